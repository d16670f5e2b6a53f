"""Every op through `qtorch.ops`, on every available backend, against `qtorch.reference`:
odd shapes (M = 1, K and N not multiples of any tile), fp32/fp16/bf16, leading dims,
non-contiguous inputs, M = 0; plus opcheck and torch.compile(fullgraph=True)."""

import pytest
import torch

import qtorch
from qtorch import ops
from qtorch import reference as R
from qtorch.testing import assert_close, int8_tie_tolerance, sqnr
from tests.conftest import OpRecorder, device_for, kernel_backends

BACKENDS = kernel_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, K, N): 1s, primes, and sizes just past powers of two
INT8_SHAPES = [(1, 1, 1), (1, 64, 19), (7, 37, 130), (33, 256, 1), (17, 130, 67)]
INT4_SHAPES = [(1, 128, 19), (5, 256, 1), (33, 384, 70)]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, device="cpu", seed=0):
    return torch.randn(*shape, generator=_gen(seed)).to(device=device, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", INT8_SHAPES)
def test_quantize_int8(backend, dtype, m, k, n):
    dev = device_for(backend)
    x = _randn(m, k, dtype=dtype, device=dev) * 5
    with qtorch.use_backend(backend):
        q, s = ops.quantize_int8(x)
    q_ref, s_ref = R.quantize_int8(x)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    diff = (q.int() - q_ref.int()).abs()
    # x * (127 / amax) instead of x / scale may flip a rounding tie: one step, rarely
    assert diff.max().item() <= 1
    assert (diff > 0).sum().item() <= max(1, q.numel() // 1000)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", INT8_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_scaled_mm(backend, out_dtype, m, k, n, with_bias):
    dev = device_for(backend)
    g = _gen(m * 1000 + k + n)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(dev)
    b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(dev)
    sa = (torch.rand(m, generator=g) + 0.01).to(dev) / 100
    sb = (torch.rand(n, generator=g) + 0.01).to(dev) / 100
    bias = _randn(n, device=dev, seed=3) if with_bias else None
    with qtorch.use_backend(backend):
        out = ops.int8_scaled_mm(a, b, sa, sb, bias, out_dtype)
    ref = R.int8_scaled_mm(a, b, sa, sb, bias, out_dtype)
    assert out.dtype == out_dtype and out.shape == (m, n)
    assert_close(out, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_scaled_mm_exact_int32_accumulation(backend):
    """Unit scales and sums below 2^24 make any fp32 epilogue exact: the int32 accumulation
    must equal the exact integer product, bit for bit."""
    dev = device_for(backend)
    g = _gen(5)
    for m, k, n in [(1, 1, 1), (3, 1000, 5), (17, 129, 33), (64, 1024, 64)]:
        a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(dev)
        b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(dev)
        with qtorch.use_backend(backend):
            out = ops.int8_scaled_mm(a, b, torch.ones(m, device=dev), torch.ones(n, device=dev))
        exact = a.cpu().long() @ b.cpu().long().T
        assert torch.equal(out.cpu().double(), exact.double()), (m, k, n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", INT8_SHAPES)
def test_int8_linear(backend, dtype, m, k, n):
    dev = device_for(backend)
    x = _randn(m, k, dtype=dtype, device=dev)
    w_q, w_s = R.quantize_int8(_randn(n, k, device=dev, seed=1))
    bias = _randn(n, dtype=dtype, device=dev, seed=2)
    with qtorch.use_backend(backend):
        out = ops.int8_linear(x, w_q, w_s, bias)
    ref = R.int8_linear(x, w_q, w_s, bias)
    assert out.dtype == dtype and out.shape == (m, n)
    tie = int8_tie_tolerance(R.quantize_int8(x)[1], w_s)
    assert_close(out, ref, scale=max(1.0, ref.abs().max().item(), tie / 1.6e-2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", INT8_SHAPES)
def test_int8_weight_only_linear(backend, dtype, m, k, n):
    dev = device_for(backend)
    x = _randn(m, k, dtype=dtype, device=dev)
    w_q, w_s = R.quantize_int8(_randn(n, k, device=dev, seed=1))
    bias = _randn(n, dtype=dtype, device=dev, seed=2)
    with qtorch.use_backend(backend):
        out = ops.int8_weight_only_linear(x, w_q, w_s, bias)
    ref = R.int8_weight_only_linear(x, w_q, w_s, bias)
    assert out.dtype == dtype and out.shape == (m, n)
    assert_close(out, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_dequantize_int4(backend, group_size, symmetric, dtype):
    dev = device_for(backend)
    w = _randn(19, 512, dtype=dtype, device=dev)
    with qtorch.use_backend(backend):
        got = ops.quantize_int4(w, group_size, symmetric)
        deq = ops.dequantize_int4(*got, group_size)
    ref = R.quantize_int4(w, group_size, symmetric)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2])
    torch.testing.assert_close(got[1], ref[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(deq, R.dequantize_int4(*ref, group_size), rtol=1e-6, atol=1e-7)
    # 4 bits per weight with group scales: about 6 dB/bit plus a little from small groups
    assert sqnr(w.float(), deq) > (17 if group_size > 32 else 19)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", INT4_SHAPES)
@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_weight_only_linear(backend, dtype, m, k, n, group_size):
    dev = device_for(backend)
    x = _randn(m, k, dtype=dtype, device=dev)
    qw = R.quantize_int4(_randn(n, k, device=dev, seed=1), group_size)
    bias = _randn(n, dtype=dtype, device=dev, seed=2)
    with qtorch.use_backend(backend):
        out = ops.int4_weight_only_linear(x, *qw, group_size, bias)
    ref = R.int4_weight_only_linear(x, *qw, group_size, bias)
    assert out.dtype == dtype and out.shape == (m, n)
    assert_close(out, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_noncontiguous_and_empty(backend):
    dev = device_for(backend)
    x = _randn(2, 3, 5, 64, device=dev).transpose(1, 2)  # [2, 5, 3, 64], non-contiguous
    assert not x.is_contiguous()
    w_q, w_s = R.quantize_int8(_randn(11, 64, device=dev, seed=1))
    qw = R.quantize_int4(_randn(11, 64, device=dev, seed=1), 32)
    with qtorch.use_backend(backend):
        q, s = ops.quantize_int8(x)
        assert q.shape == x.shape and s.shape == x.shape[:-1]
        for fn, args, ref_fn in [
            (ops.int8_linear, (w_q, w_s), R.int8_linear),
            (ops.int8_weight_only_linear, (w_q, w_s), R.int8_weight_only_linear),
            (ops.int4_weight_only_linear, (*qw, 32), R.int4_weight_only_linear),
        ]:
            out = fn(x, *args)
            assert out.shape == (2, 5, 3, 11)
            assert_close(out, ref_fn(x.reshape(-1, 64), *args).reshape(2, 5, 3, 11))
            empty = fn(x[:, :0], *args)
            assert empty.shape == (2, 0, 3, 11)
        a_t = torch.randint(-127, 128, (64, 6), dtype=torch.int8).to(dev).T  # [6, 64] strided
        out = ops.int8_scaled_mm(a_t, w_q, torch.ones(6, device=dev), w_s)
        assert_close(out, R.int8_scaled_mm(a_t.contiguous(), w_q, torch.ones(6, device=dev), w_s))
        assert ops.int8_scaled_mm(a_t[:0], w_q, torch.ones(0, device=dev), w_s).shape == (0, 11)


# ------------------------------------------------------------------------------ distillation

DIVS = ["kl", "reverse_kl", "jsd"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,v", [(1, 1), (1, 7), (9, 1000), (33, 4099)])
def test_distillation_loss_vs_reference(backend, divergence, dtype, m, v):
    dev = device_for(backend)
    s = (_randn(m, v, device=dev) * 3).to(dtype)
    t = (_randn(m, v, device=dev, seed=1) * 3).to(dtype)
    labels = torch.randint(0, v, (m,), generator=_gen(2)).to(dev)
    labels[1::3] = -100
    kw = dict(temperature=2.0, alpha=0.7, divergence=divergence, beta=0.3)
    ref_l, ref_g = R.distillation_loss(s, t, labels, 2.0, 0.7, divergence, 0.3, -100, True)
    s_req = s.clone().requires_grad_(True)
    with qtorch.use_backend(backend):
        out = ops.distillation_loss(s_req, t, labels, reduction="none", **kw)
        out.sum().backward()
    assert out.dtype == torch.float32 and s_req.grad.dtype == dtype
    assert_close(out, ref_l, dtype=torch.float32)
    assert_close(s_req.grad, ref_g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_distillation_reductions_and_num_items(backend, reduction):
    dev = device_for(backend)
    s = _randn(2, 5, 50, device=dev)
    t = _randn(2, 5, 50, device=dev, seed=1)
    labels = torch.randint(0, 50, (2, 5), generator=_gen(2)).to(dev)
    labels[0, 1] = -100
    tok, _ = R.distillation_loss(
        s.reshape(10, 50), t.reshape(10, 50), labels.reshape(-1), 1.0, 0.5, "kl", 0.5, -100, False
    )
    with qtorch.use_backend(backend):
        out = ops.distillation_loss(s, t, labels, reduction=reduction)
        if reduction == "none":
            assert out.shape == (2, 5)
            assert_close(out.reshape(-1), tok)
        elif reduction == "sum":
            assert_close(out, tok.sum())
        else:
            assert_close(out, tok.sum() / 9)
            for n_items in (4, torch.tensor(4, device=dev)):
                assert_close(
                    ops.distillation_loss(s, t, labels, num_items_in_batch=n_items), tok.sum() / 4
                )


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_gives_zero_loss_and_zero_grad(backend):
    dev = device_for(backend)
    s = _randn(4, 30, device=dev).requires_grad_(True)
    t = _randn(4, 30, device=dev, seed=1)
    labels = torch.full((4,), -100, device=dev)
    with qtorch.use_backend(backend):
        loss = ops.distillation_loss(s, t, labels)
        loss.backward()
        assert loss.item() == 0.0 and torch.all(s.grad == 0)
        s.grad = None
        loss = ops.distillation_loss(
            s, t, torch.zeros(4, dtype=torch.long, device=dev), num_items_in_batch=0
        )
        loss.backward()
        assert loss.item() == 0.0 and torch.all(s.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVS)
def test_nonfinite_logits(backend, divergence):
    dev = device_for(backend)
    s = _randn(3, 16, device=dev)
    t = _randn(3, 16, device=dev, seed=1)
    t[0, 2] = float("nan")
    t[1, :4] = float("-inf")  # masked vocabulary entries: fine
    labels = torch.tensor([1, 5, 7], device=dev)
    with qtorch.use_backend(backend):
        tok = ops.distillation_loss(s, t, labels, divergence=divergence, reduction="none")
    assert torch.isnan(tok[0])
    assert torch.isfinite(tok[1:]).all()
    ref, _ = R.distillation_loss(s, t, labels, 1.0, 0.5, divergence, 0.5, -100, False)
    assert_close(tok[1:], ref[1:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_distillation_vs_reference(backend, dtype, with_bias, reduction):
    dev = device_for(backend)
    m, h, v = 37, 48, 1001
    hs = _randn(m, h, dtype=dtype, device=dev)
    ws = (_randn(v, h, device=dev, seed=1) * 0.2).to(dtype)
    ht = _randn(m, h + 16, dtype=dtype, device=dev, seed=2)
    wt = (_randn(v, h + 16, device=dev, seed=3) * 0.2).to(dtype)
    bs = _randn(v, dtype=dtype, device=dev, seed=4) if with_bias else None
    labels = torch.randint(0, v, (m,), generator=_gen(5)).to(dev)
    labels[::5] = -100
    weights = torch.rand(m, generator=_gen(6)).to(dev)
    scale = None if reduction == "mean" else weights
    ref = R.fused_linear_distillation_loss(
        hs, ws, ht, wt, labels, bs, None, scale, 8, 1.5, 0.5, "kl", 0.5, -100, True
    )
    hr, wr = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    br = bs.clone().requires_grad_(True) if with_bias else None
    with qtorch.use_backend(backend):
        out = ops.fused_linear_distillation_loss(
            hr, wr, ht, wt, labels, br, None, chunk_size=8, temperature=1.5, reduction=reduction
        )
        (out.sum() if reduction == "mean" else (out * weights).sum()).backward()
    n_valid = (labels != -100).sum()
    div = n_valid if reduction == "mean" else 1
    ref_loss = ref[0].sum() / n_valid if reduction == "mean" else ref[0]
    # every backend's logits are the fp32 accumulator of its GEMM, so the loss is judged in
    # fp32; the gradients in the inputs' dtype
    assert_close(out, ref_loss, dtype=torch.float32)
    assert_close(hr.grad, ref[1] / div, dtype=dtype)
    assert_close(wr.grad, ref[2] / div, dtype=dtype)
    if with_bias:
        assert_close(br.grad, ref[3] / div, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_frozen_student_head(backend, reduction, monkeypatch):
    """student_weight.requires_grad False: no weight gradient is computed (the chunk loop's
    weight-gradient GEMM never runs) and w.grad stays None; the loss and the hidden-state and
    bias gradients are exactly those of the trainable head."""
    dev = device_for(backend)
    m, h, v = 13, 16, 97
    hs, ws = _randn(m, h, device=dev), _randn(v, h, device=dev, seed=1) * 0.2
    ht, wt = _randn(m, h + 3, device=dev, seed=2), _randn(v, h + 3, device=dev, seed=3) * 0.2
    bs = _randn(v, device=dev, seed=4)
    labels = torch.randint(0, v, (m,), generator=_gen(5)).to(dev)
    labels[::4] = -100
    head = R.distillation.LinearHead
    backward, weight_grads = head.backward, []

    def spy(self, g, x, grad_input, grad_weight):
        weight_grads.append(grad_weight is not None)
        return backward(self, g, x, grad_input, grad_weight)

    monkeypatch.setattr(head, "backward", spy)
    runs = {}
    for frozen in (False, True):
        weight_grads.clear()
        x, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(not frozen)
        b = bs.clone().requires_grad_(True)
        with qtorch.use_backend(backend):
            out = ops.fused_linear_distillation_loss(
                x, w, ht, wt, labels, b, chunk_size=5, reduction=reduction
            )
            out.sum().backward()
        assert weight_grads and all(weight_grads) != frozen and any(weight_grads) != frozen
        runs[frozen] = (out.detach(), x.grad, b.grad, w.grad)
    assert runs[True][3] is None and runs[False][3] is not None
    for got, want in zip(runs[True][:3], runs[False][:3]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_distillation_gradcheck_float64():
    g = _gen(7)
    t = torch.randn(3, 2, 9, generator=g, dtype=torch.float64)
    labels = torch.tensor([[1, -100], [8, 0], [3, 3]])
    for div in DIVS:
        for reduction in ("mean", "sum", "none"):
            s = torch.randn(3, 2, 9, generator=g, dtype=torch.float64, requires_grad=True)
            assert torch.autograd.gradcheck(
                lambda s_: ops.distillation_loss(
                    s_,
                    t,
                    labels,
                    temperature=1.7,
                    alpha=0.6,
                    divergence=div,
                    beta=0.3,
                    reduction=reduction,
                ),
                (s,),
            )


def test_fused_gradcheck_float64():
    g = _gen(8)
    hs = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bs = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    ht, wt = (
        torch.randn(5, 3, generator=g, dtype=torch.float64),
        torch.randn(7, 3, generator=g, dtype=torch.float64),
    )
    labels = torch.tensor([1, -100, 6, 0, 2])
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda a, b, c: ops.fused_linear_distillation_loss(
                a, b, ht, wt, labels, c, None, chunk_size=2, divergence="jsd", reduction=reduction
            ),
            (hs, ws, bs),
        )


# ------------------------------------------------------------------------ opcheck / compile


def _op_samples():
    x = torch.randn(5, 64)
    w_q, w_s = R.quantize_int8(torch.randn(7, 64))
    qw = R.quantize_int4(torch.randn(7, 64), 32)
    s = torch.randn(2, 3, 11, requires_grad=True)
    t = torch.randn(2, 3, 11)
    labels = torch.tensor([[1, -100, 3], [4, 5, 10]])
    hs = torch.randn(6, 8, requires_grad=True)
    ws = torch.randn(11, 8, requires_grad=True)
    ht, wt = torch.randn(6, 5), torch.randn(11, 5)
    lab6 = labels.reshape(-1)
    q = torch.ops.qtorch
    return [
        (q.quantize_int8.default, (x,), {}),
        (
            q.int8_scaled_mm.default,
            (R.quantize_int8(x)[0], w_q, R.quantize_int8(x)[1], w_s),
            {"bias": torch.randn(7), "out_dtype": torch.bfloat16},
        ),
        (q.int8_linear.default, (x.clone().requires_grad_(True), w_q, w_s, torch.randn(7)), {}),
        (q.int8_weight_only_linear.default, (x, w_q, w_s), {}),
        (q.quantize_int4.default, (torch.randn(7, 64), 32, True), {}),
        (q.dequantize_int4.default, (*qw, 32), {}),
        (q.int4_weight_only_linear.default, (x, *qw, 32, None), {}),
        (q.distillation_loss.default, (s, t, labels), {"temperature": 2.0, "divergence": "jsd"}),
        (q.distillation_loss.default, (s, t, labels), {"reduction": "none"}),
        (q.distillation_loss.int_items, (s, t, labels), {"num_items_in_batch": 3}),
        (q.fused_linear_distillation_loss.default, (hs, ws, ht, wt, lab6), {"chunk_size": 4}),
        (
            q.fused_linear_distillation_loss.default,
            (hs, ws, ht, wt, lab6),
            {"reduction": "none", "chunk_size": 4},
        ),
        (q.int8_linear_grad_input.default, (torch.randn(5, 7), w_q, w_s), {}),
        (q.int4_linear_grad_input.default, (torch.randn(5, 7), *qw, 32), {}),
        (
            q._distillation_loss_fwd.default,
            (
                s.detach().reshape(6, 11),
                t.reshape(6, 11),
                labels.reshape(6),
                2.0,
                0.5,
                "jsd",
                0.3,
                -100,
                True,
            ),
            {},
        ),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("idx", range(len(_op_samples())))
def test_opcheck(backend, idx):
    op, args, kwargs = _op_samples()[idx]
    if device_for(backend).type != "cpu":
        pytest.skip("samples are CPU tensors; the CUDA run covers opcheck on CPU backends only")
    with qtorch.use_backend(backend):
        torch.library.opcheck(op, args, kwargs)


def test_every_public_op_is_a_registered_custom_op():
    for name in ops.__all__:
        assert hasattr(torch.ops.qtorch, name), name


def test_torch_compile_fullgraph_matches_eager():
    x = torch.randn(4, 3, 64)
    w_q, w_s = R.quantize_int8(torch.randn(9, 64))
    qw = R.quantize_int4(torch.randn(9, 64), 32)
    labels = torch.randint(0, 9, (4, 3))

    def f(x, labels):
        a = ops.int8_linear(x, w_q, w_s)
        b = ops.int8_weight_only_linear(x, w_q, w_s)
        c = ops.int4_weight_only_linear(x, *qw, 32)
        q, s = ops.quantize_int8(x)
        loss = ops.distillation_loss(a, b + c, labels, temperature=2.0)
        return a + b + c, q, s, loss

    eager = f(x, labels)
    compiled = torch.compile(f, fullgraph=True)(x, labels)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)


def test_torch_compile_fullgraph_training_step():
    hs = torch.randn(6, 8, requires_grad=True)
    ws = torch.randn(11, 8, requires_grad=True)
    ht, wt = torch.randn(6, 5), torch.randn(11, 5)
    labels = torch.randint(0, 11, (6,))

    def step(hs, ws):
        return ops.fused_linear_distillation_loss(hs, ws, ht, wt, labels, chunk_size=4)

    loss_c = torch.compile(step, fullgraph=True)(hs, ws)
    loss_c.backward()
    g_c = (hs.grad.clone(), ws.grad.clone())
    hs.grad = ws.grad = None
    step(hs, ws).backward()
    torch.testing.assert_close(loss_c, step(hs, ws))
    torch.testing.assert_close(g_c[0], hs.grad)
    torch.testing.assert_close(g_c[1], ws.grad)


def test_linear_ops_backward_straight_through():
    x = torch.randn(3, 5, 64, requires_grad=True)
    w = torch.randn(9, 64)
    w_q, w_s = R.quantize_int8(w)
    w_hat = w_q.float() * w_s[:, None]
    bias = torch.randn(9, requires_grad=True)
    for fn in (ops.int8_linear, ops.int8_weight_only_linear):
        x.grad = bias.grad = None
        g = torch.randn(3, 5, 9)
        fn(x, w_q, w_s, bias).backward(g)
        torch.testing.assert_close(x.grad, g @ w_hat)
        torch.testing.assert_close(bias.grad, g.sum((0, 1)))
    qw = R.quantize_int4(w, 32)
    x.grad = None
    g = torch.randn(3, 5, 9)
    ops.int4_weight_only_linear(x, *qw, 32).backward(g)
    torch.testing.assert_close(x.grad, g @ R.dequantize_int4(*qw, 32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", INT8_SHAPES)
def test_linear_grad_input_kernels(backend, dtype, m, k, n):
    """The backward kernels of the linears (grad_out @ ŵ) on every backend vs the reference."""
    from qtorch.ops import weight_only as wo_ops
    from qtorch.reference.weight_only import int4_linear_grad_input, int8_linear_grad_input

    dev = device_for(backend)
    g = _randn(m, n, dtype=dtype, device=dev)
    w_q, w_s = R.quantize_int8(_randn(n, k, device=dev, seed=1))
    with qtorch.use_backend(backend):
        out = wo_ops.int8_linear_grad_input(g, w_q, w_s)
    assert out.dtype == dtype and out.shape == (m, k)
    assert_close(out, int8_linear_grad_input(g, w_q, w_s))
    k4 = 64 * ((k + 63) // 64)
    qw = R.quantize_int4(_randn(n, k4, device=dev, seed=2), 64)
    with qtorch.use_backend(backend):
        out = wo_ops.int4_linear_grad_input(g, *qw, 64)
    assert_close(out, int4_linear_grad_input(g, *qw, 64))


@pytest.mark.parametrize("fused", [False, True])
def test_distillation_backward_fills_no_zero_tensors(fused):
    """Only the loss output carries a gradient: autograd must not materialize zero grads for
    the op's saved-gradient outputs ([M, V] for distillation_loss, the weight's size for the
    fused op), which cost a full extra pass per backward."""
    m, v, h = 6, 50, 8
    hs, ws = torch.randn(m, h, requires_grad=True), torch.randn(v, h, requires_grad=True)
    ht, wt, labels = torch.randn(m, h), torch.randn(v, h), torch.randint(0, v, (m,))
    s = torch.randn(m, v, requires_grad=True)
    if fused:
        loss = ops.fused_linear_distillation_loss(hs, ws, ht, wt, labels)
    else:
        loss = ops.distillation_loss(s, torch.randn(m, v), labels)
    with OpRecorder() as rec:
        loss.backward()
    fills = [
        (str(f), n)
        for f, n in rec.calls
        if f.overloadpacket.__name__ in ("zeros", "zero_", "fill_", "zeros_like")
        and n >= min(m * v, v * h)
    ]
    assert not fills, fills
    if fused:
        assert hs.grad is not None and ws.grad is not None
    else:
        assert s.grad is not None and s.grad.abs().sum() > 0
