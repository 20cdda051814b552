"""A row-sparse forward for PEFT's trainable token embeddings (`lora_train_token_embeddings`).

PEFT's `TrainableTokensLayer` (peft 0.21) writes the trained rows into a fresh copy of the whole vocabulary x hidden
matrix on every forward (`index_copy`), once for the embedding and again for an LM head tied to it, and the backward
pass then takes a dense gradient of that copy: for the head, a matrix product as large as the head itself. For
SmolLM2 that is two 113 MB matrices built and differentiated per step to train 1911 rows (what it cost is in
docs/benchmarks.md, "Training"). The forward below gives the same outputs and the same gradients while touching only
the trained rows: the embedding looks tokens up in the frozen matrix and swaps in the trained rows; the head
multiplies by the frozen matrix and overwrites the trained rows' logits. It changes no parameter or buffer, so
saving, resuming and merging stay PEFT's own, and anything it does not cover (several or disabled adapters, merged
weights) goes to PEFT's path.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def use_row_sparse_forward(model: nn.Module) -> int:
    """Give every trainable-token layer in `model` the row-sparse forward; returns how many there were."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    layers = [
        m
        for m in model.modules()
        if isinstance(m, TrainableTokensLayer) and isinstance(m.get_base_layer(), nn.Embedding | nn.Linear)
    ]
    for layer in layers:
        layer.forward = types.MethodType(_row_sparse_forward, layer)  # on the instance: PEFT's class is untouched
        layer._row_index_cache = {}
    return len(layers)


def _row_sparse_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapters = layer.active_adapters
    if layer.disable_adapters or layer.merged or len(adapters) != 1 or adapters[0] not in layer.trainable_tokens_delta:
        return type(layer).forward(layer, x, *args, **kwargs)
    adapter = adapters[0]
    base = layer.get_base_layer()
    rows = layer.trainable_tokens_delta[adapter].to(base.weight)  # the trained rows themselves, not differences
    index, position = _row_index(layer, adapter, base.weight)
    if isinstance(base, nn.Embedding):
        out = F.embedding(
            x,
            base.weight,
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )
        slot = position[x]  # where each token's row sits among the trained rows, -1 if it is not trained
        out = torch.where((slot >= 0).unsqueeze(-1), F.embedding(slot.clamp(min=0), rows), out)
        scale = layer._get_embed_scale()  # as PEFT does, for embeddings that scale their output (Gemma 3)
        return out if scale is None else out * scale.to(out.dtype)
    # A head tied to the embedding: PEFT's path applies no bias either.
    out = F.linear(x, base.weight)
    return out.index_copy(-1, index, F.linear(x, rows).to(out.dtype))


def _row_index(layer, adapter: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained token ids, and a vocabulary-sized map from token id to its trained row (-1: frozen), per device."""
    key = (adapter, weight.device)
    if key not in layer._row_index_cache:
        index = torch.tensor(layer.token_indices[adapter], dtype=torch.long, device=weight.device)
        position = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        position[index] = torch.arange(len(index), device=weight.device)
        layer._row_index_cache[key] = (index, position)
    return layer._row_index_cache[key]
