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


@pytest.fixture(scope="module")
def prepared_tiny(tiny_model_dir):
    """The tiny chat model and its tokenizer, prepared as a training job prepares them (pad token added)."""
    import torch
    from trainer import prompts
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts.prepare_tokenizer(tokenizer, prompts.choose_format("auto", tokenizer, str(tiny_model_dir)))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


def test_answer_loss_matches_full_logits_cross_entropy(prepared_tiny):
    """The answer-positions-only LM head gives the same mean loss as the plain full-logits computation."""
    import torch
    from trainer import prompts
    from trainer.data import Example
    from trainer.evaluation import answer_loss

    model, tokenizer = prepared_tiny
    examples = [
        Example(question=q, answer=a, context="", source=f"row {i}")
        for i, (q, a) in enumerate([("What is LoRA?", "Low-rank adapters."), ("Why?", "Because it is small.")])
    ]
    encoded = [prompts.encode_example(tokenizer, e) for e in examples]
    collator = prompts.CompletionCollator(tokenizer.pad_token_id)

    batch = collator(encoded)
    with torch.inference_mode():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    assert answer_loss(model, encoded, collator, batch_size=1) == pytest.approx(expected.item(), rel=1e-5)


def test_a_stop_request_ends_evaluation_within_a_decoding_step(prepared_tiny):
    """SIGTERM during a long evaluation: generation stops at the next decoding step, not after the batch."""
    from trainer import prompts
    from trainer.data import Example
    from trainer.evaluation import EvaluationStopped, answer_loss, generate_answers

    model, tokenizer = prepared_tiny
    polls = []

    def stop_after_five_polls() -> bool:
        polls.append(1)
        return len(polls) > 5

    with pytest.raises(EvaluationStopped, match="stopped after 0 of 2 answers"):
        generate_answers(
            model,
            tokenizer,
            ["What is LoRA?", "Why?"],
            max_new_tokens=10_000,
            batch_size=2,
            stop_token_ids=[],
            should_stop=stop_after_five_polls,
        )
    assert len(polls) < 10  # polled per step: it did not run on towards 10,000 tokens

    encoded = [prompts.encode_example(tokenizer, Example("Why?", "Because.", "", "row 1"))]
    collator = prompts.CompletionCollator(tokenizer.pad_token_id)
    with pytest.raises(EvaluationStopped):
        answer_loss(model, encoded, collator, batch_size=1, should_stop=lambda: True)
