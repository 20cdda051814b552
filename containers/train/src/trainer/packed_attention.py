"""Attention over packed rows that computes each example's own causal block only.

With packing, a row of 2,048 tokens holds ~10 examples. Transformers keeps them apart with a block mask, which
its SDPA path materialises, and a masked SDPA call computes attention over the whole row: ~10x the work that the
examples need, and on a GPU the slower masked kernel. PyTorch's `varlen_attn` (Flash Attention over concatenated
sequences, bounds given as cumulative lengths) computes only the blocks that exist. We register it with
Transformers' attention interface under our own name; wherever it cannot run (CPU, no cumulative lengths given, as
in generation) the same name falls back to Transformers' SDPA with the mask, so the model behaves alike anywhere.
"""

from __future__ import annotations

import inspect
import itertools

import torch

NAME = "packed_varlen"


def use_packed_attention(model) -> str:
    """Switch `model` (the bare Transformers model) to packed attention; returns the implementation it had."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the fallback's mask; built on a GPU too, and cheap
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    return previous


def packed_attention_forward(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens: torch.Tensor | None = None,
    max_seq_len: int | None = None,
    **kwargs,
):
    """Transformers' attention-function contract: query/key/value (batch, heads, length, head_dim) in, output
    (batch, length, heads, head_dim) and no weights out. `cu_seq_lens` are the bounds of every example (and of each
    row's padding) in the rows laid end to end, `max_seq_len` the longest."""
    if cu_seq_lens is None or dropout > 0 or not varlen_available(query):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    batch, heads, length, head_dim = query.shape
    # Flash kernels take 16-bit inputs only; in mixed precision the rotary embedding hands over fp32 queries and keys.
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else value.dtype
    query, key, value = (t.to(dtype) for t in (query, key, value))
    if key.shape[1] != heads:  # grouped-query attention: one key/value head per group of query heads
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(batch * length, heads, head_dim)

    out = varlen_causal(flat(query), flat(key), flat(value), cu_seq_lens, max_seq_len, scaling)
    return out.view(batch, length, heads, head_dim), None


def varlen_available(query: torch.Tensor) -> bool:
    sixteen_bit = (torch.bfloat16, torch.float16)
    if not query.is_cuda or not (query.dtype in sixteen_bit or torch.is_autocast_enabled("cuda")):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (PyTorch 2.10 and later)
    except ImportError:
        return False
    return True


def varlen_causal(query, key, value, cu_seq_lens, max_seq_len: int, scale: float | None) -> torch.Tensor:
    """Causal attention within each [cu_seq_lens[i], cu_seq_lens[i+1]) span of (tokens, heads, head_dim) tensors."""
    from torch.nn.attention.varlen import varlen_attn

    accepted = _parameters(varlen_attn)
    # Earlier releases take `is_causal`; later ones say causal as a (-1, 0) window.
    options = {"window_size": (-1, 0)} if "window_size" in accepted else {"is_causal": True}
    if "scale" in accepted:
        options["scale"] = scale
    elif scale is not None and abs(scale - query.shape[-1] ** -0.5) > 1e-6:
        raise NotImplementedError(f"this PyTorch's varlen_attn takes no scale, and the model asks for {scale}")
    return varlen_attn(query, key, value, cu_seq_lens, cu_seq_lens, max_seq_len, max_seq_len, **options)


def reference_varlen_causal(query, key, value, cu_seq_lens, max_seq_len: int, scale: float | None) -> torch.Tensor:
    """What varlen_causal computes, one span at a time with plain SDPA: for tests, on any device."""
    out = torch.empty_like(query)
    bounds = cu_seq_lens.tolist()
    for start, end in itertools.pairwise(bounds):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        span = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        out[start:end] = span.transpose(0, 1)
    return out


def _parameters(function) -> set[str]:
    try:
        return set(inspect.signature(function).parameters)
    except (TypeError, ValueError):  # a compiled op without a Python signature
        return set()
