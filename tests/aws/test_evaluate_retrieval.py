"""evaluate's third column: a variant with a retrieval index answers with and without retrieval, and recall.

The endpoint is a fake sagemaker-runtime client in-process, answering as the serving container does (TGI shape):
the `tuned` variant has an index, so its replies carry `sources` unless the request says
`"parameters": {"retrieval": false}`; the `base` variant has none and never carries them.
"""

from __future__ import annotations

import io
import json
from argparse import Namespace

import pytest
from llmft_aws import evaluate
from llmft_aws.context import AwsContext

FAQ = {  # training question -> answer: the index's passages are titled with these questions
    "What is Amazon SageMaker?": "A managed machine learning service.",
    "How am I charged for SageMaker?": "You pay for what you use.",
    "Which Regions have SageMaker?": "Most AWS Regions.",
}


class FakeRuntime:
    """sagemaker-runtime's invoke_endpoint for an endpoint with variants `tuned` (index) and `base` (none)."""

    def __init__(self):
        self.requests: list[tuple[str, dict]] = []

    def invoke_endpoint(self, *, EndpointName, TargetVariant, Body, ContentType, Accept):
        request = json.loads(Body)
        self.requests.append((TargetVariant, request))
        question = request["inputs"]
        retrieval = request["parameters"].get("retrieval", True)
        if TargetVariant == "base":
            assert "retrieval" not in request["parameters"], "a variant without an index was asked without retrieval"
            reply = [{"generated_text": "I do not know."}]
        elif not retrieval:
            reply = [{"generated_text": FAQ.get(question, "I do not know.") if question in FAQ else "Maybe."}]
        else:
            # The index finds the training question's passage for training questions and for "rewordings" (the
            # question lower-cased), nothing useful otherwise; the answer then quotes the gold passage.
            gold = next((q for q in FAQ if q.lower() == question.lower()), None)
            titles = ([gold] if gold else []) + [q for q in FAQ if q != gold][:2]
            sources = [
                {"id": i, "title": t, "source": f"faq.csv#{i + 1}", "score": 1.0 - i / 10} for i, t in enumerate(titles)
            ]
            reply = [{"generated_text": FAQ[gold] if gold else "Maybe.", "sources": sources}]
        return {"Body": io.BytesIO(json.dumps(reply).encode()), "InvokedProductionVariant": TargetVariant}


def rows_file(tmp_path):
    """Two training questions, a rewording naming its original as gold title, and a held-out question."""
    rows = [
        {"question": "What is Amazon SageMaker?", "answer": FAQ["What is Amazon SageMaker?"]},
        {"question": "How am I charged for SageMaker?", "answer": FAQ["How am I charged for SageMaker?"]},
        {
            "question": "which regions have sagemaker?",
            "answer": FAQ["Which Regions have SageMaker?"],
            "gold_title": "Which  Regions have SageMaker?",  # whitespace differs: compared normalised
        },
        {"question": "Does SageMaker support R?", "answer": "Yes, R is supported."},
    ]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_variant_with_an_index_answers_with_and_without_retrieval_and_recall_is_measured(tmp_path):
    rows = evaluate.read_rows(rows_file(tmp_path))
    pairs = [(r.question, r.answer) for r in rows]
    golds = [r.gold_title for r in rows]
    runtime = FakeRuntime()

    results = evaluate.evaluate(runtime, "faq", ["tuned", "base"], pairs, 32, golds)

    assert [r.label for r in results] == ["tuned (no retrieval)", "tuned + retrieval", "base"]
    off, on, base = results
    assert (off.retrieval, on.retrieval, base.retrieval) == (False, True, None)
    asked = [(variant, r["parameters"].get("retrieval")) for variant, r in runtime.requests]
    assert asked == [("tuned", None)] * 4 + [("tuned", False)] * 4 + [("base", None)] * 4
    assert on.scores["exact_match"] == pytest.approx(0.75) and off.scores["exact_match"] == pytest.approx(0.5)
    assert off.sources == [None] * 4 and base.sources == [None] * 4
    # Only the rewording names its gold passage here: the training questions would need --gold-is-question.
    assert on.recall == {
        "k": 3,
        "recall_at_k": 1.0,
        "questions_with_gold": 1,
        "gold_retrieved": [None, None, True, None],
    }
    assert off.recall == {} and base.recall == {}

    report = evaluate.write_report(results, "faq", tmp_path / "questions.jsonl", tmp_path / "report", pairs, golds)
    text = report.read_text()
    assert "| variant | retrieval | ROUGE-L | exact match | recall@k |" in text
    assert "| tuned (no retrieval) | off | 0.500 | 0.500 | - |" in text
    assert "| tuned + retrieval | on (k=3) | 0.750 | 0.750 | 1.000 |" in text
    assert "| base | no index | " in text
    assert "Highest ROUGE-L: **tuned + retrieval**." in text
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert set(saved["variants"]) == {"tuned (no retrieval)", "tuned + retrieval", "base"}
    assert saved["variants"]["tuned + retrieval"]["sources"][2][0]["title"] == "Which Regions have SageMaker?"
    assert saved["variants"]["tuned + retrieval"]["recall"]["recall_at_k"] == 1.0
    assert "sources" not in saved["variants"]["base"]
    assert saved["gold_titles"][2] == "Which  Regions have SageMaker?"
    assert (tmp_path / "report" / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class FakeSession:
    def __init__(self, runtime):
        self.runtime = runtime

    def client(self, service, region_name=None, **kwargs):
        assert service == "sagemaker-runtime"
        return self.runtime


def test_the_command_counts_training_questions_as_their_own_gold_with_gold_is_question(tmp_path, capsys):
    data = tmp_path / "train.csv"
    data.write_text("question,answer\n" + "".join(f'"{q}","{a}"\n' for q, a in FAQ.items()))
    ctx = AwsContext(region="us-east-1", _session=FakeSession(FakeRuntime()))
    args = Namespace(
        endpoint="faq",
        data=data,
        variants=["tuned"],
        max_samples=50,
        max_new_tokens=16,
        gold_is_question=True,
        report=tmp_path / "report",
    )

    assert evaluate.run(ctx, args) == 0

    assert capsys.readouterr().out.strip() == str(tmp_path / "report" / "report.md")
    saved = json.loads((tmp_path / "report" / "results.json").read_text())["variants"]
    assert saved["tuned + retrieval"]["recall"]["recall_at_k"] == 1.0
    assert saved["tuned + retrieval"]["recall"]["questions_with_gold"] == 3
    assert saved["tuned (no retrieval)"]["scores"]["rouge_l"] == pytest.approx(1.0)


def test_without_any_index_the_report_keeps_its_two_column_table(tmp_path):
    pairs = [("What is Amazon SageMaker?", "I do not know.")]
    results = evaluate.evaluate(FakeRuntime(), "faq", ["base"], pairs, 16)
    text = evaluate.write_report(results, "faq", tmp_path / "d.csv", tmp_path / "r", pairs).read_text()
    assert "| variant | ROUGE-L | exact match | p50 ms |" in text and "retrieval" not in text
    assert "| base | 1.000 | 1.000 |" in text


def test_gold_titles_come_from_a_csv_column_too(tmp_path):
    path = tmp_path / "paraphrased.csv"
    path.write_text("question,answer,gold_title\nwhat is it?,A thing.,What is it?\nWhy?,Because.,\n")
    assert evaluate.read_rows(path) == [
        evaluate.Row("what is it?", "A thing.", "What is it?"),
        evaluate.Row("Why?", "Because.", None),
    ]
    assert evaluate.read_pairs(path) == [("what is it?", "A thing."), ("Why?", "Because.")]
    assert evaluate.gold_in_sources("What is\u00a0it? ", [{"title": "What is it?"}])
    assert not evaluate.gold_in_sources("What is it?", [{"title": "What is it? More"}, {}])
