"""quantize_int8: symmetric per-row int8 quantization, one fused pass per row.

Per row r (API.md, all in fp32):
    amax_r  = max_k |x[r, k]|
    scale_r = amax_r / 127            (1.0 where amax_r == 0)
    q[r, k] = clamp(round_half_even(x[r, k] / scale_r), -127, 127)
When the row fits one block (K <= MAX_ONE_BLOCK) it is loaded once and kept in registers for
both the reduction and the quantization; longer rows take a second sweep, which is served from
L2 since the same program just read them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from qtorch._kernels import INTERPRET

if not INTERPRET:
    from triton.language.extra import libdevice

# Rows up to this length are quantized from registers in one load (16 KiB of fp32 per row).
MAX_ONE_BLOCK = 4096


@triton.jit
def round_half_even(y, INTERPRET: tl.constexpr):
    """fp32 round-half-to-even of |y| <= 2^22 (torch.round semantics)."""
    if INTERPRET:
        # The interpreter has no libdevice. Adding then subtracting 1.5 * 2^23 leaves no
        # fraction bits, so the fp32 add itself rounds to nearest even.
        return (y + 12582912.0) - 12582912.0
    else:
        return libdevice.rint(y)


@triton.jit
def quantize_row_block(x, scale, INTERPRET: tl.constexpr):
    """q = clamp(round(x / scale), -127, 127) as int8; x fp32 block, scale fp32 scalar.
    IEEE division (div_rn), not x * (1/scale), so ties round exactly as the reference does."""
    y = tl.math.div_rn(x, scale)
    y = round_half_even(y, INTERPRET)
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    return y.to(tl.int8)


@triton.jit
def row_scale(amax):
    """scale = amax / 127, or 1.0 for an all-zero row (IEEE division, as the reference)."""
    return tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, 127.0))


@triton.jit
def _quantize_int8_kernel(
    x_ptr,  # [M, K] fp32/fp16/bf16, row stride stride_x, unit column stride
    q_ptr,  # [M, K] int8 out, contiguous
    scale_ptr,  # [M] fp32 out
    K,  # row length
    stride_x,  # elements between rows of x
    BLOCK_K: tl.constexpr,  # columns per sweep; >= K when ONE_BLOCK
    ONE_BLOCK: tl.constexpr,  # the whole row fits one block: read x once
    INTERPRET: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * K
    cols = tl.arange(0, BLOCK_K)
    if ONE_BLOCK:
        mask = cols < K
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        scale = row_scale(tl.max(tl.abs(x), axis=0))
        tl.store(q_row + cols, quantize_row_block(x, scale, INTERPRET), mask=mask)
    else:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + cols < K
            x = tl.load(x_row + k0 + cols, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = row_scale(tl.max(amax, axis=0))
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + cols < K
            x = tl.load(x_row + k0 + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_row + k0 + cols, quantize_row_block(x, scale, INTERPRET), mask=mask)
    tl.store(scale_ptr + row, scale)


def _launch_params(k: int) -> tuple[int, bool, int]:
    """(BLOCK_K, ONE_BLOCK, num_warps) for rows of length k."""
    if k <= MAX_ONE_BLOCK:
        block = triton.next_power_of_2(max(k, 16))
        return block, True, min(8, max(1, block // 256))
    return 2048, False, 8


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] fp32/fp16/bf16 (unit column stride) -> (q int8 [M, K], scale fp32 [M])."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    if k == 0:
        return q, scale.fill_(1.0)
    block, one, warps = _launch_params(k)
    _quantize_int8_kernel[(m,)](
        x, q, scale, k, x.stride(0),
        BLOCK_K=block, ONE_BLOCK=one, INTERPRET=INTERPRET, num_warps=warps,
    )
    return q, scale
