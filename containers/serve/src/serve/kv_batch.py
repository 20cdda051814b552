"""The running batch's KV cache: one left-padded row per sequence, on transformers' DynamicCache.

Sequences join (their prefilled rows are appended, the shorter side padded on the left so every row ends at
the current position) and leave (their rows dropped, then columns that only padding still uses trimmed).
The attention mask, one row per sequence and one column per cache position, marks the padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, position ids) for prefilling `prompts` together, each [len(prompts), longest]."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, mask, positions


class KVBatch:
    """The cache and mask shared by the running sequences, row i belonging to the i-th running sequence."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, cache length], 0 where a row is padding

    @staticmethod
    def new_cache() -> DynamicCache:
        return DynamicCache()

    def join(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append the rows of a prefill (its cache and mask) below the running ones."""
        if self.cache is None or self.mask is None:
            self.cache, self.mask = cache, mask
            return
        old_len, new_len = self.mask.shape[1], mask.shape[1]
        pad_old, pad_new = max(0, new_len - old_len), max(0, old_len - new_len)
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([F.pad(old.keys, (0, 0, pad_old, 0)), F.pad(new.keys, (0, 0, pad_new, 0))])
            old.values = torch.cat([F.pad(old.values, (0, 0, pad_old, 0)), F.pad(new.values, (0, 0, pad_new, 0))])
        self.mask = torch.cat([F.pad(self.mask, (pad_old, 0)), F.pad(mask, (pad_new, 0))])

    def grow(self) -> torch.Tensor:
        """One more position for every row (the token a decode step feeds in); returns the new mask."""
        assert self.mask is not None
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        return self.mask

    def undo_step(self) -> None:
        """After a decode step that failed part-way: the mask loses the column grow() added, and layers that
        already appended that position drop it, so every layer is as long as the mask again."""
        assert self.cache is not None and self.mask is not None
        self.mask = self.mask[:, :-1]
        width = self.mask.shape[1]
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, :width]
            layer.values = layer.values[:, :, :width]

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in this order), then trim the columns that are padding in every row left."""
        if not rows:
            self.clear()
            return
        assert self.cache is not None and self.mask is not None
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask[index]
        first = int(mask.sum(0).nonzero()[0])
        self.mask = mask[:, first:]
        for layer in self.cache.layers:
            rows = index.to(layer.keys.device)  # under device_map the layers live on different GPUs
            layer.keys = layer.keys[rows, :, first:]
            layer.values = layer.values[rows, :, first:]

    def clear(self) -> None:
        self.cache, self.mask = None, None
