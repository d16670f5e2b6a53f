"""The reproducers of issue 12 ("never a silently wrong result"), one test each, on every
available backend: non-finite and denormal inputs, tiny temperatures, empty batches, the
int32 K limit, corrupted state dicts, unclear errors, and the reference's N-D int8_linear.
The semantics they hold the backends to are in docs/semantics.md; tests/test_fuzz.py draws
many more such inputs."""

import warnings

import pytest
import torch
from torch import nn

import qtorch
from qtorch import ops
from qtorch import reference as R
from tests.conftest import kernel_backends

BACKENDS = kernel_backends()
NAN, INF = float("nan"), float("inf")


def _w8(n=8, k=64, seed=1):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return R.quantize_int8(w)


# ------------------------------------------------------ 1. NaN / inf hidden by W8A8


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_nonfinite_row_gives_nan_row_in_w8a8_module(backend, bad):
    x = torch.randn(2, 64)
    x[0, 5] = bad
    model = qtorch.quantize_(nn.Sequential(nn.Linear(64, 8)), qtorch.Int8DynamicConfig())
    with qtorch.use_backend(backend), torch.no_grad():
        out = model(x)
    assert out[0].isnan().all(), out[0]
    assert out[1].isfinite().all()
    with qtorch.use_backend("reference"), torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(out, ref, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nonfinite_row_quantize_int8(backend, bad, dtype):
    x = torch.randn(3, 40)
    x[1, 39] = bad  # last element: the vector tail of the CPU kernels
    x = x.to(dtype)
    with qtorch.use_backend(backend):
        q, s = ops.quantize_int8(x)
    assert s[1].isnan() and (q[1] == 0).all()
    q_ref, s_ref = R.quantize_int8(x)
    torch.testing.assert_close(s, s_ref, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_nonfinite_row_int8_linear_is_nan(backend, bad):
    w_q, w_s = _w8()
    x = torch.ones(2, 64)
    x[0, 5] = bad
    with qtorch.use_backend(backend):
        out = ops.int8_linear(x, w_q, w_s)
    assert out[0].isnan().all() and out[1].isfinite().all()
    torch.testing.assert_close(out, R.int8_linear(x, w_q, w_s), equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["int8_weight_only_linear", "int4_weight_only_linear"])
def test_nonfinite_x_weight_only_linears_nonfinite_where_reference_is(backend, op):
    """W8A16 / W4A16: IEEE propagation; NaN vs ±inf may differ by summation order, finiteness
    may not (docs/semantics.md)."""
    x = torch.ones(2, 64)
    x[0, 5] = INF
    if op == "int8_weight_only_linear":
        args = _w8()
    else:
        args = (*R.quantize_int4(torch.randn(8, 64), 32), 32)
    with qtorch.use_backend(backend):
        out = getattr(ops, op)(x, *args)
    ref = getattr(R, op)(x, *args)
    assert torch.equal(out.isfinite(), ref.isfinite())
    assert not out[0].isfinite().any()
    torch.testing.assert_close(out[1], ref[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [NAN, INF])
def test_nonfinite_weight_scale_w8a16_nonfinite_column(backend, bad):
    w_q, w_s = _w8()
    w_s = w_s.clone()
    w_s[0] = bad
    x = torch.randn(3, 64)
    with qtorch.use_backend(backend):
        out = ops.int8_weight_only_linear(x, w_q, w_s)
    ref = R.int8_weight_only_linear(x, w_q, w_s)
    assert not out[:, 0].isfinite().any()
    assert torch.equal(out.isfinite(), ref.isfinite())
    torch.testing.assert_close(out[:, 1:], ref[:, 1:])


# ------------------------------------------------------------------ 5. denormal rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [1e-45, -1e-45, 1e-43])
def test_underflowing_scale_counts_as_zero_row(backend, value):
    x = torch.full((1, 4), value)
    with qtorch.use_backend(backend):
        q, s = ops.quantize_int8(x)
    q_ref, s_ref = R.quantize_int8(x)
    if value == 1e-43:  # amax / 127 is a (tiny) denormal, not 0: the ordinary rule
        assert s_ref.item() > 0
    else:
        assert s_ref.item() == 1.0 and (q_ref == 0).all()
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=0)


# -------------------------------------------------------------- 2. tiny temperatures


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1e-20, 1e-15, 0.009, 100.5, float("inf"), 0.0, -1.0])
def test_temperature_out_of_range_raises(backend, temperature):
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    labels = torch.randint(0, 10, (4,))
    with qtorch.use_backend(backend), pytest.raises(ValueError, match="temperature"):
        ops.distillation_loss(s, t, labels, temperature=temperature)
    with qtorch.use_backend(backend), pytest.raises(ValueError, match="temperature"):
        ops.fused_linear_distillation_loss(
            torch.randn(4, 6),
            torch.randn(10, 6),
            torch.randn(4, 6),
            torch.randn(10, 6),
            labels,
            temperature=temperature,
        )
    with pytest.raises(ValueError, match="temperature"):
        qtorch.nn.DistillationLoss(temperature=temperature)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.01, 100])
def test_temperature_range_ends_match_reference(backend, temperature):
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    labels = torch.randint(0, 10, (4,), generator=g)
    with qtorch.use_backend(backend):
        out = ops.distillation_loss(s, t, labels, temperature=temperature)
    with qtorch.use_backend("reference"):
        ref = ops.distillation_loss(s.double(), t.double(), labels, temperature=temperature)
    assert out.isfinite()
    # T² amplifies the fp32 rounding of log p − log q: at T = 100 by 1e4.
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-7 * temperature**2)


# ------------------------------------------------------------------- 3. empty inputs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_distillation_loss(backend, reduction):
    s = torch.empty(0, 5, requires_grad=True)
    with qtorch.use_backend(backend):
        out = ops.distillation_loss(
            s, torch.empty(0, 5), torch.empty(0, dtype=torch.long), reduction=reduction
        )
    if reduction == "none":
        assert out.shape == (0,)
    else:
        assert out.item() == 0.0
        out.backward()
        assert s.grad.shape == (0, 5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_fused_linear_distillation_loss(backend, reduction):
    w = torch.randn(5, 4, requires_grad=True)
    with qtorch.use_backend(backend):
        out = ops.fused_linear_distillation_loss(
            torch.empty(0, 4),
            w,
            torch.empty(0, 3),
            torch.randn(5, 3),
            torch.empty(0, dtype=torch.long),
            reduction=reduction,
        )
    if reduction == "none":
        assert out.shape == (0,)
    else:
        assert out.item() == 0.0
        out.backward()
        assert torch.equal(w.grad, torch.zeros_like(w))


# ------------------------------------------------------------------ 4. int32 overflow


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_scaled_mm_k_beyond_exact_int32_raises(backend):
    a = torch.full((2, 140000), -128, dtype=torch.int8)
    with qtorch.use_backend(backend), pytest.raises(ValueError, match="K = 140000"):
        ops.int8_scaled_mm(a, a, torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="K = 140000"):
        R.int8_scaled_mm(a, a, torch.ones(2), torch.ones(2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_linear_k_beyond_exact_int32_raises(backend):
    w_q = torch.full((1, 131072), -128, dtype=torch.int8)
    with qtorch.use_backend(backend), pytest.raises(ValueError, match="K = 131072"):
        ops.int8_linear(torch.ones(1, 131072), w_q, torch.ones(1))


def test_int8_scaled_mm_largest_exact_k_is_exact():
    """K = 131071 of −128 · −128: 2^31 − 16384, exactly representable; every backend exact."""
    k = 131071
    a = torch.full((1, k), -128, dtype=torch.int8)
    for backend in BACKENDS:
        if backend == "triton":
            continue  # a 131071-long dot product in the interpreter is too slow for the suite
        with qtorch.use_backend(backend):
            out = ops.int8_scaled_mm(a, a, torch.ones(1), torch.ones(1), out_dtype=torch.float32)
        assert out.item() == float(128 * 128 * k), backend


# ------------------------------------------------------------ 6. corrupted state dicts


def _int4_module():
    return qtorch.nn.Int4WeightOnlyLinear.from_float(nn.Linear(64, 8), group_size=32)


@pytest.mark.parametrize(
    "key,make,exc,match",
    [
        (
            "zeros",
            lambda t: torch.full_like(t, 200),
            ValueError,
            r"zeros must hold values in \[0, 15\]",
        ),
        ("zeros", lambda t: t.long(), TypeError, "zeros must have dtype torch.uint8"),
        ("qweight", lambda t: t.float(), TypeError, "qweight must have dtype torch.uint8"),
        ("qweight", lambda t: t.int(), TypeError, "qweight must have dtype torch.uint8"),
        ("scales", lambda t: t.int(), TypeError, "scales must be a float32"),
    ],
)
def test_corrupted_int4_state_dict_raises(key, make, exc, match):
    sd = dict(_int4_module().state_dict())
    sd[key] = make(sd[key])
    target = qtorch.nn.Int4WeightOnlyLinear(64, 8, group_size=32)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(exc, match=match):
        target.load_state_dict(sd)
    for k, v in target.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("cls", [qtorch.nn.Int8DynamicLinear, qtorch.nn.Int8WeightOnlyLinear])
@pytest.mark.parametrize(
    "make",
    [
        lambda t: torch.full(t.shape, 300, dtype=torch.int32),
        lambda t: t.float(),
        lambda t: t.to(torch.uint8),
    ],
)
def test_corrupted_int8_state_dict_raises(cls, make):
    sd = dict(cls.from_float(nn.Linear(64, 8)).state_dict())
    sd["qweight"] = make(sd["qweight"])
    with pytest.raises(TypeError, match="qweight must have dtype torch.int8"):
        cls(64, 8).load_state_dict(sd)


@pytest.mark.parametrize(
    "cls,key",
    [
        (qtorch.nn.Int8DynamicLinear, "weight_scale"),
        (qtorch.nn.Int8WeightOnlyLinear, "weight_scale"),
        (qtorch.nn.Int4WeightOnlyLinear, "scales"),
    ],
)
def test_nonfinite_scales_in_state_dict_warn(cls, key):
    src = cls.from_float(nn.Linear(64, 8)) if key == "weight_scale" else _int4_module()
    sd = dict(src.state_dict())
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = NAN
    target = (
        cls(64, 8)
        if key == "weight_scale"
        else qtorch.nn.Int4WeightOnlyLinear(64, 8, group_size=32)
    )
    with pytest.warns(RuntimeWarning, match=f"{key} holds non-finite"):
        target.load_state_dict(sd)
    clean = dict(src.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        target.load_state_dict(clean)  # a clean state dict loads without a word


def test_prefixed_state_dict_names_the_full_key():
    model = nn.Sequential(nn.Linear(64, 8))
    qtorch.quantize_(model, qtorch.Int4WeightOnlyConfig(group_size=32))
    sd = dict(model.state_dict())
    sd["0.zeros"] = torch.full_like(sd["0.zeros"], 16)
    with pytest.raises(ValueError, match=r"0\.zeros must hold values"):
        model.load_state_dict(sd)


# --------------------------------------------------------------------- 7. unclear errors


@pytest.mark.parametrize(
    "name,value,exc",
    [
        ("alpha", "0.5", TypeError),
        ("alpha", torch.tensor(0.5), TypeError),
        ("alpha", True, TypeError),
        ("temperature", torch.tensor(2.0), TypeError),
        ("temperature", "2", TypeError),
        ("beta", torch.tensor(0.5), TypeError),
        ("alpha", 1.5, ValueError),
    ],
)
def test_loss_scalars_must_be_numbers(name, value, exc):
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    labels = torch.randint(0, 10, (4,))
    with pytest.raises(exc, match=name):
        ops.distillation_loss(s, t, labels, **{name: value})
    with pytest.raises(exc, match=name):
        ops.fused_linear_distillation_loss(
            torch.randn(4, 6),
            torch.randn(10, 6),
            torch.randn(4, 6),
            torch.randn(10, 6),
            labels,
            **{name: value},
        )
    with pytest.raises(exc, match=name):
        qtorch.nn.DistillationLoss(**{name: value})


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_input_ops_check_shapes(backend):
    w_q, w_s = _w8()
    qw = R.quantize_int4(torch.randn(8, 64), 32)
    gi8 = torch.ops.qtorch.int8_linear_grad_input
    gi4 = torch.ops.qtorch.int4_linear_grad_input
    with qtorch.use_backend(backend):
        with pytest.raises(ValueError, match="grad_out"):
            gi8(torch.randn(3, 7), w_q, w_s)
        with pytest.raises(ValueError, match="w_scale"):
            gi8(torch.randn(3, 8), w_q, w_s[:5])
        with pytest.raises(TypeError, match="w_q"):
            gi8(torch.randn(3, 8), w_q.float(), w_s)
        with pytest.raises(TypeError, match="grad_out"):
            gi8(torch.randn(3, 8).long(), w_q, w_s)
        with pytest.raises(ValueError, match="grad_out"):
            gi4(torch.randn(3, 7), *qw, 32)
        with pytest.raises(ValueError, match="scales"):
            gi4(torch.randn(3, 8), qw[0], qw[1][:, :1], qw[2], 32)
        out = gi8(torch.randn(2, 3, 8), w_q, w_s)  # valid leading dims still work
        assert out.shape == (2, 3, 64)
    assert not hasattr(ops, "int8_linear_grad_input")  # internal: torch.ops.qtorch.* only


# -------------------------------------------------- 8. reference int8_linear shapes


@pytest.mark.parametrize("shape", [(64,), (3, 64), (2, 3, 64), (2, 1, 3, 64)])
def test_reference_int8_linear_accepts_what_the_op_accepts(shape):
    w_q, w_s = _w8()
    x = torch.randn(*shape)
    ref = R.int8_linear(x, w_q, w_s)
    assert ref.shape == (*shape[:-1], 8)
    torch.testing.assert_close(ops.int8_linear(x, w_q, w_s), ref)
