"""GPU check, for when a GPU is lent: training and serving a ~1B model on one GPU, with our own images' code.

    python benchmarks/gpu_check.py --tokenizer DIR --faq CSV --out DIR [--size 1b|tiny] [--write]

(`--faq`: the Amazon SageMaker FAQ CSV, which `scripts/fetch_faq_dataset.py` downloads.)

Training: `containers/train/train` (the training image's entry point) runs LoRA and full fine-tuning of a
Llama-shaped ~1.2B model under DeepSpeed ZeRO-3 in bf16 on the FAQ data, and we read its tokens/s from its
own log lines, then compute model FLOPs utilisation (MFU) against the GPU's dense bf16 peak.
Serving: `containers/serve/serve` (gunicorn + our batching engine) on the same model in bf16, output
tokens/s at 1, 8 and 32 concurrent clients, 128 new tokens each.

No model hub is reachable from the GPU machine, so the weights are random, built from a config (the
Llama 3.2 1B shape with SmolLM2's 49k vocabulary and its tokenizer). Throughput does not depend on the
weights' values; answer quality is not measured here. `--size tiny` runs the same steps on a CPU in seconds,
to check this script before spending GPU time. Writes results.json and section.md to --out, and with
--write the `gpu` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import write_section

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "containers" / "train" / "train"

SHAPES = {
    # Llama 3.2 1B's shape (16 layers, d=2048, GQA 32/8 heads, MLP 8192), untied head, SmolLM2's vocabulary.
    "1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    ),
}
# Dense bf16 peak (no sparsity) by device name, from NVIDIA's data sheets (SXM parts).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, required=True, help="a tokenizer directory (SmolLM2's)")
    parser.add_argument(
        "--faq",
        type=Path,
        required=True,
        metavar="PATH",
        help="the Amazon SageMaker FAQ CSV to train on; scripts/fetch_faq_dataset.py downloads it",
    )
    parser.add_argument("--out", type=Path, required=True, help="where results.json, section.md and logs go")
    parser.add_argument("--work", type=Path, default=None, help="scratch space for models and jobs (default: OUT/work)")
    parser.add_argument("--size", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per training run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: lora, full, serve")
    parser.add_argument("--write", action="store_true", help="also rewrite the gpu section of docs/benchmarks.md")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / "work"
    skip = set(filter(None, args.skip.split(",")))
    model_dir, params = build_model(args.size, args.tokenizer, work / "base-model")
    results = {"device": device_name(), "size": args.size, "parameters": params, "training": {}, "serving": {}}
    print(f"device: {results['device']}; model: {params['total'] / 1e9:.3f} B parameters", flush=True)
    if "attention" not in skip and gpu():
        results["attention"] = attempt(attention_probe)
        print(f"attention: {json.dumps(results['attention'])}", flush=True)
    for method in ("lora", "full"):
        if method not in skip:
            # Each part on its own: one that fails is reported and the others still run (GPU time is scarce).
            results["training"][method] = attempt(train, method, model_dir, args, work / f"job-{method}", params)
            print(f"{method}: {json.dumps(results['training'][method])}", flush=True)
            save(args.out, results)
    if "serve" not in skip:
        results["serving"] = attempt(serve, model_dir, args)
        save(args.out, results)
    section = render(results, args)
    (args.out / "section.md").write_text(section + "\n")
    print(section)
    if args.write:
        write_section("gpu", section)
    shutil.rmtree(work, ignore_errors=True)


def attempt(part, *args) -> dict:
    try:
        return part(*args)
    except Exception as e:  # recorded in the results, and the run goes on
        print(f"{part.__name__} failed: {e}", flush=True)
        return {"error": f"{type(e).__name__}: {e}"[-2000:]}


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def build_model(size: str, tokenizer_dir: Path, target: Path) -> tuple[Path, dict]:
    """A Llama-shaped model with random weights, saved in bf16 next to the tokenizer it will be trained with."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        rope_theta=500000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **SHAPES[size],
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, do_sample=False)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    params = {
        "total": total,
        "non_embedding": total - embedding,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
    }
    del model
    return target, params


def train(method: str, model_dir: Path, args, job_dir: Path, params: dict) -> dict:
    """One training job through the image's entry point, in a job tree of its own."""
    shutil.rmtree(job_dir, ignore_errors=True)
    config = job_dir / "input" / "config"
    config.mkdir(parents=True)
    (job_dir / "input" / "data" / "train").mkdir(parents=True)
    shutil.copy(args.faq, job_dir / "input" / "data" / "train" / "faq.csv")
    hyperparameters = {
        "model_id": str(model_dir),
        "method": method,
        "deepspeed": "zero3",
        "precision": "bf16" if gpu() else "fp32",
        "max_steps": args.steps,
        "per_device_batch_size": args.batch_size,
        "logging_steps": 5,
        "learning_rate": 2e-4 if method == "lora" else 2e-5,
        # No checkpoints mid-run (a full ZeRO-3 checkpoint of this model is ~14 GB); a short evaluation only:
        # the weights are random, so answer quality means nothing here.
        "save_steps": 100000,
        "eval_base_model": False,
        "eval_max_samples": 4,
        "eval_train_samples": 0,
        "eval_max_new_tokens": 16,
    }
    (config / "hyperparameters.json").write_text(json.dumps({k: str(v) for k, v in hyperparameters.items()}))
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(job_dir), "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(TRAIN)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    log = proc.stdout + proc.stderr
    (args.out / f"train-{method}.log").write_text(log)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{method} training failed ({proc.returncode}); log in {args.out}/train-{method}.log:\n" + log[-3000:]
        )
    done = re.search(r"training done: (\d+) steps, (\d+) s, ([\d.]+) tokens/s", log)
    interval_rates = [float(r) for r in re.findall(r"tokens_per_second=([\d.]+)", log)]
    steady = statistics.median(interval_rates[1:]) if len(interval_rates) > 1 else float(done.group(3))
    memory = re.search(r"peak GPU memory: ([\d.]+) GiB allocated", log)
    # Model FLOPs per trained token: 6N for full fine-tuning (forward 2N, backward 4N); 4N for LoRA, whose
    # frozen weights get input gradients but no weight gradients. N excludes the embedding lookup.
    flops_per_token = (6 if method == "full" else 4) * params["non_embedding"]
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name()), None)
    return {
        "steps": int(done.group(1)),
        "tokens_per_s_whole_run": float(done.group(3)),
        "tokens_per_s_steady": steady,
        "job_wall_s": round(wall, 1),
        "peak_gpu_memory_gib": float(memory.group(1)) if memory else None,
        "mfu": steady * flops_per_token / peak if peak else None,
        "flops_per_token": flops_per_token,
        "batch_size": args.batch_size,
    }


def attention_probe() -> dict:
    """Milliseconds per attention call on shapes that change every call (as in decoding and length-grouped
    training), with PyTorch's default backend choice and with cuDNN's backend switched off; see train()."""
    import contextlib

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch, heads, head_dim, lengths = 8, 32, 64, range(200, 232)
    options = {
        "default": None,
        "without_cudnn": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    }
    kv = [torch.randn(batch, heads, lengths[-1], head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    results = {}
    for label, backends in options.items():
        for case, query_len in (("decode_masked", 1), ("train_masked_fwd_bwd", None)):
            torch.cuda.synchronize()
            started = time.perf_counter()
            for length in lengths:
                q_len = query_len or length
                q = torch.randn(
                    batch, heads, q_len, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=query_len is None
                )
                mask = torch.ones(batch, 1, q_len, length, dtype=torch.bool, device="cuda").tril(length - q_len)
                mask[0, :, :, :8] = False  # left padding in one row, as in a mixed batch
                with sdpa_kernel(backends) if backends else contextlib.nullcontext():
                    out = F.scaled_dot_product_attention(q, kv[0][:, :, :length], kv[1][:, :, :length], attn_mask=mask)
                    if query_len is None:
                        out.sum().backward()
            torch.cuda.synchronize()
            results[f"{label}_{case}_ms"] = (time.perf_counter() - started) / len(lengths) * 1000
    return results


def gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def serve(model_dir: Path, args) -> dict:
    from serve_throughput import PROMPTS, Server

    results = {}
    with Server(model_dir) as server:
        results["startup_s"] = round(server.startup_s, 1)
        server.generate(PROMPTS[0], 8)
        for clients in (int(c) for c in args.concurrency.split(",")):
            per_client = 4 if clients == 1 else 2

            def client(i: int, per_client=per_client, clients=clients) -> list[tuple[dict, float]]:
                out = []
                for k in range(per_client):
                    started = time.perf_counter()
                    reply = server.generate(PROMPTS[(i + k * clients) % len(PROMPTS)], args.new_tokens)
                    out.append((reply, time.perf_counter() - started))
                return out

            with ThreadPoolExecutor(max_workers=clients) as pool:
                started = time.perf_counter()
                replies = [r for rs in pool.map(client, range(clients)) for r in rs]
                elapsed = time.perf_counter() - started
            tokens = sum(reply["details"]["generated_tokens"] for reply, _ in replies)
            latencies = sorted(latency for _, latency in replies)
            results[str(clients)] = {
                "tokens_per_s": tokens / elapsed,
                "requests": len(replies),
                "tokens": tokens,
                "latency_p50_s": statistics.median(latencies),
                "latency_max_s": latencies[-1],
            }
            print(f"serve c={clients}: {json.dumps(results[str(clients)])}", flush=True)
    return results


def save(out: Path, results: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def render(results: dict, args) -> str:
    params = results["parameters"]
    lines = [
        f"Device: {results['device']}, one GPU. Model: Llama-shaped, {params['total'] / 1e9:.2f} B parameters "
        f"({params['layers']} layers, d={params['hidden']}), random weights (no model hub on that machine), "
        "bf16. Command: `python benchmarks/gpu_check.py --tokenizer DIR --faq Amazon_SageMaker_FAQs.csv "
        f"--out DIR --write` (size {results['size']}).",
        "",
        "| training (containers/train/train, DeepSpeed ZeRO-3, bf16) | tokens/s, steady | tokens/s, whole run "
        "| MFU | peak GPU memory |",
        "|---|---|---|---|---|",
    ]
    for method, r in results["training"].items():
        if "error" in r:
            lines.append(f"| {method} | failed: {r['error'][:200]} | | | |")
            continue
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "n/a"
        memory = f"{r['peak_gpu_memory_gib']:.1f} GiB" if r["peak_gpu_memory_gib"] is not None else "n/a"
        lines.append(
            f"| {method}, batch {r['batch_size']}, {r['steps']} steps, FAQ CSV | {r['tokens_per_s_steady']:.0f} "
            f"| {r['tokens_per_s_whole_run']:.0f} | {mfu} | {memory} |"
        )
    probe = results.get("attention")
    if probe and "error" not in probe:
        lines += [
            "",
            "| attention call, new shape each call (ms per call) | PyTorch's default backend | cuDNN backend off |",
            "|---|---|---|",
        ]
        for case in ("decode_masked", "train_masked_fwd_bwd"):
            lines.append(
                f"| {case.replace('_', ' ')} | {probe[f'default_{case}_ms']:.2f} "
                f"| {probe[f'without_cudnn_{case}_ms']:.2f} |"
            )
    s = results["serving"]
    if s.get("error"):
        lines += ["", f"Serving failed: {s['error'][:300]}"]
    elif s:
        lines += [
            "",
            f"| serving (containers/serve/serve, bf16), {args.new_tokens} new tokens per request "
            "| output tokens/s | latency p50 | requests |",
            "|---|---|---|---|",
        ]
        for key, r in s.items():
            if key.isdigit():
                lines.append(
                    f"| {key} concurrent client(s) | {r['tokens_per_s']:.0f} | {r['latency_p50_s']:.2f} s "
                    f"| {r['requests']} |"
                )
        lines.append(f"| `serve` start to first 200 from /ping | {s['startup_s']} s | | |")
    lines += [
        "",
        "Tokens/s in training counts non-padding input tokens; 'steady' is the median of the per-log-interval "
        "rates after the first (start-up excluded). MFU = tokens/s x model FLOPs per token / the GPU's dense bf16 "
        "peak; model FLOPs per token are 6N for full fine-tuning and 4N for LoRA (frozen weights get no weight "
        "gradient), N the non-embedding parameters; attention's sequence-length term is left out (sequences "
        "here are a few hundred tokens).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
