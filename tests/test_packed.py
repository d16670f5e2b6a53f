"""Quantized modules own their packed layout (qtorch/_packed.py, qtorch/nn/linear.py).

What must hold: no result is ever computed from stale or foreign packed data (a write into a
canonical buffer by any route is seen; an op keeps nothing between calls, so a fresh tensor at
a freed address cannot hit anything); nothing grows with the number of distinct tensors seen;
a packed module keeps one copy of its weight; unpacking gives back the canonical buffers
bitwise; and the backend choice stays per call, in eager, compiled and exported code.
"""

from __future__ import annotations

import copy
import gc
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import qtorch
from qtorch import _packed, ops
from qtorch import reference as R
from qtorch.testing import assert_close

pytestmark = pytest.mark.skipif(
    "cpu" not in qtorch.available_backends(), reason="qtorch._C (the cpu backend) is not built"
)

CONFIGS = {
    "w8a8": qtorch.Int8DynamicConfig(),
    "w8a16": qtorch.Int8WeightOnlyConfig(),
    "w4a16": qtorch.Int4WeightOnlyConfig(group_size=32),
}
SCALES = {"w8a8": "weight_scale", "w8a16": "weight_scale", "w4a16": "scales"}


def _model(name, k=64, n=40, bias=True, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(k, n, bias=bias))
    qtorch.quantize_(m, CONFIGS[name])
    return m


def _reference(mod, x):
    """The module's output by the reference, from its canonical buffers as they are now
    (read without changing the module's state, so the check does not alter what it checks)."""
    sd = {k: v.clone() for k, v in mod._canonical().items()}
    if mod.bias is not None:
        sd["bias"] = mod.bias.detach()
    x2 = x.reshape(-1, x.shape[-1])
    if isinstance(mod, qtorch.nn.Int4WeightOnlyLinear):
        out = R.int4_weight_only_linear(
            x2, sd["qweight"], sd["scales"], sd["zeros"], mod.group_size, sd.get("bias")
        )
    elif isinstance(mod, qtorch.nn.Int8DynamicLinear):
        out = R.int8_linear(x2, sd["qweight"], sd["weight_scale"], sd.get("bias"))
    else:
        out = R.int8_weight_only_linear(x2, sd["qweight"], sd["weight_scale"], sd.get("bias"))
    return out.reshape(*x.shape[:-1], -1)


def _check(mod, x):
    with torch.no_grad():
        out = mod(x)
    ref = _reference(mod, x)
    if isinstance(mod, qtorch.nn.Int8DynamicLinear):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)  # exact int32 accumulation
    else:
        assert_close(out, ref, x.dtype)
    return out


def _layout(mod):
    return None if mod._layout is None else mod._layout.name


# --------------------------------------------------------------- writes are always seen


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_data_write_into_the_scales_is_seen(name):
    # The reproducer: quantize_, two calls, then `.data.mul_(3)` on the scales.
    m = _model(name, n=32)
    x = torch.randn(3, 64)
    with torch.no_grad():
        m(x)
        before = m(x)
    getattr(m[0], SCALES[name]).data.mul_(3)
    after = _check(m[0], x)
    bias = m[0].bias.detach()
    torch.testing.assert_close(after - bias, 3 * (before - bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("how", ["data_copy", "numpy", "inplace"])
def test_a_write_into_qweight_is_seen(name, how):
    m = _model(name)
    x = torch.randn(2, 64)
    before = _check(m[0], x)
    if how == "data_copy":
        m[0].qweight.data.copy_(m[0].qweight.flip(0))
    elif how == "numpy":
        m[0].qweight.numpy()[::2] = 1
    else:
        m[0].qweight.bitwise_xor_(0x5A if name == "w4a16" else 1)
    after = _check(m[0], x)
    assert not torch.equal(after, before)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_module_built_in_inference_mode_sees_its_updates(name):
    with torch.inference_mode():
        m = _model(name)
        x = torch.randn(2, 64)
        before = m(x)
        getattr(m[0], SCALES[name]).mul_(2)
        m[0].qweight.numpy()[0] = 3
        after = m(x)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, _reference(m[0], x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_kept_canonical_buffer_stays_live(name):
    m = _model(name)
    mod = m[0]
    x = torch.randn(2, 64)
    w = mod.qweight  # the module runs from this tensor while it is held
    assert _layout(mod) is None
    _check(mod, x)
    assert _layout(mod) is None
    w.numpy()[:] = 2  # seen: the module packs per call while w is held
    _check(mod, x)
    del w
    _check(mod, x)  # nothing else holds it: packed again, once
    assert _layout(mod) == f"cpu_{name}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_assigning_a_canonical_buffer_replaces_the_packed_one(name):
    m = _model(name)
    mod = m[0]
    x = torch.randn(2, 64)
    _check(mod, x)
    mod.qweight = mod.qweight.flip(0).contiguous()
    _check(mod, x)
    assert _layout(mod) == f"cpu_{name}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_aliases_and_load_repacks(name):
    m = _model(name)
    x = torch.randn(2, 64)
    sd = m.state_dict()
    assert _layout(m[0]) is None
    sd["0.qweight"].fill_(1)  # a state dict aliases the module's buffers, as nn.Linear's
    out = _check(m[0], x)
    del sd
    m2 = _model(name, seed=1)
    m2.load_state_dict(m.state_dict())
    assert _layout(m2[0]) == f"cpu_{name}"
    with torch.no_grad():
        torch.testing.assert_close(m2(x), out, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_asking_for_the_storage_does_not_stop_repacking(name):
    """safetensors, transformers' save_pretrained and huggingface_hub call
    `t.untyped_storage()` on every tensor they save; torch then keeps that storage's Python
    object (and its reference to the storage) for good. That is not another holder: once the
    state dict is gone the module packs again."""
    m = _model(name)
    x = torch.randn(2, 64)
    sd = m.state_dict()
    for t in sd.values():
        t.untyped_storage().data_ptr()
    del sd, t
    _check(m[0], x)
    assert _layout(m[0]) == f"cpu_{name}"
    w = m[0].qweight
    w.untyped_storage()  # while someone holds the buffer it is not packed
    _check(m[0], x)
    assert _layout(m[0]) is None
    del w
    _check(m[0], x)
    assert _layout(m[0]) == f"cpu_{name}"


# --------------------------------------------------------------- ops keep nothing


def test_a_fresh_scale_at_a_freed_address_is_never_a_hit():
    # The reproducer: each new scale tensor may land where a freed one lived.
    torch.manual_seed(0)
    wq, _ = R.quantize_int8(torch.randn(32, 64))
    x = torch.randn(4, 64)
    for i in range(50):
        s = torch.rand(32) + i
        y = ops.int8_weight_only_linear(x, wq, s)
        assert_close(y, R.int8_weight_only_linear(x, wq, s), x.dtype)
        y = ops.int8_linear(x, wq, s)
        torch.testing.assert_close(y, R.int8_linear(x, wq, s), rtol=0, atol=0)
        del s, y


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_distinct_scales_do_not_pile_up_packed_copies():
    # The reproducer: 300 calls with a 1 MiB weight and a new scale tensor each grew RSS by
    # 300 MiB when every (weight, scale) pair kept a packed copy alive.
    torch.manual_seed(0)
    wq, _ = R.quantize_int8(torch.randn(1024, 1024))
    x = torch.randn(1, 1024)
    for i in range(10):
        ops.int8_weight_only_linear(x, wq, torch.rand(1024) + i)
    gc.collect()
    before = _rss_kib()
    for i in range(300):
        ops.int8_weight_only_linear(x, wq, torch.rand(1024) + i)
    gc.collect()
    assert _rss_kib() - before < 64 * 1024  # KiB; was ~300 MiB


# --------------------------------------------------------------- one copy, packed once


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_packed_module_holds_one_copy(name):
    m = _model(name, k=256, n=96)
    mod = m[0]
    assert _layout(mod) == f"cpu_{name}"  # packed at construction
    lay = _packed.layout_named(f"cpu_{name}")
    for derived in lay.derived:
        assert mod._buffers[derived] is None
    canonical = sum(t.nbytes for t in mod._canonical().values())
    resident = sum(t.nbytes for t in mod.buffers())
    assert resident <= 1.25 * canonical + (64 << 10)  # packing pads to blocks; no 2nd copy
    with torch.no_grad():
        mod(torch.randn(3, 256))
    assert sum(t.nbytes for t in mod.buffers()) == resident


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_module_packs_once(name, monkeypatch):
    lay = _packed.layout_named(f"cpu_{name}")
    calls = []

    def counting(*a):
        calls.append(1)
        return lay.pack(*a)

    spy = _packed.Layout(
        **{**{f: getattr(lay, f) for f in lay.__dataclass_fields__}, "pack": counting}
    )
    monkeypatch.setitem(_packed._BY_FAMILY, (lay.family, lay.backend), spy)
    m = _model(name)
    x = torch.randn(2, 64)
    with torch.no_grad():
        for _ in range(5):
            m(x)
    assert calls == [1]
    assert m[0]._layout is spy


# --------------------------------------------------------------- unpack is bitwise


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("n,k", [(1, 64), (17, 96), (65, 160), (130, 64), (3, 256)])
def test_unpack_gives_back_the_canonical_buffers(name, n, k):
    lin = nn.Linear(k, n)
    mod = {
        "w8a8": qtorch.nn.Int8DynamicLinear,
        "w8a16": qtorch.nn.Int8WeightOnlyLinear,
        "w4a16": qtorch.nn.Int4WeightOnlyLinear,
    }[name]
    kw = {"group_size": 32} if name == "w4a16" else {}
    ref = mod.from_float(lin, **kw)
    ref._unpack()
    expected = {k_: v.clone() for k_, v in ref._canonical().items()}
    ref._pack()
    got = ref._canonical()  # unpacked from the packed layout
    for key, t in expected.items():
        assert torch.equal(got[key], t), key


@pytest.mark.parametrize("k", [1, 3, 7, 65])
def test_int8_layouts_take_any_k(k):
    for name in ("w8a8", "w8a16"):
        cls = qtorch.nn.Int8DynamicLinear if name == "w8a8" else qtorch.nn.Int8WeightOnlyLinear
        mod = cls.from_float(nn.Linear(k, 5))
        assert _layout(mod) == f"cpu_{name}"
        x = torch.randn(4, k)
        _check(mod, x)
        c = mod._canonical()
        mod._unpack()
        assert torch.equal(c["qweight"], mod.qweight)


# --------------------------------------------------------------- backward from the layout


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 3)])
def test_backward_from_the_packed_layout(name, dtype, lead):
    m = _model(name, k=96, n=33)
    m = m.to(dtype)
    mod = m[0]
    assert _layout(mod) == f"cpu_{name}"
    x = torch.randn(*lead, 96, dtype=dtype, requires_grad=True)
    mod(x).float().sum().backward()
    w = mod.dequantize()
    ref = (torch.ones(*lead, 33) @ w).to(dtype)
    assert_close(x.grad, ref, dtype)
    assert mod.bias.grad is not None
    torch.testing.assert_close(mod.bias.grad.float(), torch.full((33,), float(np.prod(lead))))


# --------------------------------------------------------------- moves, copies


@pytest.mark.parametrize("name", list(CONFIGS))
def test_to_dtype_keeps_the_layout_and_the_fp32_scales(name):
    m = _model(name)
    x = torch.randn(2, 64)
    with torch.no_grad():
        out = m(x)
    m.to(torch.bfloat16)
    mod = m[0]
    assert _layout(mod) == f"cpu_{name}"
    for t in mod._canonical().values():
        assert t.dtype in (torch.int8, torch.uint8, torch.float32)
    with torch.no_grad():
        out16 = m(x.to(torch.bfloat16))
    assert_close(out16, out, torch.bfloat16)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_deepcopy_and_pickle_keep_the_layout(name):
    m = _model(name)
    x = torch.randn(2, 64)
    with torch.no_grad():
        out = m(x)
        for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
            assert clone[0]._layout is m[0]._layout
            torch.testing.assert_close(clone(x), out, rtol=0, atol=0)


# --------------------------------------------------------------- the backend stays per call


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_packed_module_follows_the_backend_in_force(name, monkeypatch):
    m = _model(name)
    x = torch.randn(3, 64)
    op = _packed.FAMILIES[name][0]
    seen = []
    real = qtorch._backend._KERNELS[op]["reference"]

    def spy(*a):
        seen.append(op)
        return real(*a)

    monkeypatch.setitem(qtorch._backend._KERNELS[op], "reference", spy)
    with qtorch.use_backend("reference"):
        ref_out = m(x)
    assert seen == [op]
    assert _layout(m[0]) == f"cpu_{name}"  # a call on another backend does not relayout
    torch.testing.assert_close(ref_out, _reference(m[0], x), rtol=0, atol=0)
    qtorch.set_backend("reference")
    m(x)
    assert seen == [op, op]
    qtorch.set_backend("auto")
    with qtorch.use_backend("cpu"):
        _check(m[0], x)
    assert seen == [op, op]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_module_follows_the_backend_in_force(name, monkeypatch):
    m = _model(name)
    x = torch.randn(3, 64)
    with torch.no_grad():
        eager = m(x)
        compiled = torch.compile(m, fullgraph=True)
        torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)
        op = _packed.FAMILIES[name][0]
        seen = []
        real = qtorch._backend._KERNELS[op]["reference"]
        monkeypatch.setitem(
            qtorch._backend._KERNELS[op], "reference", lambda *a: seen.append(1) or real(*a)
        )
        with qtorch.use_backend("reference"):
            compiled(x)
        assert seen == [1]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_linear_packed_opcheck(name):
    mod = _model(name, k=64, n=24)[0]
    lay = mod._layout
    weight = [mod._buffers[b] for b in lay.buffers]
    for x, bias in (
        (torch.randn(3, 64), mod.bias.detach()),
        (torch.randn(2, 5, 64), None),
        (torch.randn(1, 64, requires_grad=True), None),
    ):
        torch.library.opcheck(
            torch.ops.qtorch.linear_packed.default,
            (x, *_packed.flat(weight), bias, lay.name, 24, 64, mod._group_size()),
        )


def test_bad_inputs_name_the_argument():
    mod = _model("w8a8")[0]
    with pytest.raises(ValueError, match="x"):
        mod(torch.randn(2, 63))
    with pytest.raises(TypeError, match="x"):
        mod(torch.randint(0, 3, (2, 64)))
    with pytest.raises(TypeError, match="x"):
        mod(np.zeros((2, 64), dtype=np.float32))
    assert mod(torch.randn(0, 64)).shape == (0, 40)


@pytest.mark.skipif("triton" not in qtorch.available_backends(), reason="triton cannot run here")
def test_the_triton_layout(monkeypatch):
    """The layout a module keeps where "auto" picks Triton (a GPU without the CUDA extension),
    run here in Triton's interpreter: forward, backward, unpack."""
    lay = _packed.layout_named("triton_w4a16")
    monkeypatch.setitem(_packed._BY_FAMILY, ("w4a16", "cpu"), lay)
    mod = _model("w4a16")[0]
    assert _layout(mod) == "triton_w4a16"
    x = torch.randn(3, 64, requires_grad=True)
    with qtorch.use_backend("triton"):
        out = mod(x)
    assert_close(out, _reference(mod, x.detach()), torch.float32)
    with qtorch.use_backend("triton"):
        out.sum().backward()
    assert_close(x.grad, torch.ones(3, 40) @ mod.dequantize(), torch.float32)
    c = mod._canonical()
    mod._unpack()
    for key, t in c.items():
        assert torch.equal(t, mod._buffers[key])


def test_export_and_aot_inductor_call_the_kernel_and_follow_the_backend(monkeypatch, tmp_path):
    """torch.export + AOTInductor of a quantized model: with qtorch.inductor_options() the
    compiled code calls the op's C shim (no boxed custom-op call); the result equals eager and
    the backend choice still holds per call."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    qtorch.quantize_(m, CONFIGS["w4a16"])
    x = torch.randn(3, 64)
    with torch.no_grad():
        eager = m(x)
        ep = torch.export.export(m, (x,))
        pkg = torch._inductor.aoti_compile_and_package(
            ep, package_path=str(tmp_path / "m.pt2"), inductor_configs=qtorch.inductor_options()
        )
        run = torch._inductor.aoti_load_package(pkg)
        assert_close(run(x), eager, torch.float32)
        seen = []
        real = qtorch._backend._KERNELS["int4_weight_only_linear"]["reference"]
        monkeypatch.setitem(
            qtorch._backend._KERNELS["int4_weight_only_linear"],
            "reference",
            lambda *a: seen.append(1) or real(*a),
        )
        with qtorch.use_backend("reference"):
            assert_close(run(x), eager, torch.float32)
        assert seen == [1, 1]
