"""The `cpu` backend's distillation kernels (csrc/cpu/distill.cpp) against `qtorch.reference`,
on every kernel ISA this CPU runs (forced with `qtorch._C.set_isa`): every divergence, T != 1,
alpha in {0, 0.3, 1}, ignore_index (ignored rows holding NaN), labels=None, masked (-inf)
teacher entries, NaN/inf -> non-finite, fp32/bf16/fp16, odd V (vector tails), and the
fused-linear op (chunking, biases, token_scale) — plus the label range error."""

import math

import pytest
import torch

import qtorch
from qtorch import ops
from qtorch import reference as R
from qtorch.testing import assert_close

_C = pytest.importorskip("qtorch._C", reason="qtorch._C (the C++ CPU kernels) is not built")
from qtorch.backends import cpu as CPU  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DIVERGENCES = ["kl", "reverse_kl", "jsd"]
# (M, V): V = 1, sizes around the 8/16-lane vectors and the 64-float blocks, a large odd V
SHAPES = [(1, 1), (1, 7), (3, 17), (5, 64), (4, 65), (2, 1000), (3, 4099)]


@pytest.fixture(params=["avx512_vnni", "avx2", "scalar"])
def isa(request):
    """Force one kernel ISA for the test (skipped where the CPU lacks it), then restore."""
    before = _C.isa()
    got = _C.set_isa(request.param)
    try:
        if got != request.param:
            pytest.skip(f"CPU has no {request.param} (best: {got})")
        yield got
    finally:
        _C.set_isa(before)


def _logits(m, v, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, v, generator=g) * scale).to(dtype)


def _labels(m, v, seed, ignore=True):
    g = torch.Generator().manual_seed(seed + 99)
    lab = torch.randint(0, v, (m,), generator=g)
    if ignore and m > 1:
        lab[1] = -100
    return lab


def _check(loss, grad, ref_loss, ref_grad, dtype):
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    # The loss is fp32 math on the same (rounded) inputs: fp32 tolerance whatever the dtype.
    assert_close(loss, ref_loss, torch.float32)
    assert grad.dtype == dtype and grad.shape == ref_grad.shape
    assert_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("m,v", SHAPES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 0.3), (0.7, 0.0), (1.5, 1.0)])
def test_kernel_vs_reference_fp32(isa, m, v, divergence, temperature, alpha):
    s, t = _logits(m, v, torch.float32, 1), _logits(m, v, torch.float32, 2)
    lab = _labels(m, v, 3)
    args = (lab, temperature, alpha, divergence, 0.3, -100, True)
    loss, grad = CPU._distillation_loss(s, t, *args)
    ref_loss, ref_grad = R.distillation_loss(s, t, *args)
    _check(loss, grad, ref_loss, ref_grad, torch.float32)
    if m > 1:  # the ignored row: loss 0, zero gradient
        assert loss[1].item() == 0.0 and bool((grad[1] == 0).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,v", [(1, 7), (3, 17), (4, 65), (3, 4099)])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kernel_vs_reference_half(isa, dtype, m, v, divergence):
    s, t = _logits(m, v, dtype, 4), _logits(m, v, dtype, 5)
    args = (_labels(m, v, 6), 2.0, 0.5, divergence, 0.5, -100, True)
    loss, grad = CPU._distillation_loss(s, t, *args)
    ref_loss, ref_grad = R.distillation_loss(s, t, *args)
    _check(loss, grad, ref_loss, ref_grad, dtype)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_labels_none_and_no_grad(isa, divergence, dtype):
    s, t = _logits(4, 33, dtype, 7), _logits(4, 33, dtype, 8)
    loss, grad = CPU._distillation_loss(s, t, None, 1.3, 1.0, divergence, 0.5, -100, True)
    ref_loss, ref_grad = R.distillation_loss(s, t, None, 1.3, 1.0, divergence, 0.5, -100, True)
    _check(loss, grad, ref_loss, ref_grad, dtype)
    loss2, grad2 = CPU._distillation_loss(s, t, None, 1.3, 1.0, divergence, 0.5, -100, False)
    assert grad2 is None
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [5, 17, 100])
def test_masked_teacher_entries(isa, divergence, dtype, v):
    """-inf teacher logits are probability 0 and contribute 0: finite loss and gradient."""
    s, t = _logits(3, v, dtype, 9), _logits(3, v, dtype, 10)
    t[:, ::3] = float("-inf")
    t[2, :] = float("-inf")
    t[2, 1] = 0.5  # row 2: a single live entry
    args = (_labels(3, v, 11, ignore=False), 2.0, 0.6, divergence, 0.3, -100, True)
    loss, grad = CPU._distillation_loss(s, t, *args)
    ref_loss, ref_grad = R.distillation_loss(s, t, *args)
    assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(grad.float()).all())
    _check(loss, grad, ref_loss, ref_grad, dtype)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("where,bad", [("student", math.nan), ("student", math.inf),
                                       ("student", -math.inf), ("teacher", math.nan),
                                       ("teacher", math.inf)])
@pytest.mark.parametrize("col", [0, 18, 32])  # first element, mid-vector, the vector tail
def test_nonfinite_is_not_silent(isa, divergence, where, bad, col):
    s, t = _logits(3, 33, torch.float32, 12), _logits(3, 33, torch.float32, 13)
    (s if where == "student" else t)[0, col] = bad
    (s if where == "student" else t)[1, col] = bad  # row 1 is ignored: must stay 0
    loss, grad = CPU._distillation_loss(s, t, _labels(3, 33, 14), 2.0, 0.5, divergence, 0.5,
                                        -100, True)
    ref_loss, _ = R.distillation_loss(s, t, _labels(3, 33, 14), 2.0, 0.5, divergence, 0.5,
                                      -100, True)
    assert not math.isfinite(loss[0].item()) and not math.isfinite(ref_loss[0].item())
    assert bool(torch.isnan(grad[0]).all())
    assert loss[1].item() == 0.0 and bool((grad[1] == 0).all())
    assert math.isfinite(loss[2].item())


def test_label_out_of_range_is_an_error():
    s, t = _logits(3, 10, torch.float32, 15), _logits(3, 10, torch.float32, 16)
    for bad in (10, -1, 1 << 40):
        lab = torch.tensor([0, bad, 3])
        with pytest.raises(ValueError, match="outside"):
            CPU._distillation_loss(s, t, lab, 1.0, 0.5, "kl", 0.5, -100, True)
        with pytest.raises(ValueError, match="outside"):
            CPU._fused_linear_distillation_loss(
                s, torch.ones(10, 10), t, torch.ones(10, 10), lab, None, None, None, 2,
                1.0, 0.5, "kl", 0.5, -100, True)
    # ignore_index may itself lie outside [0, V)
    lab = torch.tensor([0, -100, 3])
    CPU._distillation_loss(s, t, lab, 1.0, 0.5, "kl", 0.5, -100, True)


def test_through_public_op_with_autograd(isa):
    """qtorch.ops on the cpu backend: forward and backward equal the reference backend's."""
    s, t = _logits(2 * 3, 65, torch.float32, 17).reshape(2, 3, 65), _logits(6, 65, torch.float32, 18)
    t = t.reshape(2, 3, 65)
    lab = _labels(6, 65, 19).reshape(2, 3)
    outs = {}
    for backend in ("cpu", "reference"):
        x = s.clone().requires_grad_(True)
        with qtorch.use_backend(backend):
            loss = ops.distillation_loss(x, t, lab, temperature=2.0, alpha=0.4,
                                         divergence="jsd", beta=0.4)
        loss.backward()
        outs[backend] = (loss.detach(), x.grad)
    assert_close(outs["cpu"][0], outs["reference"][0], torch.float32)
    assert_close(outs["cpu"][1], outs["reference"][1], torch.float32)


def test_large_vocab_bf16(isa):
    s, t = _logits(3, 32000, torch.bfloat16, 20), _logits(3, 32000, torch.bfloat16, 21)
    args = (_labels(3, 32000, 22), 1.0, 0.5, "kl", 0.5, -100, True)
    _check(*CPU._distillation_loss(s, t, *args), *R.distillation_loss(s, t, *args), torch.bfloat16)


# ------------------------------------------------------------------ fused linear distillation


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("chunk", [1, 3, 0])  # 0: the kernel's default chunk
@pytest.mark.parametrize("bias,scaled,labels", [(True, True, True), (False, False, True),
                                                (True, False, False)])
def test_fused_linear_vs_reference(isa, dtype, divergence, chunk, bias, scaled, labels):
    m, h, ht, v = 7, 24, 40, 67
    g = torch.Generator().manual_seed(23)
    hs = torch.randn(m, h, generator=g).to(dtype)
    ws = (torch.randn(v, h, generator=g) / 3).to(dtype)
    th = torch.randn(m, ht, generator=g).to(dtype)
    wt = (torch.randn(v, ht, generator=g) / 3).to(dtype)
    bs = torch.randn(v, generator=g).to(dtype) if bias else None
    bt = torch.randn(v, generator=g).to(dtype) if bias else None
    lab = _labels(m, v, 24) if labels else None
    alpha = 0.6 if labels else 1.0
    ts = torch.rand(m, generator=g) if scaled else None
    out = CPU._fused_linear_distillation_loss(hs, ws, th, wt, lab, bs, bt, ts, chunk, 1.7, alpha,
                                              divergence, 0.4, -100, True)
    ref = R.fused_linear_distillation_loss(hs, ws, th, wt, lab, bs, bt, ts, chunk or 2, 1.7,
                                           alpha, divergence, 0.4, -100, True)
    assert_close(out[0], ref[0], torch.float32)
    for got, want, like in zip(out[1:], ref[1:], (hs, ws, bs)):
        if like is None:
            assert got is None and want is None
            continue
        assert got.dtype == like.dtype and got.shape == like.shape
        assert_close(got, want, dtype)
    if labels:  # row 1 is ignored: no loss, no gradient
        assert out[0][1].item() == 0.0 and bool((out[1][1] == 0).all())
    loss_only = CPU._fused_linear_distillation_loss(hs, ws, th, wt, lab, bs, bt, ts, chunk, 1.7,
                                                    alpha, divergence, 0.4, -100, False)
    assert loss_only[1:] == (None, None, None)
    torch.testing.assert_close(loss_only[0], out[0], rtol=0, atol=0)


def test_fused_linear_public_op_autograd(isa):
    g = torch.Generator().manual_seed(25)
    hs, ws = torch.randn(2, 5, 16, generator=g), torch.randn(33, 16, generator=g) / 4
    th, wt = torch.randn(2, 5, 8, generator=g), torch.randn(33, 8, generator=g) / 4
    lab = _labels(10, 33, 26).reshape(2, 5)
    outs = {}
    for backend in ("cpu", "reference"):
        x, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        with qtorch.use_backend(backend):
            loss = ops.fused_linear_distillation_loss(x, w, th, wt, lab, chunk_size=3,
                                                      temperature=2.0, divergence="reverse_kl")
        loss.backward()
        outs[backend] = (loss.detach(), x.grad, w.grad)
    for a, b in zip(outs["cpu"], outs["reference"]):
        assert_close(a, b, torch.float32)
