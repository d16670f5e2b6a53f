"""Differential fuzzing: every op on every available backend against `qtorch.reference`.

Hypothesis draws shapes (1, odd sizes, sizes past the kernels' tiles), dtypes (fp32, fp16,
bf16), layouts (non-contiguous views) and values: ordinary, NaN, ±inf, denormals, huge and tiny
magnitudes, all-equal rows. Each backend must give the reference's result within the op's
tolerance, with the semantics of docs/semantics.md on non-finite values (`qtorch.testing.
assert_matches`), or raise the same exception type. Bounded and reproducible (derandomized,
no example database); every finding of issue 12 is an explicit `@example`.

The count of compared examples per op and backend is printed at the end of the module (run
with -s to see it) and written as JSON to $QTORCH_FUZZ_COUNTS (default
build/fuzz_counts.json).
"""

import collections
import json
import os
import pathlib

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import qtorch
from qtorch import ops
from qtorch.testing import assert_matches, device_for
from tests.conftest import kernel_backends

BACKENDS = kernel_backends()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COUNTS: collections.Counter = collections.Counter()  # (op, backend) -> examples compared

SETTINGS = settings(
    max_examples=int(os.environ.get("QTORCH_FUZZ_EXAMPLES", "20")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)

# Magnitudes each dtype holds. "huge" stays well inside the range so that results which only
# overflow by summation (order-dependent, outside the contract) do not occur.
HUGE = {torch.float32: 1e30, torch.float16: 1e3, torch.bfloat16: 1e30}
TINY = {torch.float32: 1e-30, torch.float16: 1e-4, torch.bfloat16: 1e-30}
SPECIALS = ("nan", "inf", "-inf", "denormal", "huge", "tiny")


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    rows = sorted(COUNTS.items())
    path = pathlib.Path(os.environ.get("QTORCH_FUZZ_COUNTS", "build/fuzz_counts.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({f"{op}/{b}": n for (op, b), n in rows}, indent=1))
    print("\nfuzz examples compared per op and backend:")
    for (op, b), n in rows:
        print(f"  {op:34s} {b:10s} {n}")


# ------------------------------------------------------------------------ value strategies


@st.composite
def floats(draw, shape, dtype, specials=True, scale=1.0):
    """A float tensor of `shape` in `dtype`: normal values times `scale` (or all equal rows),
    with a few special values (NaN, ±inf, denormals, huge, tiny) at drawn positions, and
    maybe a non-contiguous layout."""
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g) * scale
    if len(shape) >= 1 and shape[-1] > 0 and draw(st.booleans()) and draw(st.booleans()):
        t = t[..., :1].expand(*shape).clone()  # all-equal rows
    n = t.numel()
    if specials and n:
        for _ in range(draw(st.integers(0, 3))):
            kind = draw(st.sampled_from(SPECIALS))
            i = draw(st.integers(0, n - 1))
            if kind in ("denormal", "tiny") and draw(st.booleans()):
                # a whole row of it: the underflowing-scale case
                row = i // shape[-1]
                t.view(-1, shape[-1])[row] = 1e-45 if kind == "denormal" else TINY[dtype]
                continue
            t.view(-1)[i] = {
                "nan": float("nan"),
                "inf": float("inf"),
                "-inf": float("-inf"),
                "denormal": 1e-45 if dtype == torch.float32 else 1e-40,
                "huge": HUGE[dtype],
                "tiny": TINY[dtype],
            }[kind]
    t = t.to(dtype)
    if len(shape) == 2 and draw(st.booleans()):
        t = t.T.contiguous().T  # column-major: a non-contiguous view of the same values
    return t


def _call(backend, fn, args):
    with qtorch.use_backend(backend):
        try:
            return fn(*args), None
        except Exception as e:  # compared by type with the reference's
            return None, e


def _on(dev, args):
    return tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args)


def _run(op, fn, args, compare, backends=None):
    """fn(*args) on the reference and each backend; `compare(out, ref)` on results."""
    ref, ref_err = _call("reference", fn, args)
    for b in backends or BACKENDS:
        if b == "reference":
            continue
        out, err = _call(b, fn, _on(device_for(b), args))
        if ref_err is not None:
            assert err is not None and type(err) is type(ref_err), (
                f"{op}/{b}: reference raised {ref_err!r}, backend gave {err!r}"
            )
        else:
            assert err is None, f"{op}/{b}: backend raised {err!r}, reference did not"
            compare(out, ref)
        COUNTS[(op, b)] += 1


def _small_for_triton(*sizes):
    """Backends to run: the Triton interpreter is slow, so only small problems go to it."""
    return [b for b in BACKENDS if b != "triton" or max(sizes) <= 96]


# ------------------------------------------------------------------------------ W8A8

dims = st.sampled_from([1, 2, 3, 5, 7, 16, 17, 33, 64, 65, 130])


def _cmp_quantize(out, ref):
    q, s = out
    q_ref, s_ref = ref
    assert_matches(s, s_ref, torch.float32, scale=1.0, exact_nan=True)
    fin = torch.isfinite(s_ref)
    torch.testing.assert_close(s[fin], s_ref[fin], rtol=1e-6, atol=0)
    assert q.dtype == torch.int8 and q.shape == q_ref.shape
    diff = (q.int() - q_ref.int()).abs()
    assert diff.max().item() <= 1 if diff.numel() else True  # a flipped tie, API.md


@SETTINGS
@given(m=dims, k=dims, dtype=st.sampled_from(DTYPES), data=st.data())
@example(m=2, k=64, dtype=torch.float32, data=None)  # issue 12 #1: a NaN row
@example(m=1, k=4, dtype=torch.float32, data=None)  # issue 12 #5: 1e-45 row
def test_fuzz_quantize_int8(m, k, dtype, data):
    if data is None:
        x = torch.randn(m, k).to(dtype)
        if k == 64:
            x[0, 5] = float("nan")
        else:
            x = torch.full((m, k), 1e-45)
    else:
        x = data.draw(floats((m, k), dtype))
    _run("quantize_int8", ops.quantize_int8, (x,), _cmp_quantize, _small_for_triton(m, k))


def _cmp_scaled_mm(out, ref):
    assert_matches(out, ref, exact_nan=True)


@SETTINGS
@given(
    m=dims, k=dims, n=dims, out_dtype=st.sampled_from(DTYPES), bias=st.booleans(), data=st.data()
)
@example(m=2, k=140000, n=2, out_dtype=torch.float32, bias=False, data=None)  # issue 12 #4
def test_fuzz_int8_scaled_mm(m, k, n, out_dtype, bias, data):
    if data is None:
        a = torch.full((m, k), -128, dtype=torch.int8)
        args = (a, a, torch.ones(m), torch.ones(n), None, out_dtype)
    else:
        seed = data.draw(st.integers(0, 2**16))
        g = torch.Generator().manual_seed(seed)
        a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        b = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        sa = data.draw(floats((m,), torch.float32, scale=1e-3)).abs()
        sb = data.draw(floats((n,), torch.float32, scale=1e-3)).abs()
        bb = data.draw(floats((n,), out_dtype, specials=False)) if bias else None
        args = (a, b, sa, sb, bb, out_dtype)
    _run("int8_scaled_mm", ops.int8_scaled_mm, args, _cmp_scaled_mm, _small_for_triton(m, k, n))


def _w8(n, k, seed, dtype=torch.float32):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1
    return ops.quantize_int8(w)


@SETTINGS
@given(
    m=dims,
    k=dims,
    n=dims,
    dtype=st.sampled_from(DTYPES),
    bias=st.booleans(),
    lead=st.booleans(),
    data=st.data(),
)
@example(m=2, k=64, n=8, dtype=torch.float32, bias=True, lead=False, data=None)  # issue 12 #1
def test_fuzz_int8_linear(m, k, n, dtype, bias, lead, data):
    if data is None:
        x = torch.randn(m, k)
        x[0, 5] = float("nan")
        x[1, 7] = float("inf")
        w_q, w_s = _w8(n, k, 0)
    else:
        x = data.draw(floats((m, k), dtype))
        w_q, w_s = _w8(n, k, data.draw(st.integers(0, 99)))
    bb = torch.randn(n).to(dtype) if bias else None
    if lead:
        x = x.reshape(1, m, k)

    def cmp(out, ref):
        xs = ops.quantize_int8(x)[1]
        fin = xs[torch.isfinite(xs)]
        tie = (fin.abs().max().item() if fin.numel() else 0.0) * w_s.abs().max().item() * 127
        fref = ref[torch.isfinite(ref)]
        top = fref.double().abs().max().item() if fref.numel() else 0.0
        assert_matches(out, ref, scale=max(1.0, top, tie / 1.6e-2), exact_nan=True)

    _run("int8_linear", ops.int8_linear, (x, w_q, w_s, bb), cmp, _small_for_triton(m, k, n))


# ----------------------------------------------------------------------- weight-only


def _cmp_close(out, ref):
    assert_matches(out, ref)


@SETTINGS
@given(
    m=dims,
    k=dims,
    n=dims,
    dtype=st.sampled_from(DTYPES),
    bias=st.booleans(),
    bad_scale=st.booleans(),
    data=st.data(),
)
@example(m=2, k=64, n=8, dtype=torch.float32, bias=False, bad_scale=True, data=None)  # #1
def test_fuzz_int8_weight_only_linear(m, k, n, dtype, bias, bad_scale, data):
    if data is None:
        x = torch.randn(m, k)
        w_q, w_s = _w8(n, k, 0)
    else:
        x = data.draw(floats((m, k), dtype))
        w_q, w_s = _w8(n, k, data.draw(st.integers(0, 99)))
    if bad_scale:
        w_s = w_s.clone()
        w_s[0] = (
            float("inf")
            if data is None
            else data.draw(st.sampled_from([float("inf"), float("nan"), float("-inf"), 0.0]))
        )
    bb = torch.randn(n).to(dtype) if bias else None
    _run(
        "int8_weight_only_linear",
        ops.int8_weight_only_linear,
        (x, w_q, w_s, bb),
        _cmp_close,
        _small_for_triton(m, k, n),
    )


gs_dims = st.sampled_from([32, 64, 96, 128, 256])


@SETTINGS
@given(
    n=dims,
    k=gs_dims,
    group_size=st.sampled_from([32, 64, 128]),
    symmetric=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    data=st.data(),
)
def test_fuzz_quantize_dequantize_int4(n, k, group_size, symmetric, dtype, data):
    k = max(group_size, k // group_size * group_size)
    # Weights are finite (quantization is offline; non-finite weights: docs/semantics.md).
    w = data.draw(floats((n, k), dtype, specials=False))
    if data.draw(st.booleans()):  # denormal, tiny or all-equal groups
        w[: max(1, n // 2)] = data.draw(st.sampled_from([1e-45, -1e-40, 1e-30, 3.0, 0.0]))
        w = w.to(dtype)

    def cmp(out, ref):
        for o, r in zip(out, ref):
            assert o.dtype == r.dtype and o.shape == r.shape
        torch.testing.assert_close(out[1], ref[1], rtol=1e-6, atol=0)
        assert torch.equal(out[2], ref[2])
        deq = ops.dequantize_int4(*out, group_size)
        deq_ref = ops.dequantize_int4(*ref, group_size)
        torch.testing.assert_close(deq, deq_ref, rtol=1e-6, atol=1e-7)

    _run(
        "quantize_int4", ops.quantize_int4, (w, group_size, symmetric), cmp, _small_for_triton(n, k)
    )


@SETTINGS
@given(
    m=dims,
    n=dims,
    k=gs_dims,
    dtype=st.sampled_from(DTYPES),
    bias=st.booleans(),
    bad_scale=st.booleans(),
    data=st.data(),
)
@example(m=2, n=8, k=64, dtype=torch.float32, bias=False, bad_scale=False, data=None)  # #1
def test_fuzz_int4_weight_only_linear(m, n, k, dtype, bias, bad_scale, data):
    gs = 32
    k = k // gs * gs
    if data is None:
        x = torch.ones(m, k)
        x[0, 5] = float("inf")
        qw = ops.quantize_int4(torch.randn(n, k), gs)
    else:
        x = data.draw(floats((m, k), dtype))
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
        qw = ops.quantize_int4(torch.randn(n, k, generator=g) * 0.1, gs, data.draw(st.booleans()))
    if bad_scale:
        qw = (qw[0], qw[1].clone(), qw[2])
        qw[1][0, 0] = data.draw(st.sampled_from([float("inf"), float("nan")]))
    bb = torch.randn(n).to(dtype) if bias else None
    _run(
        "int4_weight_only_linear",
        ops.int4_weight_only_linear,
        (x, *qw, gs, bb),
        _cmp_close,
        _small_for_triton(m, n, k),
    )


@SETTINGS
@given(m=dims, n=dims, k=gs_dims, dtype=st.sampled_from(DTYPES), data=st.data())
def test_fuzz_linear_grad_inputs(m, n, k, dtype, data):
    gs = 32
    k = k // gs * gs
    g_out = data.draw(floats((m, n), dtype))
    seed = data.draw(st.integers(0, 99))
    w_q, w_s = _w8(n, k, seed)
    qw = ops.quantize_int4(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)), gs)
    backends = _small_for_triton(m, n, k)
    _run(
        "int8_linear_grad_input",
        torch.ops.qtorch.int8_linear_grad_input,
        (g_out, w_q, w_s),
        _cmp_close,
        backends,
    )
    _run(
        "int4_linear_grad_input",
        torch.ops.qtorch.int4_linear_grad_input,
        (g_out, *qw, gs),
        _cmp_close,
        backends,
    )


# ---------------------------------------------------------------------- distillation

LOSS_KW = st.fixed_dictionaries(
    {
        "temperature": st.sampled_from([0.01, 0.5, 1.0, 2.0, 4.0, 100.0]),
        "alpha": st.sampled_from([0.0, 0.3, 1.0]),
        "divergence": st.sampled_from(["kl", "reverse_kl", "jsd"]),
        "beta": st.sampled_from([0.0, 0.5, 1.0]),
        "reduction": st.sampled_from(["mean", "sum", "none"]),
    }
)


def _loss_tol(kw):
    # T² amplifies the fp32 rounding of log p − log q (1e4 at T = 100): atol grows with it.
    return 1e-4 * max(1.0, kw["temperature"] ** 2 / 100)


def _labels(data, m, v, empty_ok=True):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    lab = torch.randint(0, v, (m,), generator=g)
    if m and data.draw(st.booleans()):
        lab[data.draw(st.integers(0, m - 1))] = -100
    return lab


def _cmp_loss(kw, dtype=torch.float32):
    """Losses (fp32) or gradients (the student's dtype), the tolerance widened by T²."""
    widen = _loss_tol(kw) / 1e-4

    def cmp(out, ref):
        fin = ref[torch.isfinite(ref)]
        top = fin.double().abs().max().item() if fin.numel() else 1.0
        assert_matches(out, ref, dtype, scale=max(1.0, top) * widen)

    return cmp


def _defined_grad_rows(ref_loss, m):
    """Tokens whose gradient is defined: those of finite loss (docs/semantics.md); a
    non-finite reduced loss leaves none."""
    if ref_loss.dim() == 0:
        return torch.full((m,), bool(torch.isfinite(ref_loss)))
    return torch.isfinite(ref_loss)


@SETTINGS
@given(
    m=st.sampled_from([0, 1, 2, 5, 17]),
    v=st.sampled_from([1, 2, 7, 33, 100]),
    dtype=st.sampled_from(DTYPES),
    kw=LOSS_KW,
    labeled=st.booleans(),
    data=st.data(),
)
@example(
    m=0,
    v=5,
    dtype=torch.float32,
    kw=dict(temperature=1.0, alpha=0.5, divergence="kl", beta=0.5, reduction="mean"),
    labeled=True,
    data=None,
)  # issue 12 #3: empty batch
@example(
    m=4,
    v=10,
    dtype=torch.float32,
    kw=dict(temperature=1e-15, alpha=0.5, divergence="kl", beta=0.5, reduction="mean"),
    labeled=True,
    data=None,
)  # issue 12 #2: tiny T
@example(
    m=4,
    v=10,
    dtype=torch.float32,
    kw=dict(temperature=1.0, alpha="0.5", divergence="kl", beta=0.5, reduction="mean"),
    labeled=True,
    data=None,
)  # issue 12 #7: alpha="0.5"
@example(
    m=4,
    v=10,
    dtype=torch.float32,
    kw=dict(temperature=torch.tensor(2.0), alpha=0.5, divergence="kl", beta=0.5, reduction="mean"),
    labeled=True,
    data=None,
)  # #7
def test_fuzz_distillation_loss(m, v, dtype, kw, labeled, data):
    if data is None:
        s, t = torch.randn(m, v), torch.randn(m, v)
        lab = torch.randint(0, v, (m,))
    else:
        s = data.draw(floats((m, v), dtype, scale=3.0))
        t = data.draw(floats((m, v), dtype, scale=3.0))
        # A row with every entry -inf has no distribution; its loss is not defined yet
        # (reference NaN, kernels 0 in some cases), so the fuzz keeps one entry live.
        t[(t == float("-inf")).all(-1), 0] = 0
        s[(s == float("-inf")).all(-1), 0] = 0
        lab = _labels(data, m, v)
    if not labeled:
        lab, kw = None, {**kw, "alpha": 1.0}

    def fn(s, t, lab):
        s = s.detach().requires_grad_()
        loss = ops.distillation_loss(s, t, lab, **kw)
        if loss.numel():
            torch.where(torch.isfinite(loss), loss, 0).sum().backward()
        return loss, s.grad

    def cmp(out, ref):
        _cmp_loss(kw)(out[0], ref[0])
        rows = _defined_grad_rows(ref[0], m)
        if ref[1] is not None:
            _cmp_loss(kw, s.dtype)(out[1][rows], ref[1][rows])

    _run("distillation_loss", fn, (s, t, lab), cmp)


@SETTINGS
@given(
    m=st.sampled_from([0, 1, 3, 9]),
    v=st.sampled_from([1, 5, 33]),
    h=st.sampled_from([1, 8, 17]),
    dtype=st.sampled_from(DTYPES),
    kw=LOSS_KW,
    bias=st.booleans(),
    chunk=st.sampled_from([None, 1, 4]),
    data=st.data(),
)
@example(
    m=0,
    v=5,
    h=4,
    dtype=torch.float32,
    kw=dict(temperature=1.0, alpha=0.5, divergence="kl", beta=0.5, reduction="mean"),
    bias=False,
    chunk=None,
    data=None,
)  # issue 12 #3: empty batch
def test_fuzz_fused_linear_distillation_loss(m, v, h, dtype, kw, bias, chunk, data):
    if data is None:
        sh, th = torch.empty(m, h), torch.empty(m, h)
        sw, tw = torch.randn(v, h), torch.randn(v, h)
        lab = torch.empty(m, dtype=torch.long)
    else:
        sh = data.draw(floats((m, h), dtype))
        th = data.draw(floats((m, h), dtype))
        sw = data.draw(floats((v, h), dtype, specials=False))
        tw = data.draw(floats((v, h), dtype, specials=False))
        lab = _labels(data, m, v)
    sb = torch.randn(v).to(dtype) if bias else None

    def fn(sh, sw, th, tw, lab, sb):
        sh = sh.detach().requires_grad_()
        sw = sw.detach().requires_grad_()
        loss = ops.fused_linear_distillation_loss(sh, sw, th, tw, lab, sb, None, chunk, **kw)
        if loss.numel():
            torch.where(torch.isfinite(loss), loss, 0).sum().backward()
        return loss, sh.grad, sw.grad

    def cmp(out, ref):
        _cmp_loss(kw)(out[0], ref[0])
        rows = _defined_grad_rows(ref[0], m)
        if ref[1] is not None:
            _cmp_loss(kw, ref[1].dtype)(out[1][rows], ref[1][rows])
        if ref[2] is not None and bool(rows.all()):  # fp32 accumulation over tokens
            _cmp_loss(kw, ref[2].dtype)(out[2], ref[2])

    _run("fused_linear_distillation_loss", fn, (sh, sw, th, tw, lab, sb), cmp)
