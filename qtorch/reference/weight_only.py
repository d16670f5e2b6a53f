"""Weight-only references: int4 group-wise quantization in canonical storage (API.md,
"Quantization numerics"), and the W8A16 / W4A16 linears with their input gradients (which
also serve the W8A8 linear's backward). All statistics in float32; round is
round-half-to-even (torch.round)."""

from __future__ import annotations

import torch

# ----------------------------------------------------------------------------------- W8A16


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


# ------------------------------------------------------------------------------------ int4


def quantize_int4(
    w: torch.Tensor, group_size: int = 128, symmetric: bool = False, zero_point: str = "int"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise int4 per output channel, canonical storage.

    w [N, K] float (K % group_size == 0)  ->
        qweight uint8 [N, K // 2]  (k even: low nibble of byte k // 2; k odd: high nibble)
        scales  float32 [N, K // group_size]
        zeros   uint8   [N, K // group_size]  (8 everywhere when symmetric)
    asymmetric: lo = min(min(w_g), 0), hi = max(max(w_g), 0), scale = (hi - lo) / 15
                (1.0 where hi == lo), zero = clamp(round(-lo / scale), 0, 15),
                q = clamp(round(w / scale) + zero, 0, 15)
    symmetric:  scale = amax / 7 (1.0 where amax == 0), q = clamp(round(w / scale), -8, 7) + 8
    zero_point="float" (asymmetric only; Q4_1's grid): the group's own range, a float zero
                lo = min(w_g), hi = max(w_g), scale = (hi - lo) / 15 (1.0 where hi == lo),
                zero = -lo / scale (float32, not rounded), q = clamp(round(w / scale + zero), 0, 15)
                zeros is then float32 [N, K // group_size].
    """
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    if zero_point == "float":
        lo = g.amin(dim=-1)
        hi = g.amax(dim=-1)
        scale = torch.where(hi == lo, torch.ones_like(hi), (hi - lo) / 15)
        zero = -lo / scale
        q = torch.clamp(torch.round(g / scale.unsqueeze(-1) + zero.unsqueeze(-1)), 0, 15)
        q = q.to(torch.uint8).reshape(n, k)
        qweight = q[:, 0::2] | (q[:, 1::2] << 4)
        return qweight.contiguous(), scale.contiguous(), zero.contiguous()
    if symmetric:
        amax = g.abs().amax(dim=-1)
        scale = torch.where(amax == 0, torch.ones_like(amax), amax / 7)
        q = torch.clamp(torch.round(g / scale.unsqueeze(-1)), -8, 7) + 8
        zero = torch.full_like(scale, 8)
    else:
        lo = g.amin(dim=-1).clamp(max=0)
        hi = g.amax(dim=-1).clamp(min=0)
        scale = torch.where(hi == lo, torch.ones_like(hi), (hi - lo) / 15)
        zero = torch.clamp(torch.round(-lo / scale), 0, 15)
        q = torch.clamp(torch.round(g / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, 15)
    q = q.to(torch.uint8).reshape(n, k)
    qweight = q[:, 0::2] | (q[:, 1::2] << 4)
    return qweight.contiguous(), scale.contiguous(), zero.to(torch.uint8).contiguous()


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] canonical packing -> uint8 [N, K] of values 0..15."""
    lo = qweight & 0xF
    hi = qweight >> 4
    return torch.stack((lo, hi), dim=-1).reshape(qweight.shape[0], -1)


def dequantize_int4(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """ŵ = (q - zero) * scale, float32 [N, K]; zeros uint8 or float32 (both exact in fp32)."""
    q = unpack_int4(qweight).float()
    n, k = q.shape
    q = q.reshape(n, k // group_size, group_size)
    w = (q - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return w.reshape(n, k)


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
