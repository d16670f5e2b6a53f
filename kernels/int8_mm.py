"""W8A8 int8 kernels: quantize_int8, int8_scaled_mm and int8_linear.

quantize_int8: symmetric per-row int8 quantization, one fused pass per row. Per row r
(API.md, all in fp32):
    amax_r  = max_k |x[r, k]|
    scale_r = amax_r / 127            (1.0 where amax_r == 0 or amax_r / 127 underflows to 0)
    q[r, k] = clamp(round_half_even(x[r, k] / scale_r), -127, 127)
    (a row holding NaN or ±inf: scale_r = NaN, q = 0; docs/semantics.md)
When the row fits one block (K <= MAX_ONE_BLOCK) it is loaded once and kept in registers for
both the reduction and the quantization; longer rows take a second sweep, which is served from
L2 since the same program just read them.

W8A8:  out[m, n] = (Σ_k a[m, k] · b[n, k], exact int32) · scale_a[m] · scale_b[n] + bias[n]
       int8 × int8 → int32 `tl.dot` (IMMA on sm_80, IGMMA on sm_90); the epilogue applies the
       row and column scales, the bias and the cast to out_dtype in registers, in fp32, in the
       reference's order ((acc · sa) · sb + bias), and rounds once.
       int8_linear quantizes x per token with the one-pass quantize_int8 kernel (x is read
       once, in float; the GEMM then reads int8, a quarter of fp32's bytes) and runs the same
       GEMM with out_dtype = x.dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from qtorch._kernels import INTERPRET, for_device, gpu_configs, pow2_bucket
from qtorch._kernels import gemm_config as _cfg

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
    # A NaN scale marks a row holding NaN/inf: its codes are 0 (the scale poisons the output).
    y = tl.where(scale == scale, y, 0.0)
    return y.to(tl.int8)


@triton.jit
def row_scale(amax, nonfinite):
    """scale = amax / 127 (IEEE division, as the reference); 1.0 for an all-zero row or one
    whose amax / 127 underflows to 0; NaN for a row holding NaN or ±inf (`nonfinite` > 0:
    counted apart because tl.maximum may drop NaN operands)."""
    s = tl.math.div_rn(amax, 127.0)
    s = tl.where(s == 0.0, 1.0, s)
    return tl.where(nonfinite > 0, float("nan"), s)


@triton.jit
def count_nonfinite(x):
    """How many entries of the block x are NaN or ±inf (NaN < inf is false)."""
    return tl.sum(tl.where(tl.abs(x) < float("inf"), 0, 1), axis=0)


@triton.jit
def _quantize_int8_kernel(
    x_ptr,  # [M, K] fp32/fp16/bf16, row stride stride_x, unit column stride
    q_ptr,  # [M, K] int8 out, contiguous
    scale_ptr,  # [M] fp32 out
    K,  # row length
    stride_x,  # elements between rows of x
    smooth_ptr,  # [K] fp32 SmoothQuant divisor of x (read when SMOOTH), or any pointer
    BLOCK_K: tl.constexpr,  # columns per sweep; >= K when ONE_BLOCK
    ONE_BLOCK: tl.constexpr,  # the whole row fits one block: read x once
    INTERPRET: tl.constexpr,
    SMOOTH: tl.constexpr = False,  # quantize x / smooth (IEEE fp32 division as it is read)
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * K
    cols = tl.arange(0, BLOCK_K)
    if ONE_BLOCK:
        mask = cols < K
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if SMOOTH:
            x = tl.math.div_rn(x, tl.load(smooth_ptr + cols, mask=mask, other=1.0))
        scale = row_scale(tl.max(tl.abs(x), axis=0), count_nonfinite(x))
        tl.store(q_row + cols, quantize_row_block(x, scale, INTERPRET), mask=mask)
    else:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        bad = tl.zeros((BLOCK_K,), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + cols < K
            x = tl.load(x_row + k0 + cols, mask=mask, other=0.0).to(tl.float32)
            if SMOOTH:
                x = tl.math.div_rn(x, tl.load(smooth_ptr + k0 + cols, mask=mask, other=1.0))
            amax = tl.maximum(amax, tl.abs(x))
            bad += tl.where(tl.abs(x) < float("inf"), 0, 1)
        scale = row_scale(tl.max(amax, axis=0), tl.sum(bad, axis=0))
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + cols < K
            x = tl.load(x_row + k0 + cols, mask=mask, other=0.0).to(tl.float32)
            if SMOOTH:
                x = tl.math.div_rn(x, tl.load(smooth_ptr + k0 + cols, mask=mask, other=1.0))
            tl.store(q_row + k0 + cols, quantize_row_block(x, scale, INTERPRET), mask=mask)
    tl.store(scale_ptr + row, scale)


def _launch_params(k: int) -> tuple[int, bool, int]:
    """(BLOCK_K, ONE_BLOCK, num_warps) for rows of length k."""
    if k <= MAX_ONE_BLOCK:
        block = triton.next_power_of_2(max(k, 16))
        return block, True, min(8, max(1, block // 256))
    return 2048, False, 8


def quantize_int8(
    x: torch.Tensor, smooth: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] fp32/fp16/bf16 (unit column stride) -> (q int8 [M, K], scale fp32 [M]) of
    x / smooth when smooth (fp32 [K], SmoothQuant) is given, divided inside the kernel."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    if k == 0:
        return q, scale.fill_(1.0)
    block, one, warps = _launch_params(k)
    _quantize_int8_kernel[(m,)](
        x,
        q,
        scale,
        k,
        x.stride(0),
        x if smooth is None else smooth,
        BLOCK_K=block,
        ONE_BLOCK=one,
        INTERPRET=INTERPRET,
        SMOOTH=smooth is not None,
        num_warps=warps,
    )
    return q, scale


# int8 tiles: K blocks of 128 bytes fill the 128-byte shared-memory rows of the MMA swizzle.
# Shared memory per stage = (BM + BN) · BK bytes. On sm_80 (mma.sync, accumulators in the
# registers of all warps) 128×256 tiles spill registers whatever BK (checked by
# tests/test_triton_aot.py), so Ampere stops at 128×128; Hopper's wgmma keeps 128×256 with
# 4 stages = 192 KiB of the 227 KiB.
_INT8_AMPERE = [
    _cfg(128, 128, 128, 8, 3),
    _cfg(128, 128, 64, 8, 4),
    _cfg(128, 64, 128, 4, 4),
    _cfg(64, 128, 128, 4, 4),
    _cfg(64, 64, 128, 4, 4),
    _cfg(16, 128, 256, 4, 4),
    _cfg(32, 64, 256, 4, 4),
]
_INT8_HOPPER = [
    _cfg(128, 256, 128, 8, 4),
    _cfg(256, 128, 128, 8, 4),
    _cfg(128, 128, 128, 8, 4),
    _cfg(128, 128, 128, 4, 5),
    _cfg(64, 128, 128, 4, 5),
    _cfg(64, 64, 128, 4, 6),
    _cfg(16, 128, 256, 4, 5),
    _cfg(32, 64, 256, 4, 5),
]
AMPERE_CONFIGS = {"_int8_scaled_mm_kernel": _INT8_AMPERE}
HOPPER_CONFIGS = {"_int8_scaled_mm_kernel": _INT8_HOPPER}
# Under the interpreter: few, large programs (its cost grows with the program count).
_INTERP = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=4)


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in grouped order: GROUP_M row blocks share each column sweep, so the B
    tiles they read stay in L2 (Triton matmul tutorial)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    return pid_m, pid_n


@triton.jit
def _int8_scaled_mm_kernel(
    a_ptr,  # [M, K] int8, row stride K
    b_ptr,  # [N, K] int8, row stride K (used as the K×N operand b.T)
    c_ptr,  # [M, N] out_dtype, row stride N
    sa_ptr,  # [M] fp32 row scales
    sb_ptr,  # [N] fp32 column scales
    bias_ptr,  # [N] any float dtype, or a dummy when HAS_BIAS is False
    M,
    N,
    K,
    M_BUCKET,  # autotune key only (next power of two of M)
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Out-of-range rows/cols wrap to valid ones (their results are never stored), so A and B
    # loads need a mask only along K.
    ra = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M)
    rb = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
    a_ptrs = a_ptr + ra[:, None].to(tl.int64) * K + rk[None, :]
    b_ptrs = b_ptr + rb[None, :].to(tl.int64) * K + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kmask = rk < K - k0
        a = tl.load(a_ptrs, mask=kmask[None, :], other=0)
        b = tl.load(b_ptrs, mask=kmask[:, None], other=0)
        acc = tl.dot(a, b, acc)  # int8 x int8 -> int32, exact
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    # Epilogue in fp32: ((acc · sa) · sb) + bias, one rounding to the output dtype.
    sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
    sb = tl.load(sb_ptr + rn, mask=rn < N, other=0.0)
    out = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


_int8_scaled_mm_tuned = triton.autotune(
    configs=gpu_configs(_INT8_AMPERE, _INT8_HOPPER),
    key=["M_BUCKET", "N", "K", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": for_device(_INT8_AMPERE, _INT8_HOPPER)},
)(_int8_scaled_mm_kernel)


def int8_scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """a [M, K] int8, b [N, K] int8, scale_a [M] fp32, scale_b [N] fp32, bias [N] | None
    -> [M, N] out_dtype (fp32/fp16/bf16); contiguous inputs."""
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    if k == 0:  # empty sum: the epilogue alone
        out = torch.zeros((m, n), dtype=torch.float32, device=a.device)
        return (out + bias.float() if bias is not None else out).to(out_dtype)
    args = (
        a,
        b,
        c,
        scale_a,
        scale_b,
        bias if bias is not None else scale_b,
        m,
        n,
        k,
        pow2_bucket(m),
    )
    if INTERPRET:
        grid = (triton.cdiv(m, _INTERP["BLOCK_M"]) * triton.cdiv(n, _INTERP["BLOCK_N"]),)
        _int8_scaled_mm_kernel[grid](*args, HAS_BIAS=bias is not None, **_INTERP)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _int8_scaled_mm_tuned[grid](*args, HAS_BIAS=bias is not None)
    return c


def int8_linear(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Dynamic W8A8: x [M, K] float, w_q [N, K] int8, w_scale [N] fp32 -> [M, N] x.dtype."""
    q, s = quantize_int8(x)
    return int8_scaled_mm(q, w_q, s, w_scale, bias, x.dtype)


def int8_linear_smooth(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    smooth: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """SmoothQuant W8A8: int8_linear of x / smooth (fp32 [K]), the division fused into the
    activation-quantization kernel."""
    q, s = quantize_int8(x, smooth)
    return int8_scaled_mm(q, w_q, s, w_scale, bias, x.dtype)
