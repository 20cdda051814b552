"""Did fine-tuning help? Answer quality and loss for a model on question/answer pairs.

The scoring half (`score_answers`, `rouge_l`, `exact_match`, `latency_summary`, `gold_retrieved`) is pure Python
with no torch, so the endpoint A/B evaluation (scripts/) scores answers from a live endpoint with the very same
code. The model half answers questions in batches and measures the loss on the answer tokens; given
`documents_for` (retrieval), each question's prompt carries the passages retrieved for it, as serving builds it.
"""

from __future__ import annotations

import logging
import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
    # The examples themselves (trainer.data.Example), so that prompts and encodings can be built again with the
    # documents retrieved for each question. Empty: the set cannot be evaluated with retrieval.
    examples: list = field(default_factory=list)
    # Whether each reference answer is also a passage of the retrieval index (training questions, and rewordings
    # of them answered with the original's answer): then the passage whose text equals the reference is the
    # question's gold passage, and recall is measured. Held-out questions have none.
    gold_in_index: bool = False


def eval_set(tokenizer, examples: Sequence, *, gold_in_index: bool = False) -> EvalSet:
    """An EvalSet of `examples` (trainer.data.Example), rendered with the tokenizer's chat template."""
    from . import prompts

    return EvalSet(
        questions=[e.question for e in examples],
        prompts=[prompts.example_prompt(tokenizer, e) for e in examples],
        references=[e.answer for e in examples],
        encoded=[prompts.encode_example(tokenizer, e) for e in examples],
        examples=list(examples),
        gold_in_index=gold_in_index,
    )


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


def gold_retrieved(reference: str, passage_texts: Sequence[str]) -> bool:
    """Whether the gold passage of a question is among the passages used: for a question whose answer is a passage
    of the index (a training row: passage text = its answer), the passage whose text is the reference answer."""
    gold = " ".join(reference.split())
    return any(" ".join(text.split()) == gold for text in passage_texts)


def recall(hits: Sequence[bool | None]) -> float | None:
    """Share of the questions with a known gold passage (not None) whose gold was retrieved; None if none."""
    known = [hit for hit in hits if hit is not None]
    return sum(known) / len(known) if known else None


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
    documents_for: Callable[[str], list[dict]] | None = None,
) -> dict:
    """Loss/perplexity and answer quality on each named EvalSet; EvaluationStopped when should_stop().

    With `documents_for` (a question -> the passages retrieved for it, `{"id", "title", "text", "source"}` each),
    every prompt and every loss example carries its question's passages through the chat template's `documents`,
    as serving builds them. Each set's result then has `retrieval`: the passage ids used per question (none where
    the index's gate held them back), how many questions got any (`with_passages`), whether the gold passage was
    among them (None where the set has no gold), and `recall_at_k`, the share of questions whose gold was among
    the k used (None for a set without gold passages, such as held-out questions).
    """
    results: dict[str, dict] = {}
    for set_name, eval_set in sets.items():
        prompts_, encoded, retrieval = eval_set.prompts, eval_set.encoded, None
        if documents_for is not None:
            prompts_, encoded, retrieval = _with_documents(tokenizer, set_name, eval_set, documents_for)
            log.info(
                "eval %s/%s: passages for %d of %d questions (the others below the gate), %d at most, recall %s",
                label,
                set_name,
                retrieval["with_passages"],
                len(retrieval["sources"]),
                retrieval["k"],
                "n/a (no gold passages)" if retrieval["recall_at_k"] is None else f"{retrieval['recall_at_k']:.3f}",
            )
        loss = answer_loss(model, encoded, collator, batch_size, should_stop)

        def progress(done: int, total: int, set_name=set_name) -> None:
            log.info("eval %s/%s: answered %d/%d questions", label, set_name, done, total)

        answers = generate_answers(
            model,
            tokenizer,
            prompts_,
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
            **({"retrieval": retrieval} if retrieval is not None else {}),
        }
    return results


def _with_documents(
    tokenizer, set_name: str, eval_set: EvalSet, documents_for: Callable[[str], list[dict]]
) -> tuple[list[str], list[dict], dict]:
    """The set's prompts and loss examples rebuilt with each question's retrieved passages, and what was used."""
    from . import prompts

    if len(eval_set.examples) != len(eval_set.questions):
        raise ValueError(f"evaluation set {set_name!r} holds no examples to rebuild its prompts with documents")
    prompts_, encoded, sources, hits = [], [], [], []
    for example, reference in zip(eval_set.examples, eval_set.references, strict=True):
        passages = documents_for(example.question)
        documents = [{"title": p["title"], "text": p["text"]} for p in passages]
        # The documents go into the last user message through the chat template, as serving renders them.
        prompts_.append(prompts.example_prompt(tokenizer, example, documents=documents))
        encoded.append(prompts.encode_example(tokenizer, example, documents=documents))
        sources.append([p["id"] for p in passages])
        hits.append(gold_retrieved(reference, [p["text"] for p in passages]) if eval_set.gold_in_index else None)
    retrieval = {
        "k": max((len(ids) for ids in sources), default=0),
        "recall_at_k": recall(hits),
        "questions_with_gold": sum(hit is not None for hit in hits),
        "with_passages": sum(bool(ids) for ids in sources),
        "sources": sources,
        "gold_retrieved": hits,
    }
    return prompts_, encoded, retrieval
