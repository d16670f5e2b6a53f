"""Weight-only kernels: int8_weight_only_linear (W8A16) and int4_weight_only_linear (W4A16).

W8A16: out = (x @ w_q.T) · w_scale[n] + bias. The per-output-channel scale factors out of the
       K sum, so int8 weights are converted to x's 16-bit type in registers (exact: |q| <= 127)
       and fed to an fp16/bf16 `tl.dot` with fp32 accumulation; the scale is applied once in
       the epilogue.
W4A16: out = x @ ŵ.T + bias, with ŵ[n, k] = (q[n, k] − zero[n, g]) · scale[n, g],
       g = k // group_size. The kernel reads the weight in its kernel layout, prepared from the
       canonical one (API.md) by the Triton adapter (`qtorch/backends/triton.py`,
       `kernel_layout`):
    qweight_t uint8 [K // 2, N]   canonical bytes transposed: byte j of column n holds
                                  q[n, 2j] (low nibble) and q[n, 2j + 1] (high nibble), and
                                  consecutive n are adjacent, so a [BLOCK_K / 2, BLOCK_N] tile
                                  load is coalesced along N
    scales_t  fp32  [K // gs, N]  and  zeros_t [K // gs, N] (uint8 integer zero points, or
                                  fp32 ones with zero_point="float"): one row per group, the
                                  BLOCK_N values of a tile are one contiguous load
       Inside the K loop the packed bytes are split into nibbles in registers, dequantized in
       fp32 ((q − zero) · scale, as the reference computes it), cast to x's 16-bit type and fed
       to `tl.dot` with fp32 accumulation. Low and high nibbles hold the even and odd k, so
       instead of interleaving them the kernel issues two dots: x[:, 0::2] @ ŵ_even +
       x[:, 1::2] @ ŵ_odd. BLOCK_K divides group_size (both powers of two, BLOCK_K <=
       group_size), so every K tile lies in one group and K % BLOCK_K == 0: no K masks.
Both: for M <= 16 (decode) the launch uses 16-row, 32-column tiles so that many programs
stream the weight (read once) at memory bandwidth; when those tiles do not cover the SMs, K
is split too and torch reduces the fp32 partials [SPLIT_K, M, N]. fp32 activations use a
tf32x3 dot (about fp32 accuracy) with one fixed tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from qtorch._kernels import F32_PRECISION, INTERPRET, for_device, gpu_configs, num_sms, pow2_bucket
from qtorch._kernels import gemm_config as _cfg
from qtorch._kernels.int8_mm import tile_ids

# 16-bit activations, int8 weights converted in registers: BK = 64 halves = 128 bytes.
_W8A16_AMPERE = [
    _cfg(128, 256, 32, 8, 3),
    _cfg(128, 128, 64, 8, 3),
    _cfg(64, 256, 64, 8, 3),
    _cfg(128, 128, 32, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(128, 64, 64, 4, 4),
    _cfg(64, 64, 64, 4, 4),
    _cfg(32, 128, 64, 4, 4),
]
_W8A16_HOPPER = [
    _cfg(128, 256, 64, 8, 4),
    _cfg(128, 128, 64, 8, 4),
    _cfg(128, 128, 64, 4, 4),
    _cfg(64, 128, 64, 4, 5),
    _cfg(64, 64, 64, 4, 6),
    _cfg(32, 128, 64, 4, 5),
]
# Each K step holds both nibble halves dequantized (2 × [BK/2, BN] fp32) next to the
# accumulator, so sm_80 tiles with 128×128×64 (4 or 8 warps) and 128×256×64 spill
# (tests/test_triton_aot.py); the Ampere list keeps the ones that do not.
_W4A16_AMPERE = [
    _cfg(128, 256, 32, 8, 3),
    _cfg(64, 256, 64, 8, 3),
    _cfg(128, 128, 32, 8, 3),
    _cfg(64, 128, 64, 4, 4),
    _cfg(128, 64, 64, 4, 4),
    _cfg(64, 64, 64, 4, 4),
    _cfg(32, 128, 128, 4, 4),
    _cfg(64, 128, 32, 4, 4),
]
_W4A16_HOPPER = [
    _cfg(128, 256, 64, 8, 4),
    _cfg(128, 128, 64, 8, 4),
    _cfg(64, 128, 64, 4, 5),
    _cfg(128, 64, 64, 4, 5),
    _cfg(64, 64, 64, 4, 6),
    _cfg(32, 128, 128, 4, 5),
    _cfg(64, 128, 32, 4, 5),
    _cfg(128, 128, 32, 8, 4),
]
AMPERE_CONFIGS = {"_w8a16_kernel": _W8A16_AMPERE, "_w4a16_kernel": _W4A16_AMPERE}
HOPPER_CONFIGS = {"_w8a16_kernel": _W8A16_HOPPER, "_w4a16_kernel": _W4A16_HOPPER}
# Decode (M <= 16) launches: one 16-row block (the smallest MMA M), narrow N tiles so that
# many programs stream the weight, long K tiles (W4A16: capped at the group size); split-K
# when N is small.
_W8A16_DECODE = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
_W4A16_DECODE = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
# Under the interpreter: few, large programs (its cost grows with the program count).
_W8A16_INTERP = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=4)
_W4A16_INTERP = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=4)
# fp32 activations on GPU (tf32x3 dot): the 16-bit tile lists spill or overflow shared memory
# with operands twice as wide; one modest tile instead of autotuning (BLOCK_K <= any group).
_F32_CFG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)


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


# ------------------------------------------------------------------------------ W8A16


@triton.jit
def _w8a16_kernel(
    x_ptr,  # [M, K] fp32/fp16/bf16, row stride K
    w_ptr,  # [N, K] int8, row stride K
    ws_ptr,  # [N] fp32 per-output-channel scale
    bias_ptr,  # [N] or dummy
    out_ptr,  # SPLIT_K == 1: [M, N] x.dtype;  else fp32 partials [SPLIT_K, M, N]
    M,
    N,
    K,
    K_PER_SPLIT,  # K range of one split (a multiple of BLOCK_K)
    M_BUCKET,  # autotune key only
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,  # > 1: write fp32 partial sums, no epilogue
    DOT_F32: tl.constexpr,  # fp32 x, or the interpreter: fp32 operands
    F32_PRECISION: tl.constexpr,  # their tl.dot precision: "tf32x3" on GPU, "ieee" interpreted
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
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
                x,
                w_q,
                w_scale,
                bias_arg,
                out,
                m,
                n,
                k,
                k,
                16,
                HAS_BIAS=has_bias,
                SPLIT_K=1,
                DOT_F32=dot_f32,
                F32_PRECISION=F32_PRECISION,
                **cfg,
            )
            return out
        part = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        _w8a16_kernel[grid](
            x,
            w_q,
            w_scale,
            bias_arg,
            part,
            m,
            n,
            k,
            per,
            16,
            HAS_BIAS=False,
            SPLIT_K=split,
            DOT_F32=dot_f32,
            F32_PRECISION=F32_PRECISION,
            **cfg,
        )
        out = part.sum(0) * w_scale[None, :]
        if has_bias:
            out += bias.float()
        return out.to(x.dtype)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    args = (x, w_q, w_scale, bias_arg, out, m, n, k, k, pow2_bucket(m))
    if INTERPRET or dot_f32:
        cfg = _W8A16_INTERP if INTERPRET else _F32_CFG
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), 1)
        _w8a16_kernel[grid](
            *args, HAS_BIAS=has_bias, SPLIT_K=1, DOT_F32=True, F32_PRECISION=F32_PRECISION, **cfg
        )
    else:
        grid = lambda meta: (
            triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),
            1,
        )
        _w8a16_tuned[grid](
            *args, HAS_BIAS=has_bias, SPLIT_K=1, DOT_F32=dot_f32, F32_PRECISION=F32_PRECISION
        )
    return out


# ------------------------------------------------------------------------------ W4A16


@triton.jit
def _w4a16_kernel(
    x_ptr,  # [M, K] fp32/fp16/bf16, row stride K
    qw_ptr,  # [K // 2, N] uint8 (kernel layout, see module doc)
    s_ptr,  # [K // GROUP_SIZE, N] fp32 scales
    z_ptr,  # [K // GROUP_SIZE, N] zero points: uint8 0..15, or fp32 (zero_point="float")
    bias_ptr,  # [N] or dummy
    out_ptr,  # SPLIT_K == 1: [M, N] x.dtype;  else fp32 partials [SPLIT_K, M, N]
    M,
    N,
    K,
    K_PER_SPLIT,  # K range of one split (a multiple of BLOCK_K)
    M_BUCKET,  # autotune key only
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_F32: tl.constexpr,  # fp32 x, or the interpreter: fp32 operands
    F32_PRECISION: tl.constexpr,  # their tl.dot precision: "tf32x3" on GPU, "ieee" interpreted
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    tl.static_assert(GROUP_SIZE % BLOCK_K == 0)
    HALF_K: tl.constexpr = BLOCK_K // 2
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, HALF_K)  # byte index within the K tile
    ra = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M)
    rb = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
    # x[:, k0 + 2j] (even k) and x[:, k0 + 2j + 1] (odd k)
    x_ptrs = x_ptr + ra[:, None].to(tl.int64) * K + (k_lo + 2 * rj)[None, :]
    q_ptrs = qw_ptr + ((k_lo // 2) + rj)[:, None].to(tl.int64) * N + rb[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        g = k0 // GROUP_SIZE
        scale = tl.load(s_ptr + g * N + rb)[None, :]
        zero = tl.load(z_ptr + g * N + rb).to(tl.float32)[None, :]  # (exact for uint8)
        packed = tl.load(q_ptrs)  # [HALF_K, BLOCK_N] uint8
        w_even = ((packed & 0xF).to(tl.float32) - zero) * scale
        w_odd = ((packed >> 4).to(tl.float32) - zero) * scale
        x_even = tl.load(x_ptrs)
        x_odd = tl.load(x_ptrs + 1)
        if DOT_F32:
            acc = tl.dot(x_even.to(tl.float32), w_even, acc, input_precision=F32_PRECISION)
            acc = tl.dot(x_odd.to(tl.float32), w_odd, acc, input_precision=F32_PRECISION)
        else:
            acc = tl.dot(x_even, w_even.to(x_even.dtype), acc)
            acc = tl.dot(x_odd, w_odd.to(x_odd.dtype), acc)
        x_ptrs += BLOCK_K
        q_ptrs += HALF_K * N
    omask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K == 1:
        out = acc
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        o_ptrs = out_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        o_ptrs = out_ptr + (pid_k * M + rm[:, None]).to(tl.int64) * N + rn[None, :]
        tl.store(o_ptrs, acc, mask=omask)


def _w4a16_prune(configs, named_args, **kwargs):
    """Hopper/Ampere list for the device, then only BLOCK_K <= group size (one group per tile)."""
    gs = kwargs.get("GROUP_SIZE", named_args.get("GROUP_SIZE"))
    configs = for_device(_W4A16_AMPERE, _W4A16_HOPPER)(configs, named_args, **kwargs)
    return [c for c in configs if c.kwargs["BLOCK_K"] <= gs]


_w4a16_tuned = triton.autotune(
    configs=gpu_configs(_W4A16_AMPERE, _W4A16_HOPPER),
    key=["M_BUCKET", "N", "K", "GROUP_SIZE", "HAS_BIAS", "DOT_F32"],
    prune_configs_by={"early_config_prune": _w4a16_prune},
)(_w4a16_kernel)


def int4_weight_only_linear(
    x: torch.Tensor,
    qweight_t: torch.Tensor,
    scales_t: torch.Tensor,
    zeros_t: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [M, K] fp32/fp16/bf16 and an int4 weight in the kernel layout (module doc):
    qweight_t uint8 [K // 2, N], scales_t / zeros_t fp32 [K // group_size, N];
    K % group_size == 0, group_size in {32, 64, 128, 256} -> [M, N] x.dtype."""
    m, k = x.shape
    n = qweight_t.shape[1]
    if m == 0 or n == 0:
        return torch.empty((m, n), dtype=x.dtype, device=x.device)
    dot_f32 = INTERPRET or x.dtype == torch.float32
    has_bias = bias is not None
    bias_arg = bias if has_bias else scales_t
    if m <= 16:  # decode: narrow column tiles, K split when they do not cover the SMs
        cfg = dict(_W4A16_DECODE, BLOCK_K=min(_W4A16_DECODE["BLOCK_K"], group_size))
        if INTERPRET:
            cfg.update(num_warps=1, num_stages=1)
        split, per = split_k_for(n, k, cfg["BLOCK_N"], cfg["BLOCK_K"], x.device)
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), split)
        common = dict(GROUP_SIZE=group_size, DOT_F32=dot_f32, F32_PRECISION=F32_PRECISION, **cfg)
        if split == 1:
            out = torch.empty((m, n), dtype=x.dtype, device=x.device)
            _w4a16_kernel[grid](
                x,
                qweight_t,
                scales_t,
                zeros_t,
                bias_arg,
                out,
                m,
                n,
                k,
                k,
                16,
                HAS_BIAS=has_bias,
                SPLIT_K=1,
                **common,
            )
            return out
        part = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        _w4a16_kernel[grid](
            x,
            qweight_t,
            scales_t,
            zeros_t,
            bias_arg,
            part,
            m,
            n,
            k,
            per,
            16,
            HAS_BIAS=False,
            SPLIT_K=split,
            **common,
        )
        out = part.sum(0)
        if has_bias:
            out += bias.float()
        return out.to(x.dtype)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    args = (x, qweight_t, scales_t, zeros_t, bias_arg, out, m, n, k, k, pow2_bucket(m))
    if INTERPRET or dot_f32:
        cfg = _F32_CFG
        if INTERPRET:
            cfg = dict(_W4A16_INTERP, BLOCK_K=min(_W4A16_INTERP["BLOCK_K"], group_size))
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), 1)
        _w4a16_kernel[grid](
            *args,
            GROUP_SIZE=group_size,
            HAS_BIAS=has_bias,
            SPLIT_K=1,
            DOT_F32=True,
            F32_PRECISION=F32_PRECISION,
            **cfg,
        )
    else:
        grid = lambda meta: (
            triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),
            1,
        )
        _w4a16_tuned[grid](
            *args,
            GROUP_SIZE=group_size,
            HAS_BIAS=has_bias,
            SPLIT_K=1,
            DOT_F32=dot_f32,
            F32_PRECISION=F32_PRECISION,
        )
    return out
