"""What the job leaves in output/data/: evaluation report, sample answers, loss curve, data report."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)

REPORT_FILE = "eval_report.json"
SAMPLES_FILE = "sample_answers.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
DATA_REPORT_FILE = "data_report.json"


def write_json(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(content), indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def comparison(base: dict, tuned: dict) -> dict:
    """Side-by-side metrics per evaluation set: base, tuned and the difference."""
    table = {}
    for set_name in sorted(set(base) | set(tuned)):
        rows = {}
        for metric in ("loss", "perplexity", "rouge_l", "exact_match"):
            b = base.get(set_name, {}).get(metric)
            t = tuned.get(set_name, {}).get(metric)
            rows[metric] = {"base": b, "tuned": t, "delta": (t - b) if b is not None and t is not None else None}
        rows["count"] = (tuned.get(set_name) or base.get(set_name) or {}).get("count", 0)
        table[set_name] = rows
    return table


def log_comparison(table: dict) -> None:
    for set_name, rows in table.items():
        log.info("A/B on %s (%d questions):", set_name, rows["count"])
        for metric in ("loss", "perplexity", "rouge_l", "exact_match"):
            r = rows[metric]
            log.info("  %-12s base %s  tuned %s  delta %s", metric, _fmt(r["base"]), _fmt(r["tuned"]), _fmt(r["delta"]))


def before_after_text(eval_report: dict) -> str:
    """The comparison of an eval_report.json as a person reads it in a terminal."""
    lines = ["Before / after fine-tuning:"]
    for set_name, rows in eval_report["comparison"].items():
        lines.append(f"  {set_name} ({rows['count']} questions)")
        for metric in ("loss", "rouge_l", "exact_match"):
            r = rows[metric]
            if r["base"] is not None and r["tuned"] is not None:
                lines.append(f"    {metric:12s} base {r['base']:.3f} -> tuned {r['tuned']:.3f}")
            elif r["tuned"] is not None:
                lines.append(f"    {metric:12s} tuned {r['tuned']:.3f}")
    return "\n".join(lines)


def metric_lines(table: dict) -> list[str]:
    """CloudWatch-readable lines (see metric_definitions.json), from the validation set when there is one."""
    rows = table.get("validation") or table.get("train_sample")
    if not rows:
        return []
    parts = []
    for prefix in ("base", "tuned"):
        for metric, name in (("loss", "eval_loss"), ("rouge_l", "rouge_l"), ("exact_match", "exact_match")):
            value = rows[metric][prefix]
            if value is not None and not math.isnan(value):
                parts.append(f"{prefix}_{name}={value:.4f}")
    return [f"metrics: {' '.join(parts)}"] if parts else []


def write_samples(path: Path, sets: dict, base: dict, tuned: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for set_name, eval_set in sets.items():
            base_answers = base.get(set_name, {}).get("answers", [])
            tuned_answers = tuned.get(set_name, {}).get("answers", [])
            for i, (question, reference) in enumerate(zip(eval_set.questions, eval_set.references, strict=True)):
                f.write(
                    json.dumps(
                        {
                            "set": set_name,
                            "question": question,
                            "reference": reference,
                            "base_answer": base_answers[i] if i < len(base_answers) else None,
                            "tuned_answer": tuned_answers[i] if i < len(tuned_answers) else None,
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )


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
