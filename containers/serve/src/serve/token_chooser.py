"""How each sequence picks its next token from the logits, as TGI's NextTokenChooser does it.

Greedy rows without a repetition penalty (the common case) are chosen together with one argmax over the
batch; every other row goes through its own chooser: repetition penalty, then greedy or seeded sampling
with temperature, top-k, top-p and typical-p (in TGI's and transformers' order). Rows that ask for their
top-n alternatives get them from one log-softmax over those rows only, of the raw logits, before any
penalty or warping (as TGI's batch_top_tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from serve.generation import SamplingParams


class NextTokenChooser:
    """One sequence's token choice. Sampling draws from its own generator, so a seed reproduces an answer
    whatever else is in the batch."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], device: torch.device | str) -> None:
        self.params = params
        self.generator = torch.Generator(device=device).manual_seed(params.seed) if params.do_sample else None
        self._penalised = params.repetition_penalty != 1.0
        self._seen: set[int] = set(prompt_ids) if self._penalised else set()  # ids the penalty applies to

    @property
    def batched_argmax(self) -> bool:
        """Plain greedy: its row can share the batch's one argmax."""
        return not self.params.do_sample and not self._penalised

    def choose(self, row: torch.Tensor) -> tuple[int, float]:
        """(token id, its log-probability before top-k/top-p filtering) from one row of float32 logits."""
        p = self.params
        if self._penalised:
            seen = torch.tensor(sorted(self._seen), device=row.device)
            scores = row[seen]
            row = row.clone()
            row[seen] = torch.where(scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty)
        if not p.do_sample:
            token_id = int(row.argmax())
            logprob = float(torch.log_softmax(row, -1)[token_id])
        else:
            token_id, logprob = self._sample(row)
        if self._penalised:
            self._seen.add(token_id)
        return token_id, logprob

    def _sample(self, row: torch.Tensor) -> tuple[int, float]:
        p = self.params
        row = row / p.temperature
        logprobs = torch.log_softmax(row, -1)
        filtered = row
        if p.top_k and p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            filtered = filtered.masked_fill(filtered < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(filtered, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest set reaching top_p
            filtered = filtered.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
        if p.typical_p < 1.0:
            filtered = typical_filter(filtered, p.typical_p)
        probs = filtered.softmax(-1)
        token_id = int(torch.multinomial(probs, 1, generator=self.generator))
        return token_id, float(logprobs[token_id])


def typical_filter(scores: torch.Tensor, mass: float) -> torch.Tensor:
    """Typical decoding (Meister et al., arXiv 2202.00666), as transformers' TypicalLogitsWarper and TGI do it:
    keep the tokens whose surprisal is closest to the distribution's entropy, fewest first, until they hold
    `mass` of the probability; the rest become -inf. The closest one always stays."""
    logprobs = torch.log_softmax(scores, -1)
    entropy = -(logprobs * logprobs.exp()).nansum(-1, keepdim=True)
    shifted = (-logprobs - entropy).abs()
    sorted_shifted, order = torch.sort(shifted)
    cumulative = scores.gather(-1, order).softmax(-1).cumsum(-1)
    last = (cumulative < mass).sum(-1, keepdim=True).clamp(max=scores.shape[-1] - 1)
    remove = sorted_shifted > sorted_shifted.gather(-1, last)
    remove[..., :1] = False
    return scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


# What choose_next_tokens gives each row: (token id, its log-probability, the row's top-n alternatives as
# (id, log-probability) pairs, best first), or the error its own choice raised.
Choice = tuple[int, float, list[tuple[int, float]]]


def top_alternatives(logits: torch.Tensor, counts: Sequence[int]) -> list[list[tuple[int, float]]]:
    """The `counts[i]` most likely tokens of row i of float32 `logits` [rows, vocab], best first, with their
    log-probabilities under the raw logits (TGI's top_n_tokens: before penalties, temperature or filtering)."""
    k = min(max(counts), logits.shape[-1])
    top = torch.log_softmax(logits, -1).topk(k, dim=-1)
    ids, values = top.indices.tolist(), top.values.tolist()
    return [list(zip(ids[i][:n], values[i][:n], strict=True)) for i, n in enumerate(counts)]


def choose_next_tokens(choosers: Sequence[NextTokenChooser], logits: torch.Tensor) -> list[Choice | RuntimeError]:
    """(token id, log-probability, top alternatives) for each row of `logits` [batch, vocab], row i chosen by
    choosers[i]; or the error that row's own choice raised (sampling from NaN probabilities, say), which fails
    that row alone. Alternatives are computed only for the rows whose params ask for them."""
    logits = logits.float()
    asking = [i for i, chooser in enumerate(choosers) if chooser.params.top_n_tokens > 0]
    alternatives: list[list[tuple[int, float]]] = [[] for _ in choosers]
    if asking:
        counts = [choosers[i].params.top_n_tokens for i in asking]
        for i, top in zip(asking, top_alternatives(logits[asking], counts), strict=True):
            alternatives[i] = top
    chosen: list[Choice | RuntimeError | None] = [None] * len(choosers)
    greedy = [i for i, chooser in enumerate(choosers) if chooser.batched_argmax]
    if greedy:
        rows = logits[greedy]
        ids = rows.argmax(-1)
        logprobs = torch.log_softmax(rows, -1).gather(-1, ids[:, None])[:, 0]
        for i, token_id, logprob in zip(greedy, ids.tolist(), logprobs.tolist(), strict=True):
            chosen[i] = (token_id, logprob, alternatives[i])
    for i, chooser in enumerate(choosers):
        if chosen[i] is None:
            try:
                chosen[i] = (*chooser.choose(logits[i]), alternatives[i])
            except RuntimeError as e:
                chosen[i] = e
    return chosen  # type: ignore[return-value]  # every row is filled above
