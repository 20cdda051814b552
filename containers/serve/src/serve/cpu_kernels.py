"""oneDNN matrix multiplies with prepacked weights, for fp32 serving on CPU.

Why: PyTorch sends an fp32 `nn.Linear` on CPU to MKL's sgemm. For a batched decode step (a few rows, e.g. 8
sequences) and for prefill, oneDNN with the weight reordered once into its blocked layout does the same product
much faster on this project's machines (AMD EPYC, AVX2; see docs/benchmarks.md, `serve`), above all for the
49k-row LM head. A single row (one lone request decoding) is faster on MKL, so rows below a threshold stay there.
The op is the one PyTorch's own compiler uses for frozen CPU linears (Inductor's mkldnn fusion pass); we call
it directly because compiling the model would cost far more start-up time than the 20 s we allow.

Only model loading (serve.artifact) uses this module.
The packed copy doubles the linear weights' memory (about +0.5 GiB for a 135 M model); that is the trade.
"""

from __future__ import annotations

import torch

# Rows (batch x positions) from which the packed oneDNN path is faster than MKL, measured on the project's
# machine kind for SmolLM2's shapes: one row is faster on MKL, from two rows on oneDNN wins.
DEFAULT_MIN_ROWS = 2


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(torch.nn.Module):
    """`nn.Linear` that multiplies with a oneDNN-packed copy of its weight once enough rows come in."""

    def __init__(self, linear: torch.nn.Linear, min_rows: int = DEFAULT_MIN_ROWS):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # shared, not copied: tied embeddings stay tied
        self.bias = linear.bias
        self.min_rows = min_rows
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.register_buffer("packed_weight", packed, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < self.min_rows * self.in_features or x.dtype != torch.float32:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, min_rows={self.min_rows}"


def pack_linears(model: torch.nn.Module, min_rows: int = DEFAULT_MIN_ROWS) -> int:
    """Swap every fp32 CPU `nn.Linear` in `model` for a PackedLinear, in place; returns how many."""
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Linear and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu"
    ]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child, min_rows))
    return len(targets)
