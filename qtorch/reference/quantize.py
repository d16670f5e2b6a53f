"""Quantization references (API.md, "Quantization numerics"). All statistics in float32;
round is round-half-to-even (torch.round)."""

from __future__ import annotations

import torch


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8.

    x [..., K] float  ->  q [..., K] int8, scale [...] float32, with
        amax_r = max_k |x[r, k]|;  scale_r = amax_r / 127  (1.0 where amax_r == 0)
        q[r, k] = clamp(round(x[r, k] / scale_r), -127, 127)
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1) if xf.shape[-1] > 0 else xf.new_zeros(xf.shape[:-1])
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / 127)
    q = torch.clamp(torch.round(xf / scale.unsqueeze(-1)), -127, 127).to(torch.int8)
    return q, scale


def quantize_int4(
    w: torch.Tensor, group_size: int = 128, symmetric: bool = False
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
    """
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
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
    """ŵ = (q - zero) * scale, float32 [N, K]."""
    q = unpack_int4(qweight).float()
    n, k = q.shape
    q = q.reshape(n, k // group_size, group_size)
    w = (q - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return w.reshape(n, k)
