"""Plumbing shared by the op families: the kernel lookup, argument normalization, the linear
call and its autograd helpers, and the public-function wrapper that `qtorch/ops/__init__.py`
puts around each custom op (with the C++ eager fast path of the CPU linears)."""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor

from qtorch import _backend
from qtorch import _checks as chk

_FLOATS = frozenset(chk.FLOAT_DTYPES)


def _kernel(op: str, device: torch.device):
    return _backend.resolve(op, device)[1]


def _rows(x: Tensor) -> Tensor:
    """[..., K] -> contiguous [M, K]."""
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    return x.contiguous()


def _vec(t: Tensor) -> Tensor:
    """[N] or [N, 1] -> contiguous [N]."""
    return (t if t.dim() == 1 else t.reshape(-1)).contiguous()


def _c(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


# ------------------------------------------------------------------------ custom-op helpers

# The implementation function of each op (checks + kernel call), keyed by its CustomOpDef,
# kept before `torch.library.custom_op` wraps it: `_public` calls it directly in plain eager.
_IMPLS: dict = {}


def _custom_op(qualname: str, fn=None, *, mutates_args=(), schema: str | None = None):
    """`torch.library.custom_op(qualname, fn, ...)` (also as a decorator) that remembers `fn`."""

    def define(fn):
        op = torch.library.custom_op(qualname, fn, mutates_args=mutates_args, schema=schema)
        _IMPLS[op] = fn
        return op

    return define if fn is None else define(fn)


# ------------------------------------------------------------------------------ the linears


def _linear_call(op: str, x: Tensor, n: int, *weights, bias=None) -> Tensor:
    out_shape = (*x.shape[:-1], n)
    if x.numel() == 0:
        return torch.empty(out_shape, dtype=x.dtype, device=x.device)
    b = None if bias is None else bias.to(x.dtype).contiguous()
    out = _kernel(op, x.device)(_rows(x), *weights, b)
    return out if x.dim() == 2 else out.reshape(out_shape)


def _setup_linear(ctx, inputs, output):
    x, *weights, bias = inputs
    ctx.save_for_backward(*weights)
    ctx.bias_grad = bias is not None and bias.requires_grad
    ctx.bias_dtype = None if bias is None else bias.dtype


def _bias_grad(ctx, grad):
    if not ctx.bias_grad:
        return None
    return grad.reshape(-1, grad.shape[-1]).float().sum(0).to(ctx.bias_dtype)


# int8_linear (W8A8) and int8_weight_only_linear (W8A16) take the same arguments:
# x [..., K] float, w_q [N, K] int8, w_scale [N] fp32, bias [N] or None.


def _int8_linear_ok(x, w_q, w_scale, bias) -> bool:
    """The common valid case in a few comparisons (the hot path at decode sizes); anything
    else goes through the detailed checks, which name what is wrong."""
    try:
        n, k = w_q.shape
        dev = x.device
        return (
            x.dtype in _FLOATS
            and w_q.dtype is torch.int8
            and w_scale.dtype is torch.float32
            and x.dim() >= 1
            and x.shape[-1] == k
            and k > 0
            and n > 0
            and w_scale.dim() == 1
            and w_scale.shape[0] == n
            and w_q.device == dev
            and w_scale.device == dev
            and (
                bias is None
                or (
                    bias.dtype in _FLOATS
                    and bias.dim() == 1
                    and bias.shape[0] == n
                    and bias.device == dev
                )
            )
        )
    except (AttributeError, TypeError, ValueError):
        return False


def _check_int8_linear(x, w_q, w_scale, bias) -> None:
    if _int8_linear_ok(x, w_q, w_scale, bias):
        return
    for name, t in (("x", x), ("w_q", w_q), ("w_scale", w_scale)):
        chk.tensor(name, t)
    chk.dtype_in("x", x, chk.FLOAT_DTYPES)
    chk.min_ndim("x", x, 1)
    chk.dtype_in("w_q", w_q, (torch.int8,))
    chk.ndim("w_q", w_q, 2)
    chk.dtype_in("w_scale", w_scale, (torch.float32,))
    if x.shape[-1] != w_q.shape[1]:
        raise ValueError(
            f"x [..., K] and w_q [N, K] must share K, got x {tuple(x.shape)} and w_q {tuple(w_q.shape)}"
        )
    chk.positive("K", w_q.shape[1])
    chk.positive("w_q.shape[0] (N)", w_q.shape[0])
    chk.vector("w_scale", w_scale, w_q.shape[0], "one per output channel")
    chk.bias(bias, w_q.shape[0])
    chk.same_device(x=x, w_q=w_q, w_scale=w_scale, bias=bias)


def _int8_linear_call(op: str, x, w_q, w_scale, bias) -> Tensor:
    _check_int8_linear(x, w_q, w_scale, bias)
    return _linear_call(op, x, w_q.shape[0], w_q.contiguous(), _vec(w_scale), bias=bias)


def _int8_linear_fake(x, w_q, w_scale, bias=None):
    _check_int8_linear(x, w_q, w_scale, bias)
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


_INT8_LINEAR_SCHEMA = "(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias=None) -> Tensor"


# ------------------------------------------------------------------------ public functions
#
# The dispatcher rejects a non-tensor where a Tensor is declared with a RuntimeError; the
# contract wants a TypeError naming the argument, so the public functions check that first.
# `torch.ops.qtorch.<name>` stays the op itself.
#
# Eager fast path: the dispatcher round trip (autograd wrapper, redispatch, dynamo-disable
# guard) costs ~25 µs a call, five times a W8A8 kernel at M=1. When no autograd, compile,
# fake tensor or dispatch mode can be involved, the public function runs the op's own
# implementation (the same checks and kernel) directly; otherwise it calls the op.


def _plain_eager(args, kwargs) -> bool:
    # torch._C private probes: torch has no public query for an active dispatch mode or
    # torch-function mode, and its public torch.jit.is_tracing() wraps this C call in a
    # Python frame, which this per-call test (the reason the fast path exists) cannot afford.
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() != 0:
        return False
    if torch._C._is_torch_function_mode_enabled() or torch._C._get_tracing_state() is not None:
        return False  # (a jit trace records the public op, not its kernel)
    grad = torch.is_grad_enabled()
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            if type(a) is not torch.Tensor or (grad and a.requires_grad):
                return False
    return True


def _public(opdef, fast=None):
    """The public function of `opdef` (made by `_custom_op`). `fast`: a C function that runs
    the common eager call on CPU tensors (valid arguments, the cpu backend in force; the weight
    packed for the call) and returns None for anything else (csrc/cpu/linear_packed.cpp);
    dynamo never traces into it."""
    fn = _IMPLS[opdef]
    sig = inspect.signature(fn)
    tensor_params = {
        n: "None" in str(p.annotation)
        for n, p in sig.parameters.items()
        if str(p.annotation).startswith("Tensor")
    }

    def slow(*args, **kwargs):
        if _plain_eager(args, kwargs):
            return fn(*args, **kwargs)  # the op's implementation: checks raise TypeError too
        bound = sig.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            if name in tensor_params:
                chk.tensor(name, value, optional=tensor_params[name])
        return opdef(*args, **kwargs)

    if fast is None:
        wrapper = functools.wraps(fn)(slow)
    else:

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not _is_compiling():
                out = fast(*args, **kwargs)
                if out is not None:
                    return out
            return slow(*args, **kwargs)

    wrapper.__module__ = "qtorch.ops"  # where the public function lives (and pickles from)
    wrapper.op = opdef
    return wrapper


_is_compiling = torch.compiler.is_compiling
try:  # the C++ eager fast path of the CPU linears (absent without the compiled extension)
    from qtorch import _C as _cext

    FAST = {
        "int8_linear": _cext.fast_int8_linear,
        "int8_weight_only_linear": _cext.fast_int8_weight_only_linear,
        "int4_weight_only_linear": _cext.fast_int4_weight_only_linear,
    }
except (ImportError, AttributeError):
    FAST = {}


def _check_loss_call_types(tensors: dict, num_items_in_batch, temperature, alpha, beta) -> None:
    """What the dispatcher would reject with a schema-mismatch RuntimeError, checked first so
    the error is a TypeError (or ValueError) naming the argument."""
    for name, (value, optional) in tensors.items():
        chk.tensor(name, value, optional=optional)
    chk.num_items_in_batch(num_items_in_batch)
    chk.loss_scalars(temperature, alpha, beta)
