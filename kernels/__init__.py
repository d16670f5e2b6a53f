"""Triton kernels for qtorch (imported as `qtorch._kernels`; registered as the `triton` backend
by `qtorch/backends/triton.py`).

Two ways to run them:
  * on a CUDA device, compiled by Triton, with autotuned configs for Ampere (sm_80) and
    Hopper (sm_90);
  * under `TRITON_INTERPRET=1` (set before triton is imported) on CPU tensors, for tests.
    The interpreter runs each program in numpy, so it (a) cannot autotune (one config),
    (b) gets bf16 arithmetic wrong (numpy has no bf16): every kernel casts to fp32 right after
    `tl.load` and back at `tl.store`, and feeds `tl.dot` fp32 operands instead of 16-bit ones,
    (c) has no libdevice: rounding uses the fp32 magic-number trick instead of `rint`.
    Its cost grows with the number of programs, so interpreter configs use large blocks.
"""

from __future__ import annotations

import os

import triton

#: True when kernels run in Triton's CPU interpreter (must be decided before `import triton`).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def configs(interpret: triton.Config, ampere: list[triton.Config], hopper: list[triton.Config]):
    """Autotune candidates: the single `interpret` config under the interpreter (autotuning
    needs a driver to time configs), else the Ampere and Hopper lists, de-duplicated. The
    autotune key includes the problem shape, so each shape class tunes once per process."""
    if INTERPRET:
        return [interpret]
    seen, out = set(), []
    for c in ampere + hopper:
        key = (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out
