"""The C++ eager fast path of the CPU linears (csrc/cpu/fast_path.cpp).

It may only change what a call costs, never its result: it serves a call only when the full
Python path would run the cpu kernel on the same packed weight, and answers None otherwise.
These tests check both halves: that it does serve the common call (so its speed is real), and
that every way the cached state can go stale (in-place updates of the weight or its scales, a
dead weight whose address is reused) or the call leaves the plain eager case (autograd, another
backend, modes, subclasses, tracing) falls back to the Python path.
"""

from __future__ import annotations

import gc

import pytest
import torch

import qtorch
from qtorch import ops
from qtorch import reference as R
from qtorch.testing import assert_close
from tests.conftest import OpRecorder

pytestmark = pytest.mark.skipif("cpu" not in qtorch.available_backends(),
                                reason="qtorch._C (the cpu backend) is not built")

if "cpu" in qtorch.available_backends():
    from qtorch import _C
else:  # pragma: no cover
    _C = None

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _int8(n=24, k=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    w_q, w_scale = R.quantize_int8(torch.randn(n, k, generator=g))
    return w_q, w_scale, torch.randn(n, generator=g)


def _int4(n=24, k=64, gs=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    qw, sc, z = R.quantize_int4(torch.randn(n, k, generator=g), group_size=gs)
    return qw, sc, z, torch.randn(n, generator=g)


CASES = {
    # name: (public op, fast-path function, reference); lambdas: _C may be missing
    "int8_linear": (lambda: ops.int8_linear, lambda: _C.fast_int8_linear, R.int8_linear),
    "int8_weight_only_linear": (lambda: ops.int8_weight_only_linear,
                                lambda: _C.fast_int8_weight_only_linear,
                                R.int8_weight_only_linear),
    "int4_weight_only_linear": (lambda: ops.int4_weight_only_linear,
                                lambda: _C.fast_int4_weight_only_linear,
                                R.int4_weight_only_linear),
}


def _args(name, seed=0):
    if name == "int4_weight_only_linear":
        qw, sc, z, b = _int4(seed=seed)
        return [qw, sc, z, 32], b, 64
    w_q, w_scale, b = _int8(seed=seed)
    return [w_q, w_scale], b, 40


def _ref(name, x, weights, bias):
    ref = CASES[name][2]
    x2 = x.reshape(-1, x.shape[-1])
    return ref(x2, *weights, bias).reshape(*x.shape[:-1], -1)


def _matches_ref(name, out, x, weights, bias):
    """int8_linear accumulates in int32, so it equals the reference bitwise; the weight-only
    ops sum in fp32 in another order and get the tolerance every kernel-vs-reference test uses
    (qtorch.testing: 1e-4 of max |ref| for fp32; the output dtype's resolution otherwise)."""
    ref = _ref(name, x, weights, bias)
    if name == "int8_linear":
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    else:
        assert_close(out, ref, x.dtype)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5), ()])
@pytest.mark.parametrize("with_bias", [False, True])
def test_serves_the_common_call_with_the_same_result(name, dtype, lead, with_bias):
    op, fast = CASES[name][0](), CASES[name][1]()
    weights, bias, k = _args(name)
    bias = bias.to(dtype) if with_bias else None
    x = torch.randn(*lead, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    first = op(x, *weights, bias)  # packs and registers the weight
    served = fast(x, *weights, bias)
    assert served is not None, "the fast path did not serve a packed weight"
    assert served.dtype == dtype and served.shape == (*lead, weights[0].shape[0])
    torch.testing.assert_close(served, first, rtol=0, atol=0)
    again = op(x, *weights, bias=bias)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    _matches_ref(name, served, x, weights, bias)


def _packed_call(name, m):
    """(op, fast, weights, bias, x) after one op call packed the weight; checks it is served."""
    op, fast = CASES[name][0](), CASES[name][1]()
    weights, bias, k = _args(name)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    op(x, *weights, bias)
    assert fast(x, *weights, bias) is not None
    return op, fast, weights, bias, x


@pytest.mark.parametrize("name", list(CASES))
def test_in_place_weight_update_is_seen(name):
    op, fast, weights, bias, x = _packed_call(name, 4)
    if name == "int4_weight_only_linear":
        weights[0].bitwise_xor_(0x5A)  # new nibbles
    else:
        weights[0].neg_()
    assert fast(x, *weights, bias) is None  # stale: the version moved
    _matches_ref(name, op(x, *weights, bias), x, weights, bias)
    assert fast(x, *weights, bias) is not None  # repacked and registered again


@pytest.mark.parametrize("name", ["int8_weight_only_linear", "int4_weight_only_linear"])
def test_in_place_scale_update_is_seen(name):
    # The weight-only packed forms fold the scales (and zeros) in: changing them is a miss.
    op, fast, weights, bias, x = _packed_call(name, 3)
    weights[1].mul_(2.0)
    assert fast(x, *weights, bias) is None
    _matches_ref(name, op(x, *weights, bias), x, weights, bias)
    if name == "int4_weight_only_linear":
        weights[2].add_(1).clamp_(max=15)  # zeros
        assert fast(x, *weights, bias) is None
        _matches_ref(name, op(x, *weights, bias), x, weights, bias)


def test_a_dead_weight_is_never_served():
    x = torch.randn(2, 40)
    for seed in range(20):  # new weights of one shape: addresses get reused
        w_q, w_scale, b = _int8(seed=seed)
        out = ops.int8_linear(x, w_q, w_scale, b)
        torch.testing.assert_close(out, R.int8_linear(x, w_q, w_scale, b), rtol=0, atol=0)
        del w_q, w_scale, b, out  # freed here (refcount); gc.collect per round costs seconds
    gc.collect()
    w_q, w_scale, b = _int8(seed=99)
    assert _C.fast_int8_linear(x, w_q, w_scale, b) is None  # never packed: nothing to serve


def test_entries_do_not_pile_up():
    x = torch.randn(1, 40)
    for seed in range(300):
        w_q, w_scale, b = _int8(seed=seed)
        ops.int8_linear(x, w_q, w_scale, b)
        del w_q, w_scale, b
    gc.collect()
    assert _C.fast_entries() < 200  # dead entries are swept as the table grows


@pytest.mark.parametrize("name", list(CASES))
def test_falls_back_outside_plain_eager(name, monkeypatch):
    op, fast, weights, bias, x = _packed_call(name, 2)

    xg = x.clone().requires_grad_()
    assert fast(xg, *weights, bias) is None  # autograd must record the op
    with torch.no_grad():
        assert fast(xg, *weights, bias) is not None
    with qtorch.use_backend("reference"):
        assert fast(x, *weights, bias) is None
    with qtorch.use_backend("cpu"):
        assert fast(x, *weights, bias) is not None
    qtorch.set_backend("reference")
    try:
        assert fast(x, *weights, bias) is None
    finally:
        qtorch.set_backend("auto")  # set_backend outranks QTORCH_BACKEND, here and in Python
    monkeypatch.setenv("QTORCH_BACKEND", "reference")
    assert fast(x, *weights, bias) is not None and qtorch.get_backend() == "auto"
    monkeypatch.setattr(qtorch._backend, "_global_choice", None)
    monkeypatch.setenv("QTORCH_BACKEND", "reference")
    assert fast(x, *weights, bias) is None
    monkeypatch.setenv("QTORCH_BACKEND", "cpu")
    assert fast(x, *weights, bias) is not None
    monkeypatch.setenv("QTORCH_BACKEND", "no-such-backend")
    assert fast(x, *weights, bias) is None  # the Python path names the bad variable
    with pytest.raises(RuntimeError, match="QTORCH_BACKEND"):
        op(x, *weights, bias)
    monkeypatch.delenv("QTORCH_BACKEND")

    class Sub(torch.Tensor):
        pass

    assert fast(x.as_subclass(Sub), *weights, bias) is None

    with OpRecorder() as rec:
        assert fast(x, *weights, bias) is None
        op(x, *weights, bias)
    seen = [str(f) for f, _ in rec.calls]
    assert any(f"qtorch.{name}" in o for o in seen), seen  # the mode saw the op

    with torch.overrides.TorchFunctionMode():
        assert fast(x, *weights, bias) is None
    traced = torch.jit.trace(lambda t: op(t, *weights, bias), (x,), check_trace=False)
    assert f"qtorch::{name}" in str(traced.graph)


@pytest.mark.parametrize("name", list(CASES))
def test_odd_calls_fall_back_to_the_checked_path(name):
    op, fast = CASES[name][0](), CASES[name][1]()
    weights, bias, k = _args(name)
    x = torch.randn(2, k)
    op(x, *weights, bias)
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
    # a non-contiguous weight view is served by the Python path, correctly
    w_nc = weights[0].t().contiguous().t()
    out = op(x, w_nc, *weights[1:], bias)
    torch.testing.assert_close(out, op(x, *weights, bias), rtol=0, atol=0)


def test_group_size_must_be_an_int():
    qw, sc, z, b = _int4()
    x = torch.randn(2, 64)
    ops.int4_weight_only_linear(x, qw, sc, z, 32, b)
    assert _C.fast_int4_weight_only_linear(x, qw, sc, z, 32, b) is not None
    assert _C.fast_int4_weight_only_linear(x, qw, sc, z, 32.0, b) is None
    assert _C.fast_int4_weight_only_linear(x, qw, sc, z, True, b) is None
    assert _C.fast_int4_weight_only_linear(x, qw, sc, z, 64, b) is None  # not this packing


def test_inference_mode_weights():
    # Inference tensors have no version counter: the Python path serves them (and caches).
    with torch.inference_mode():
        w_q, w_scale, b = _int8()
        x = torch.randn(3, 40)
        out = ops.int8_linear(x, w_q, w_scale, b)
        torch.testing.assert_close(out, R.int8_linear(x, w_q, w_scale, b), rtol=0, atol=0)
        assert _C.fast_int8_linear(x, w_q, w_scale, b) is None
    w_q, w_scale, b = _int8(seed=1)
    ops.int8_linear(torch.randn(1, 40), w_q, w_scale, b)
    with torch.inference_mode():
        x = torch.randn(3, 40)
        assert _C.fast_int8_linear(x, w_q, w_scale, b) is not None  # inference x is fine


def test_compile_does_not_trace_into_the_fast_path():
    w_q, w_scale, b = _int8()
    x = torch.randn(3, 40)
    ops.int8_linear(x, w_q, w_scale, b)
    f = torch.compile(lambda t: ops.int8_linear(t, w_q, w_scale, b), fullgraph=True,
                      backend="eager")
    torch.testing.assert_close(f(x), R.int8_linear(x, w_q, w_scale, b), rtol=0, atol=0)


def test_threads_see_their_own_backend_scope():
    import threading

    w_q, w_scale, b = _int8()
    x = torch.randn(2, 40)
    ops.int8_linear(x, w_q, w_scale, b)
    seen = {}

    def worker():
        with qtorch.use_backend("reference"):
            seen["worker"] = _C.fast_int8_linear(x, w_q, w_scale, b)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["worker"] is None
    assert _C.fast_int8_linear(x, w_q, w_scale, b) is not None
