"""int8 matmuls: int8_scaled_mm and int8_linear (W8A8), int8_weight_only_linear (W8A16).

W8A8:  out[m, n] = (Σ_k a[m, k] · b[n, k], exact int32) · scale_a[m] · scale_b[n] + bias[n]
       int8 × int8 → int32 `tl.dot` (IMMA on sm_80, IGMMA on sm_90); the epilogue applies the
       row and column scales, the bias and the cast to out_dtype in registers, in fp32, in the
       reference's order ((acc · sa) · sb + bias), and rounds once.
       int8_linear quantizes x per token with the one-pass kernel of quantize.py (x is read
       once, in float; the GEMM then reads int8, a quarter of fp32's bytes) and runs the same
       GEMM with out_dtype = x.dtype.
W8A16: out = (x @ w_q.T) · w_scale[n] + bias. The per-output-channel scale factors out of the
       K sum, so int8 weights are converted to x's 16-bit type in registers (exact: |q| <= 127)
       and fed to an fp16/bf16 `tl.dot` with fp32 accumulation; the scale is applied once in
       the epilogue. For M <= 16 (decode) the launch uses 16-row, 32-column tiles so that
       many programs stream the weight (read once) at memory bandwidth; when those tiles do
       not cover the SMs, K is split too and torch reduces the fp32 partials [SPLIT_K, M, N].
       fp32 activations use a tf32x3 dot (about fp32 accuracy) with one fixed tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from qtorch._kernels import F32_PRECISION, INTERPRET, for_device, gpu_configs, num_sms, pow2_bucket
from qtorch._kernels import gemm_config as _cfg
from qtorch._kernels.quantize import quantize_int8

# int8 tiles: K blocks of 128 bytes fill the 128-byte shared-memory rows of the MMA swizzle.
# Shared memory per stage = (BM + BN) · BK bytes. On sm_80 (mma.sync, accumulators in the
# registers of all warps) 128×256 tiles spill registers whatever BK (checked by
# tests/test_triton_aot.py), so Ampere stops at 128×128; Hopper's wgmma keeps 128×256 with
# 4 stages = 192 KiB of the 227 KiB.
_INT8_AMPERE = [
    _cfg(128, 128, 128, 8, 3), _cfg(128, 128, 64, 8, 4), _cfg(128, 64, 128, 4, 4),
    _cfg(64, 128, 128, 4, 4), _cfg(64, 64, 128, 4, 4), _cfg(16, 128, 256, 4, 4),
    _cfg(32, 64, 256, 4, 4),
]
_INT8_HOPPER = [
    _cfg(128, 256, 128, 8, 4), _cfg(256, 128, 128, 8, 4), _cfg(128, 128, 128, 8, 4),
    _cfg(128, 128, 128, 4, 5), _cfg(64, 128, 128, 4, 5), _cfg(64, 64, 128, 4, 6),
    _cfg(16, 128, 256, 4, 5), _cfg(32, 64, 256, 4, 5),
]
# 16-bit activations, int8 weights converted in registers: BK = 64 halves = 128 bytes.
_W8A16_AMPERE = [
    _cfg(128, 256, 32, 8, 3), _cfg(128, 128, 64, 8, 3), _cfg(64, 256, 64, 8, 3),
    _cfg(128, 128, 32, 4, 4), _cfg(64, 128, 64, 4, 4), _cfg(128, 64, 64, 4, 4),
    _cfg(64, 64, 64, 4, 4), _cfg(32, 128, 64, 4, 4),
]
_W8A16_HOPPER = [
    _cfg(128, 256, 64, 8, 4), _cfg(128, 128, 64, 8, 4), _cfg(128, 128, 64, 4, 4),
    _cfg(64, 128, 64, 4, 5), _cfg(64, 64, 64, 4, 6), _cfg(32, 128, 64, 4, 5),
]
AMPERE_CONFIGS = {"_int8_scaled_mm_kernel": _INT8_AMPERE, "_w8a16_kernel": _W8A16_AMPERE}
HOPPER_CONFIGS = {"_int8_scaled_mm_kernel": _INT8_HOPPER, "_w8a16_kernel": _W8A16_HOPPER}
# Decode (M <= 16) launch of the W8A16 kernel: one 16-row block (the smallest MMA M), narrow
# N tiles so that many programs stream the weight, split-K when N is small.
_W8A16_DECODE = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
# Under the interpreter: few, large programs (its cost grows with the program count).
_INTERP = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=4)
# fp32 activations on GPU (tf32x3 dot): operands twice the bytes of 16-bit ones, so the 16-bit
# tile lists spill or overflow shared memory; one modest tile instead of autotuning.
_F32_CFG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)


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
    M, N, K,
    M_BUCKET,  # autotune key only (next power of two of M)
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
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
    args = (a, b, c, scale_a, scale_b, bias if bias is not None else scale_b, m, n, k,
            pow2_bucket(m))
    if INTERPRET:
        grid = (triton.cdiv(m, _INTERP["BLOCK_M"]) * triton.cdiv(n, _INTERP["BLOCK_N"]),)
        _int8_scaled_mm_kernel[grid](*args, HAS_BIAS=bias is not None, **_INTERP)
    else:
        grid = lambda meta: (
            triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),
        )
        _int8_scaled_mm_tuned[grid](*args, HAS_BIAS=bias is not None)
    return c


def int8_linear(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Dynamic W8A8: x [M, K] float, w_q [N, K] int8, w_scale [N] fp32 -> [M, N] x.dtype."""
    q, s = quantize_int8(x)
    return int8_scaled_mm(q, w_q, s, w_scale, bias, x.dtype)


@triton.jit
def _w8a16_kernel(
    x_ptr,  # [M, K] fp32/fp16/bf16, row stride K
    w_ptr,  # [N, K] int8, row stride K
    ws_ptr,  # [N] fp32 per-output-channel scale
    bias_ptr,  # [N] or dummy
    out_ptr,  # SPLIT_K == 1: [M, N] x.dtype;  else fp32 partials [SPLIT_K, M, N]
    M, N, K,
    K_PER_SPLIT,  # K range of one split (a multiple of BLOCK_K)
    M_BUCKET,  # autotune key only
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,  # > 1: write fp32 partial sums, no epilogue
    DOT_F32: tl.constexpr,  # fp32 x, or the interpreter: fp32 operands
    F32_PRECISION: tl.constexpr,  # their tl.dot precision: "tf32x3" on GPU, "ieee" interpreted
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    ra = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M)
    rb = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
    x_ptrs = x_ptr + ra[:, None].to(tl.int64) * K + (k_lo + rk)[None, :]
    w_ptrs = w_ptr + rb[None, :].to(tl.int64) * K + (k_lo + rk)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kmask = rk < k_hi - k0
        x = tl.load(x_ptrs, mask=kmask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=kmask[:, None], other=0)
        if DOT_F32:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision=F32_PRECISION)
        else:
            # int8 -> fp16/bf16 is exact (|q| <= 127 < 2^8); fp32 accumulation in the MMA.
            acc = tl.dot(x, w.to(x.dtype), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    omask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K == 1:
        ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
        out = acc * ws[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        o_ptrs = out_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        o_ptrs = out_ptr + (pid_k * M + rm[:, None]).to(tl.int64) * N + rn[None, :]
        tl.store(o_ptrs, acc, mask=omask)


_w8a16_tuned = triton.autotune(
    configs=gpu_configs(_W8A16_AMPERE, _W8A16_HOPPER),
    key=["M_BUCKET", "N", "K", "HAS_BIAS", "DOT_F32"],
    prune_configs_by={"early_config_prune": for_device(_W8A16_AMPERE, _W8A16_HOPPER)},
)(_w8a16_kernel)


def split_k_for(n: int, k: int, block_n: int, block_k: int, device) -> tuple[int, int]:
    """(splits, K per split) for a decode launch over cdiv(n, block_n) column tiles.

    Decode is bound by reading the weight once, which needs every SM streaming: when the
    column tiles alone cover the SMs (N = 8192 with 32-wide tiles is 256 tiles) K is not split
    and the epilogue stays in the kernel (one launch); otherwise K is split until tiles ×
    splits covers the SMs, each split at least two K blocks long. Under the interpreter
    2 splits whenever K has two blocks, so tests run the split path.
    K per split is a multiple of block_k."""
    k_blocks = triton.cdiv(k, block_k)
    tiles = triton.cdiv(n, block_n)
    if INTERPRET:
        want = 2 if k_blocks >= 2 else 1
    elif tiles >= num_sms(device):
        want = 1
    else:
        want = max(1, min(triton.cdiv(num_sms(device), tiles), k_blocks // 2, 32))
    per = triton.cdiv(k_blocks, want) * block_k
    return triton.cdiv(k, per), per


def int8_weight_only_linear(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """W8A16: x [M, K] fp32/fp16/bf16, w_q [N, K] int8, w_scale [N] fp32 -> [M, N] x.dtype."""
    m, k = x.shape
    n = w_q.shape[0]
    dot_f32 = INTERPRET or x.dtype == torch.float32
    if m == 0 or n == 0 or k == 0:
        out = torch.zeros((m, n), dtype=torch.float32, device=x.device)
        return (out + bias.float() if bias is not None else out).to(x.dtype)
    has_bias = bias is not None
    bias_arg = bias if has_bias else w_scale
    if m <= 16:  # decode: narrow column tiles, K split when they do not cover the SMs
        cfg = dict(_W8A16_DECODE)
        if INTERPRET:
            cfg.update(BLOCK_K=64, num_warps=1, num_stages=1)
        split, per = split_k_for(n, k, cfg["BLOCK_N"], cfg["BLOCK_K"], x.device)
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), split)
        if split == 1:
            out = torch.empty((m, n), dtype=x.dtype, device=x.device)
            _w8a16_kernel[grid](
                x, w_q, w_scale, bias_arg, out, m, n, k, k, 16,
                HAS_BIAS=has_bias, SPLIT_K=1, DOT_F32=dot_f32, F32_PRECISION=F32_PRECISION,
                **cfg,
            )
            return out
        part = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        _w8a16_kernel[grid](
            x, w_q, w_scale, bias_arg, part, m, n, k, per, 16,
            HAS_BIAS=False, SPLIT_K=split, DOT_F32=dot_f32, F32_PRECISION=F32_PRECISION,
            **cfg,
        )
        out = part.sum(0) * w_scale[None, :]
        if has_bias:
            out += bias.float()
        return out.to(x.dtype)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    args = (x, w_q, w_scale, bias_arg, out, m, n, k, k, pow2_bucket(m))
    if INTERPRET or dot_f32:
        cfg = _INTERP if INTERPRET else _F32_CFG
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), 1)
        _w8a16_kernel[grid](*args, HAS_BIAS=has_bias, SPLIT_K=1, DOT_F32=True,
                            F32_PRECISION=F32_PRECISION, **cfg)
    else:
        grid = lambda meta: (
            triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), 1,
        )
        _w8a16_tuned[grid](*args, HAS_BIAS=has_bias, SPLIT_K=1, DOT_F32=dot_f32,
                           F32_PRECISION=F32_PRECISION)
    return out
