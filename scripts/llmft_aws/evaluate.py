"""A/B evaluation of a live endpoint: each validation question to each variant, scored like training does.

    scripts/llmft-aws evaluate --endpoint faq-assistant --data validation.csv [--variants tuned base] \
        [--max-samples 50] [--max-new-tokens 128] [--report runs/ab-report]

Every request pins its variant with `TargetVariant`, so both models answer the same questions. Answers are
scored with the training image's own code (containers/train/src/trainer/evaluation.py: ROUGE-L, exact match,
latency percentiles), and the result is written as REPORT/report.md, REPORT/scores.png (bar chart) and
REPORT/results.json (every answer, for a closer look). Works against a real endpoint or the local endpoint
emulator (AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME=http://127.0.0.1:8081).
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmft_aws.context import AwsContext, CommandError, UsageError, log

REPO = Path(__file__).resolve().parents[2]

QUESTION_KEYS = ("question", "prompt", "instruction", "input")
ANSWER_KEYS = ("answer", "response", "output", "completion")


@dataclass
class VariantResult:
    variant: str
    answers: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    scores: dict = field(default_factory=dict)
    latency: dict = field(default_factory=dict)


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """(question, answer) pairs from a CSV (header optional: else the first two columns) or JSONL file."""
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".jsonl":
        pairs = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            record = {k.lower(): v for k, v in json.loads(line).items()}
            q = next((record[k] for k in QUESTION_KEYS if k in record), None)
            a = next((record[k] for k in ANSWER_KEYS if k in record), None)
            if q is None or a is None:
                raise UsageError(f"{path}:{number}: needs a question and an answer field")
            pairs.append((str(q).strip(), str(a).strip()))
        return pairs
    if path.suffix.lower() != ".csv":
        raise UsageError(f"{path}: use a .csv or .jsonl validation file")
    rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0]]
    qi = next((header.index(k) for k in QUESTION_KEYS if k in header), None)
    ai = next((header.index(k) for k in ANSWER_KEYS if k in header), None)
    if qi is not None and ai is not None:
        rows = rows[1:]
    else:
        qi, ai = 0, 1
    return [(r[qi].strip(), r[ai].strip()) for r in rows if len(r) > max(qi, ai)]


def answer_text(body: bytes) -> str:
    """The generated text from our serving container's answer (TGI shape: an object or a list of them)."""
    payload = json.loads(body)
    if isinstance(payload, list):
        payload = payload[0] if payload else {}
    if not isinstance(payload, dict) or "generated_text" not in payload:
        raise ValueError(f"no generated_text in the answer: {body[:200]!r}")
    return str(payload["generated_text"]).strip()


def ask_variant(runtime, endpoint: str, variant: str, questions: list[str], max_new_tokens: int) -> VariantResult:
    result = VariantResult(variant)
    for number, question in enumerate(questions, 1):
        body = json.dumps({"inputs": question, "parameters": {"max_new_tokens": max_new_tokens, "do_sample": False}})
        t0 = time.perf_counter()
        try:
            response = runtime.invoke_endpoint(
                EndpointName=endpoint,
                TargetVariant=variant,
                Body=body,
                ContentType="application/json",
                Accept="application/json",
            )
            raw = response["Body"].read()
            elapsed = time.perf_counter() - t0
            invoked = response.get("InvokedProductionVariant")
            if invoked and invoked != variant:
                raise CommandError(f"asked for variant {variant} but {invoked} answered: TargetVariant ignored?")
            result.answers.append(answer_text(raw))
            result.latencies_s.append(elapsed)
        except CommandError:
            raise
        except Exception as e:
            result.answers.append("")
            result.errors.append(f"question {number}: {type(e).__name__}: {e}")
        if number % 10 == 0 or number == len(questions):
            log(f"{variant}: answered {number}/{len(questions)}")
    return result


def evaluate(
    runtime, endpoint: str, variants: list[str], pairs: list[tuple[str, str]], max_new_tokens: int
) -> list[VariantResult]:
    # The A/B scores must be the very numbers the training job reports, so the scoring code is the training
    # image's own module, not a copy: its source folder goes on the path (scoring imports no torch).
    from trainer.evaluation import latency_summary, score_answers

    questions = [q for q, _ in pairs]
    references = [a for _, a in pairs]
    results = []
    for variant in variants:
        result = ask_variant(runtime, endpoint, variant, questions, max_new_tokens)
        result.scores = score_answers(result.answers, references)
        result.latency = latency_summary(result.latencies_s)
        results.append(result)
    return results


def write_chart(results: list[VariantResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = [r.variant for r in results]
    fig, (quality, latency) = plt.subplots(1, 2, figsize=(9, 3.6))
    width = 0.38
    xs = range(len(names))
    quality.bar([x - width / 2 for x in xs], [r.scores["rouge_l"] for r in results], width, label="ROUGE-L")
    quality.bar([x + width / 2 for x in xs], [r.scores["exact_match"] for r in results], width, label="exact match")
    quality.set_xticks(list(xs), names)
    quality.set_ylim(0, 1)
    quality.set_title("answer quality (higher is better)")
    quality.legend(loc="upper right", fontsize=8)
    latency.bar(names, [r.latency.get("p50_ms", 0) for r in results], color="tab:gray", label="p50")
    latency.scatter(names, [r.latency.get("p90_ms", 0) for r in results], color="black", zorder=3, label="p90")
    latency.set_title("latency, ms (lower is better)")
    latency.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    results: list[VariantResult], endpoint: str, data: Path, out_dir: Path, pairs: list[tuple[str, str]]
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_chart(results, out_dir / "scores.png")
    lines = [
        f"# A/B evaluation of endpoint `{endpoint}`",
        "",
        f"{len(pairs)} questions from `{data.name}`, sent to each variant with `TargetVariant`; scored with the "
        "training image's evaluation (ROUGE-L F1 with stemming, SQuAD-style exact match). Latency is the "
        "client's round trip.",
        "",
        "| variant | ROUGE-L | exact match | p50 ms | p90 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lat = r.latency
        lines.append(
            f"| {r.variant} | {r.scores['rouge_l']:.3f} | {r.scores['exact_match']:.3f} | "
            f"{lat.get('p50_ms', float('nan')):.0f} | {lat.get('p90_ms', float('nan')):.0f} | "
            f"{lat.get('p99_ms', float('nan')):.0f} | {len(r.errors)} |"
        )
    best = max(results, key=lambda r: (r.scores["rouge_l"], r.scores["exact_match"]))
    lines += ["", f"Highest ROUGE-L: **{best.variant}**.", "", "![scores](scores.png)", ""]
    if any(r.errors for r in results):
        lines += ["## Errors", ""]
        for r in results:
            lines += [f"- {r.variant}: {e}" for e in r.errors[:20]]
        lines.append("")
    lines += [
        "## Sample answers",
        "",
        "| question | reference | " + " | ".join(r.variant for r in results) + " |",
        "|---|---|" + "---|" * len(results),
    ]
    for i, (q, a) in enumerate(pairs[:5]):
        cells = [q, a, *(r.answers[i] for r in results)]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ")[:160] for c in cells) + " |")
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out_dir / "results.json").write_text(
        json.dumps(
            {
                "endpoint": endpoint,
                "data": str(data),
                "questions": [q for q, _ in pairs],
                "references": [a for _, a in pairs],
                "variants": {
                    r.variant: {"scores": r.scores, "latency": r.latency, "errors": r.errors, "answers": r.answers}
                    for r in results
                },
            },
            indent=2,
        )
    )
    return report


def variants_of(ctx: AwsContext, endpoint: str) -> list[str]:
    try:
        described = ctx.client("sagemaker").describe_endpoint(EndpointName=endpoint)
    except Exception as e:
        raise CommandError(f"cannot list the variants of {endpoint} ({e}); pass --variants") from e
    return [v["VariantName"] for v in described["ProductionVariants"]]


def add_arguments(parser) -> None:
    parser.add_argument("--endpoint", required=True, help="endpoint name")
    parser.add_argument("--data", type=Path, required=True, help="validation set: .csv (question,answer) or .jsonl")
    parser.add_argument("--variants", nargs="+", help="variants to compare (default: all of the endpoint's)")
    parser.add_argument("--max-samples", type=int, default=50, help="questions to send (default 50)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="answer length cap (default 128)")
    parser.add_argument(
        "--report",
        type=Path,
        default=Path("runs/ab-report"),
        help="output folder (default runs/ab-report, which git ignores)",
    )


def run(ctx: AwsContext, args) -> int:
    pairs = read_pairs(args.data)[: args.max_samples]
    if not pairs:
        raise UsageError(f"{args.data}: no question/answer pairs")
    if ctx.dry_run:
        variants = args.variants or ["<each variant of the endpoint>"]
        for v in variants:
            print(
                f"[dry-run] {len(pairs)} x sagemaker-runtime.invoke_endpoint EndpointName={args.endpoint} "
                f"TargetVariant={v}"
            )
        return 0
    variants = args.variants or variants_of(ctx, args.endpoint)
    from botocore.config import Config

    # One attempt per question: a retried answer would hide errors and skew latency.
    runtime = ctx.client(
        "sagemaker-runtime", config=Config(retries={"max_attempts": 1, "mode": "standard"}, read_timeout=120)
    )
    results = evaluate(runtime, args.endpoint, variants, pairs, args.max_new_tokens)
    report = write_report(results, args.endpoint, args.data, args.report, pairs)
    for r in results:
        log(
            f"{r.variant}: ROUGE-L {r.scores['rouge_l']:.3f}, exact match {r.scores['exact_match']:.3f}, "
            f"p50 {r.latency.get('p50_ms', float('nan')):.0f} ms, {len(r.errors)} errors"
        )
    print(report)
    return 1 if all(len(r.errors) == len(pairs) for r in results) else 0
