"""Helpers shared by tests, `qtorch validate` and benchmarks: SQNR and per-dtype tolerances."""

from __future__ import annotations

import math

import torch

# Tolerances for comparing a kernel with the fp32-math reference, per output dtype. A kernel
# that accumulates in fp32 in another order differs from the reference by a few ulps of fp32
# and then rounds once to the output dtype, so the output dtype's resolution dominates.
ATOL_RTOL = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float64: (1e-10, 1e-10),
}


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for results of `dtype` (scale atol by the output magnitude when needed)."""
    return ATOL_RTOL[dtype]


def sqnr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(Σ ref² / Σ (ref − approx)²).
    +inf when the two are identical."""
    ref = ref.double()
    noise = (ref - approx.double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def max_errors(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """(max |out − ref|, max |out − ref| / max |ref|), in float64."""
    ref64, out64 = ref.double(), out.double()
    abs_err = (out64 - ref64).abs().max().item() if ref.numel() else 0.0
    denom = ref64.abs().max().item() if ref.numel() else 0.0
    return abs_err, abs_err / denom if denom > 0 else abs_err


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None,
                 scale: float | None = None) -> None:
    """out ≈ ref within the tolerance of `dtype` (default out.dtype); atol is relative to
    `scale` (default max |ref|, at least 1) so large-magnitude outputs are judged fairly."""
    dtype = dtype or out.dtype
    atol, rtol = tolerances(dtype)
    if scale is None:
        scale = max(ref.detach().abs().max().item() if ref.numel() else 0.0, 1.0)
    torch.testing.assert_close(out.double(), ref.double(), atol=atol * scale, rtol=rtol)
