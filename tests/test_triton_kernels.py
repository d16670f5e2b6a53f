"""The Triton backend's plumbing (the kernels themselves are tested per family in
tests/test_int8_mm.py, tests/test_weight_only.py and tests/test_distillation.py): the
autotune config lists chosen per device, and the dispatch of `qtorch.ops` to the Triton
kernels with leading dims. Runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py switches
the interpreter on when no GPU exists) or compiled on a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

from qtorch import _backend, ops
from qtorch import reference as R
from qtorch.testing import assert_close, device_for
from tests.conftest import TRITON_RUNS, triton_kernels

if TRITON_RUNS:
    from qtorch._kernels import int8_mm as K8
    from qtorch._kernels import weight_only as KW

DEV = device_for("triton")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(device=DEV, dtype=dtype)


def _labels(m, v, seed, ignore_row=None):
    lab = torch.randint(0, v, (m,), generator=_gen(seed)).to(DEV)
    if ignore_row is not None:
        lab[ignore_row] = -100
    return lab


@triton_kernels
@pytest.mark.parametrize("major", [8, 9])
def test_autotune_configs_follow_the_device(monkeypatch, major):
    # Hopper (sm_90) gets the Hopper list, Ampere the Ampere list; W4A16 also drops K tiles
    # longer than the group (a K tile must lie in one group).
    from qtorch import _kernels

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (major, 0))
    prune = _kernels.for_device(K8._INT8_AMPERE, K8._INT8_HOPPER)
    got = prune(K8._int8_scaled_mm_tuned.configs, {})
    assert got == (K8._INT8_HOPPER if major == 9 else K8._INT8_AMPERE)
    got = KW._w4a16_prune(KW._w4a16_tuned.configs, {}, GROUP_SIZE=32)
    want = KW._W4A16_HOPPER if major == 9 else KW._W4A16_AMPERE
    assert got and got == [c for c in want if c.kwargs["BLOCK_K"] <= 32]


@triton_kernels
def test_ops_dispatch_to_triton_with_leading_dims():
    with _backend.use_backend("triton"):
        assert _backend.resolve("int8_linear", DEV)[0] == "triton"
        assert _backend.resolve("fused_linear_distillation_loss", DEV)[0] == "triton"
        x = _randn(2, 3, 40, dtype=torch.bfloat16, seed=60)
        w_q, w_s = R.quantize_int8(_randn(24, 40, seed=61))
        assert_close(
            ops.int8_linear(x, w_q, w_s),
            R.int8_linear(x.reshape(6, 40), w_q, w_s).reshape(2, 3, 24),
            torch.bfloat16,
        )
        qw, sc, z = R.quantize_int4(_randn(24, 64, seed=62), 32, False)
        x4 = _randn(2, 3, 64, dtype=torch.float16, seed=63)
        assert_close(
            ops.int4_weight_only_linear(x4, qw, sc, z, 32),
            R.int4_weight_only_linear(x4.reshape(6, 64), qw, sc, z, 32).reshape(2, 3, 24),
            torch.float16,
        )
        s = _randn(2, 3, 50, seed=64).requires_grad_(True)
        t = _randn(2, 3, 50, seed=65)
        lab = _labels(6, 50, seed=66, ignore_row=0).reshape(2, 3)
        loss = ops.distillation_loss(s, t, lab, divergence="jsd", temperature=2.0)
        loss.backward()
    s_ref = s.detach().clone().requires_grad_(True)
    with _backend.use_backend("reference"):
        loss_ref = ops.distillation_loss(s_ref, t, lab, divergence="jsd", temperature=2.0)
        loss_ref.backward()
    assert_close(loss, loss_ref, torch.float32)
    assert_close(s.grad, s_ref.grad, torch.float32)
