"""Triton kernels against `qtorch.reference`, under TRITON_INTERPRET=1 on CPU (tests/conftest.py
switches the interpreter on when no GPU exists) or compiled on a CUDA device.

Shapes include M = 1, K and N that are not multiples of any block, several K / vocabulary
blocks per row, and the decode (split-K) paths; every op that takes floats runs in fp32, fp16
and bf16. Integer accumulation is checked for exact equality. Float results use the per-dtype
tolerances of `qtorch.testing` (the interpreter casts fp32 to bf16 by truncation, so bf16
outputs can differ from torch's round-to-nearest by one bf16 ulp, well inside 1.6e-2).
"""

from __future__ import annotations

import os

import pytest
import torch

from qtorch import _backend, _cache, ops
from qtorch import reference as R
from qtorch.testing import assert_close

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.skipif(
        not (_INTERPRET or torch.cuda.is_available()),
        reason="Triton needs a CUDA device or TRITON_INTERPRET=1 (set by tests/conftest.py)",
    ),
    # The interpreter evaluates both sides of tl.where in numpy, so masked lanes (-inf - -inf,
    # 0 * inf) raise numpy warnings for values that are then discarded.
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]
if _INTERPRET or torch.cuda.is_available():
    from qtorch._kernels import distillation as KD
    from qtorch._kernels import int8_mm as K8
    from qtorch._kernels import weight_only as KW

    from qtorch.backends import triton as TB

DEV = torch.device("cuda" if torch.cuda.is_available() and not _INTERPRET else "cpu")
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(device=DEV, dtype=dtype)


def _int8(*shape, seed=0):
    return torch.randint(-127, 128, shape, generator=_gen(seed), dtype=torch.int8).to(DEV)


# ------------------------------------------------------------------------------ quantize_int8

# (M, K): K = 4100 > MAX_ONE_BLOCK takes the two-sweep path.
QUANT_SHAPES = [(1, 1), (3, 17), (5, 300), (2, 4100)]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m,k", QUANT_SHAPES)
def test_quantize_int8_matches_reference_exactly(m, k, dtype):
    x = _randn(m, k, dtype=dtype, seed=m * k, scale=3.0)
    x[0, 0] = 0.0
    q, s = K8.quantize_int8(x)
    q_ref, s_ref = R.quantize_int8(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)  # same IEEE division, same round-half-even


def test_quantize_int8_ties_round_half_even_and_zero_rows():
    # amax = 127 -> scale 1, so x / scale hits exact .5 ties.
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 127.0], [0.0] * 7], device=DEV)
    q, s = K8.quantize_int8(x)
    assert s.tolist() == [1.0, 1.0]
    assert q.tolist() == [[0, 2, 2, 0, -2, -2, 127], [0] * 7]


# --------------------------------------------------------------------- int8_scaled_mm / W8A8

# (M, N, K): blocks under the interpreter are 32×64×64, so these cover one and several blocks
# with ragged edges in every dimension.
MM_SHAPES = [(1, 1, 1), (1, 70, 100), (37, 65, 130), (64, 64, 64), (16, 33, 300)]


@pytest.mark.parametrize("m,n,k", MM_SHAPES)
def test_int8_scaled_mm_int32_accumulation_is_exact(m, n, k):
    # Unit scales: the output is the int32 accumulator itself; |acc| <= 127² · 300 < 2^24,
    # so it is exact in fp32 and must equal the integer matmul bit for bit.
    a, b = _int8(m, k, seed=1), _int8(n, k, seed=2)
    ones_m = torch.ones(m, device=DEV)
    ones_n = torch.ones(n, device=DEV)
    out = K8.int8_scaled_mm(a, b, ones_m, ones_n, None, torch.float32)
    exact = (a.cpu().int() @ b.cpu().int().T).float()
    assert torch.equal(out.cpu(), exact)


@pytest.mark.parametrize("out_dtype", FLOATS)
@pytest.mark.parametrize("m,n,k", MM_SHAPES)
def test_int8_scaled_mm_epilogue(m, n, k, out_dtype):
    a, b = _int8(m, k, seed=3), _int8(n, k, seed=4)
    # Scales of a real quantization (amax / 127) keep fp16 outputs in range.
    sa = (torch.rand(m, generator=_gen(5)) * 0.05 + 0.01).to(DEV)
    sb = (torch.rand(n, generator=_gen(6)) * 0.05 + 0.01).to(DEV)
    bias = _randn(n, seed=7).to(out_dtype)
    for bs in (None, bias):
        out = K8.int8_scaled_mm(a, b, sa, sb, bs, out_dtype)
        ref = R.int8_scaled_mm(a, b, sa, sb, bs, out_dtype)
        assert out.dtype == out_dtype and out.shape == (m, n)
        assert_close(out, ref, out_dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m,n,k", MM_SHAPES)
def test_int8_linear(m, n, k, dtype):
    x = _randn(m, k, dtype=dtype, seed=8)
    w_q, w_s = R.quantize_int8(_randn(n, k, seed=9))
    bias = _randn(n, dtype=dtype, seed=10)
    out = K8.int8_linear(x, w_q, w_s, bias)
    ref = R.int8_linear(x, w_q, w_s, bias)
    assert out.dtype == dtype
    assert_close(out, ref, dtype)


# --------------------------------------------------------------------------------- W8A16

# M <= 16 takes the split-K decode launch (2 splits under the interpreter when K has two
# blocks), M > 16 the tiled one.
WO_SHAPES = [(1, 1, 1), (1, 70, 100), (5, 33, 300), (16, 65, 130), (37, 65, 130)]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m,n,k", WO_SHAPES)
def test_int8_weight_only_linear(m, n, k, dtype):
    x = _randn(m, k, dtype=dtype, seed=11)
    w_q, w_s = R.quantize_int8(_randn(n, k, seed=12))
    bias = _randn(n, dtype=dtype, seed=13)
    for bs in (None, bias):
        out = KW.int8_weight_only_linear(x, w_q, w_s, bs)
        ref = R.int8_weight_only_linear(x, w_q, w_s, bs)
        assert out.dtype == dtype and out.shape == (m, n)
        assert_close(out, ref, dtype)


def test_int8_weight_only_decode_uses_split_k():
    # Under the interpreter the decode launch splits K whenever it has two blocks, so the
    # decode shapes above run the split path (K = 100 and 300 with 64-wide K blocks).
    split, per = KW.split_k_for(64, 300, 32, 64, DEV)
    assert split >= 2 and per % 64 == 0 and (split - 1) * per < 300 <= split * per


@pytest.mark.parametrize("n,k,want_split", [(8192, 8192, 1), (1024, 8192, 5), (64, 256, 1)])
def test_split_k_rule_on_gpu_sizes(monkeypatch, n, k, want_split):
    # The GPU rule (132 SMs, as on an H100/H200): no split when the 32-wide column tiles cover
    # the SMs, else enough splits to cover them, each at least two 128-wide K blocks.
    monkeypatch.setattr(KW, "INTERPRET", False)
    monkeypatch.setattr(KW, "num_sms", lambda device: 132)
    split, per = KW.split_k_for(n, k, 32, 128, DEV)
    assert split == want_split
    assert per % 128 == 0 and (split - 1) * per < k <= split * per


# --------------------------------------------------------------------------------- W4A16

# (M, N, K, group_size, symmetric)
W4_SHAPES = [
    (1, 1, 32, 32, False),
    (1, 70, 256, 64, True),
    (3, 33, 512, 256, False),
    (16, 9, 64, 32, True),
    (37, 65, 256, 128, False),
    (40, 9, 128, 32, False),
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m,n,k,gs,sym", W4_SHAPES)
def test_int4_weight_only_linear(m, n, k, gs, sym, dtype):
    qw, sc, z = R.quantize_int4(_randn(n, k, seed=14), gs, sym)
    x = _randn(m, k, dtype=dtype, seed=15)
    bias = _randn(n, dtype=dtype, seed=16)
    for bs in (None, bias):
        out = TB.int4_weight_only_linear(x, qw, sc, z, gs, bs)
        ref = R.int4_weight_only_linear(x, qw, sc, z, gs, bs)
        assert out.dtype == dtype and out.shape == (m, n)
        assert_close(out, ref, dtype)


def test_int4_kernel_layout_prepared_once(monkeypatch):
    qw, sc, z = R.quantize_int4(_randn(24, 64, seed=17), 32, False)
    calls = []
    real = TB.kernel_layout
    monkeypatch.setattr(TB, "kernel_layout", lambda *a: calls.append(1) or real(*a))
    _cache.clear()
    x = _randn(2, 64, seed=18)
    first = TB.int4_weight_only_linear(x, qw, sc, z, 32, None)
    second = TB.int4_weight_only_linear(x, qw, sc, z, 32, None)
    assert len(calls) == 1  # repacked on first use only
    assert torch.equal(first, second)
    qw.add_(0)  # an in-place change (version bump) invalidates the cached layout
    TB.int4_weight_only_linear(x, qw, sc, z, 32, None)
    assert len(calls) == 2


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


# -------------------------------------------------------------------------- distillation


def _logits(m, v, dtype, seed, mask_teacher=False):
    s = _randn(m, v, dtype=dtype, seed=seed, scale=3.0)
    t = _randn(m, v, dtype=dtype, seed=seed + 1, scale=3.0)
    if mask_teacher:
        t[:, ::7] = float("-inf")  # masked vocabulary entries
    return s, t


def _labels(m, v, seed, ignore_row=None):
    lab = torch.randint(0, v, (m,), generator=_gen(seed)).to(DEV)
    if ignore_row is not None:
        lab[ignore_row] = -100
    return lab


def _check_loss(s, t, lab, *args):
    loss, grad = KD.distillation_loss(s, t, lab, *args, -100, True)
    loss_ref, grad_ref = R.distillation_loss(s, t, lab, *args, -100, True)
    assert loss.dtype == torch.float32 and grad.dtype == s.dtype
    assert_close(loss, loss_ref, torch.float32)
    assert_close(grad, grad_ref, s.dtype)
    loss_ng, grad_ng = KD.distillation_loss(s, t, lab, *args, -100, False)
    assert grad_ng is None
    assert_close(loss_ng, loss_ref, torch.float32)
    return loss, grad


# (M, V): V = 20000 is two vocabulary blocks even under the interpreter (16384 wide).
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("m,v", [(1, 1), (5, 1000), (2, 20000)])
def test_distillation_loss_divergences(m, v, divergence):
    s, t = _logits(m, v, torch.float32, seed=20)
    lab = _labels(m, v, seed=21)
    _check_loss(s, t, lab, 2.0, 0.7, divergence, 0.3)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_distillation_loss_dtypes_masks_and_ignored_rows(divergence, dtype):
    s, t = _logits(4, 333, dtype, seed=22, mask_teacher=True)
    lab = _labels(4, 333, seed=23, ignore_row=1)
    s[1, 0] = float("nan")  # an ignored token contributes nothing, whatever it holds
    loss, grad = _check_loss(s, t, lab, 1.5, 0.5, divergence, 0.5)
    assert loss[1].item() == 0.0
    assert torch.count_nonzero(grad[1]).item() == 0
    assert torch.isfinite(loss).all() and torch.isfinite(grad.float()).all()


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_distillation_jsd_beta_endpoints(beta):
    s, t = _logits(3, 257, torch.float32, seed=24, mask_teacher=True)
    _check_loss(s, t, _labels(3, 257, seed=25), 1.0, 0.8, "jsd", beta)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_distillation_loss_without_labels(divergence):
    s, t = _logits(3, 500, torch.bfloat16, seed=26)
    _check_loss(s, t, None, 3.0, 1.0, divergence, 0.5)


def test_distillation_nonfinite_logits_give_nonfinite_loss():
    s, t = _logits(3, 100, torch.float32, seed=27)
    s[0, 5] = float("nan")
    t[1, 7] = float("inf")
    loss, _ = KD.distillation_loss(s, t, _labels(3, 100, seed=28), 1.0, 0.5, "kl", 0.5, -100,
                                   True)
    assert not torch.isfinite(loss[0]) and not torch.isfinite(loss[1])
    assert torch.isfinite(loss[2])


def test_distillation_bad_label_is_an_error():
    s, t = _logits(2, 10, torch.float32, seed=29)
    with pytest.raises(ValueError, match="labels"):
        KD.distillation_loss(s, t, torch.tensor([3, 10], device=DEV), 1.0, 0.5, "kl", 0.5,
                             -100, True)


def test_distillation_grad_in_place_matches():
    # The fused path writes the gradient over the student logits.
    s, t = _logits(3, 700, torch.bfloat16, seed=30)
    lab = _labels(3, 700, seed=31)
    for div in ("kl", "reverse_kl", "jsd"):
        loss, grad = KD.distillation_loss(s, t, lab, 2.0, 0.5, div, 0.5, -100, True)
        buf = s.clone()
        scale = torch.full((3,), 0.25, device=DEV)
        loss2 = KD._launch(buf, t, lab, 2.0, 0.5, div, 0.5, -100, buf, scale)
        assert torch.equal(loss2, loss)
        assert_close(buf, grad * 0.25, torch.bfloat16)


# (M, H, Ht, V, chunk)
FUSED_SHAPES = [(1, 16, 8, 50, 4), (13, 32, 24, 300, 5)]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("m,h,ht,v,chunk", FUSED_SHAPES)
def test_fused_linear_distillation_loss(m, h, ht, v, chunk, divergence, dtype):
    hs, ws = _randn(m, h, dtype=dtype, seed=40), _randn(v, h, dtype=dtype, seed=41, scale=0.25)
    ht_, wt = _randn(m, ht, dtype=dtype, seed=42), _randn(v, ht, dtype=dtype, seed=43, scale=0.25)
    bs, bt = _randn(v, dtype=dtype, seed=44), _randn(v, dtype=dtype, seed=45)
    lab = _labels(m, v, seed=46, ignore_row=m // 2)
    ts = torch.rand(m, generator=_gen(47)).to(DEV)
    args = (hs, ws, ht_, wt, lab, bs, bt, ts, chunk, 2.0, 0.6, divergence, 0.4, -100, True)
    out = KD.fused_linear_distillation_loss(*args)
    # The reference forms the logits in fp32; the kernel forms them in the inputs' dtype
    # (a 16-bit GEMM on GPU), so 16-bit cases compare at that dtype's tolerance.
    ref = R.fused_linear_distillation_loss(*args)
    loss_tol = torch.float32 if dtype == torch.float32 else dtype
    assert out[0].dtype == torch.float32
    assert_close(out[0], ref[0], loss_tol)
    for got, want, like in zip(out[1:], ref[1:], (hs, ws, bs), strict=True):
        assert got.dtype == like.dtype and got.shape == like.shape
        assert_close(got, want, dtype)


def test_fused_linear_without_grad_or_bias():
    hs, ws = _randn(6, 16, seed=50), _randn(40, 16, seed=51)
    ht_, wt = _randn(6, 8, seed=52), _randn(40, 8, seed=53)
    args = (hs, ws, ht_, wt, None, None, None, None, 4, 1.0, 1.0, "kl", 0.5, -100)
    out = KD.fused_linear_distillation_loss(*args, False)
    ref = R.fused_linear_distillation_loss(*args, False)
    assert out[1] is None and out[2] is None and out[3] is None
    assert_close(out[0], ref[0], torch.float32)
    out = KD.fused_linear_distillation_loss(*args, True)
    ref = R.fused_linear_distillation_loss(*args, True)
    assert out[3] is None
    assert_close(out[1], ref[1], torch.float32)
    assert_close(out[2], ref[2], torch.float32)


# ------------------------------------------------------- dispatch through qtorch.ops


def test_ops_dispatch_to_triton_with_leading_dims():
    with _backend.use_backend("triton"):
        assert _backend.resolve("int8_linear", DEV)[0] == "triton"
        assert _backend.resolve("fused_linear_distillation_loss", DEV)[0] == "triton"
        x = _randn(2, 3, 40, dtype=torch.bfloat16, seed=60)
        w_q, w_s = R.quantize_int8(_randn(24, 40, seed=61))
        assert_close(ops.int8_linear(x, w_q, w_s), R.int8_linear(x.reshape(6, 40), w_q, w_s)
                     .reshape(2, 3, 24), torch.bfloat16)
        qw, sc, z = R.quantize_int4(_randn(24, 64, seed=62), 32, False)
        x4 = _randn(2, 3, 64, dtype=torch.float16, seed=63)
        assert_close(ops.int4_weight_only_linear(x4, qw, sc, z, 32),
                     R.int4_weight_only_linear(x4.reshape(6, 64), qw, sc, z, 32).reshape(2, 3, 24),
                     torch.float16)
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
