"""A short version of benchmarks/retrieval_faq.py: the generated FAQ (tests/fixtures/faq_csv.py) and rewordings of
some of its questions, the tiny model, two steps per job. The real run (the FAQ, 3 epochs) is the script's job; its
result is in docs/benchmarks.md."""

from __future__ import annotations

import json
import re

import pytest
from fixtures.faq_csv import DUPLICATED_QUESTION, faq_pairs, write_faq_csv


@pytest.fixture(scope="module")
def bench():
    import retrieval_faq  # benchmarks/retrieval_faq.py; benchmarks/ is on the test path (pyproject.toml)

    return retrieval_faq


def reworded(question: str) -> str:
    return "Please tell me: " + question.strip().lower().replace("amazon sagemaker", "SageMaker")


@pytest.fixture
def data(tmp_path):
    """The generated FAQ, and rewordings of 8 of its questions (one of them the question asked twice)."""
    faq = write_faq_csv(tmp_path / "faq")
    questions = list(dict.fromkeys(" ".join(q.split()) for q, _ in faq_pairs()))
    originals = [*questions[:7], DUPLICATED_QUESTION]
    paraphrases = tmp_path / "paraphrases.jsonl"
    paraphrases.write_text("".join(json.dumps({"question": q, "paraphrase": reworded(q)}) + "\n" for q in originals))
    return faq, paraphrases, originals


def test_the_split_keeps_every_reworded_question_in_training(bench, data):
    faq, paraphrases, originals = data
    examples = bench.load_faq(faq)
    split = bench.split_faq(examples, bench.read_paraphrases(paraphrases))

    questions = {e.question for e in examples}
    assert len({e.question for e in split.held_out}) == round(0.15 * len(questions))
    assert not {e.question for e in split.held_out} & set(originals)
    assert len(split.train) + len(split.held_out) == len(examples)
    assert split.originals == originals
    first_answer = {e.question: e.answer for e in reversed(examples)}  # of a question asked twice: the first
    assert [e.answer for e in split.paraphrased] == [first_answer[q] for q in originals]
    assert [e.question for e in split.paraphrased] == [reworded(q) for q in originals]
    again = bench.split_faq(examples, bench.read_paraphrases(paraphrases))
    assert [e.question for e in again.held_out] == [e.question for e in split.held_out]  # seeded

    recall = bench.index_recall(split.train, [e.question for e in split.paraphrased], split.originals)
    assert list(recall) == [1, 3, 5] and recall[1] <= recall[3] <= recall[5]
    assert recall[5] >= 0.75  # the rewordings keep most of their original's words
    exact = bench.index_recall(split.train, split.originals, split.originals)
    assert exact[3] == 1.0  # a training question finds its own passage


def test_folds_hold_out_disjoint_questions_and_fold_0_is_the_split(bench, data):
    faq, paraphrases, originals = data
    examples, pairs = bench.load_faq(faq), bench.read_paraphrases(paraphrases)
    count = bench.fold_count(examples, pairs)
    folds = [bench.split_faq(examples, pairs, fold=i) for i in range(count)]

    held = [{e.question for e in split.held_out} for split in folds]
    assert count >= 2 and all(len(h) == len(held[0]) for h in held)
    assert len(set().union(*held)) == count * len(held[0])  # no question held out twice
    assert held[0] == {e.question for e in bench.split_faq(examples, pairs).held_out}
    for split, questions in zip(folds, held, strict=True):
        assert not questions & set(originals)
        assert len(split.train) + len(split.held_out) == len(examples)
    with pytest.raises(ValueError, match=f"make {count} folds"):
        bench.split_faq(examples, pairs, fold=count)


def test_a_rewording_of_a_question_the_faq_lacks_is_refused(bench, data, tmp_path):
    faq, _, _ = data
    paraphrases = tmp_path / "other.jsonl"
    paraphrases.write_text(json.dumps({"question": "Is this in the FAQ?", "paraphrase": "Is it?"}) + "\n")
    with pytest.raises(SystemExit, match="not questions of the FAQ"):
        bench.split_faq(bench.load_faq(faq), bench.read_paraphrases(paraphrases))


@pytest.mark.slow
def test_the_short_run_trains_both_jobs_and_tabulates_them(bench, data, tmp_path, tiny_model_dir, capsys):
    faq, paraphrases, originals = data
    jobs = tmp_path / "jobs"
    args = [
        "--faq",
        str(faq),
        "--paraphrases",
        str(paraphrases),
        "--model-id",
        str(tiny_model_dir),
        "--jobs-dir",
        str(jobs),
        "--max-steps",
        "2",
        "--train-samples",
        "4",
        "--max-new-tokens",
        "4",
        "--hp",
        "max_seq_length=2048",
        "--hp",
        "per_device_batch_size=4",
        "--folds",
        "2",
    ]
    assert bench.main([*args, "--no-write"]) == 0
    out = capsys.readouterr().out

    a = json.loads((jobs / "A" / "input" / "config" / "hyperparameters.json").read_text())
    b = json.loads((jobs / "B" / "input" / "config" / "hyperparameters.json").read_text())
    assert a["retrieval"] == "off" and b["retrieval"] == "on" and b["eval_base_model"] == "False"
    assert b["retrieval_min_margin"] == "auto"
    assert {k: v for k, v in a.items() if k not in ("retrieval",)} == {
        k: v for k, v in b.items() if k not in ("retrieval", "retrieval_min_margin", "eval_base_model")
    }
    b_retrieval = json.loads((jobs / "B" / "model" / "manifest.json").read_text())["retrieval"]
    assert b_retrieval["k"] == 3 and b_retrieval["min_margin"] >= 0
    assert (
        "| questions | base | A tuned | B tuned, no retrieval | B tuned + retrieval | B given passages | B recall@3 |"
        in out
    )
    rows = {line.split(" | ")[0]: line for line in out.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"| training (4)", "| held-out (6)", f"| paraphrased ({len(originals)})"}
    # Held-out questions have no passage of their own, so no recall; paraphrased ones do.
    assert rows["| held-out (6)"].endswith("| - |")
    assert re.search(r"\| \d of 6 \| - \|$", rows["| held-out (6)"])  # the questions that passed B's gate
    assert not rows[f"| paraphrased ({len(originals)})"].endswith("| - |")
    assert "Training time (the training phase, manifest.json): A " in out and "×**." in out
    assert "Targets (issue 22; B with retrieval, as served): ROUGE-L on paraphrases with retrieval >= 0.6: " in out
    assert "B with retrieval minus A tuned, question by question" in out and "; held-out " in out

    # Fold 1: both jobs trained again without its held-out questions, answering only them.
    for name in ("A", "B"):
        fold = json.loads((jobs / "fold-1" / name / "input" / "config" / "hyperparameters.json").read_text())
        assert fold["retrieval"] == {"A": "off", "B": "on"}[name]
        assert (fold["eval_train_samples"], fold["eval_base_model"], fold["eval_gguf"]) == ("0", "False", "False")
        assert not (jobs / "fold-1" / name / "input" / "data" / "paraphrases").exists()
    assert "Held-out questions over 2 disjoint folds (`--folds 2`)" in out
    assert set(rows) >= {"| 0 (6)", "| 1 (6)", "| all (12)"}
    assert re.search(r"\| \d+ of 12 \| \*\*[+-]", rows["| all (12)"])
    assert "; over the 2 folds' 12 questions: " in out

    # Run again: both jobs are reused, and the section goes into the docs file given.
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# B\n\n<!-- BEGIN retrieval-faq -->\nstale section\n<!-- END retrieval-faq -->\n")
    assert bench.main([*args, "--docs", str(docs)]) == 0
    assert capsys.readouterr().out.count("finished earlier") == 4
    written = docs.read_text()
    assert "stale section" not in written and "| questions | base | A tuned |" in written


def _job(bench, answers):
    rows = [
        {"set": set_name, "question": q, "reference": ref, "tuned_answer": a, "tuned_retrieval_answer": b}
        for set_name, q, ref, a, b in answers
    ]
    return bench.JobResult({}, {}, None, rows)


def test_the_paired_difference_is_per_question_with_a_seeded_interval(bench):
    ref = "the cat sat on the mat"
    answers = [
        ("validation", "q1", ref, "a dog", ref),  # B 1.0, A 0.0
        ("validation", "q2", ref, ref, "a dog"),  # B 0.0, A 1.0
        ("validation", "q3", ref, ref, ref),  # equal
        ("validation", "q4", ref, "a dog", ref),
    ]
    job = _job(bench, answers)
    d = bench.paired(job, job, "validation")
    assert d.mean == 0.25 and (d.better, d.worse) == (2, 1)
    assert -1.0 <= d.low <= d.mean <= d.high <= 1.0
    assert bench.paired(job, job, "validation") == d  # seeded
    assert d.text().startswith("+0.250 [") and d.text().endswith(", 2 better, 1 worse")

    assert bench.paired(job, job, "paraphrased") is None  # no such questions
    other = _job(bench, [("validation", "another", ref, ref, ref), *answers[1:]])
    assert bench.paired(other, job, "validation") is None  # not the same questions: nothing to pair
    unevaluated = _job(bench, [(*answers[0][:4], None), *answers[1:]])
    assert bench.paired(job, unevaluated, "validation") is None  # B did not answer with retrieval
    same = _job(bench, [("validation", "q1", ref, ref, ref)])
    assert bench.paired(same, same, "validation").low is None  # one question, or all equal: no interval


def test_the_folds_are_pooled_question_by_question(bench):
    ref = "the cat sat on the mat"
    fold_0 = _job(bench, [("validation", "q1", ref, "a dog", ref), ("validation", "q2", ref, ref, ref)])
    fold_1 = _job(bench, [("validation", "q3", ref, ref, "a dog"), ("validation", "q4", ref, ref, "a dog")])

    rows, pooled = bench.fold_rows([(fold_0, fold_0), (fold_1, fold_1)])
    assert [row.split(" | ")[0] for row in rows] == ["| 0 (2)", "| 1 (2)", "| all (4)"]
    assert rows[0].endswith("| +0.500 [+0.000, +1.000], 1 better, 0 worse |")
    assert (pooled.mean, pooled.better, pooled.worse, pooled.count) == (-0.25, 1, 2, 4)
    assert rows[-1].endswith(f"| **{pooled.text()}** |")

    gated = bench.JobResult(
        {"validation": {"count": 2, "retrieval": {"with_passages": 1}}}, {}, {"min_margin": 0.38}, fold_1.answers
    )
    rows, _ = bench.fold_rows([(fold_0, fold_0), (fold_1, gated)])
    assert " | 0.380 | 1 of 2 | " in rows[1] and " | - | - | " in rows[0]  # fold 0's B recorded no gate
    assert " | - | " in rows[-1]  # pooled: unknown where a fold did not count its passages
    assert bench._given_passages(gated, gated) == "2 of 4"

    unevaluated = _job(bench, [("validation", "q3", ref, ref, None), ("validation", "q4", ref, ref, "a dog")])
    assert bench.fold_rows([(fold_0, fold_0), (fold_1, unevaluated)]) == ([], None)  # a fold that cannot pair
