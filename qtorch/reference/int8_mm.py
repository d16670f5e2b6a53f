"""W8A8 int8 references: per-row int8 quantization, the int8 GEMM with its fp32 epilogue, and
the dynamic W8A8 linear (API.md, "Quantization numerics"). All statistics in float32; round
is round-half-to-even (torch.round)."""

from __future__ import annotations

import torch


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8.

    x [..., K] float  ->  q [..., K] int8, scale [...] float32, with
        amax_r = max_k |x[r, k]|;  scale_r = amax_r / 127  (1.0 where amax_r == 0)
        q[r, k] = clamp(round(x[r, k] / scale_r), -127, 127)
    Edge cases (docs/semantics.md): a row holding a NaN or ±inf gets scale NaN and q 0, so
    every output computed from it is NaN, never a finite wrong value; a row whose scale
    underflows to 0 (0 < amax < 127 · 2^-149) counts as amax == 0: scale 1, q 0.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1) if xf.shape[-1] > 0 else xf.new_zeros(xf.shape[:-1])
    scale = amax / 127
    finite = torch.isfinite(amax)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    q = torch.clamp(torch.round(xf / scale.unsqueeze(-1)), -127, 127)
    q = torch.where(finite.unsqueeze(-1), q, torch.zeros_like(q)).to(torch.int8)
    return q, scale


MAX_EXACT_K = (2**31 - 1) // (128 * 128)  # 131071: |a·b| <= 128², the int32 sum of K of them


def _int_mm_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 @ b [N, K].T in exact int32.

    Computed in float64 on every device: each product is at most 127² and float64 holds
    integers exactly up to 2^53, so the sum is exact for any K < 5e11.
    """
    return (a.double() @ b.double().T).to(torch.int32)


def int8_scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(a @ b.T in exact int32) * scale_a[:, None] * scale_b[None, :] + bias, as out_dtype.

    a [M, K] int8, b [N, K] int8, scale_a [M] fp32, scale_b [N] fp32, bias [N] or None.
    The epilogue runs in fp32 and rounds once, to out_dtype. int32 is exact only while
    128 · 128 · K <= 2^31 - 1, so K > 131071 is a ValueError (never a wrapped or saturated sum).
    """
    if a.shape[-1] > MAX_EXACT_K:
        raise ValueError(
            f"K = {a.shape[-1]} is too large for exact int32 accumulation of int8 "
            f"products (K <= {MAX_EXACT_K})"
        )
    acc = _int_mm_exact(a, b).float()
    out = acc * scale_a.float().reshape(-1, 1) * scale_b.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def int8_linear(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Dynamic W8A8: x [..., K] quantized per token (quantize_int8), int8 GEMM with the
    per-channel weight w_q [N, K] / w_scale [N], rescaled; result [..., N] in x.dtype (the
    leading dims of x are kept, as the op keeps them). Its input gradient is
    `weight_only.int8_linear_grad_input` (straight-through)."""
    q, s = quantize_int8(x.reshape(-1, x.shape[-1]))
    out = int8_scaled_mm(q, w_q, s, w_scale, bias, out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], w_q.shape[0])


def int8_linear_smooth(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    smooth_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """SmoothQuant W8A8: int8_linear(x / s, w_q, w_scale, bias) with s = smooth_scale fp32 [K]
    and w_q / w_scale the int8 weight of W · diag(s). The division is in fp32 (x widened
    exactly, one rounding per element) and feeds the per-token quantization directly, with no
    rounding to x.dtype in between: what a kernel that fuses it into that step computes.
    x [..., K] -> [..., N] x.dtype, leading dims kept."""
    q, s = quantize_int8(x.reshape(-1, x.shape[-1]).float() / smooth_scale.float())
    out = int8_scaled_mm(q, w_q, s, w_scale, bias, out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], w_q.shape[0])
