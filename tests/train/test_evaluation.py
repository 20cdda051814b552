import math

import pytest
from trainer.evaluation import exact_match, latency_summary, normalize_answer, rouge_l, score_answers


def test_exact_match_normalises_case_punctuation_and_articles():
    assert normalize_answer("The  Model, deployed!") == "model deployed"
    assert exact_match("the model deployed.", "Model deployed") == 1.0
    assert exact_match("a model", "another model") == 0.0


def test_rouge_l_is_the_reference_implementation():
    assert rouge_l("SageMaker trains models", "SageMaker trains models") == pytest.approx(1.0)
    assert rouge_l("", "SageMaker trains models") == 0.0
    assert 0 < rouge_l("SageMaker deploys models", "SageMaker trains models") < 1


def test_score_answers_averages_and_checks_lengths():
    scores = score_answers(["a b", "c"], ["a b", "d"])
    assert scores["exact_match"] == 0.5 and scores["count"] == 2
    with pytest.raises(ValueError):
        score_answers(["a"], [])
    assert math.isnan(score_answers([], [])["rouge_l"])


def test_latency_summary_nearest_rank():
    summary = latency_summary([0.1] * 98 + [1.0, 2.0])
    assert summary["p50_ms"] == pytest.approx(100) and summary["p99_ms"] == pytest.approx(1000)
    assert latency_summary([]) == {}
