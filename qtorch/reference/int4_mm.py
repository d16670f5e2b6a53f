"""int4 weight-only matmul reference."""

from __future__ import annotations

import torch

from qtorch.reference.quantize import dequantize_int4


def int4_weight_only_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W4A16: x [M, K] @ ŵ.T + bias with ŵ = dequantize_int4(...) [N, K]; fp32 math,
    result in x.dtype."""
    w = dequantize_int4(qweight, scales, zeros, group_size)
    out = x.float() @ w.T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def int4_linear_grad_input(
    grad_out: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """grad_out [M, N] @ ŵ [N, K] in fp32, result in grad_out.dtype."""
    w = dequantize_int4(qweight, scales, zeros, group_size)
    return (grad_out.float() @ w).to(grad_out.dtype)
