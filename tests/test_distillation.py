"""The distillation ops (distillation_loss, fused_linear_distillation_loss): every backend's
kernels against `qtorch.reference` (tests/test_ops.py runs the public ops on every backend as
well).

cpu (csrc/cpu/distillation.cpp), on every kernel ISA this CPU runs (forced with
`qtorch._C.set_isa`): every divergence, T != 1, alpha in {0, 0.3, 1}, ignore_index (ignored
rows holding NaN), labels=None, masked (-inf) teacher entries, NaN/inf -> non-finite,
fp32/bf16/fp16, odd V (vector tails), and the fused-linear op (chunking, biases,
token_scale) — plus the label range error.

triton (kernels/distillation.py), under TRITON_INTERPRET=1 on CPU or compiled on a CUDA
device: several vocabulary blocks per row, masks, ignored rows, the gradient written in place
over the student logits, and the fused-linear chunk loop, at the per-dtype tolerances of
`qtorch.testing`.

cuda (csrc/cuda/distillation.cu; the GPU tests are skipped without a CUDA device and a built
qtorch._C_cuda): the loss kernel over vocabulary sizes around its blocks; and, on any machine,
the closed-form loss and gradient formulas the kernel evaluates, in torch.
"""

import math

import pytest
import torch

import qtorch
from qtorch import ops
from qtorch import reference as R
from qtorch.testing import assert_close, device_for
from tests.conftest import TRITON_RUNS, cpu_kernels, cuda_kernels, triton_kernels

if "cpu" in qtorch.available_backends():
    from qtorch.backends import cpu as CPU
if TRITON_RUNS:
    from qtorch._kernels import distillation as KD

    from qtorch.backends import triton as TB

DIVERGENCES = ["kl", "reverse_kl", "jsd"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, dtype=torch.float32, scale=1.0, device="cpu"):
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------- cpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (M, V): V = 1, sizes around the 8/16-lane vectors and the 64-float blocks, a large odd V
SHAPES = [(1, 1), (1, 7), (3, 17), (5, 64), (4, 65), (2, 1000), (3, 4099)]


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


@cpu_kernels
@pytest.mark.parametrize("m,v", SHAPES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 0.3), (0.7, 0.0), (1.5, 1.0)])
def test_cpu_kernel_vs_reference_fp32(isa, m, v, divergence, temperature, alpha):
    s, t = _logits(m, v, torch.float32, 1), _logits(m, v, torch.float32, 2)
    lab = _labels(m, v, 3)
    args = (lab, temperature, alpha, divergence, 0.3, -100, True)
    loss, grad = CPU._distillation_loss(s, t, *args)
    ref_loss, ref_grad = R.distillation_loss(s, t, *args)
    _check(loss, grad, ref_loss, ref_grad, torch.float32)
    if m > 1:  # the ignored row: loss 0, zero gradient
        assert loss[1].item() == 0.0 and bool((grad[1] == 0).all())


@cpu_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,v", [(1, 7), (3, 17), (4, 65), (3, 4099)])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_cpu_kernel_vs_reference_half(isa, dtype, m, v, divergence):
    s, t = _logits(m, v, dtype, 4), _logits(m, v, dtype, 5)
    args = (_labels(m, v, 6), 2.0, 0.5, divergence, 0.5, -100, True)
    loss, grad = CPU._distillation_loss(s, t, *args)
    ref_loss, ref_grad = R.distillation_loss(s, t, *args)
    _check(loss, grad, ref_loss, ref_grad, dtype)


@cpu_kernels
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_labels_none_and_no_grad(isa, divergence, dtype):
    s, t = _logits(4, 33, dtype, 7), _logits(4, 33, dtype, 8)
    loss, grad = CPU._distillation_loss(s, t, None, 1.3, 1.0, divergence, 0.5, -100, True)
    ref_loss, ref_grad = R.distillation_loss(s, t, None, 1.3, 1.0, divergence, 0.5, -100, True)
    _check(loss, grad, ref_loss, ref_grad, dtype)
    loss2, grad2 = CPU._distillation_loss(s, t, None, 1.3, 1.0, divergence, 0.5, -100, False)
    assert grad2 is None
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)


@cpu_kernels
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [5, 17, 100])
def test_cpu_masked_teacher_entries(isa, divergence, dtype, v):
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


@cpu_kernels
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize(
    "where,bad",
    [
        ("student", math.nan),
        ("student", math.inf),
        ("student", -math.inf),
        ("teacher", math.nan),
        ("teacher", math.inf),
    ],
)
@pytest.mark.parametrize("col", [0, 18, 32])  # first element, mid-vector, the vector tail
def test_cpu_nonfinite_is_not_silent(isa, divergence, where, bad, col):
    s, t = _logits(3, 33, torch.float32, 12), _logits(3, 33, torch.float32, 13)
    (s if where == "student" else t)[0, col] = bad
    (s if where == "student" else t)[1, col] = bad  # row 1 is ignored: must stay 0
    loss, grad = CPU._distillation_loss(
        s, t, _labels(3, 33, 14), 2.0, 0.5, divergence, 0.5, -100, True
    )
    ref_loss, _ = R.distillation_loss(
        s, t, _labels(3, 33, 14), 2.0, 0.5, divergence, 0.5, -100, True
    )
    assert not math.isfinite(loss[0].item()) and not math.isfinite(ref_loss[0].item())
    assert bool(torch.isnan(grad[0]).all())
    assert loss[1].item() == 0.0 and bool((grad[1] == 0).all())
    assert math.isfinite(loss[2].item())


@cpu_kernels
def test_cpu_label_out_of_range_is_an_error():
    s, t = _logits(3, 10, torch.float32, 15), _logits(3, 10, torch.float32, 16)
    for bad in (10, -1, 1 << 40):
        lab = torch.tensor([0, bad, 3])
        with pytest.raises(ValueError, match="outside"):
            CPU._distillation_loss(s, t, lab, 1.0, 0.5, "kl", 0.5, -100, True)
        with pytest.raises(ValueError, match="outside"):
            CPU._fused_linear_distillation_loss(
                s,
                torch.ones(10, 10),
                t,
                torch.ones(10, 10),
                lab,
                None,
                None,
                None,
                2,
                1.0,
                0.5,
                "kl",
                0.5,
                -100,
                True,
            )
    # ignore_index may itself lie outside [0, V)
    lab = torch.tensor([0, -100, 3])
    CPU._distillation_loss(s, t, lab, 1.0, 0.5, "kl", 0.5, -100, True)


@cpu_kernels
def test_cpu_through_public_op_with_autograd(isa):
    """qtorch.ops on the cpu backend: forward and backward equal the reference backend's."""
    s, t = (
        _logits(2 * 3, 65, torch.float32, 17).reshape(2, 3, 65),
        _logits(6, 65, torch.float32, 18),
    )
    t = t.reshape(2, 3, 65)
    lab = _labels(6, 65, 19).reshape(2, 3)
    outs = {}
    for backend in ("cpu", "reference"):
        x = s.clone().requires_grad_(True)
        with qtorch.use_backend(backend):
            loss = ops.distillation_loss(
                x, t, lab, temperature=2.0, alpha=0.4, divergence="jsd", beta=0.4
            )
        loss.backward()
        outs[backend] = (loss.detach(), x.grad)
    assert_close(outs["cpu"][0], outs["reference"][0], torch.float32)
    assert_close(outs["cpu"][1], outs["reference"][1], torch.float32)


@cpu_kernels
def test_cpu_large_vocab_bf16(isa):
    s, t = _logits(3, 32000, torch.bfloat16, 20), _logits(3, 32000, torch.bfloat16, 21)
    args = (_labels(3, 32000, 22), 1.0, 0.5, "kl", 0.5, -100, True)
    _check(*CPU._distillation_loss(s, t, *args), *R.distillation_loss(s, t, *args), torch.bfloat16)


# ------------------------------------------------------------------ fused linear distillation


def _cpu_fused_args(m, h, ht, v, dtype, chunk, divergence, bias, scaled, labels, seed):
    """Kernel-contract arguments (all but compute_grad*) of a cpu fused-linear case."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(m, h, generator=g).to(dtype)
    ws = (torch.randn(v, h, generator=g) / 3).to(dtype)
    th = torch.randn(m, ht, generator=g).to(dtype)
    wt = (torch.randn(v, ht, generator=g) / 3).to(dtype)
    bs = torch.randn(v, generator=g).to(dtype) if bias else None
    bt = torch.randn(v, generator=g).to(dtype) if bias else None
    lab = _labels(m, v, seed + 1) if labels else None
    alpha = 0.6 if labels else 1.0
    ts = torch.rand(m, generator=g) if scaled else None
    return (hs, ws, th, wt, lab, bs, bt, ts, chunk, 1.7, alpha, divergence, 0.4, -100)


def _check_cpu_fused(out, args, dtype):
    """out (loss, grad_hidden, grad_weight, grad_bias) against the reference on `args`, whose
    default chunk (0) is taken as 2 rows: the loss at fp32 tolerance, gradients at dtype's."""
    ref = R.fused_linear_distillation_loss(*args[:8], args[8] or 2, *args[9:], True)
    assert_close(out[0], ref[0], torch.float32)
    for got, want, like in zip(out[1:], ref[1:], (args[0], args[1], args[5])):
        if like is None:
            assert got is None and want is None
            continue
        assert got.dtype == like.dtype and got.shape == like.shape
        assert_close(got, want, dtype)


@cpu_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("chunk", [1, 3, 0])  # 0: the kernel's default chunk
@pytest.mark.parametrize(
    "bias,scaled,labels", [(True, True, True), (False, False, True), (True, False, False)]
)
def test_cpu_fused_linear_vs_reference(isa, dtype, divergence, chunk, bias, scaled, labels):
    args = _cpu_fused_args(7, 24, 40, 67, dtype, chunk, divergence, bias, scaled, labels, 23)
    out = CPU._fused_linear_distillation_loss(*args, True)
    _check_cpu_fused(out, args, dtype)
    if labels:  # row 1 is ignored: no loss, no gradient
        assert out[0][1].item() == 0.0 and bool((out[1][1] == 0).all())
    loss_only = CPU._fused_linear_distillation_loss(*args, False)
    assert loss_only[1:] == (None, None, None)
    torch.testing.assert_close(loss_only[0], out[0], rtol=0, atol=0)


def _bf16_gemm():
    if "cpu" not in qtorch.available_backends():
        pytest.skip("no cpu backend")
    if not torch.ops.qtorch_cpu.bf16_gemm_available():
        pytest.skip("torch's CPU library has no cblas_gemm_bf16bf16f32")
    return torch.ops.qtorch_cpu.mm_bf16_f32_


def _layout(t, kind):
    """t [r, c] as a row-major, column-major or strided (every other column) matrix."""
    if kind == "row":
        return t.contiguous()
    if kind == "col":
        return t.T.contiguous().T
    wide = torch.zeros(t.shape[0], 2 * t.shape[1] + 1, dtype=t.dtype)
    wide[:, 1 : 2 * t.shape[1] : 2] = t
    return wide[:, 1 : 2 * t.shape[1] : 2]


@pytest.mark.parametrize(
    "m,k,n", [(1, 1, 1), (1, 7, 3), (3, 1, 5), (5, 0, 4), (0, 3, 4), (37, 129, 1001), (17, 576, 65)]
)
@pytest.mark.parametrize(
    "la,lb", [("row", "row"), ("row", "col"), ("col", "row"), ("col", "strided")]
)
def test_cpu_mm_bf16_f32_is_the_fp32_gemm_of_the_widened_operands(m, k, n, la, lb):
    """out = a @ b (+ beta * out) with bf16 operands and an fp32 result: each product is exact
    in fp32, so it is the fp32 GEMM of the widened operands up to the order of the sums; beta
    = 0 ignores what out held (NaN included); an empty sum gives beta * out."""
    mm = _bf16_gemm()
    g = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    a = _layout(torch.randn(m, k, generator=g).bfloat16(), la)
    b = _layout(torch.randn(k, n, generator=g).bfloat16(), lb)
    want = a.double() @ b.double()
    out = torch.full((m, n), float("nan"))
    mm(out, a, b, 0.0)
    scale = max(1.0, math.sqrt(k))
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-6 * scale)
    prior = torch.randn(m, n, generator=g)
    acc = prior.clone()
    mm(acc, a, b, 1.0)
    torch.testing.assert_close(acc.double(), want + prior.double(), rtol=0, atol=1e-6 * scale)
    # a non-contiguous out (a column block of a wider buffer) is written in place
    wide = torch.zeros(m, n + 3)
    mm(wide[:, 1 : n + 1], a, b, 0.0)
    torch.testing.assert_close(wide[:, 1 : n + 1].double(), want, rtol=0, atol=1e-6 * scale)
    assert bool((wide[:, 0] == 0).all()) and bool((wide[:, n + 1 :] == 0).all())


def test_cpu_mm_bf16_f32_propagates_nonfinite_and_checks_its_arguments():
    mm = _bf16_gemm()
    a = torch.randn(4, 8).bfloat16()
    b = torch.randn(8, 3).bfloat16()
    a[2, 5] = float("nan")
    b[1, 0] = float("inf")
    out = torch.empty(4, 3)
    mm(out, a, b, 0.0)
    want = a.double() @ b.double()
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.isinf(), want.isinf())
    with pytest.raises(RuntimeError, match="bfloat16"):
        mm(out, a.float(), b, 0.0)
    with pytest.raises(RuntimeError, match="out"):
        mm(torch.empty(4, 3, dtype=torch.bfloat16), a, b, 0.0)
    with pytest.raises(RuntimeError, match=r"\[4, 3\]"):
        mm(torch.empty(3, 4), a, b, 0.0)
    with pytest.raises(RuntimeError, match="b is"):
        mm(out, a, b[:5], 0.0)


def _bf16_head_used(monkeypatch, flag):
    """Force QTORCH_CPU_BF16_GEMM=flag; returns a list recording the head class of each call."""
    monkeypatch.setenv("QTORCH_CPU_BF16_GEMM", flag)
    used = []
    loop = R.distillation.fused_linear_distillation_loss

    def spy(*args, **kw):
        used.append(kw["head"])
        return loop(*args, **kw)

    monkeypatch.setattr(CPU._ref_distill, "fused_linear_distillation_loss", spy)
    return used


@cpu_kernels
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("chunk", [1, 3, 0])
@pytest.mark.parametrize(
    "bias,scaled,labels", [(True, True, True), (False, False, True), (True, False, False)]
)
@pytest.mark.parametrize("m,h,ht,v", [(7, 24, 40, 67), (1, 1, 3, 1), (5, 17, 9, 1031)])
def test_cpu_fused_linear_bf16_gemm_head_vs_reference(
    isa, monkeypatch, divergence, chunk, bias, scaled, labels, m, h, ht, v
):
    """bf16 heads on the bf16 GEMM (`_Bf16Head`, forced on): loss and gradients against the
    reference's fp32 GEMMs, the backward's bf16 rounding of the chunk gradient inside bf16
    tolerance; the frozen head (no weight gradient) and the loss-only call agree with it."""
    _bf16_gemm()
    used = _bf16_head_used(monkeypatch, "1")
    dtype = torch.bfloat16
    args = _cpu_fused_args(m, h, ht, v, dtype, chunk, divergence, bias, scaled, labels, 31 + m + v)
    out = CPU._fused_linear_distillation_loss(*args, True)
    assert used == [CPU._Bf16Head]
    _check_cpu_fused(out, args, dtype)
    frozen = CPU._fused_linear_distillation_loss(*args, True, False)
    assert frozen[2] is None
    torch.testing.assert_close(frozen[0], out[0], rtol=0, atol=0)
    torch.testing.assert_close(frozen[1], out[1], rtol=0, atol=0)
    loss_only = CPU._fused_linear_distillation_loss(*args, False)
    assert loss_only[1:] == (None, None, None)
    torch.testing.assert_close(loss_only[0], out[0], rtol=0, atol=0)


@cpu_kernels
def test_cpu_fused_linear_bf16_gemm_head_with_module_teacher_and_nonfinite(isa, monkeypatch):
    """A quantized teacher head (no teacher block to reuse: the head keeps its own bf16
    gradient buffer), and a NaN in the student's hidden states comes out non-finite."""
    from qtorch.nn import Int8WeightOnlyLinear

    _bf16_gemm()
    used = _bf16_head_used(monkeypatch, "1")
    g = torch.Generator().manual_seed(71)
    m, h, v = 11, 32, 203
    hs = torch.randn(m, h, generator=g).bfloat16()
    ws = (torch.randn(v, h, generator=g) / 4).bfloat16()
    th = torch.randn(m, h, generator=g).bfloat16()
    lin = torch.nn.Linear(h, v, bias=True)
    head = Int8WeightOnlyLinear.from_float(lin).to(torch.bfloat16).requires_grad_(False)
    lab = _labels(m, v, 72)
    args = (None, None, None, 4, 1.0, 0.5, "kl", 0.5, -100, True)
    out = CPU._fused_linear_distillation_loss(
        hs, ws, th, R.distillation.ModuleHead(head), lab, *args
    )
    assert used == [CPU._Bf16Head]
    ref = R.fused_linear_distillation_loss(hs, ws, th, R.distillation.ModuleHead(head), lab, *args)
    assert_close(out[0], ref[0], torch.float32)
    assert_close(out[1], ref[1], torch.bfloat16)
    assert_close(out[2], ref[2], torch.bfloat16)
    bad = hs.clone()
    bad[3, 7] = float("nan")
    loss = CPU._fused_linear_distillation_loss(bad, ws, th, ws, lab, *args)[0]
    assert not bool(loss[3].isfinite()) and bool(loss[:3].isfinite().all())


@cpu_kernels
def test_cpu_bf16_gemm_head_policy(isa, monkeypatch):
    """QTORCH_CPU_BF16_GEMM=0 keeps the widening LinearHead; unset, the bf16 GEMM runs only
    where torch can use the AMX tiles; fp32 or mixed-dtype heads never take it."""
    g = torch.Generator().manual_seed(5)
    hs, ws = torch.randn(3, 8, generator=g).bfloat16(), torch.randn(9, 8, generator=g).bfloat16()
    args = (None, None, None, None, 2, 1.0, 1.0, "kl", 0.5, -100, True)
    used = _bf16_head_used(monkeypatch, "0")
    CPU._fused_linear_distillation_loss(hs, ws, hs, ws, *args)
    assert used == [R.distillation.LinearHead]
    monkeypatch.setenv("QTORCH_CPU_BF16_GEMM", "1")
    CPU._fused_linear_distillation_loss(hs.float(), ws.float(), hs.float(), ws.float(), *args)
    CPU._fused_linear_distillation_loss(hs, ws, hs.float(), ws, *args)  # fp32 teacher input
    assert used[1:] == [R.distillation.LinearHead] * 2
    monkeypatch.delenv("QTORCH_CPU_BF16_GEMM")
    amx = bool(torch._C._cpu._init_amx()) if hasattr(torch._C._cpu, "_init_amx") else False
    assert CPU._bf16_gemm_wanted() == (amx and torch.ops.qtorch_cpu.bf16_gemm_available())


@cpu_kernels
def test_cpu_fused_linear_public_op_autograd(isa):
    g = torch.Generator().manual_seed(25)
    hs, ws = torch.randn(2, 5, 16, generator=g), torch.randn(33, 16, generator=g) / 4
    th, wt = torch.randn(2, 5, 8, generator=g), torch.randn(33, 8, generator=g) / 4
    lab = _labels(10, 33, 26).reshape(2, 5)
    outs = {}
    for backend in ("cpu", "reference"):
        x, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        with qtorch.use_backend(backend):
            loss = ops.fused_linear_distillation_loss(
                x, w, th, wt, lab, chunk_size=3, temperature=2.0, divergence="reverse_kl"
            )
        loss.backward()
        outs[backend] = (loss.detach(), x.grad, w.grad)
    for a, b in zip(outs["cpu"], outs["reference"]):
        assert_close(a, b, torch.float32)


@cpu_kernels
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.6), (2.0, 0.6), (1.5, 1.0)])
def test_cpu_jsd_in_place_gradient_matches_reference(isa, beta, temperature, alpha):
    """The in-place row kernel of the chunk loop (gradient over the student logits), JSD at
    β ∈ {0, ½, 1}, with and without the hard term at T != 1 (its gradient pass reads q and
    log q − log m kept from the loss pass, and the student logits for the hard term)."""
    m, v = 5, 1031  # V: a vector tail on every ISA
    s, t = _logits(m, v, torch.float32, 41), _logits(m, v, torch.float32, 42)
    t[2, 3:9] = float("-inf")  # masked teacher entries
    lab = _labels(m, v, 43)
    ts = torch.rand(m, generator=_gen(44))
    g = s.clone()
    loss, grad = CPU._chunk_loss(g, t, lab, ts, temperature, alpha, "jsd", beta, -100, True)
    assert grad is g
    ref_loss, ref_grad = R.distillation_loss(s, t, lab, temperature, alpha, "jsd", beta, -100)
    assert_close(loss, ref_loss, torch.float32)
    assert_close(grad, ref_grad * ts[:, None], torch.float32)


@cpu_kernels
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("spread", [1.0, 60.0])
@pytest.mark.parametrize("v", [1031, 4099])
def test_cpu_jsd_kept_exponentials_and_underflow(isa, beta, spread, v):
    """For 0 < β < 1 the kernel forms q and p from pass 1's exponentials (rescaled per block of
    lane maxima) and log m directly, falling back to the log-domain form for a vector holding
    an m below FLT_MIN: wide logits (spread 60: most q and p underflow, maxima that move
    across blocks) and masked teacher entries, against the float64 reference."""
    m = 6
    s = _logits(m, v, torch.float32, 61) * spread
    t = _logits(m, v, torch.float32, 62) * spread
    s[1] = s[1] + torch.linspace(0, 40 * spread, v)  # the student maximum moves along the row
    t[2, : v // 2] = float("-inf")
    t[3, 5:] = float("-inf")  # five live teacher entries
    g = s.clone()
    loss, grad = CPU._chunk_loss(g, t, None, None, 1.0, 1.0, "jsd", beta, -100, True)
    ref_loss, ref_grad = R.distillation_loss(s.double(), t.double(), None, 1.0, 1.0, "jsd", beta)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_head_16bit_weight_is_walked_in_slices(dtype, bias, monkeypatch):
    """A 16-bit head weight is never widened whole: LinearHead keeps it 16-bit and widens
    ~4 MiB row slices into one buffer (7-row slices here, V = 45: a ragged last slice); its
    logits, grad_input and grad_weight are those of the head on the widened weight."""
    monkeypatch.setattr(R.distillation, "_slice_rows", lambda k: 7)
    g = torch.Generator().manual_seed(51)
    w = (torch.randn(45, 24, generator=g) / 3).to(dtype)
    b = torch.randn(45, generator=g).to(dtype) if bias else None
    sliced = R.distillation.LinearHead(w, b, torch.float32)
    whole = R.distillation.LinearHead(w.float(), None if b is None else b.float(), torch.float32)
    assert sliced.weight.dtype == dtype  # no fp32 copy of W
    x = sliced.operand(torch.randn(6, 24, generator=g).to(dtype))
    out_s, out_w = torch.empty(6, 45), torch.empty(6, 45)
    sliced.logits(x, out_s)
    whole.logits(x, out_w)
    assert sliced._slice[0].numel() == 7 * 24  # one 7-row slice buffer
    assert_close(out_s, out_w, torch.float32)
    # a second head sharing the buffer (the chunk loop's teacher) grows it to its K and is right
    w2 = (torch.randn(45, 30, generator=g) / 3).to(dtype)
    other = R.distillation.LinearHead(w2, None, torch.float32)
    other.share_slices(sliced)
    x2 = other.operand(torch.randn(6, 30, generator=g).to(dtype))
    assert_close(other.logits(x2, torch.empty(6, 45)), x2 @ w2.float().T, torch.float32)
    assert sliced._slice[0].numel() == 7 * 30
    sliced.logits(x, out_s)  # and the first head still reads its own W through it
    assert_close(out_s, out_w, torch.float32)
    grad = torch.randn(6, 45, generator=g)
    gi_s, gi_w = torch.empty(6, 24, dtype=dtype), torch.empty(6, 24, dtype=dtype)
    gw_s, gw_w = torch.zeros(45, 24), torch.zeros(45, 24)
    sliced.backward(grad, x, gi_s, gw_s)
    whole.backward(grad, x, gi_w, gw_w)
    assert_close(gi_s, gi_w, dtype)
    torch.testing.assert_close(gw_s, gw_w, rtol=0, atol=0)  # g.T @ x reads no weight
    gi32_s, gi32_w = torch.empty(6, 24), torch.empty(6, 24)
    sliced.backward(grad, x, gi32_s, None)
    whole.backward(grad, x, gi32_w, None)
    assert_close(gi32_s, gi32_w, torch.float32)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("teacher", ["tensor", "int8 module"])
def test_fused_unit_gradient_is_not_copied_and_stays_right(backend, teacher, monkeypatch):
    """loss.backward() hands the saved gradients over without multiplying them by 1 (no second
    [V, H] weight gradient at the peak); a retained graph backpropagated three times adds three
    gradients, another incoming gradient still scales them, and a gradient accumulated into
    .grad over two steps is the sum."""
    if backend == "cpu" and "cpu" not in qtorch.available_backends():
        pytest.skip("no cpu backend")
    from qtorch.nn import Int8WeightOnlyLinear

    g = torch.Generator().manual_seed(61)
    hs, ws = torch.randn(9, 16, generator=g), torch.randn(37, 16, generator=g) / 4
    th, wt = torch.randn(9, 16, generator=g), torch.randn(37, 16, generator=g) / 4
    lab = _labels(9, 37, 62)
    if teacher == "tensor":
        head = wt
    else:
        lin = torch.nn.Linear(16, 37, bias=False)
        with torch.no_grad():
            lin.weight.copy_(wt)
        head = Int8WeightOnlyLinear.from_float(lin)

    import qtorch.ops.distillation as OD

    handed = []  # per backward: were the saved gradients handed over without a product?
    scaled = OD._scaled

    def spy(grad_loss, *grads):
        out = scaled(grad_loss, *grads)
        handed.append(all(a is b for a, b in zip(out, grads, strict=True)))
        return out

    monkeypatch.setattr(OD, "_scaled", spy)

    def run(scale=None, retain=False, times=1, x=None, w=None):
        x = hs.clone().requires_grad_(True) if x is None else x
        w = ws.clone().requires_grad_(True) if w is None else w
        with qtorch.use_backend(backend):
            loss = ops.fused_linear_distillation_loss(x, w, th, head, lab, chunk_size=4)
        out = loss if scale is None else loss * scale
        for _ in range(times):
            out.backward(retain_graph=retain)
        return x, w

    x1, w1 = run()
    assert handed == [True]
    # three times: were .grad to alias a saved gradient, the third pass would read the sum of
    # the first two from it (4x, not 3x)
    x2, w2 = run(retain=True, times=3)
    assert_close(x2.grad, 3 * x1.grad, torch.float32)
    assert_close(w2.grad, 3 * w1.grad, torch.float32)
    assert handed[1:] == [False] * 3  # a kept graph: fresh products every time
    x3, w3 = run(scale=3.0)
    assert handed[4:] == [False]
    assert_close(x3.grad, 3 * x1.grad, torch.float32)
    assert_close(w3.grad, 3 * w1.grad, torch.float32)
    x4, w4 = run()
    run(x=x4, w=w4)  # a second step accumulates into the first step's .grad
    assert_close(w4.grad, 2 * w1.grad, torch.float32)
    assert_close(x4.grad, 2 * x1.grad, torch.float32)


def test_fused_module_teacher_logits_are_widened_to_the_loss_precision():
    """A module teacher's logits (fp32 from an int8 head on fp32 hidden states) are widened to
    the loop's accumulation dtype: float64 for a float64 student, as a tensor teacher's are."""
    from qtorch.nn import Int8WeightOnlyLinear

    g = torch.Generator().manual_seed(71)
    lin = torch.nn.Linear(16, 37, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(37, 16, generator=g) / 4)
    head = Int8WeightOnlyLinear.from_float(lin)
    hs = torch.randn(5, 16, generator=g, dtype=torch.float64)
    ws = torch.randn(37, 16, generator=g, dtype=torch.float64) / 4
    th = torch.randn(5, 16, generator=g)
    lab = _labels(5, 37, 72)
    seen = []
    chunk_loss = R.distillation.reference_chunk_loss

    def spy(s, t, *args):
        seen.append((s.dtype, t.dtype))
        return chunk_loss(s, t, *args)

    got = R.fused_linear_distillation_loss(
        hs,
        ws,
        th,
        R.distillation.ModuleHead(head),
        lab,
        None,
        None,
        None,
        2,
        chunk_loss=spy,
    )
    assert seen and all(d == (torch.float64, torch.float64) for d in seen)
    tw = head.dequantize().double()
    want = R.fused_linear_distillation_loss(hs, ws, th.double(), tw, lab, None, None, None, 2)
    assert_close(got[0], want[0], torch.float32)
    assert_close(got[1], want[1], torch.float32)


# ---------------------------------------------------------------------------------- triton

DEV = device_for("triton")
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _logit_pair(m, v, dtype, seed, mask_teacher=False):
    s = _randn(m, v, dtype=dtype, seed=seed, scale=3.0, device=DEV)
    t = _randn(m, v, dtype=dtype, seed=seed + 1, scale=3.0, device=DEV)
    if mask_teacher:
        t[:, ::7] = float("-inf")  # masked vocabulary entries
    return s, t


def _dev_labels(m, v, seed, ignore_row=None):
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
@triton_kernels
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("m,v", [(1, 1), (5, 1000), (2, 20000)])
def test_triton_distillation_loss_divergences(m, v, divergence):
    s, t = _logit_pair(m, v, torch.float32, seed=20)
    lab = _dev_labels(m, v, seed=21)
    _check_loss(s, t, lab, 2.0, 0.7, divergence, 0.3)


@triton_kernels
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_triton_distillation_loss_dtypes_masks_and_ignored_rows(divergence, dtype):
    s, t = _logit_pair(4, 333, dtype, seed=22, mask_teacher=True)
    lab = _dev_labels(4, 333, seed=23, ignore_row=1)
    s[1, 0] = float("nan")  # an ignored token contributes nothing, whatever it holds
    loss, grad = _check_loss(s, t, lab, 1.5, 0.5, divergence, 0.5)
    assert loss[1].item() == 0.0
    assert torch.count_nonzero(grad[1]).item() == 0
    assert torch.isfinite(loss).all() and torch.isfinite(grad.float()).all()


@triton_kernels
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_triton_distillation_jsd_beta_endpoints(beta):
    s, t = _logit_pair(3, 257, torch.float32, seed=24, mask_teacher=True)
    _check_loss(s, t, _dev_labels(3, 257, seed=25), 1.0, 0.8, "jsd", beta)


@triton_kernels
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_triton_distillation_loss_without_labels(divergence):
    s, t = _logit_pair(3, 500, torch.bfloat16, seed=26)
    _check_loss(s, t, None, 3.0, 1.0, divergence, 0.5)


@triton_kernels
def test_triton_distillation_nonfinite_logits_give_nonfinite_loss():
    s, t = _logit_pair(3, 100, torch.float32, seed=27)
    s[0, 5] = float("nan")
    t[1, 7] = float("inf")
    loss, _ = KD.distillation_loss(
        s, t, _dev_labels(3, 100, seed=28), 1.0, 0.5, "kl", 0.5, -100, True
    )
    assert not torch.isfinite(loss[0]) and not torch.isfinite(loss[1])
    assert torch.isfinite(loss[2])


@triton_kernels
def test_triton_distillation_bad_label_is_an_error():
    s, t = _logit_pair(2, 10, torch.float32, seed=29)
    with pytest.raises(ValueError, match="labels"):
        KD.distillation_loss(
            s, t, torch.tensor([3, 10], device=DEV), 1.0, 0.5, "kl", 0.5, -100, True
        )


@triton_kernels
def test_triton_distillation_grad_in_place_matches():
    # The fused path writes the gradient over the student logits.
    s, t = _logit_pair(3, 700, torch.bfloat16, seed=30)
    lab = _dev_labels(3, 700, seed=31)
    for div in ("kl", "reverse_kl", "jsd"):
        loss, grad = KD.distillation_loss(s, t, lab, 2.0, 0.5, div, 0.5, -100, True)
        buf = s.clone()
        scale = torch.full((3,), 0.25, device=DEV)
        loss2 = KD._launch(buf, t, lab, 2.0, 0.5, div, 0.5, -100, buf, scale)
        assert torch.equal(loss2, loss)
        assert_close(buf, grad * 0.25, torch.bfloat16)


# (M, H, Ht, V, chunk)
FUSED_SHAPES = [(1, 16, 8, 50, 4), (13, 32, 24, 300, 5)]


def _fused_case(m, h, ht, v, chunk, dtype, divergence, seed):
    """Kernel-contract arguments of a fused-linear case: biases, an ignored row, token_scale."""
    hs, ws = (
        _randn(m, h, dtype=dtype, seed=seed, device=DEV),
        _randn(v, h, dtype=dtype, seed=seed + 1, scale=0.25, device=DEV),
    )
    ht_, wt = (
        _randn(m, ht, dtype=dtype, seed=seed + 2, device=DEV),
        _randn(v, ht, dtype=dtype, seed=seed + 3, scale=0.25, device=DEV),
    )
    bs, bt = (
        _randn(v, dtype=dtype, seed=seed + 4, device=DEV),
        _randn(v, dtype=dtype, seed=seed + 5, device=DEV),
    )
    lab = _dev_labels(m, v, seed=seed + 6, ignore_row=m // 2)
    ts = torch.rand(m, generator=_gen(seed + 7)).to(DEV)
    return (hs, ws, ht_, wt, lab, bs, bt, ts, chunk, 2.0, 0.6, divergence, 0.4, -100, True)


def _check_fused(out, args, dtype):
    # The logits are the fp32 accumulator of the GEMM on every path (16-bit operands on a GPU),
    # so the loss compares at fp32 tolerance; the gradients at the inputs' dtype.
    ref = R.fused_linear_distillation_loss(*args)
    assert out[0].dtype == torch.float32
    assert_close(out[0], ref[0], torch.float32)
    for got, want, like in zip(out[1:], ref[1:], (args[0], args[1], args[5]), strict=True):
        assert got.dtype == like.dtype and got.shape == like.shape
        assert_close(got, want, dtype)


@triton_kernels
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("m,h,ht,v,chunk", FUSED_SHAPES)
def test_triton_fused_linear_distillation_loss(m, h, ht, v, chunk, divergence, dtype):
    args = _fused_case(m, h, ht, v, chunk, dtype, divergence, seed=40)
    _check_fused(TB.fused_linear_distillation_loss(*args), args, dtype)


@triton_kernels
def test_triton_fused_linear_without_grad_or_bias():
    hs, ws = _randn(6, 16, seed=50, device=DEV), _randn(40, 16, seed=51, device=DEV)
    ht_, wt = _randn(6, 8, seed=52, device=DEV), _randn(40, 8, seed=53, device=DEV)
    args = (hs, ws, ht_, wt, None, None, None, None, 4, 1.0, 1.0, "kl", 0.5, -100)
    out = TB.fused_linear_distillation_loss(*args, False)
    ref = R.fused_linear_distillation_loss(*args, False)
    assert out[1] is None and out[2] is None and out[3] is None
    assert_close(out[0], ref[0], torch.float32)
    out = TB.fused_linear_distillation_loss(*args, True)
    ref = R.fused_linear_distillation_loss(*args, True)
    assert out[3] is None
    assert_close(out[1], ref[1], torch.float32)
    assert_close(out[2], ref[2], torch.float32)


@triton_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_triton_fused_linear_mixed16_head(dtype, divergence, monkeypatch):
    """The head the Triton backend runs on CUDA for 16-bit inputs: 16-bit operands, fp32
    logits (never rounded to 16 bits, so the loss matches the fp32 reference at fp32
    tolerance), the gradient read in 16 bits by the backward GEMMs, dW accumulated in fp32 in
    blocks of rows (made small here, so several blocks and a partial one run). Off CUDA the
    fp32-output GEMM is emulated by an fp32 GEMM of the 16-bit values (exact products)."""
    if torch.device(DEV).type != "cuda":
        monkeypatch.setattr(
            TB, "_mm_fp32", lambda a, b, out=None: torch.mm(a.float(), b.float(), out=out)
        )
    monkeypatch.setattr(TB, "_GW_ROWS", 128)
    args = _fused_case(13, 32, 24, 300, 5, dtype, divergence, seed=60)
    out = R.fused_linear_distillation_loss(*args, chunk_loss=KD.chunk_loss, head=TB.Mixed16Head)
    _check_fused(out, args, dtype)


# ------------------------------------------------------------------------------------ cuda

CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_cuda_distillation_closed_forms(divergence, temperature, beta):
    """The per-row formulas distillation.cu evaluates (from running sums, no autograd), in
    torch, against the reference's autograd: masked (-inf) teacher entries, an ignored row,
    T != 1, beta at both ends."""
    m, v, alpha, T = 6, 37, 0.7, temperature
    g = _gen(7)
    s = torch.randn(m, v, generator=g) * 3
    t = torch.randn(m, v, generator=g) * 3
    t[:, ::5] = float("-inf")
    labels = torch.randint(0, v, (m,), generator=g)
    labels[1] = -100
    loss_ref, grad_ref = R.distillation_loss(s, t, labels, T, alpha, divergence, beta, -100)

    z, u = s / T, t / T
    log_zz, log_zu = z.logsumexp(-1, keepdim=True), u.logsumexp(-1, keepdim=True)
    log_zs = s.logsumexp(-1, keepdim=True)
    lq, lp = z - log_zz, u - log_zu
    q, p = lq.exp(), lp.exp()
    live = t != float("-inf")
    zero = torch.zeros(())
    if divergence == "kl":  # D = Σ_live p (u - z) + logZ_z - logZ_u;  dD/dz = q - p
        d = torch.where(live, p * (u - z), zero).sum(-1, keepdim=True) + log_zz - log_zu
        soft = q - p
    elif divergence == "reverse_kl":
        # D = Σ_live q (z - u) + (logZ_u - logZ_z) Q,  Q = Σ_live q
        # dD/dz_j = live_j q_j (g_j + 1) - q_j (D + Q),  g = log q - log p
        ql = torch.where(live, q, zero).sum(-1, keepdim=True)
        d = torch.where(live, q * (z - u), zero).sum(-1, keepdim=True) + (log_zu - log_zz) * ql
        soft = torch.where(live, q * ((lq - lp) + 1 - d - ql), -q * (d + ql))
    else:  # dD/dz_j = (1 - β) q_j (log q_j - log m_j - KL(q ‖ m))
        lm = (beta * p + (1 - beta) * q).log()
        kl_pm = torch.where(live, p * (lp - lm), zero).sum(-1, keepdim=True)
        kl_qm = (q * (lq - lm)).sum(-1, keepdim=True)
        d = (beta * kl_pm if beta != 0 else 0) + ((1 - beta) * kl_qm if beta != 1 else 0)
        soft = (1 - beta) * q * (lq - lm - kl_qm) if beta != 1 else torch.zeros_like(q)
    safe = labels.clamp(min=0)
    hard = log_zs.squeeze(-1) - s.gather(1, safe[:, None]).squeeze(1)
    loss = alpha * T * T * d.squeeze(-1) + (1 - alpha) * hard
    grad = alpha * T * soft + (1 - alpha) * (
        (s - log_zs).exp() - torch.nn.functional.one_hot(safe, v)
    )
    valid = labels != -100
    loss = torch.where(valid, loss, zero)
    grad = torch.where(valid[:, None], grad, zero)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-5)


@cuda_kernels
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("m,v", [(1, 1), (3, 37), (8, 4096), (5, 32003)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_cuda_distillation_loss(dtype, divergence, m, v, temperature):
    from qtorch.backends import cuda as cb

    g = _gen(m * v)
    s = (torch.randn(m, v, generator=g) * 4).to("cuda", dtype)
    t = (torch.randn(m, v, generator=g) * 4).to("cuda", dtype)
    if v > 4:
        t[:, 1::7] = float("-inf")  # masked vocabulary entries
    labels = torch.randint(0, v, (m,), generator=g).cuda()
    labels[0] = -100
    if m > 2:
        s[0] = float("nan")  # an ignored row leaks nothing
    args = (temperature, 0.6, divergence, 0.4, -100, True)
    loss, grad = cb._distillation_loss(s, t, labels, *args)
    loss_ref, grad_ref = R.distillation_loss(s, t, labels, *args)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_close(loss, loss_ref, dtype=torch.float32)
    assert_close(grad, grad_ref, dtype=dtype)
    loss_nl, grad_nl = cb._distillation_loss(
        s[1:], t[1:], None, temperature, 1.0, divergence, 0.4, -100, False
    )
    ref_nl, _ = R.distillation_loss(
        s[1:], t[1:], None, temperature, 1.0, divergence, 0.4, -100, False
    )
    assert grad_nl is None
    assert_close(loss_nl, ref_nl, dtype=torch.float32)


@cuda_kernels
def test_cuda_distillation_bad_label_is_value_error():
    s = torch.randn(2, 10, device="cuda")
    with qtorch.use_backend("cuda"):
        with pytest.raises(ValueError, match="labels"):
            ops.distillation_loss(s, s, torch.tensor([1, 10], device="cuda"))


@cuda_kernels
def test_cuda_distillation_nonfinite_teacher_poisons_counted_row():
    s = torch.randn(2, 64, device="cuda")
    t = torch.randn(2, 64, device="cuda")
    t[1, 3] = float("nan")
    loss, _ = torch.ops.qtorch_cuda.distillation_loss(s, t, None, 1.0, 1.0, 0, 0.5, -100, False)
    assert torch.isfinite(loss[0]) and not torch.isfinite(loss[1])


# ------------------------------------------------- a quantized teacher head (API.md, "Distillation
# with a quantized teacher"): teacher_weight is a qtorch quantized linear module

QTEACHERS = ["w8a16", "w4a16", "w8a8"]
# Ht != H, so a [V, Ht] float tensor is told apart from the student's [V, H] weight gradient
QM, QH, QHT, QV = 23, 16, 64, 97


def _qteacher(kind, v=QV, ht=QHT, bias=True, seed=11):
    from qtorch.nn import Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear

    lin = torch.nn.Linear(ht, v, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(_randn(v, ht, seed=seed, scale=0.3))
        if bias:
            lin.bias.copy_(_randn(v, seed=seed + 1))
    if kind == "w4a16":
        return Int4WeightOnlyLinear.from_float(lin, group_size=32)
    return {"w8a16": Int8WeightOnlyLinear, "w8a8": Int8DynamicLinear}[kind].from_float(lin)


def _qteacher_inputs(dev, labels=True):
    hs = _randn(QM, QH, seed=1, device=dev)
    ws = _randn(QV, QH, seed=2, scale=0.3, device=dev)
    bs = _randn(QV, seed=3, device=dev)
    ht = _randn(QM, QHT, seed=4, device=dev)
    lab = None
    if labels:
        lab = torch.randint(0, QV, (QM,), generator=_gen(5)).to(dev)
        lab[::5] = -100
    return hs, ws, bs, ht, lab


def _leaves(*ts):
    return [t.clone().requires_grad_(True) for t in ts]


@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
@pytest.mark.parametrize("backend", qtorch.available_backends())
@pytest.mark.parametrize("kind", QTEACHERS)
@pytest.mark.parametrize(
    "divergence,reduction", [("kl", "mean"), ("jsd", "sum"), ("reverse_kl", "none")]
)
def test_quantized_teacher_head(backend, kind, divergence, reduction):
    """The loss and student gradients with the module as the teacher head are (tightly) those of
    the unfused loss on the module's own logits `module(teacher_hidden)`, and (within the module
    kernel's error) those of the op given module.dequantize() and the module's bias. The module
    and the teacher hidden states get no gradient."""
    dev = device_for(backend)
    hs, ws, bs, ht, lab = _qteacher_inputs(dev)
    mod = _qteacher(kind).to(dev)
    kw = dict(divergence=divergence, temperature=2.0, alpha=0.6, reduction=reduction)
    runs = []
    with qtorch.use_backend(backend):
        for teacher in ("module", "unfused", "dequantized"):
            x, w, b = _leaves(hs, ws, bs)
            th = ht.clone().requires_grad_(True)
            if teacher == "module":
                out = ops.fused_linear_distillation_loss(x, w, th, mod, lab, b, chunk_size=7, **kw)
                assert th.grad is None and mod.bias.grad is None
            elif teacher == "unfused":
                with torch.no_grad():
                    t_logits = mod(ht).float()
                out = ops.distillation_loss(x @ w.T + b, t_logits, lab, **kw)
            else:
                out = ops.fused_linear_distillation_loss(
                    x, w, ht, mod.dequantize(), lab, b, mod.bias.detach(), chunk_size=7, **kw
                )
            (out * torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)).sum().backward()
            runs.append((out.detach(), x.grad, w.grad, b.grad))
            if teacher == "module":
                assert th.grad is None and mod.bias.grad is None
    (got, unfused, deq) = runs
    for a, e in zip(got, unfused):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
    # Weight-only kernels multiply by the same ŵ in fp32 (GEMM order only); W8A8 quantizes the
    # activations too, which moves the teacher logits by ~1% of their size (here < 0.1), and
    # the loss and gradients by as much times their Lipschitz constants (alpha, |x| ~ 3).
    tol = dict(rtol=2e-2, atol=1e-2) if kind == "w8a8" else dict(rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        logit_err = (mod(ht) - (ht @ mod.dequantize().to(dev).T + mod.bias)).abs().max()
    assert logit_err < (0.1 if kind == "w8a8" else 1e-4)
    for a, e in zip(got, deq):
        torch.testing.assert_close(a, e, **tol)


@pytest.mark.parametrize("kind", QTEACHERS)
def test_quantized_teacher_head_module_api_frozen_head_and_leading_dims(kind):
    """FusedLinearDistillationLoss.forward takes the module too; [B, T, H] inputs, no labels
    (alpha 1), a frozen student head (no weight gradient) and a bias-free teacher module."""
    hs, ws, _, ht, _ = _qteacher_inputs("cpu")
    mod = _qteacher(kind, bias=False)
    loss_fn = qtorch.nn.FusedLinearDistillationLoss(alpha=1.0, chunk_size=5)
    x = hs[:22].reshape(2, 11, QH).clone().requires_grad_(True)
    w = ws.clone()  # frozen
    out = loss_fn(x, w, ht[:22].reshape(2, 11, QHT), mod)
    out.backward()
    with torch.no_grad():
        want = ops.distillation_loss(x @ w.T, mod(ht[:22]).reshape(2, 11, QV), alpha=1.0)
    xr = x.detach().clone().requires_grad_(True)
    ops.distillation_loss(xr @ w.T, mod(ht[:22]).reshape(2, 11, QV).detach(), alpha=1.0).backward()
    torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-6)
    assert w.grad is None


class _ShapeRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape and dtype of every tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.outputs.append((func, tuple(t.shape), t.dtype))
        return out


@cpu_kernels
@pytest.mark.parametrize("kind", QTEACHERS)
def test_quantized_teacher_head_never_builds_the_float_weight(kind):
    """With the cpu backend (the module's packed kernel), no op of the fused loss with a module
    teacher returns a float [V, Ht] (or [Ht, V]) tensor: the dequantized teacher weight never
    exists. The same recorder does see it when the op is given module.dequantize()."""
    hs, ws, bs, ht, lab = _qteacher_inputs("cpu")
    mod = _qteacher(kind)
    full = {(QV, QHT), (QHT, QV)}

    def float_weights(rec):
        return [(f, s) for f, s, d in rec.outputs if d.is_floating_point and s in full]

    with qtorch.use_backend("cpu"):
        x, w, b = _leaves(hs, ws, bs)
        with _ShapeRecorder() as rec:
            ops.fused_linear_distillation_loss(x, w, ht, mod, lab, b, chunk_size=8).backward()
        assert rec.outputs, "the recorder saw no ops"
        assert float_weights(rec) == []
        x, w, b = _leaves(hs, ws, bs)
        with _ShapeRecorder() as rec:
            ops.fused_linear_distillation_loss(
                x, w, ht, mod.dequantize(), lab, b, mod.bias.detach(), chunk_size=8
            ).backward()
        assert float_weights(rec) != []


def test_quantized_teacher_head_bad_input():
    from qtorch.nn import Int8WeightOnlyLinear

    hs, ws, bs, ht, lab = _qteacher_inputs("cpu")
    mod = _qteacher("w8a16")
    with pytest.raises(ValueError, match="teacher_bias"):
        ops.fused_linear_distillation_loss(hs, ws, ht, mod, lab, teacher_bias=bs)
    with pytest.raises(ValueError, match="in_features"):
        ops.fused_linear_distillation_loss(hs, ws, ht[:, :32], mod, lab)
    with pytest.raises(ValueError, match="vocab"):
        ops.fused_linear_distillation_loss(hs, ws, ht, _qteacher("w8a16", v=QV + 1), lab)
    for bad in (torch.nn.Linear(QHT, QV), "weight", None, [mod]):
        with pytest.raises(TypeError, match="teacher_weight"):
            ops.fused_linear_distillation_loss(hs, ws, ht, bad, lab)
    with pytest.raises(TypeError, match="teacher_hidden"):
        ops.fused_linear_distillation_loss(
            hs.double(), ws.double(), ht.double(), Int8WeightOnlyLinear(QHT, QV), lab
        )


# ---------------------------------- the module route under torch.compile and opcheck (API.md)


def _teacher_modules():
    """A quantized teacher head of each kind (V=37, Ht=64, with bias), packed (eager use) and
    canonical (made inside canonical_layout)."""
    from qtorch.nn import Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear
    from qtorch.nn.linear import canonical_layout

    g = torch.Generator().manual_seed(71)
    lin = torch.nn.Linear(64, 37)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(37, 64, generator=g) / 8)
        lin.bias.copy_(torch.randn(37, generator=g))
    smooth = torch.rand(64, generator=g) + 0.5
    makers = {
        "w8a16": lambda: Int8WeightOnlyLinear.from_float(lin),
        "w4a16": lambda: Int4WeightOnlyLinear.from_float(lin, group_size=32),
        "w8a8": lambda: Int8DynamicLinear.from_float(lin),
        "w8a8-smooth": lambda: Int8DynamicLinear.from_float(lin, smooth_scale=smooth),
    }
    out = {}
    for name, make in makers.items():
        out[name] = make()
        with canonical_layout():
            out[name + "-canonical"] = make()
    return out


@pytest.mark.parametrize("kind", list(_teacher_modules()))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_module_teacher_torch_compile_fullgraph(kind, reduction):
    """The quantized-teacher route traces under torch.compile(fullgraph=True) (its custom ops
    take the module's forward spec) and matches eager: loss and the student's gradients."""
    head = _teacher_modules()[kind]
    g = torch.Generator().manual_seed(72)
    hs0, ws0 = torch.randn(2, 5, 24, generator=g), torch.randn(37, 24, generator=g) / 4
    th = torch.randn(2, 5, 64, generator=g)
    lab = torch.randint(0, 37, (2, 5), generator=g)
    lab[0, 1] = -100
    w_tok = torch.rand(2, 5, generator=g)

    def step(hs, ws):
        loss = ops.fused_linear_distillation_loss(
            hs, ws, th, head, lab, chunk_size=3, reduction=reduction, divergence="jsd"
        )
        return loss if reduction == "mean" else (loss * w_tok).sum()

    def run(fn):
        hs, ws = hs0.clone().requires_grad_(True), ws0.clone().requires_grad_(True)
        loss = fn(hs, ws)
        loss.backward()
        return loss.detach(), hs.grad, ws.grad

    torch._dynamo.reset()
    eager = run(step)
    compiled = run(torch.compile(step, fullgraph=True))
    for c, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(c, e)
    # and the route is the module's own kernel: the dequantized-weight op agrees
    ref_loss = ops.fused_linear_distillation_loss(
        hs0,
        ws0,
        th,
        head.dequantize(),
        lab,
        None,
        head.bias.detach(),
        chunk_size=3,
        reduction=reduction,
        divergence="jsd",
    )
    ref_loss = ref_loss if reduction == "mean" else (ref_loss * w_tok).sum()
    torch.testing.assert_close(eager[0], ref_loss, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kind", ["w8a16", "w4a16-canonical", "w8a8-smooth"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_module_teacher_opcheck(kind, reduction):
    head = _teacher_modules()[kind]
    g = torch.Generator().manual_seed(73)
    hs = torch.randn(6, 8, generator=g).requires_grad_(True)
    ws = torch.randn(37, 8, generator=g).requires_grad_(True)
    sb = torch.randn(37, generator=g).requires_grad_(True)
    th = torch.randn(6, 64, generator=g)
    lab = torch.randint(0, 37, (6,), generator=g)
    tkind, tensors, tbias, n, k, gs = head._forward_spec()
    args = (hs, ws, th, tensors, tbias.detach(), tkind, n, k, gs, lab, sb)
    rest = (1.5, 0.5, "kl", 0.5, -100, reduction, None, -1, 4, True, True)
    torch.library.opcheck(torch.ops.qtorch._fused_linear_distillation_loss_module_fwd, args + rest)
    if reduction == "none":
        bwd = torch.ops.qtorch._fused_linear_distillation_loss_module_bwd
        bargs = (torch.rand(6), hs.detach(), ws.detach(), th, tensors, tbias.detach(), tkind)
        bargs += (n, k, gs, lab, sb.detach(), 1.5, 0.5, "kl", 0.5, -100, 4, True)
        torch.library.opcheck(bwd, bargs)
