"""A/B evaluation of a live endpoint: each validation question to each variant, scored like training does.

    scripts/llmft-aws evaluate --endpoint faq-assistant --data validation.csv [--variants tuned base] \
        [--max-samples 50] [--max-new-tokens 128] [--gold-is-question] [--report runs/ab-report]

Every request pins its variant with `TargetVariant`, so both models answer the same questions. Answers are
scored with the training image's own code (containers/train/src/trainer/evaluation.py: ROUGE-L, exact match,
latency percentiles), and the result is written as REPORT/report.md, REPORT/scores.png (bar chart) and
REPORT/results.json (every answer, for a closer look). Works against a real endpoint or the local endpoint
emulator (AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME=http://127.0.0.1:8081).

Retrieval: each variant is first asked as a client asks it (retrieval on where its artifact has an index). A
variant whose replies carry `sources` has an index, and is asked again with `"parameters": {"retrieval": false}`,
so the report has a column per way of answering: `base`, `tuned (no retrieval)` and `tuned + retrieval`.

Recall of the retrieval columns: a reply's sources carry each passage's id, title, source and score, not its
text, so the gold passage of a question is recognised by its title. A training row's passage is titled with its
question; a row of --data names the title of its gold passage in a `gold_title` field (JSONL) or column (CSV),
e.g. a rewording of a training question names that question; `--gold-is-question` says every question of --data
is itself a training question (its own gold title). Recall@k is the share of those rows whose gold title is
among the sources used; rows without a gold title (held-out questions, passages from the documents channel,
whose titles are file and heading names) are not counted, and with none the report says recall was not measured.
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
GOLD_TITLE_KEY = "gold_title"  # optional: the title of the passage that answers the row (see the docstring)


@dataclass(frozen=True)
class Row:
    question: str
    answer: str
    gold_title: str | None = None


@dataclass
class VariantResult:
    variant: str
    # None: the variant has no retrieval index (its replies carry no sources); True / False: it has one, and this
    # is its answering with retrieval (as clients ask) / with `parameters.retrieval` false.
    retrieval: bool | None = None
    answers: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sources: list[list[dict] | None] = field(default_factory=list)  # per question: the reply's sources, if any
    scores: dict = field(default_factory=dict)
    latency: dict = field(default_factory=dict)
    recall: dict = field(default_factory=dict)  # retrieval on: k, recall_at_k (None: no gold), questions_with_gold

    @property
    def label(self) -> str:
        """The report's name for this column."""
        return {None: self.variant, False: f"{self.variant} (no retrieval)", True: f"{self.variant} + retrieval"}[
            self.retrieval
        ]

    @property
    def has_sources(self) -> bool:
        return any(s is not None for s in self.sources)


def read_rows(path: Path) -> list[Row]:
    """Question/answer rows (and each one's gold passage title, when given) from a CSV (header optional: else the
    first two columns) or JSONL file."""
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            record = {k.lower(): v for k, v in json.loads(line).items()}
            q = next((record[k] for k in QUESTION_KEYS if k in record), None)
            a = next((record[k] for k in ANSWER_KEYS if k in record), None)
            if q is None or a is None:
                raise UsageError(f"{path}:{number}: needs a question and an answer field")
            gold = record.get(GOLD_TITLE_KEY)
            rows.append(Row(str(q).strip(), str(a).strip(), str(gold).strip() if gold else None))
        return rows
    if path.suffix.lower() != ".csv":
        raise UsageError(f"{path}: use a .csv or .jsonl validation file")
    records = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
    if not records:
        return []
    header = [c.strip().lower() for c in records[0]]
    qi = next((header.index(k) for k in QUESTION_KEYS if k in header), None)
    ai = next((header.index(k) for k in ANSWER_KEYS if k in header), None)
    gi = header.index(GOLD_TITLE_KEY) if GOLD_TITLE_KEY in header else None
    if qi is not None and ai is not None:
        records = records[1:]
    else:
        qi, ai, gi = 0, 1, None
    return [
        Row(r[qi].strip(), r[ai].strip(), (r[gi].strip() or None) if gi is not None and gi < len(r) else None)
        for r in records
        if len(r) > max(qi, ai)
    ]


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """(question, answer) pairs from a CSV (header optional: else the first two columns) or JSONL file."""
    return [(row.question, row.answer) for row in read_rows(path)]


def parse_reply(body: bytes) -> tuple[str, list[dict] | None]:
    """The generated text from our serving container's answer (TGI shape: an object or a list of them), and the
    passages it was given (`sources`; None when the reply has none: no index, or retrieval off)."""
    payload = json.loads(body)
    if isinstance(payload, list):
        payload = payload[0] if payload else {}
    if not isinstance(payload, dict) or "generated_text" not in payload:
        raise ValueError(f"no generated_text in the answer: {body[:200]!r}")
    sources = payload.get("sources")
    return str(payload["generated_text"]).strip(), list(sources) if isinstance(sources, list) else None


def answer_text(body: bytes) -> str:
    """The generated text from our serving container's answer (TGI shape: an object or a list of them)."""
    return parse_reply(body)[0]


def gold_in_sources(gold_title: str, sources: list[dict]) -> bool:
    """Whether the passage titled `gold_title` is among a reply's sources (titles compared with whitespace
    normalised: the index holds the training rows' cleaned questions)."""
    gold = " ".join(gold_title.split())
    return any(" ".join(str(s.get("title", "")).split()) == gold for s in sources)


def ask_variant(
    runtime, endpoint: str, variant: str, questions: list[str], max_new_tokens: int, retrieval: bool | None = None
) -> VariantResult:
    """Every question to one variant; `retrieval=False` asks with `parameters.retrieval` false (None and True ask
    as clients do, with the variant's default)."""
    result = VariantResult(variant, retrieval)
    parameters = {"max_new_tokens": max_new_tokens, "do_sample": False}
    if retrieval is False:
        parameters["retrieval"] = False
    for number, question in enumerate(questions, 1):
        body = json.dumps({"inputs": question, "parameters": parameters})
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
            text, sources = parse_reply(raw)
            result.answers.append(text)
            result.sources.append(sources)
            result.latencies_s.append(elapsed)
        except CommandError:
            raise
        except Exception as e:
            result.answers.append("")
            result.sources.append(None)
            result.errors.append(f"question {number}: {type(e).__name__}: {e}")
        if number % 10 == 0 or number == len(questions):
            log(f"{result.label}: answered {number}/{len(questions)}")
    return result


def evaluate(
    runtime,
    endpoint: str,
    variants: list[str],
    pairs: list[tuple[str, str]],
    max_new_tokens: int,
    gold_titles: list[str | None] | None = None,
) -> list[VariantResult]:
    """Each variant's answers, scored; a variant whose replies carry sources (it has a retrieval index) answers
    twice: without retrieval, then with it (the result listed after). `gold_titles[i]` names the passage that
    answers question i (None: unknown), for recall."""
    # The A/B scores must be the very numbers the training job reports, so the scoring code is the training
    # image's own module, not a copy: its source folder goes on the path (scoring imports no torch).
    from trainer.evaluation import latency_summary, recall, score_answers

    questions = [q for q, _ in pairs]
    references = [a for _, a in pairs]
    golds = gold_titles or [None] * len(pairs)
    results = []
    for variant in variants:
        as_asked = ask_variant(runtime, endpoint, variant, questions, max_new_tokens)
        asked = [as_asked]
        if as_asked.has_sources:
            log(f"{variant}: its replies carry sources (a retrieval index); asking again with retrieval off")
            as_asked.retrieval = True
            asked.insert(0, ask_variant(runtime, endpoint, variant, questions, max_new_tokens, retrieval=False))
        for result in asked:
            result.scores = score_answers(result.answers, references)
            result.latency = latency_summary(result.latencies_s)
            if result.retrieval:
                hits = [
                    gold_in_sources(gold, sources) if gold and sources is not None else None
                    for gold, sources in zip(golds, result.sources, strict=True)
                ]
                result.recall = {
                    "k": max((len(s) for s in result.sources if s is not None), default=0),
                    "recall_at_k": recall(hits),
                    "questions_with_gold": sum(hit is not None for hit in hits),
                    "gold_retrieved": hits,
                }
        results.extend(asked)
    return results


def _recall_cell(result: VariantResult) -> str:
    value = result.recall.get("recall_at_k")
    return "-" if value is None else f"{value:.3f}"


def write_chart(results: list[VariantResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = [r.label for r in results]
    with_recall = any(r.recall.get("recall_at_k") is not None for r in results)
    fig, (quality, latency) = plt.subplots(1, 2, figsize=(10 if len(results) > 2 else 9, 3.6))
    series = [
        ("ROUGE-L", [r.scores["rouge_l"] for r in results]),
        ("exact match", [r.scores["exact_match"] for r in results]),
    ]
    if with_recall:
        k = max(r.recall.get("k", 0) for r in results)
        series.append((f"recall@{k}", [r.recall.get("recall_at_k") or 0.0 for r in results]))
    width = 0.8 / len(series)
    xs = range(len(names))
    for i, (name, values) in enumerate(series):
        quality.bar([x + (i - (len(series) - 1) / 2) * width for x in xs], values, width, label=name)
    quality.set_xticks(list(xs), names, fontsize=8)
    quality.set_ylim(0, 1)
    quality.set_title("answer quality (higher is better)")
    quality.legend(loc="upper right", fontsize=8)
    latency.bar(names, [r.latency.get("p50_ms", 0) for r in results], color="tab:gray", label="p50")
    latency.scatter(names, [r.latency.get("p90_ms", 0) for r in results], color="black", zorder=3, label="p90")
    latency.tick_params(axis="x", labelsize=8)
    latency.set_title("latency, ms (lower is better)")
    latency.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    results: list[VariantResult],
    endpoint: str,
    data: Path,
    out_dir: Path,
    pairs: list[tuple[str, str]],
    gold_titles: list[str | None] | None = None,
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_chart(results, out_dir / "scores.png")
    any_retrieval = any(r.retrieval is not None for r in results)
    lines = [
        f"# A/B evaluation of endpoint `{endpoint}`",
        "",
        f"{len(pairs)} questions from `{data.name}`, sent to each variant with `TargetVariant`; scored with the "
        "training image's evaluation (ROUGE-L F1 with stemming, SQuAD-style exact match). Latency is the "
        "client's round trip.",
        "",
    ]
    if any_retrieval:
        lines += [
            "A variant whose replies carry `sources` has a retrieval index: it answered twice, with retrieval off "
            "(`parameters.retrieval: false`) and on (as clients ask). Recall@k: the share of questions with a known "
            "gold passage (the passage titled with a training question; see `gold_title` and `--gold-is-question`) "
            "whose gold passage was among the k sources of the reply"
            + (
                "."
                if any(r.recall.get("recall_at_k") is not None for r in results)
                else "; not measured here: no question of the data names its gold passage."
            ),
            "",
            "| variant | retrieval | ROUGE-L | exact match | recall@k | p50 ms | p90 ms | p99 ms | errors |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
    else:
        lines += [
            "| variant | ROUGE-L | exact match | p50 ms | p90 ms | p99 ms | errors |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
    for r in results:
        lat = r.latency
        mode = {None: "no index", False: "off", True: f"on (k={r.recall.get('k', 0)})"}[r.retrieval]
        retrieval_cells = f"{mode} | " if any_retrieval else ""
        recall_cell = f"{_recall_cell(r)} | " if any_retrieval else ""
        lines.append(
            f"| {r.label} | {retrieval_cells}{r.scores['rouge_l']:.3f} | {r.scores['exact_match']:.3f} | {recall_cell}"
            f"{lat.get('p50_ms', float('nan')):.0f} | {lat.get('p90_ms', float('nan')):.0f} | "
            f"{lat.get('p99_ms', float('nan')):.0f} | {len(r.errors)} |"
        )
    best = max(results, key=lambda r: (r.scores["rouge_l"], r.scores["exact_match"]))
    lines += ["", f"Highest ROUGE-L: **{best.label}**.", "", "![scores](scores.png)", ""]
    if any(r.errors for r in results):
        lines += ["## Errors", ""]
        for r in results:
            lines += [f"- {r.label}: {e}" for e in r.errors[:20]]
        lines.append("")
    lines += [
        "## Sample answers",
        "",
        "| question | reference | " + " | ".join(r.label for r in results) + " |",
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
                "gold_titles": gold_titles or [None] * len(pairs),
                "variants": {
                    r.label: {
                        "variant": r.variant,
                        "retrieval": r.retrieval,
                        "scores": r.scores,
                        "latency": r.latency,
                        "errors": r.errors,
                        "answers": r.answers,
                        **({"sources": r.sources, "recall": r.recall} if r.retrieval is not None else {}),
                    }
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
        "--gold-is-question",
        action="store_true",
        help="the questions are the index's own training questions: each one's gold passage is the one titled "
        "with it, for recall (rows may instead name theirs in a gold_title field)",
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=Path("runs/ab-report"),
        help="output folder (default runs/ab-report, which git ignores)",
    )


def run(ctx: AwsContext, args) -> int:
    rows = read_rows(args.data)[: args.max_samples]
    if not rows:
        raise UsageError(f"{args.data}: no question/answer pairs")
    pairs = [(row.question, row.answer) for row in rows]
    gold_titles = [row.gold_title or (row.question if args.gold_is_question else None) for row in rows]
    if ctx.dry_run:
        variants = args.variants or ["<each variant of the endpoint>"]
        for v in variants:
            print(
                f"[dry-run] {len(pairs)} x sagemaker-runtime.invoke_endpoint EndpointName={args.endpoint} "
                f"TargetVariant={v} (and {len(pairs)} more with parameters.retrieval=false if its replies carry "
                "sources)"
            )
        return 0
    variants = args.variants or variants_of(ctx, args.endpoint)
    from botocore.config import Config

    # One attempt per question: a retried answer would hide errors and skew latency.
    runtime = ctx.client(
        "sagemaker-runtime", config=Config(retries={"max_attempts": 1, "mode": "standard"}, read_timeout=120)
    )
    results = evaluate(runtime, args.endpoint, variants, pairs, args.max_new_tokens, gold_titles)
    report = write_report(results, args.endpoint, args.data, args.report, pairs, gold_titles)
    for r in results:
        recall = r.recall.get("recall_at_k")
        log(
            f"{r.label}: ROUGE-L {r.scores['rouge_l']:.3f}, exact match {r.scores['exact_match']:.3f}, "
            + (f"recall@{r.recall['k']} {recall:.3f}, " if recall is not None else "")
            + f"p50 {r.latency.get('p50_ms', float('nan')):.0f} ms, {len(r.errors)} errors"
        )
    print(report)
    return 1 if all(len(r.errors) == len(pairs) for r in results) else 0
