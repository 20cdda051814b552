"""What the engine asks of a model: read prompts into the batch's KV cache, run one decode step for every running
sequence, and drop rows. The engine (serve.engine) owns scheduling, token choice, text and stopping; a runner
owns the model and its cache. Two runners: `TransformersRunner` (PyTorch, any device) and
serve.llamacpp.LlamaCppRunner (llama.cpp on a CPU, from the artifact's GGUF).

Row i of a runner's batch belongs to the engine's i-th running sequence: `prefill` appends rows, `keep` drops
the others, `clear` drops all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from serve.kv_batch import KVBatch, left_padded


@dataclass(frozen=True)
class PrefillCost:
    """A prompt's prefill in model FLOPs: 2 per weight per token, plus causal attention's n^2 term. Measuring the
    engine's rate in FLOP/s rather than tokens/s keeps one rate good for short and near-context prompts alike."""

    per_token: float
    per_token_pair: float

    @classmethod
    def of(cls, model: Any) -> PrefillCost:
        text = model.config.get_text_config()
        weights = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
        return cls(2.0 * weights, 2.0 * text.num_hidden_layers * text.hidden_size)

    def flops(self, tokens: int) -> float:
        return self.per_token * tokens + self.per_token_pair * tokens * tokens


@dataclass(frozen=True)
class Prefilled:
    """A prefill's logits: `last` [prompts, vocab] at each prompt's last position; with `every_position`, also
    [positions, vocab] for the first prompt's every position (the engine then prefills it alone)."""

    last: torch.Tensor
    every_position: torch.Tensor | None = None


class ModelRunner(ABC):
    """A model and its batch of KV cache rows, driven by the engine's thread only."""

    device: torch.device
    cost: PrefillCost
    name: str  # the engine's name in logs and metrics: "transformers" or "llamacpp"

    @abstractmethod
    def prefill(self, prompts: Sequence[Sequence[int]], every_position: bool = False) -> Prefilled:
        """Read `prompts` into new rows appended to the batch; on an exception no row is added."""

    @abstractmethod
    def decode(self, last_tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """One step for every row: row i reads `last_tokens[i]` at `positions[i]`; the logits, [rows, vocab]. On an
        out-of-memory error, `undo_step` puts the cache back as it was."""

    @abstractmethod
    def undo_step(self) -> None:
        """After a decode that failed part-way: every row as long as before it."""

    @abstractmethod
    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows`, in this order."""

    @abstractmethod
    def clear(self) -> None:
        """Drop every row."""

    def release_memory(self) -> None:
        """After an out-of-memory error: give cached blocks back (nothing to do by default)."""
        return None


class TransformersRunner(ModelRunner):
    """A transformers model; the batch's rows left-padded in one DynamicCache (serve.kv_batch)."""

    name = "transformers"

    def __init__(self, model: Any, pad_id: int) -> None:
        self.model = model
        self.pad_id = pad_id
        self.device = model.device
        self.cost = PrefillCost.of(model)
        self._batch = KVBatch()

    def prefill(self, prompts: Sequence[Sequence[int]], every_position: bool = False) -> Prefilled:
        input_ids, mask, positions = left_padded(prompts, self.pad_id)
        mask = mask.to(self.device)
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=mask,
            position_ids=positions.to(self.device),
            cache=KVBatch.new_cache(),
            use_cache=True,
            logits_to_keep=0 if every_position else 1,  # 0: every position's logits
        )
        self._batch.join(out.cache, mask)
        return Prefilled(out.logits[:, -1, :], out.logits[0] if every_position else None)

    def decode(self, last_tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        last = torch.tensor([[t] for t in last_tokens], dtype=torch.long, device=self.device)
        position_ids = torch.tensor([[p] for p in positions], dtype=torch.long, device=self.device)
        mask = self._batch.grow()
        out = self.model(
            input_ids=last, attention_mask=mask, position_ids=position_ids, cache=self._batch.cache, use_cache=True
        )
        self._batch.cache = out.cache
        return out.logits[:, -1, :]

    def undo_step(self) -> None:
        self._batch.undo_step()

    def keep(self, rows: Sequence[int]) -> None:
        self._batch.keep(rows)

    def clear(self) -> None:
        self._batch.clear()

    def release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
