"""Did fine-tuning help? Answer quality and loss for a model on question/answer pairs.

The scoring half (`score_answers`, `rouge_l`, `exact_match`, `latency_summary`) is pure Python with no
torch, so the endpoint A/B evaluation (scripts/) scores answers from a live endpoint with the very same
code. The model half answers questions in batches and measures the loss on the answer tokens.
"""

from __future__ import annotations

import logging
import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

log = logging.getLogger(__name__)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


class EvaluationStopped(Exception):
    """A stop was requested (SIGTERM) while the model was being evaluated."""


def _never() -> bool:
    return False


@dataclass(frozen=True)
class EvalSet:
    questions: list[str]
    prompts: list[str]  # rendered with the chat template, as a server would
    references: list[str]
    encoded: list[dict]  # token ids and labels, for the answer loss


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation or articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


@lru_cache(maxsize=1)
def _rouge_scorer():
    # Google's reference implementation, the one HF `evaluate` wraps: scores comparable with published ones.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def score_answers(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return {"rouge_l": float("nan"), "exact_match": float("nan"), "count": 0}
    return {
        "rouge_l": sum(map(rouge_l, predictions, references)) / len(references),
        "exact_match": sum(map(exact_match, predictions, references)) / len(references),
        "count": len(references),
    }


def latency_summary(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99 in milliseconds (nearest-rank)."""
    if not latencies_s:
        return {}
    ordered = sorted(latencies_s)

    def rank(p: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]

    return {"p50_ms": rank(50), "p90_ms": rank(90), "p99_ms": rank(99), "count": len(ordered)}


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """The answer before the first stop string in it, as a server returns it."""
    cut = min((at for at in (text.find(s) for s in stop_strings) if at != -1), default=len(text))
    return text[:cut]


def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    stop_token_ids: Sequence[int],
    stop_strings: Sequence[str] = (),
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] = _never,
) -> list[str]:
    """Greedy answers, batched with left padding (prompts are already rendered with the chat template).

    `should_stop` is polled at every decoding step: a batch of long answers on a CPU can take longer than
    SageMaker waits between SIGTERM and SIGKILL. When it turns true, EvaluationStopped is raised.
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopRequested(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), should_stop(), dtype=torch.bool, device=input_ids.device)

    answers: list[str] = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(
                list(prompts[start : start + batch_size]), return_tensors="pt", padding=True, add_special_tokens=False
            ).to(model.device)
            with torch.inference_mode():
                output = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=list(stop_token_ids),
                    pad_token_id=tokenizer.pad_token_id,
                    stopping_criteria=StoppingCriteriaList([StopRequested()]),
                    # Several-token end markers end a row early too; the text is cut at them below.
                    **({"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}),
                )
            if should_stop():
                raise EvaluationStopped(f"stopped after {len(answers)} of {len(prompts)} answers")
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            answers.extend(cut_at_stop(text, stop_strings).strip() for text in texts)
            if progress:
                progress(len(answers), len(prompts))
    finally:
        tokenizer.padding_side = padding_side
    return answers


def answer_loss(
    model, encoded: Sequence[dict], collator, batch_size: int, should_stop: Callable[[], bool] = _never
) -> float:
    """Mean cross-entropy per answer token (teacher forcing); perplexity is exp of it.

    The loss is training's (`prompts.answer_token_loss`, the LM head on answer positions only), summed over every
    batch and divided once by the answer tokens of all of them.
    """
    import torch

    from .prompts import answer_token_loss

    total, tokens = 0.0, 0
    model.eval()
    for start in range(0, len(encoded), batch_size):
        if should_stop():
            raise EvaluationStopped(f"stopped after {start} of {len(encoded)} loss examples")
        batch = collator(list(encoded[start : start + batch_size]))
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with torch.inference_mode():
            hidden = model.get_decoder()(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
            loss, answer_tokens = answer_token_loss(hidden, batch["labels"], model.get_output_embeddings())
        total += loss.item()
        tokens += int(answer_tokens)
    return total / max(tokens, 1)


def evaluate_model(
    model,
    tokenizer,
    *,
    label: str,
    sets: dict[str, EvalSet],
    collator,
    stop_token_ids,
    max_new_tokens: int,
    batch_size: int,
    stop_strings: Sequence[str] = (),
    should_stop: Callable[[], bool] = _never,
) -> dict:
    """Loss/perplexity and answer quality on each named EvalSet; EvaluationStopped when should_stop()."""
    results: dict[str, dict] = {}
    for set_name, eval_set in sets.items():
        loss = answer_loss(model, eval_set.encoded, collator, batch_size, should_stop)

        def progress(done: int, total: int, set_name=set_name) -> None:
            log.info("eval %s/%s: answered %d/%d questions", label, set_name, done, total)

        answers = generate_answers(
            model,
            tokenizer,
            eval_set.prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            stop_token_ids=stop_token_ids,
            stop_strings=stop_strings,
            progress=progress,
            should_stop=should_stop,
        )
        results[set_name] = {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            **score_answers(answers, eval_set.references),
            "answers": answers,
        }
    return results
