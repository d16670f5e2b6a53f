"""Triton kernels for qtorch (imported as `qtorch._kernels`; registered as the `triton` backend
by `qtorch/backends/triton.py`).

Two ways to run them:
  * on a CUDA device, compiled by Triton, autotuned over configs for Ampere (sm_80) and
    Hopper (sm_90);
  * under `TRITON_INTERPRET=1` (set before triton is imported) on CPU tensors, for tests.
    The interpreter runs each program in numpy, so it (a) cannot autotune (no driver to time
    configs): launchers call the plain `@triton.jit` kernel with one large-block config,
    (b) gets bf16 arithmetic wrong (numpy has no bf16): every kernel casts to fp32 right after
    `tl.load` and back at `tl.store`, and feeds `tl.dot` fp32 operands instead of 16-bit ones
    (`DOT_F32`), (c) has no libdevice: rounding uses the fp32 magic-number trick instead of
    `rint` (`INTERPRET` constexpr). Its cost grows with the number of programs, hence the
    large blocks.

Each kernel module keeps its GPU configs in `AMPERE_CONFIGS` / `HOPPER_CONFIGS` dicts
(kernel name -> list of triton.Config) so `tests/test_triton_aot.py` can compile every one
ahead of time and check it fits the chip.
"""

from __future__ import annotations

import os

import torch
import triton

#: True when kernels run in Triton's CPU interpreter (must be decided before `import triton`).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

#: tl.dot precision for fp32 operands. On GPU "tf32x3" (three TF32 tensor-core products that
#: recover ~fp32 accuracy; an IEEE fp32 dot runs on FFMA and spills registers at GEMM tile
#: sizes, see tests/test_triton_aot.py); the interpreter computes an exact fp32 dot anyway.
F32_PRECISION = "ieee" if INTERPRET else "tf32x3"

#: Shared memory per block a kernel may use, bytes (opt-in maximum per SM).
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def for_device(ampere: list[triton.Config], hopper: list[triton.Config]):
    """`prune_configs_by` hook: Hopper configs on sm_90+, Ampere configs otherwise. Chosen per
    call from the current device (not frozen at import), so a process with mixed GPUs works."""

    def prune(configs, named_args, **kwargs):
        major, _ = torch.cuda.get_device_capability()
        wanted = hopper if major >= 9 else ampere
        return [c for c in configs if any(c is w for w in wanted)] or list(configs)

    return prune


def gpu_configs(ampere: list[triton.Config], hopper: list[triton.Config]) -> list[triton.Config]:
    """All candidates for `@triton.autotune` (pruned per device by `for_device`)."""
    return ampere + hopper


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a nominal 132 under the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def gemm_config(bm: int, bn: int, bk: int, warps: int, stages: int, group_m: int = 8):
    """A GEMM autotune config: BLOCK_M × BLOCK_N tiles over BLOCK_K steps, GROUP_M rows of
    tiles per L2-friendly group."""
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
        num_warps=warps,
        num_stages=stages,
    )


def pow2_bucket(n: int, lo: int = 16, hi: int = 4096) -> int:
    """Autotune key for M: the next power of two, clamped, so every batch size does not
    trigger a fresh tuning run."""
    return min(hi, max(lo, triton.next_power_of_2(n)))
