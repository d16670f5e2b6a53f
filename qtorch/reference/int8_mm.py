"""int8 matmul references."""

from __future__ import annotations

import torch

from qtorch.reference.quantize import quantize_int8


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
    The epilogue runs in fp32 and rounds once, to out_dtype.
    """
    acc = _int_mm_exact(a, b).float()
    out = acc * scale_a.float().reshape(-1, 1) * scale_b.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def int8_linear(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Dynamic W8A8: x [M, K] quantized per token (quantize_int8), int8 GEMM with the
    per-channel weight w_q [N, K] / w_scale [N], rescaled; result [M, N] in x.dtype."""
    q, s = quantize_int8(x)
    return int8_scaled_mm(q, w_q, s, w_scale, bias, out_dtype=x.dtype)


def int8_weight_only_linear(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """W8A16: x @ (w_q * w_scale[:, None]).T + bias, computed in fp32, result in x.dtype."""
    w = w_q.float() * w_scale.float().reshape(-1, 1)
    out = x.float() @ w.T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def int8_linear_grad_input(
    grad_out: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    """d(x @ ŵ.T)/dx applied to grad_out [M, N]: grad_out @ ŵ, ŵ = w_q * w_scale[:, None];
    fp32 math, result in grad_out.dtype. Serves both int8 linears (activation quantization
    is straight-through)."""
    w = w_q.float() * w_scale.float().reshape(-1, 1)
    return (grad_out.float() @ w).to(grad_out.dtype)
