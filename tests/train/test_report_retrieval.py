"""The A/B report's third column (the tuned model with retrieval) and the evaluation that fills it.

The report half runs on synthetic results dicts, shaped as trainer.evaluation.evaluate_model returns them; the
evaluation half answers with the tiny model, a fake `documents_for` standing in for the retrieval index.
"""

from __future__ import annotations

import json
import math

import pytest
from trainer import report
from trainer.evaluation import gold_retrieved, recall


def results(rouge: float, loss: float, *, count: int = 2, retrieval: dict | None = None) -> dict:
    row = {
        "loss": loss,
        "perplexity": math.exp(loss),
        "rouge_l": rouge,
        "exact_match": 0.0,
        "count": count,
        "answers": [f"answer {i}" for i in range(count)],
    }
    return row | ({"retrieval": retrieval} if retrieval else {})


BASE = {"validation": results(0.13, 3.2), "train_sample": results(0.12, 3.0), "paraphrased": results(0.11, 3.1)}
TUNED = {"validation": results(0.20, 3.5), "train_sample": results(0.55, 0.4), "paraphrased": results(0.30, 1.9)}
USED = {"k": 3, "sources": [[0, 4, 2], [1, 7, 9]], "with_passages": 2}
WITH_RETRIEVAL = {
    "validation": results(
        0.22, 3.0, retrieval=USED | {"recall_at_k": None, "questions_with_gold": 0, "gold_retrieved": [None, None]}
    ),
    "train_sample": results(
        0.70, 0.3, retrieval=USED | {"recall_at_k": 1.0, "questions_with_gold": 2, "gold_retrieved": [True, True]}
    ),
    "paraphrased": results(
        0.65, 0.5, retrieval=USED | {"recall_at_k": 0.5, "questions_with_gold": 2, "gold_retrieved": [True, False]}
    ),
}


def test_three_columns_per_set_with_recall_where_the_set_knows_its_gold():
    table = report.comparison(BASE, TUNED, WITH_RETRIEVAL)

    assert set(table) == {"validation", "train_sample", "paraphrased"}
    assert report.has_retrieval(table) and report.columns(table) == ("base", "tuned", "tuned_retrieval")
    rouge = table["paraphrased"]["rouge_l"]
    assert (rouge["base"], rouge["tuned"], rouge["tuned_retrieval"]) == (0.11, 0.30, 0.65)
    assert rouge["delta"] == pytest.approx(0.19) and rouge["delta_retrieval"] == pytest.approx(0.54)
    assert table["paraphrased"]["retrieval"] == {
        "k": 3,
        "recall_at_k": 0.5,
        "questions_with_gold": 2,
        "with_passages": 2,
    }
    assert table["validation"]["retrieval"]["recall_at_k"] is None  # held-out questions have no gold passage
    assert table["train_sample"]["count"] == 2

    markdown = report.markdown_table(table)
    assert "| questions | metric | base | tuned | tuned + retrieval |" in markdown
    assert "| paraphrased (2) | rouge_l | 0.110 | 0.300 | 0.650 |" in markdown
    assert "| paraphrased (2) | recall@3 |  |  | 0.500 |" in markdown
    assert "| held-out (2) | recall@" not in markdown

    text = report.before_after_text({"comparison": table})
    assert "rouge_l      base 0.110 -> tuned 0.300 -> tuned + retrieval 0.650" in text
    assert "recall@3     0.500" in text
    assert report.metric_lines(table) == [
        "metrics: base_eval_loss=3.2000 base_rouge_l=0.1300 base_exact_match=0.0000 tuned_eval_loss=3.5000 "
        "tuned_rouge_l=0.2000 tuned_exact_match=0.0000 retrieval_eval_loss=3.0000 retrieval_rouge_l=0.2200 "
        "retrieval_exact_match=0.0000"
    ]


@pytest.mark.parametrize("off", [None, {}])
def test_without_retrieval_the_report_keeps_its_two_columns(off):
    table = report.comparison(BASE, TUNED, off)

    assert not report.has_retrieval(table) and report.columns(table) == ("base", "tuned")
    assert set(table["validation"]["rouge_l"]) == {"base", "tuned", "delta"}
    assert "retrieval" not in table["validation"]
    markdown = report.markdown_table(table)
    assert "| questions | metric | base | tuned |\n|---|---|---:|---:|" in markdown
    assert "retrieval" not in markdown and "recall" not in markdown
    text = report.before_after_text({"comparison": table})
    assert text.startswith("Before / after fine-tuning:") and "retrieval" not in text
    assert "retrieval_" not in report.metric_lines(table)[0]


def test_a_job_without_the_base_model_shows_no_base_values():
    table = report.comparison({}, TUNED, WITH_RETRIEVAL)
    assert table["train_sample"]["rouge_l"]["base"] is None
    assert table["train_sample"]["rouge_l"]["delta_retrieval"] is None
    assert "| training sample (2) | rouge_l | - | 0.550 | 0.700 |" in report.markdown_table(table)
    assert "tuned 0.550 -> tuned + retrieval 0.700" in report.before_after_text({"comparison": table})


def test_the_written_reports_carry_the_third_column_and_the_passages_used(tmp_path):
    from trainer.evaluation import EvalSet

    sets = {
        name: EvalSet(questions=["q0", "q1"], prompts=["p0", "p1"], references=["r0", "r1"], encoded=[{}, {}])
        for name in ("validation", "train_sample", "paraphrased")
    }
    table = report.comparison(BASE, TUNED, WITH_RETRIEVAL)
    manifest = {"training": {"runtime_s": 1.0}, "base_model": "tiny", "method": "lora", "retrieval": {"k": 3}}
    report.write_eval_reports(tmp_path, table, manifest, sets, BASE, TUNED, WITH_RETRIEVAL)

    written = json.loads((tmp_path / report.REPORT_FILE).read_text())
    assert written["comparison"]["paraphrased"]["rouge_l"]["tuned_retrieval"] == 0.65
    assert written["comparison"]["validation"]["retrieval"]["recall_at_k"] is None
    assert written["retrieval"] == {"k": 3}
    assert "tuned + retrieval" in (tmp_path / report.REPORT_MARKDOWN_FILE).read_text()
    samples = [json.loads(line) for line in (tmp_path / report.SAMPLES_FILE).read_text().splitlines()]
    paraphrased = [s for s in samples if s["set"] == "paraphrased"]
    assert paraphrased[1] | {"base_answer": None} == {
        "set": "paraphrased",
        "question": "q1",
        "reference": "r1",
        "base_answer": None,
        "tuned_answer": "answer 1",
        "tuned_retrieval_answer": "answer 1",
        "sources": [1, 7, 9],
        "gold_retrieved": False,
    }

    report.write_eval_reports(tmp_path, report.comparison(BASE, TUNED), manifest, sets, BASE, TUNED)
    samples = [json.loads(line) for line in (tmp_path / report.SAMPLES_FILE).read_text().splitlines()]
    assert "tuned_retrieval_answer" not in samples[0] and "sources" not in samples[0]


def test_the_gold_passage_is_the_one_whose_text_is_the_reference_answer():
    assert gold_retrieved("Amazon SageMaker is\n a service.", ["Other.", "Amazon SageMaker is a service."])
    assert not gold_retrieved("Amazon SageMaker is a service.", ["Amazon SageMaker is a service. And more."])
    assert not gold_retrieved("anything", [])
    assert recall([True, False, None, True]) == pytest.approx(2 / 3)
    assert recall([None, None]) is None


# --- evaluate_model with retrieval: the tiny model, a fake index --------------------------------------------


PASSAGES = [
    {"id": 0, "title": "What is LoRA?", "text": "Low-rank adapters.", "source": "faq.csv#1"},
    {"id": 1, "title": "Why LoRA?", "text": "It trains few weights.", "source": "faq.csv#2"},
    {"id": 2, "title": "What is SageMaker?", "text": "A managed ML service.", "source": "faq.csv#3"},
]


def fake_documents_for(question: str) -> list[dict]:
    """A stand-in for the index: the passage titled with the question first when there is one, then the others."""
    ranked = sorted(PASSAGES, key=lambda p: (p["title"] != question, p["id"]))
    return ranked[:2] if question != "Unanswerable?" else []


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny chat model, prepared as a retrieval job prepares it (pad token, documents preamble)."""
    import torch
    from trainer import prompts
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts.prepare_tokenizer(tokenizer, prompts.choose_format("auto", tokenizer, str(tiny_model_dir)), documents=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


def test_evaluate_model_puts_each_questions_passages_in_its_prompt_and_loss_and_measures_recall(tiny, monkeypatch):
    from trainer import evaluation, prompts
    from trainer.data import Example

    model, tokenizer = tiny
    train_rows = [Example("What is LoRA?", "Low-rank adapters.", "", "faq.csv#1")]
    rewordings = [  # a rewording of a training question, answered with the original's answer
        Example("Explain LoRA", "It trains few weights.", "", "paraphrases.jsonl#1"),
        Example("Unanswerable?", "It trains few weights.", "", "paraphrases.jsonl#2"),
    ]
    sets = {
        "train_sample": evaluation.eval_set(tokenizer, train_rows, gold_in_index=True),
        "paraphrased": evaluation.eval_set(tokenizer, rewordings, gold_in_index=True),
        "validation": evaluation.eval_set(tokenizer, [Example("What is SageMaker?", "Managed ML.", "", "v#1")]),
    }
    seen_prompts, seen_batches = [], []
    generate = evaluation.generate_answers

    def spy_generate(model, tokenizer, prompts_, **kwargs):
        seen_prompts.extend(prompts_)
        return generate(model, tokenizer, prompts_, **kwargs)

    monkeypatch.setattr(evaluation, "generate_answers", spy_generate)
    collator = prompts.CompletionCollator(tokenizer.pad_token_id)

    def spy_collator(features):
        seen_batches.extend(f["input_ids"] for f in features)
        return collator(features)

    common = {
        "sets": sets,
        "collator": spy_collator,
        "stop_token_ids": [tokenizer.eos_token_id],
        "max_new_tokens": 3,
        "batch_size": 2,
    }
    with_retrieval = evaluation.evaluate_model(
        model, tokenizer, label="tuned_retrieval", documents_for=fake_documents_for, **common
    )

    # Prompts as serving renders them: the question's passages in its user message, through the template.
    assert seen_prompts[0] == prompts.prompt_text(
        tokenizer, "What is LoRA?", documents=[{"title": p["title"], "text": p["text"]} for p in PASSAGES[:2]]
    )
    assert "Low-rank adapters." in seen_prompts[0] and "It trains few weights." in seen_prompts[0]
    assert seen_prompts[2] == prompts.prompt_text(tokenizer, "Unanswerable?")  # nothing retrieved: no documents
    # The loss examples carry the same passages before the answer.
    assert "A managed ML service." in tokenizer.decode(seen_batches[-1])
    assert len(seen_batches[0]) > len(sets["train_sample"].encoded[0]["input_ids"])

    assert with_retrieval["train_sample"]["retrieval"] == {
        "k": 2,
        "recall_at_k": 1.0,
        "questions_with_gold": 1,
        "with_passages": 1,
        "sources": [[0, 1]],
        "gold_retrieved": [True],
    }
    assert with_retrieval["paraphrased"]["retrieval"]["sources"] == [[0, 1], []]
    assert with_retrieval["paraphrased"]["retrieval"]["with_passages"] == 1
    assert with_retrieval["paraphrased"]["retrieval"]["recall_at_k"] == 0.5
    assert with_retrieval["validation"]["retrieval"]["gold_retrieved"] == [None]
    assert with_retrieval["validation"]["retrieval"]["recall_at_k"] is None
    assert with_retrieval["paraphrased"]["count"] == 2 and len(with_retrieval["paraphrased"]["answers"]) == 2

    seen_prompts.clear()
    without = evaluation.evaluate_model(model, tokenizer, label="tuned", **common)
    assert "retrieval" not in without["train_sample"]
    assert seen_prompts[0] == prompts.prompt_text(tokenizer, "What is LoRA?")
    assert without["train_sample"]["loss"] != pytest.approx(with_retrieval["train_sample"]["loss"])

    table = report.comparison({}, without, with_retrieval)
    assert table["paraphrased"]["retrieval"]["recall_at_k"] == 0.5
