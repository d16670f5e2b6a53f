"""Packed layouts and the op that quantized modules run on them.

A backend whose kernels want another layout than the canonical one (API.md) registers it here
as a `Layout`: how to pack the canonical buffers, how to unpack them again, and the kernels
that run on it. A quantized module (qtorch/nn/linear.py) owns at most one layout at a time, as
non-persistent buffers, and calls

    qtorch::linear_packed(x [..., K], w0, w1, w2?, bias [N]?, layout, N, K, group_size)
        -> [..., N] x.dtype
    qtorch::linear_packed_grad_input(grad [..., N], w0, w1, w2?, layout, N, K, group_size)
        -> [..., K] grad.dtype   (its backward w.r.t. x)

where w0, w1 (and w2) are the module's buffers that the layout names, in order (the `weight`
list of the Python helpers below). A w8a8 layout takes a third tensor too, SmoothQuant's
smooth_scale fp32 [K] (API.md "Calibrated quantization"), when the module has one: x / w2 is
what the kernel quantizes per token, and the backward divides dx by it. The backend choice
stays per call (API.md): the C++ CPU kernel (csrc/cpu/linear_packed.cpp) serves a cpu layout
when the cpu backend is in force; every other case comes to the Python kernel here, which runs
the layout's own kernel when its backend is the one in force, and otherwise unpacks to the
canonical buffers and calls the public op, which then runs whatever backend is chosen.

There are no caches: nothing here or in the backends keeps a packed form keyed by a tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from qtorch import _backend
from qtorch import _checks as chk

# family -> (the public op it computes, the op of its backward w.r.t. x, canonical buffers)
FAMILIES = {
    "w8a8": ("int8_linear", "int8_linear_grad_input", ("qweight", "weight_scale")),
    "w8a16": ("int8_weight_only_linear", "int8_linear_grad_input", ("qweight", "weight_scale")),
    "w4a16": ("int4_weight_only_linear", "int4_linear_grad_input", ("qweight", "scales", "zeros")),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    """A backend's layout of one family's weights.

    name:     e.g. "cpu_w4a16"; what the op receives
    family:   "w8a8", "w8a16" or "w4a16"
    backend:  the backend whose kernels run on it
    code:     the C fast path's code for it (csrc/cpu/linear_packed.cpp), or -1
    buffers:  the module buffers passed as `weight`, in order
    derived:  the canonical buffers the packed ones replace (the module drops them)
    pack:     (canonical: dict name -> Tensor, N, K, group_size) -> {packed buffer: Tensor}
    unpack:   (weight: list[Tensor], N, K, group_size) -> {derived canonical buffer: Tensor},
              bitwise what was packed
    run:      (x [M, K], weight, bias | None, N, K, group_size) -> [M, N] x.dtype
    grad_input: (grad [M, N], weight, N, K, group_size) -> [M, K] grad.dtype
    """

    name: str
    family: str
    backend: str
    code: int
    buffers: tuple[str, ...]
    derived: tuple[str, ...]
    pack: Callable
    unpack: Callable
    run: Callable
    grad_input: Callable

    def __reduce__(self):  # pickle / deepcopy refer to the registered layout by name
        return (layout_named, (self.name,))

    def canonical(self, weight, n: int, k: int, group_size: int) -> dict[str, Tensor]:
        """All canonical buffers of the family (derived ones unpacked, shared ones as given)."""
        out = dict(self.unpack(list(weight), n, k, group_size))
        for name, t in zip(self.buffers, weight):
            if name in FAMILIES[self.family][2]:
                out[name] = t
        return out


_LAYOUTS: dict[str, Layout] = {}
# (family, backend) -> layout, and (family, backend, dtype) -> a layout made for activations of
# that dtype (when the kernel's layout depends on it)
_BY_FAMILY: dict[tuple, Layout] = {}


def register_layout(layout: Layout, dtype: torch.dtype | None = None) -> Layout:
    _LAYOUTS[layout.name] = layout
    key = (
        (layout.family, layout.backend) if dtype is None else (layout.family, layout.backend, dtype)
    )
    _BY_FAMILY[key] = layout
    return layout


def layout_named(name: str) -> Layout:
    _backend.backend_status()  # backends register their layouts when they load
    try:
        return _LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown packed layout {name!r}") from None


def layout_for(
    family: str, device: torch.device, dtype: torch.dtype | None = None
) -> Layout | None:
    """The layout a module of `family` on `device`, computing in `dtype`, keeps: that of the
    backend "auto" picks there, or None (canonical) when that backend reads the canonical
    layout."""
    backend = _backend.auto_backend(device)
    return _BY_FAMILY.get((family, backend, dtype)) or _BY_FAMILY.get((family, backend))


# ---------------------------------------------------------------------------- the ops

_lib = torch.library.Library("qtorch", "FRAGMENT")
# The weights are separate arguments, not a Tensor[]: a list costs every call a conversion.
_SIZES = "str layout, int out_features, int in_features, int group_size"
_LINEAR = f"(Tensor x, Tensor w0, Tensor w1, Tensor? w2, Tensor? bias, {_SIZES}) -> Tensor"
_GRAD = f"(Tensor grad, Tensor w0, Tensor w1, Tensor? w2, {_SIZES}) -> Tensor"
_lib.define("linear_packed" + _LINEAR)
_lib.define("linear_packed_grad_input" + _GRAD)
# The Python kernels, as ops of their own so the C++ CPU kernel can hand a call to them.
_lib.define("_linear_packed_python" + _LINEAR)
_lib.define("_linear_packed_grad_input_python" + _GRAD)


def _check_x(x: Tensor, k: int, bias: Tensor | None, n: int, weight) -> None:
    chk.tensor("x", x)
    chk.dtype_in("x", x, chk.FLOAT_DTYPES)
    chk.min_ndim("x", x, 1)
    if x.shape[-1] != k:
        raise ValueError(f"x [..., K] must have K = in_features = {k}, got x {tuple(x.shape)}")
    chk.bias(bias, n)
    chk.same_device(x=x, weight=weight[0], bias=bias)


def _list(w0, w1, w2) -> list[Tensor]:
    return [w0, w1] if w2 is None else [w0, w1, w2]


def _smooth(lay: Layout, weight) -> Tensor | None:
    """SmoothQuant's smooth_scale, the third tensor of a w8a8 layout's call, or None."""
    return weight[2] if lay.family == "w8a8" and len(weight) > 2 else None


def flat(weight) -> tuple:
    """A layout's weight list as the ops' (w0, w1, w2) arguments."""
    return (weight[0], weight[1], weight[2] if len(weight) > 2 else None)


def _linear_packed_python(x, w0, w1, w2, bias, layout, n, k, group_size):
    weight = _list(w0, w1, w2)
    lay = layout_named(layout)
    _check_x(x, k, bias, n, weight)
    op = FAMILIES[lay.family][0]
    backend, _ = _backend.resolve(op, x.device)
    if backend != lay.backend:  # another backend in force: it reads the canonical buffers
        canon = lay.canonical(weight, n, k, group_size)
        args = [canon[name] for name in FAMILIES[lay.family][2]]
        if lay.family == "w4a16":
            args.append(group_size)
        if _smooth(lay, weight) is not None:
            return torch.ops.qtorch.int8_linear_smooth(x, *args, weight[2], bias)
        return getattr(torch.ops.qtorch, op)(x, *args, bias)
    shape = (*x.shape[:-1], n)
    if x.numel() == 0:
        return x.new_empty(shape)
    b = None if bias is None else bias.to(x.dtype)
    return lay.run(x.reshape(-1, k), list(weight), b, n, k, group_size).reshape(shape)


def _linear_packed_grad_input_python(grad, w0, w1, w2, layout, n, k, group_size):
    weight = _list(w0, w1, w2)
    lay = layout_named(layout)
    op = FAMILIES[lay.family][1]
    backend, _ = _backend.resolve(op, grad.device)
    if backend != lay.backend:
        canon = lay.canonical(weight, n, k, group_size)
        if lay.family == "w4a16":
            return torch.ops.qtorch.int4_linear_grad_input(
                grad, canon["qweight"], canon["scales"], canon["zeros"], group_size
            )
        g = torch.ops.qtorch.int8_linear_grad_input(grad, canon["qweight"], canon["weight_scale"])
        s = _smooth(lay, weight)
        return g if s is None else (g.float() / s).to(g.dtype)  # y = (x / s) ŵᵀ
    shape = (*grad.shape[:-1], k)
    if grad.numel() == 0:
        return grad.new_zeros(shape)
    return lay.grad_input(grad.reshape(-1, n), list(weight), n, k, group_size).reshape(shape)


for _name, _fn in (
    ("_linear_packed_python", _linear_packed_python),
    ("_linear_packed_grad_input_python", _linear_packed_grad_input_python),
):
    _lib.impl(_name, _fn, "CompositeExplicitAutograd")
# Without the C++ CPU kernel (and on every other device) the public ops are served by the
# Python kernels too; where the C++ kernel is registered for CPU it takes precedence.
_lib.impl("linear_packed", _linear_packed_python, "CompositeExplicitAutograd")
_lib.impl("linear_packed_grad_input", _linear_packed_grad_input_python, "CompositeExplicitAutograd")


def _fake(x, w0, w1, w2, bias, layout, n, k, group_size):
    _check_x(x, k, bias, n, [w0])
    return x.new_empty((*x.shape[:-1], n))


def _fake_grad(grad, w0, w1, w2, layout, n, k, group_size):
    return grad.new_empty((*grad.shape[:-1], k))


for _name, _fn in (
    ("linear_packed", _fake),
    ("_linear_packed_python", _fake),
    ("linear_packed_grad_input", _fake_grad),
    ("_linear_packed_grad_input_python", _fake_grad),
):
    torch.library.register_fake(f"qtorch::{_name}", _fn, lib=_lib)


def _setup(ctx, inputs, output):
    x, w0, w1, w2, bias, layout, n, k, group_size = inputs
    ctx.save_for_backward(w0, w1, w2)
    ctx.meta = (layout, n, k, group_size)
    ctx.bias_grad = bias is not None and bias.requires_grad
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    layout, n, k, group_size = ctx.meta
    gx = gb = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.qtorch.linear_packed_grad_input(
            grad, *ctx.saved_tensors, layout, n, k, group_size
        )
    if ctx.bias_grad:
        gb = grad.reshape(-1, n).float().sum(0).to(ctx.bias_dtype)
    return gx, None, None, None, gb, None, None, None, None


torch.library.register_autograd("qtorch::linear_packed", _backward, setup_context=_setup, lib=_lib)


# ------------------------------------------------------------ Inductor's direct call of the op

_C_SHIM = (
    "AOTITorchError aoti_torch_cpu_linear_packed(AtenTensorHandle x, AtenTensorHandle w0, "
    "AtenTensorHandle w1, AtenTensorHandle* w2, AtenTensorHandle* bias, const char* layout, "
    "int64_t N, int64_t K, int64_t group_size, AtenTensorHandle* ret0)"
)


def inductor_options() -> dict:
    """Inductor options under which AOTInductor (`torch._inductor.aoti_compile_and_package(ep,
    inductor_configs=qtorch.inductor_options())`) and Inductor's C++ wrapper
    (`torch.compile(m, options={**qtorch.inductor_options(), "cpp_wrapper": True})`) call the
    quantized modules' CPU kernel through its C shim (csrc/cpu/linear_packed.cpp) instead of
    their generic boxed custom-op call, which at decode sizes costs more than the kernel.
    The compiled code then needs qtorch imported in the process that runs it."""
    return {
        "aot_inductor.custom_ops_to_c_shims": {torch.ops.qtorch.linear_packed.default: [_C_SHIM]}
    }
