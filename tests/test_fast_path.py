"""The C++ eager fast path of the quantized modules (`qtorch._C.fast_linear`,
csrc/cpu/linear_packed.cpp).

It may only change what a call costs, never its result: a module calls it first with its
packed tensors, and it serves the call only when the op would run the cpu kernel on the same
tensors; otherwise it answers None and the module calls the op. It holds no state of its own
(the module passes its packed buffers), so nothing it serves can be stale. These tests check
both halves: that it serves the common call (so its speed is real) with the op's result, and
that every call outside the plain eager case (autograd, another backend, modes, subclasses,
tracing, odd arguments) falls back.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import qtorch
from qtorch import _packed
from qtorch import reference as R
from qtorch.testing import assert_close
from tests.conftest import OpRecorder

pytestmark = pytest.mark.skipif(
    "cpu" not in qtorch.available_backends(), reason="qtorch._C (the cpu backend) is not built"
)

if "cpu" in qtorch.available_backends():
    from qtorch import _C
else:  # pragma: no cover
    _C = None

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MODULES = {
    "int8_linear": (qtorch.nn.Int8DynamicLinear, {}, R.int8_linear),
    "int8_weight_only_linear": (qtorch.nn.Int8WeightOnlyLinear, {}, R.int8_weight_only_linear),
    "int4_weight_only_linear": (
        qtorch.nn.Int4WeightOnlyLinear,
        {"group_size": 32},
        R.int4_weight_only_linear,
    ),
}


def _module(name, k=64, n=24, bias=True, seed=0):
    cls, kw, _ = MODULES[name]
    torch.manual_seed(seed)
    return cls.from_float(nn.Linear(k, n, bias=bias), **kw)


def _fast_args(mod, x, bias="module"):
    """The arguments forward passes to fast_linear."""
    lay = mod._layout
    weight = [mod._buffers[b] for b in lay.buffers]
    b = mod.bias if bias == "module" else bias
    return (x, lay.code, mod.out_features, mod.in_features, mod._group_size(), b, *weight)


def _matches_ref(name, mod, out, x):
    """int8_linear accumulates in int32, so it equals the reference bitwise; the weight-only
    ops sum in fp32 in another order and get the tolerance every kernel-vs-reference test uses
    (qtorch.testing: 1e-4 of max |ref| for fp32; the output dtype's resolution otherwise)."""
    c = mod._canonical()
    args = [c["qweight"], c.get("weight_scale", c.get("scales"))]
    if name == "int4_weight_only_linear":
        args += [c["zeros"], mod.group_size]
    bias = None if mod.bias is None else mod.bias.detach().to(x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    ref = MODULES[name][2](x2, *args, bias).reshape(*x.shape[:-1], -1)
    if name == "int8_linear":
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    else:
        assert_close(out, ref, x.dtype)


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5), ()])
@pytest.mark.parametrize("with_bias", [False, True])
def test_serves_the_common_call_with_the_same_result(name, dtype, lead, with_bias):
    mod = _module(name, bias=with_bias).to(dtype)
    x = torch.randn(*lead, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        served = _C.fast_linear(*_fast_args(mod, x))
        assert served is not None, "the fast path did not serve a packed module"
        assert served.dtype == dtype and served.shape == (*lead, 24)
        weight = [mod._buffers[b] for b in mod._layout.buffers]
        op = torch.ops.qtorch.linear_packed(
            x, *_packed.flat(weight), mod.bias, mod._layout.name, 24, 64, mod._group_size()
        )
        torch.testing.assert_close(served, op, rtol=0, atol=0)
        torch.testing.assert_close(mod(x), served, rtol=0, atol=0)
    _matches_ref(name, mod, served, x)


@pytest.mark.parametrize("name", list(MODULES))
def test_falls_back_outside_plain_eager(name, monkeypatch):
    mod = _module(name)
    x = torch.randn(2, 64)
    fast = _C.fast_linear

    assert fast(*_fast_args(mod, x)) is None  # bias requires grad: autograd must see the op
    with torch.no_grad():
        assert fast(*_fast_args(mod, x)) is not None
    xg = x.clone().requires_grad_()
    assert fast(*_fast_args(mod, xg, bias=None)) is None
    with torch.no_grad():
        assert fast(*_fast_args(mod, xg, bias=None)) is not None
        # Open use_backend scopes send every call to Python, which resolves them per thread.
        with qtorch.use_backend("reference"):
            assert fast(*_fast_args(mod, x)) is None
        with qtorch.use_backend("cpu"):
            assert fast(*_fast_args(mod, x)) is None
            _matches_ref(name, mod, mod(x), x)  # the Python kernel runs the cpu layout
        qtorch.set_backend("reference")
        try:
            assert fast(*_fast_args(mod, x)) is None
        finally:
            qtorch.set_backend("auto")  # set_backend outranks QTORCH_BACKEND, here and in Python
        monkeypatch.setenv("QTORCH_BACKEND", "reference")
        assert fast(*_fast_args(mod, x)) is not None and qtorch.get_backend() == "auto"
        qtorch._backend.clear_backend()
        monkeypatch.setenv("QTORCH_BACKEND", "reference")
        assert fast(*_fast_args(mod, x)) is None
        monkeypatch.setenv("QTORCH_BACKEND", "cpu")
        assert fast(*_fast_args(mod, x)) is not None
        monkeypatch.setenv("QTORCH_BACKEND", "no-such-backend")
        assert fast(*_fast_args(mod, x)) is None  # the Python path names the bad variable
        with pytest.raises(RuntimeError, match="QTORCH_BACKEND"):
            mod(x)
        monkeypatch.delenv("QTORCH_BACKEND")

        class Sub(torch.Tensor):
            pass

        assert fast(*_fast_args(mod, x.as_subclass(Sub))) is None

        with OpRecorder() as rec:
            assert fast(*_fast_args(mod, x)) is None
            mod(x)
        seen = [str(f) for f, _ in rec.calls]
        assert any("qtorch.linear_packed" in o for o in seen), seen  # the mode saw the op

        with torch.overrides.TorchFunctionMode():
            assert fast(*_fast_args(mod, x)) is None
    traced = torch.jit.trace(mod, (x,), check_trace=False)  # (tracing reads the state dict)
    assert "qtorch::" in str(traced.graph)  # a qtorch op is recorded, not its kernel


@pytest.mark.parametrize("name", list(MODULES))
def test_odd_calls_fall_back_to_the_checked_path(name):
    mod = _module(name)
    x = torch.randn(2, 64)
    fast = _C.fast_linear
    args = _fast_args(mod, x)
    with torch.no_grad():
        assert fast(*args) is not None
        assert fast(*args, None, None) is None  # too many arguments
        assert fast(*args[:7]) is None  # too few
        assert fast(x.numpy(), *args[1:]) is None
        assert fast(torch.randn(0, 64), *args[1:]) is None
        assert fast(torch.randn(2, 65), *args[1:]) is None
        assert fast(x.double(), *args[1:]) is None
        assert fast(*args[:5], mod.bias.double(), *args[6:]) is None
        assert fast(*args[:5], mod.bias[:-1], *args[6:]) is None
        assert fast(x, 7, *args[2:]) is None  # not a layout code
        assert fast(x, 1.5, *args[2:]) is None
        assert fast(*args[:6], args[6].double(), *args[7:]) is None
        with pytest.raises(ValueError, match="x"):
            mod(torch.randn(2, 65))
        with pytest.raises(TypeError, match="x"):
            mod(x.numpy())
        assert mod(torch.randn(0, 64)).shape == (0, 24)
        # a non-contiguous x is served too, with the same result
        xt = torch.randn(64, 3).t()
        torch.testing.assert_close(fast(xt, *args[1:]), mod(xt.contiguous()), rtol=0, atol=0)


def test_a_mismatched_packed_tensor_is_an_error_not_a_read_out_of_bounds():
    mod = _module("int4_weight_only_linear")
    x = torch.randn(2, 64)
    args = list(_fast_args(mod, x))
    args[4] = 64  # another group size than the packing's
    with torch.no_grad():
        assert _C.fast_linear(*args) is None
        with pytest.raises(ValueError, match="packed"):
            torch.ops.qtorch.linear_packed(
                x, *_packed.flat(list(args[6:])), None, mod._layout.name, 24, 64, 64
            )


def test_inference_mode():
    with torch.inference_mode():
        mod = _module("int8_linear")
        x = torch.randn(3, 64)
        out = _C.fast_linear(*_fast_args(mod, x))
        assert out is not None
        _matches_ref("int8_linear", mod, out, x)
    mod = _module("int8_linear")
    with torch.inference_mode():
        x = torch.randn(3, 64)
        assert _C.fast_linear(*_fast_args(mod, x)) is not None  # inference x is fine


def test_compile_does_not_trace_into_the_fast_path():
    mod = _module("int8_linear")
    x = torch.randn(3, 64)
    with torch.no_grad():
        f = torch.compile(mod, fullgraph=True, backend="eager")
        torch.testing.assert_close(f(x), mod(x), rtol=0, atol=0)


def test_threads_see_their_own_backend_scope():
    mod = _module("int8_linear")
    x = torch.randn(2, 64)
    seen = {}

    def worker():
        with torch.no_grad(), qtorch.use_backend("reference"):
            seen["worker"] = _C.fast_linear(*_fast_args(mod, x))
            seen["in scope"] = qtorch.get_backend()

    with torch.no_grad():
        assert _C.fast_linear(*_fast_args(mod, x)) is not None
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert seen == {"worker": None, "in scope": "reference"}
        assert qtorch.get_backend() == "auto"
        assert _C.fast_linear(*_fast_args(mod, x)) is not None


# ------------------------------------------------------------------ the public ops' fast path
# qtorch.ops.int8_linear / int8_weight_only_linear / int4_weight_only_linear on canonical
# buffers: the same eager conditions, the weight packed for the call (an op keeps nothing).

OPS = {
    # name: (public op, fast-path function, reference); lambdas: _C may be missing
    "int8_linear": (lambda: qtorch.ops.int8_linear, lambda: _C.fast_int8_linear, R.int8_linear),
    "int8_weight_only_linear": (
        lambda: qtorch.ops.int8_weight_only_linear,
        lambda: _C.fast_int8_weight_only_linear,
        R.int8_weight_only_linear,
    ),
    "int4_weight_only_linear": (
        lambda: qtorch.ops.int4_weight_only_linear,
        lambda: _C.fast_int4_weight_only_linear,
        R.int4_weight_only_linear,
    ),
}


def _op_args(name, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name == "int4_weight_only_linear":
        qw, sc, z = R.quantize_int4(torch.randn(24, 64, generator=g), group_size=32)
        return [qw, sc, z, 32], torch.randn(24, generator=g), 64
    w_q, w_scale = R.quantize_int8(torch.randn(24, 40, generator=g))
    return [w_q, w_scale], torch.randn(24, generator=g), 40


def _op_matches_ref(name, out, x, weights, bias):
    ref = OPS[name][2](x.reshape(-1, x.shape[-1]), *weights, bias).reshape(*x.shape[:-1], -1)
    if name == "int8_linear":
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    else:
        assert_close(out, ref, x.dtype)


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5), ()])
@pytest.mark.parametrize("with_bias", [False, True])
def test_op_fast_path_serves_the_common_call(name, dtype, lead, with_bias):
    op, fast = OPS[name][0](), OPS[name][1]()
    weights, bias, k = _op_args(name)
    bias = bias.to(dtype) if with_bias else None
    x = torch.randn(*lead, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    served = fast(x, *weights, bias)
    assert served is not None
    assert served.dtype == dtype and served.shape == (*lead, 24)
    with qtorch.use_backend("cpu"):  # an open scope: the Python path, the same cpu kernel
        slow = op(x, *weights, bias=bias)
    torch.testing.assert_close(served, slow, rtol=0, atol=0)
    torch.testing.assert_close(op(x, *weights, bias), served, rtol=0, atol=0)
    _op_matches_ref(name, served, x, weights, bias)


@pytest.mark.parametrize("name", list(OPS))
def test_op_fast_path_sees_every_write(name):
    fast = OPS[name][1]()
    weights, bias, k = _op_args(name)
    x = torch.randn(3, k)
    fast(x, *weights, bias)
    weights[0].data.copy_(weights[0].flip(0))  # no version counter sees .data
    weights[1].numpy()[:] *= 2
    out = fast(x, *weights, bias)
    _op_matches_ref(name, out, x, weights, bias)


@pytest.mark.parametrize("name", list(OPS))
def test_op_fast_path_falls_back_outside_plain_eager(name, monkeypatch):
    op, fast = OPS[name][0](), OPS[name][1]()
    weights, bias, k = _op_args(name)
    x = torch.randn(2, k)
    assert fast(x, *weights, bias) is not None
    xg = x.clone().requires_grad_()
    assert fast(xg, *weights, bias) is None  # autograd must record the op
    with torch.no_grad():
        assert fast(xg, *weights, bias) is not None
    with qtorch.use_backend("reference"):
        assert fast(x, *weights, bias) is None
    qtorch.set_backend("reference")
    try:
        assert fast(x, *weights, bias) is None
    finally:
        qtorch.set_backend("auto")
    qtorch._backend.clear_backend()
    monkeypatch.setenv("QTORCH_BACKEND", "reference")
    assert fast(x, *weights, bias) is None
    monkeypatch.setenv("QTORCH_BACKEND", "no-such-backend")
    assert fast(x, *weights, bias) is None
    with pytest.raises(RuntimeError, match="QTORCH_BACKEND"):
        op(x, *weights, bias)
    monkeypatch.delenv("QTORCH_BACKEND")

    class Sub(torch.Tensor):
        pass

    assert fast(x.as_subclass(Sub), *weights, bias) is None
    with OpRecorder() as rec:
        assert fast(x, *weights, bias) is None
        op(x, *weights, bias)
    assert any(f"qtorch.{name}" in str(f) for f, _ in rec.calls)
    with torch.overrides.TorchFunctionMode():
        assert fast(x, *weights, bias) is None
    traced = torch.jit.trace(lambda t: op(t, *weights, bias), (x,), check_trace=False)
    assert f"qtorch::{name}" in str(traced.graph)


@pytest.mark.parametrize("name", list(OPS))
def test_op_fast_path_odd_calls_fall_back_to_the_checked_path(name):
    op, fast = OPS[name][0](), OPS[name][1]()
    weights, bias, k = _op_args(name)
    x = torch.randn(2, k)
    assert fast(x, *weights, bias, bias) is None  # too many arguments
    assert fast(x, *weights, bogus=bias) is None
    assert fast(x, *weights[:-1]) is None
    assert fast(x.numpy(), *weights, bias) is None
    assert fast(torch.randn(0, k), *weights, bias) is None
    assert fast(torch.randn(2, k + 1), *weights, bias) is None
    assert fast(x.double(), *weights, bias) is None
    assert fast(x, *weights, bias.double()) is None
    assert fast(x, *weights, bias[:-1]) is None
    with pytest.raises(ValueError, match="bias"):
        op(x, *weights, bias[:-1])
    with pytest.raises(TypeError, match="x"):
        op(x.numpy(), *weights, bias)
    w_nc = weights[0].t().contiguous().t()  # a non-contiguous weight: correct either way
    torch.testing.assert_close(
        op(x, w_nc, *weights[1:], bias), op(x, *weights, bias), rtol=0, atol=0
    )


def test_op_fast_path_group_size_must_be_an_int():
    weights, bias, _ = _op_args("int4_weight_only_linear")
    qw, sc, z, _gs = weights
    x = torch.randn(2, 64)
    assert _C.fast_int4_weight_only_linear(x, qw, sc, z, 32, bias) is not None
    assert _C.fast_int4_weight_only_linear(x, qw, sc, z, 32.0, bias) is None
    assert _C.fast_int4_weight_only_linear(x, qw, sc, z, True, bias) is None
    assert _C.fast_int4_weight_only_linear(x, qw, sc, z, 64, bias) is None  # scales' shape
