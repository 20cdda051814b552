"""What the job leaves in output/data/: evaluation report, sample answers, loss curve, data report."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)

REPORT_FILE = "eval_report.json"
REPORT_MARKDOWN_FILE = "eval_report.md"
SAMPLES_FILE = "sample_answers.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
DATA_REPORT_FILE = "data_report.json"

METRICS = ("loss", "perplexity", "rouge_l", "exact_match")
# The report's columns: the base model, the tuned model without retrieval, and, when the artifact has a retrieval
# index, the tuned model with the passages retrieved for each question in its prompt.
RETRIEVAL = "tuned_retrieval"
# And when the artifact has a GGUF: that file loaded back (its quantized weights, dequantized), asked as served,
# so the report shows what quantization cost beside the full-precision artifact.
GGUF = "gguf"
COLUMN_TITLES = {"base": "base", "tuned": "tuned", RETRIEVAL: "tuned + retrieval", GGUF: "GGUF"}
SET_TITLES = {"validation": "held-out", "train_sample": "training sample", "paraphrased": "paraphrased"}


def write_json(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(content), indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def comparison(base: dict, tuned: dict, tuned_retrieval: dict | None = None, gguf: dict | None = None) -> dict:
    """Side-by-side metrics per evaluation set: base, tuned and the difference (tuned - base).

    With `tuned_retrieval` (the tuned model's results with retrieval, trainer.evaluation.evaluate_model with
    `documents_for`), each metric also has `tuned_retrieval` and `delta_retrieval` (tuned_retrieval - base), and
    each set a `retrieval` row: k passages per question, and recall@k where the set knows its gold passages.
    Without it the table is the two-column one, with no empty third column.

    With `gguf` (the artifact's GGUF, asked as served: with retrieval when there is an index), each metric also
    has `gguf` and `delta_gguf`: gguf - the same model at full precision asked the same way (what quantization
    cost).
    """
    with_retrieval = bool(tuned_retrieval)
    full_precision = RETRIEVAL if with_retrieval else "tuned"
    table = {}
    for set_name in sorted(set(base) | set(tuned) | set(tuned_retrieval or {}) | set(gguf or {})):
        rows = {}
        for metric in METRICS:
            b = base.get(set_name, {}).get(metric)
            t = tuned.get(set_name, {}).get(metric)
            rows[metric] = {"base": b, "tuned": t, "delta": _delta(t, b)}
            if with_retrieval:
                r = tuned_retrieval.get(set_name, {}).get(metric)
                rows[metric] |= {RETRIEVAL: r, "delta_retrieval": _delta(r, b)}
            if gguf:
                q = gguf.get(set_name, {}).get(metric)
                rows[metric] |= {GGUF: q, "delta_gguf": _delta(q, rows[metric][full_precision])}
        rows["count"] = (tuned.get(set_name) or base.get(set_name) or (tuned_retrieval or {}).get(set_name) or {}).get(
            "count", 0
        )
        if with_retrieval:
            used = tuned_retrieval.get(set_name, {}).get("retrieval") or {}
            rows["retrieval"] = {
                "k": used.get("k"),
                "recall_at_k": used.get("recall_at_k"),
                "questions_with_gold": used.get("questions_with_gold", 0),
                "with_passages": used.get("with_passages"),
            }
        table[set_name] = rows
    return table


def has_retrieval(table: dict) -> bool:
    """Whether a comparison table has the third column (the tuned model with retrieval)."""
    return any(RETRIEVAL in rows["rouge_l"] for rows in table.values())


def has_gguf(table: dict) -> bool:
    """Whether a comparison table has the GGUF column."""
    return any(GGUF in rows["rouge_l"] for rows in table.values())


def columns(table: dict) -> tuple[str, ...]:
    return ("base", "tuned", *((RETRIEVAL,) if has_retrieval(table) else ()), *((GGUF,) if has_gguf(table) else ()))


def log_comparison(table: dict) -> None:
    shown = columns(table)
    for set_name, rows in table.items():
        log.info("A/B on %s (%d questions):", set_name, rows["count"])
        for metric in METRICS:
            r = rows[metric]
            log.info(
                "  %-12s %s  delta %s",
                metric,
                "  ".join(f"{COLUMN_TITLES[c]} {_fmt(r[c])}" for c in shown),
                _fmt(r["delta"]),
            )
        if "retrieval" in rows:
            log.info("  %-12s %s", f"recall@{rows['retrieval']['k']}", _fmt(rows["retrieval"]["recall_at_k"]))
        if GGUF in shown:
            log.info("  quantization cost (GGUF - full precision): rouge_l %s", _fmt(rows["rouge_l"]["delta_gguf"]))


def before_after_text(eval_report: dict) -> str:
    """The comparison of an eval_report.json as a person reads it in a terminal."""
    table = eval_report["comparison"]
    shown = columns(table)
    title = "Before / after fine-tuning" + (", and with retrieval" if RETRIEVAL in shown else "")
    quantized = (eval_report.get("gguf") or {}).get("quantization")
    if GGUF in shown:
        title += f", and as the {quantized} GGUF" if quantized else ", and as GGUF"
    lines = [title + ":"]
    for set_name, rows in table.items():
        lines.append(f"  {SET_TITLES.get(set_name, set_name)} ({rows['count']} questions)")
        for metric in ("loss", "rouge_l", "exact_match"):
            r = rows[metric]
            present = [(c, r[c]) for c in shown if r.get(c) is not None]
            if present:
                lines.append(f"    {metric:12s} " + " -> ".join(f"{COLUMN_TITLES[c]} {v:.3f}" for c, v in present))
        recall_at_k = (rows.get("retrieval") or {}).get("recall_at_k")
        if recall_at_k is not None:
            lines.append(
                f"    {'recall@' + str(rows['retrieval']['k']):12s} {recall_at_k:.3f} (gold passage retrieved)"
            )
        with_passages = (rows.get("retrieval") or {}).get("with_passages")
        if with_passages is not None and with_passages < rows["count"]:
            lines.append(
                f"    {'passages':12s} {with_passages} of {rows['count']} questions (the others below the gate)"
            )
    return "\n".join(lines)


def markdown_table(table: dict) -> str:
    """The comparison as a Markdown table: a row per question set and metric, a column per model."""
    shown = columns(table)
    header = ["questions", "metric", *(COLUMN_TITLES[c] for c in shown)]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * len(shown)]
    for set_name, rows in table.items():
        title = f"{SET_TITLES.get(set_name, set_name)} ({rows['count']})"
        for metric in ("rouge_l", "exact_match", "loss"):
            cells = [_cell(rows[metric].get(c)) for c in shown]
            lines.append(f"| {title} | {metric} | " + " | ".join(cells) + " |")
        if "retrieval" in rows and rows["retrieval"]["recall_at_k"] is not None:
            k = rows["retrieval"]["k"]
            cells = [_cell(rows["retrieval"]["recall_at_k"]) if c == RETRIEVAL else "" for c in shown]
            lines.append(f"| {title} | recall@{k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metric_lines(table: dict) -> list[str]:
    """CloudWatch-readable lines (see metric_definitions.json), from the validation set when there is one."""
    rows = table.get("validation") or table.get("train_sample")
    if not rows:
        return []
    parts = []
    for prefix, side in (("base", "base"), ("tuned", "tuned"), ("retrieval", RETRIEVAL), ("gguf", GGUF)):
        for metric, name in (("loss", "eval_loss"), ("rouge_l", "rouge_l"), ("exact_match", "exact_match")):
            value = rows[metric].get(side)
            if value is not None and not math.isnan(value):
                parts.append(f"{prefix}_{name}={value:.4f}")
    return [f"metrics: {' '.join(parts)}"] if parts else []


def write_eval_reports(
    out: Path,
    table: dict,
    manifest: dict,
    eval_sets: dict,
    base: dict,
    tuned: dict,
    tuned_retrieval: dict | None = None,
    gguf: dict | None = None,
) -> None:
    """The A/B report of a job: logged, as CloudWatch metric lines, eval_report.json (the table, with what was
    trained), eval_report.md (the table for people) and sample_answers.jsonl (every answer)."""
    log_comparison(table)
    for line in metric_lines(table):
        print(line, flush=True)
    write_json(
        out / REPORT_FILE,
        {
            "comparison": table,
            "training": manifest["training"],
            "base_model": manifest["base_model"],
            "method": manifest["method"],
            "retrieval": manifest.get("retrieval"),
            "gguf": manifest.get("gguf"),
        },
    )
    (out / REPORT_MARKDOWN_FILE).write_text(
        f"# A/B evaluation: {manifest['base_model']}, {manifest['method']}\n\n{markdown_table(table)}\n"
        + _gguf_note(table, manifest),
        encoding="utf-8",
    )
    write_samples(out / SAMPLES_FILE, eval_sets, base, tuned, tuned_retrieval, gguf)


def _gguf_note(table: dict, manifest: dict) -> str:
    if not has_gguf(table):
        return ""
    entry = manifest.get("gguf") or {}
    asked = "with the passages retrieved for it, as served" if has_retrieval(table) else "as served"
    return (
        f"\nGGUF: `{entry.get('file', 'the GGUF')}` ({entry.get('quantization', '?')}), its weights loaded back "
        f"dequantized and each question asked {asked}; compare it with the column to its left.\n"
    )


def write_samples(
    path: Path, sets: dict, base: dict, tuned: dict, tuned_retrieval: dict | None = None, gguf: dict | None = None
) -> None:
    """One line per question: the reference and each model's answer; with retrieval, also that answer, the ids
    of the passages it was given, and whether the gold passage was among them (null where unknown); with a GGUF,
    the GGUF's answer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for set_name, eval_set in sets.items():
            base_answers = base.get(set_name, {}).get("answers", [])
            tuned_answers = tuned.get(set_name, {}).get("answers", [])
            with_retrieval = (tuned_retrieval or {}).get(set_name, {})
            retrieval_answers = with_retrieval.get("answers", [])
            used = with_retrieval.get("retrieval") or {}
            gguf_answers = (gguf or {}).get(set_name, {}).get("answers", [])
            for i, (question, reference) in enumerate(zip(eval_set.questions, eval_set.references, strict=True)):
                row = {
                    "set": set_name,
                    "question": question,
                    "reference": reference,
                    "base_answer": _at(base_answers, i),
                    "tuned_answer": _at(tuned_answers, i),
                }
                if tuned_retrieval is not None:
                    row |= {
                        "tuned_retrieval_answer": _at(retrieval_answers, i),
                        "sources": _at(used.get("sources", []), i),
                        "gold_retrieved": _at(used.get("gold_retrieved", []), i),
                    }
                if gguf is not None:
                    row["gguf_answer"] = _at(gguf_answers, i)
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _at(values: list, i: int):
    return values[i] if i < len(values) else None


def _delta(value, reference):
    return (value - reference) if value is not None and reference is not None else None


def _cell(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def plot_loss_curve(
    path: Path, log_history: list[dict], base_eval_loss: float | None, tuned_eval_loss: float | None
) -> Path | None:
    points = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display in a container
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label="training loss (answer tokens)")
    if base_eval_loss is not None:
        ax.axhline(base_eval_loss, color="grey", linestyle="--", label=f"validation loss, base {base_eval_loss:.3f}")
    if tuned_eval_loss is not None:
        ax.axhline(
            tuned_eval_loss, color="green", linestyle="--", label=f"validation loss, tuned {tuned_eval_loss:.3f}"
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.set_title("Fine-tuning loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(value) -> str:
    return "   n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:8.4f}"


def json_safe(value):
    """JSON has no NaN: missing metrics become null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
