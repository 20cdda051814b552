#!/usr/bin/env python3
"""What quantization costs in answers: one artifact served by each engine, the same questions, ROUGE-L side by side.

    .venv/bin/python benchmarks/gguf_quality.py --model-dir runs/job/model [--limit 48] [--no-write]

The artifact (a training job's model/ directory) holds fp32 safetensors and the GGUF the job wrote
(`gguf_quantization`, q8_0 by default). Both are served in this process through the server's own app
(serve.create_app, the Flask test client: the chat template, retrieval when the artifact has an index, greedy
decoding, the artifact's stops), once with SERVE_ENGINE=transformers (the fp32 weights) and once with
SERVE_ENGINE=llamacpp (the GGUF). The questions are the job's training questions, read from the artifact's
retrieval index (one passage per training row: its question and answer) unless --faq names a CSV of
question/answer rows. With --more-ggufs (default q4_0), the same weights are also written as those GGUFs, as
training would write them, and answer on llama.cpp too. ROUGE-L against the reference answers, as the training
image's evaluation computes it (trainer.evaluation.rouge_l). Issue 23's target: the GGUF within 0.02 of fp32.
Writes the `gguf-quality` section of docs/benchmarks.md unless --no-write.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import with_gguf, write_section

TARGET_ROUGE_GAP = 0.02
CLIENTS = 8  # questions in flight at once: both engines batch them


def questions_of(model_dir: Path, faq: Path | None, limit: int) -> list[tuple[str, str]]:
    if faq is not None:
        from trainer.data import load_channel

        examples, _ = load_channel(faq.parent) if faq.is_file() else load_channel(faq)
        pairs = [(e.question, e.answer) for e in examples]
    else:
        passages = model_dir / "retrieval" / "passages.jsonl"
        if not passages.is_file():
            raise SystemExit(f"{model_dir} has no retrieval index to read its training questions from: use --faq")
        rows = [json.loads(line) for line in passages.read_text().splitlines() if line.strip()]
        pairs = [(r["title"], r["text"]) for r in rows if r.get("source", "").rsplit("#", 1)[0].endswith(".csv")]
        pairs = pairs or [(r["title"], r["text"]) for r in rows]
    return pairs[:limit] if limit else pairs


def answer_all(model_dir: Path, engine: str, questions: list[str], new_tokens: int) -> dict:
    from serve import create_app
    from serve.config import ServeConfig
    from serve.predictor import Predictor

    config = ServeConfig(
        model_dir=model_dir,
        engine=engine,
        max_batch_size=CLIENTS,
        max_queue=4 * CLIENTS,
        max_new_tokens_cap=new_tokens,
        timeout_s=600,
        metrics="off",  # no EMF line per request on stdout
    )
    predictor = Predictor(config)
    started = time.perf_counter()
    predictor.load_now()
    if not predictor.ready:
        raise SystemExit(f"{engine}: {predictor.reason}")
    load_s = time.perf_counter() - started
    client = create_app(config, predictor=predictor).test_client()

    def ask(question: str) -> dict:
        body = {"inputs": question, "parameters": {"max_new_tokens": new_tokens, "do_sample": False, "details": True}}
        reply = client.post("/invocations", json=body)
        assert reply.status_code == 200, reply.get_data(as_text=True)
        return reply.get_json()[0]

    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        replies = list(pool.map(ask, questions))
    elapsed = time.perf_counter() - started
    predictor.engine.stop()
    tokens = sum(r["details"]["generated_tokens"] for r in replies)
    return {
        "answers": [r["generated_text"] for r in replies],
        "name": predictor.model_name,
        "tokens": tokens,
        "seconds": elapsed,
        "load_s": load_s,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="a training job's model/ directory")
    parser.add_argument("--faq", type=Path, help="question/answer rows (default: the artifact's training rows)")
    parser.add_argument("--limit", type=int, default=48, help="questions to ask (0: all; default 48)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument(
        "--more-ggufs",
        default="q4_0",
        help="other quantizations to write from the same artifact and answer with too, comma-separated ('' for none)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)

    from trainer.evaluation import score_answers

    manifest = json.loads((args.model_dir / "manifest.json").read_text())
    if "gguf" not in manifest:
        raise SystemExit(f"{args.model_dir}/manifest.json names no GGUF (train with gguf_quantization=q8_0)")
    pairs = questions_of(args.model_dir, args.faq, args.limit)
    questions, references = [q for q, _ in pairs], [a for _, a in pairs]
    runs = {}
    for engine in ("transformers", "llamacpp"):
        runs[engine] = answer_all(args.model_dir, engine, questions, args.new_tokens)
        runs[engine]["score"] = score_answers(runs[engine]["answers"], references)
        print(f"{engine}: ROUGE-L {runs[engine]['score']['rouge_l']:.3f}", flush=True)
    more = {}
    for quantization in [q for q in args.more_ggufs.split(",") if q]:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = with_gguf(args.model_dir, quantization, Path(tmp))
            more[quantization] = answer_all(model_dir, "llamacpp", questions, args.new_tokens)
            more[quantization]["score"] = score_answers(more[quantization]["answers"], references)
            more[quantization]["bytes"] = (model_dir / f"model.{quantization}.gguf").stat().st_size
        print(f"llamacpp on {quantization}: ROUGE-L {more[quantization]['score']['rouge_l']:.3f}", flush=True)
    same = sum(a == b for a, b in zip(runs["transformers"]["answers"], runs["llamacpp"]["answers"], strict=True))
    section = render(args, manifest, runs, len(pairs), same, more)
    print(section)
    if not args.no_write:
        write_section("gguf-quality", section)
    return 0


def render(args, manifest: dict, runs: dict, count: int, same: int, more: dict | None = None) -> str:
    gguf = manifest["gguf"]
    fp32, quantized = runs["transformers"]["score"]["rouge_l"], runs["llamacpp"]["score"]["rouge_l"]
    gap = quantized - fp32
    met = "met" if abs(gap) <= TARGET_ROUGE_GAP else "**missed**"
    source = "the artifact's training rows" if args.faq is None else f"`{args.faq.name}`"
    base = manifest.get("base_model")
    artifact = f"`{base}` fine-tuned ({manifest.get('method', '?')})" if base else f"`{args.model_dir.name}`"

    def row(engine: str, label: str, run: dict | None = None) -> str:
        run = run or runs[engine]
        return (
            f"| {label} | {run['score']['rouge_l']:.3f} | {run['score']['exact_match']:.3f} | "
            f"{run['tokens'] / run['seconds']:.1f} | {run['load_s']:.1f} s |"
        )

    return "\n".join(
        [
            f"Artifact: {artifact}, {count} questions from {source}, each answered once per engine "
            f"through the server's app (chat template, retrieval as served, greedy, up to {args.new_tokens} new "
            f"tokens, {CLIENTS} at once); {os.cpu_count()} cores. Command: `python benchmarks/gguf_quality.py "
            f"--model-dir DIR`.",
            "",
            "| weights (engine) | ROUGE-L | exact match | output tokens/s | load |",
            "|---|---:|---:|---:|---:|",
            row("transformers", "fp32 safetensors (transformers)"),
            row("llamacpp", f"{gguf['quantization']} GGUF, {gguf['bytes'] / 1e6:.0f} MB (llama.cpp)"),
            *(
                row("llamacpp", f"{q} GGUF of the same weights, {run['bytes'] / 1e6:.0f} MB (llama.cpp)", run)
                for q, run in (more or {}).items()
            ),
            "",
            f"ROUGE-L of the {gguf['quantization']} GGUF minus fp32: **{gap:+.3f}** (target within "
            f"{TARGET_ROUGE_GAP}: {met}); {same} of {count} answers identical word for word."
            + "".join(f" {q}: {run['score']['rouge_l'] - fp32:+.3f}." for q, run in (more or {}).items()),
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
