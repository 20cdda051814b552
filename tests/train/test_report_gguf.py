"""The A/B report's GGUF column: the artifact's quantized file asked as served, beside the full-precision model
asked the same way, so the user sees what `gguf_quantization` cost. Synthetic results dicts, shaped as
trainer.evaluation.evaluate_model returns them; the job that fills the column runs in test_gguf_export.py."""

from __future__ import annotations

import json

import pytest
from trainer import report

from .test_report_retrieval import BASE, TUNED, WITH_RETRIEVAL, results

GGUF = {"validation": results(0.21, 3.1), "train_sample": results(0.68, 0.35), "paraphrased": results(0.66, 0.52)}
MANIFEST = {
    "training": {"steps": 4},
    "base_model": "tiny",
    "method": "lora",
    "gguf": {"file": "model.q8_0.gguf", "quantization": "q8_0"},
}


def test_the_gguf_is_compared_with_the_full_precision_model_asked_the_same_way():
    with_index = report.comparison(BASE, TUNED, WITH_RETRIEVAL, gguf=GGUF)
    assert report.columns(with_index) == ("base", "tuned", "tuned_retrieval", "gguf")
    rouge = with_index["train_sample"]["rouge_l"]
    assert rouge["gguf"] == 0.68 and rouge["delta_gguf"] == pytest.approx(0.68 - 0.70)  # against tuned + retrieval

    without_index = report.comparison(BASE, TUNED, gguf=GGUF)
    assert report.columns(without_index) == ("base", "tuned", "gguf")
    assert without_index["train_sample"]["rouge_l"]["delta_gguf"] == pytest.approx(0.68 - 0.55)  # against tuned

    assert not report.has_gguf(report.comparison(BASE, TUNED, WITH_RETRIEVAL))


def test_every_report_shows_the_gguf_column(tmp_path):
    table = report.comparison(BASE, TUNED, WITH_RETRIEVAL, gguf=GGUF)
    markdown = report.markdown_table(table)
    assert "| questions | metric | base | tuned | tuned + retrieval | GGUF |" in markdown
    assert "| paraphrased (2) | rouge_l | 0.110 | 0.300 | 0.650 | 0.660 |" in markdown
    assert "| paraphrased (2) | recall@3 |  |  | 0.500 |  |" in markdown  # recall stays under its own column

    sets = {name: _EvalSet(2) for name in table}
    report.write_eval_reports(tmp_path, table, MANIFEST, sets, BASE, TUNED, WITH_RETRIEVAL, GGUF)
    written = json.loads((tmp_path / report.REPORT_FILE).read_text())
    assert written["gguf"]["quantization"] == "q8_0"
    assert "GGUF: `model.q8_0.gguf` (q8_0)" in (tmp_path / report.REPORT_MARKDOWN_FILE).read_text()
    samples = [json.loads(line) for line in (tmp_path / report.SAMPLES_FILE).read_text().splitlines()]
    assert all(row["gguf_answer"] == row["tuned_answer"] for row in samples)  # "answer i" on every side here

    text = report.before_after_text(written)
    assert text.splitlines()[0] == "Before / after fine-tuning, and with retrieval, and as the q8_0 GGUF:"
    assert "tuned + retrieval 0.700 -> GGUF 0.680" in text
    assert "gguf_rouge_l=0.2100" in report.metric_lines(table)[0]


class _EvalSet:
    def __init__(self, count: int) -> None:
        self.questions = [f"question {i}" for i in range(count)]
        self.references = [f"reference {i}" for i in range(count)]
