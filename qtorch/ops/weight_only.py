"""Weight-only ops: int8_weight_only_linear (W8A16), quantize_int4, dequantize_int4,
int4_weight_only_linear (W4A16), and the linear backward helpers int8_linear_grad_input and
int4_linear_grad_input, which are weight-only GEMMs (definitions:
`qtorch.reference.weight_only`). The public functions are made in `qtorch/ops/__init__.py`;
the two backward helpers have none (`torch.ops.qtorch.*` only)."""

from __future__ import annotations

import torch
from torch import Tensor

from qtorch import _checks as chk
from qtorch.ops._common import (
    _FLOATS,
    _INT8_LINEAR_SCHEMA,
    _bias_grad,
    _custom_op,
    _int8_linear_call,
    _int8_linear_fake,
    _kernel,
    _linear_call,
    _rows,
    _setup_linear,
)

# ------------------------------------------------------------------------------ W8A16


@_custom_op("qtorch::int8_weight_only_linear", schema=_INT8_LINEAR_SCHEMA)
def int8_weight_only_linear(
    x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None
) -> Tensor:
    """W8A16: x [..., K] @ (w_q * w_scale[:, None]).T + bias, in x.dtype (fp32
    accumulation). Differentiable w.r.t. x and bias."""
    return _int8_linear_call("int8_weight_only_linear", x, w_q, w_scale, bias)


int8_weight_only_linear.register_fake(_int8_linear_fake)


@_custom_op("qtorch::int8_linear_grad_input")
def int8_linear_grad_input(grad_out: Tensor, w_q: Tensor, w_scale: Tensor) -> Tensor:
    """grad_out [..., N] @ (w_q * w_scale[:, None]) -> [..., K] in grad_out.dtype (the
    backward of both int8 linears w.r.t. x)."""
    _check_int8_grad_input(grad_out, w_q, w_scale)
    k = w_q.shape[1]
    if grad_out.numel() == 0:
        return grad_out.new_zeros((*grad_out.shape[:-1], k))
    fn = _kernel("int8_linear_grad_input", grad_out.device)
    return fn(_rows(grad_out), w_q.contiguous(), w_scale.reshape(-1).contiguous()).reshape(
        *grad_out.shape[:-1], k
    )


def _check_grad_out(grad_out, n: int, name_of_n: str) -> None:
    chk.tensor("grad_out", grad_out)
    chk.dtype_in("grad_out", grad_out, chk.FLOAT_DTYPES)
    chk.min_ndim("grad_out", grad_out, 1)
    if grad_out.shape[-1] != n:
        raise ValueError(
            f"grad_out [..., N] must have N = {name_of_n} = {n}, got grad_out "
            f"{tuple(grad_out.shape)}"
        )


def _check_int8_grad_input(grad_out, w_q, w_scale) -> None:
    for name, t in (("w_q", w_q), ("w_scale", w_scale)):
        chk.tensor(name, t)
    chk.dtype_in("w_q", w_q, (torch.int8,))
    chk.ndim("w_q", w_q, 2)
    chk.dtype_in("w_scale", w_scale, (torch.float32,))
    chk.positive("w_q.shape[1] (K)", w_q.shape[1])
    chk.vector("w_scale", w_scale, w_q.shape[0], "one per output channel")
    _check_grad_out(grad_out, w_q.shape[0], "w_q.shape[0]")
    chk.same_device(grad_out=grad_out, w_q=w_q, w_scale=w_scale)


@int8_linear_grad_input.register_fake
def _(grad_out, w_q, w_scale):
    _check_int8_grad_input(grad_out, w_q, w_scale)
    return grad_out.new_empty((*grad_out.shape[:-1], w_q.shape[1]))


def _int8_linear_backward(ctx, grad):
    """Backward of int8_weight_only_linear and of int8_linear (W8A8: the activation
    quantization is straight-through, so d/dx is this weight-only GEMM too)."""
    w_q, w_scale = ctx.saved_tensors
    gx = int8_linear_grad_input(grad, w_q, w_scale) if ctx.needs_input_grad[0] else None
    return gx, None, None, _bias_grad(ctx, grad)


int8_weight_only_linear.register_autograd(_int8_linear_backward, setup_context=_setup_linear)


# ------------------------------------------------------------------------------------- int4


def _check_quantize_int4(w, group_size, symmetric, zero_point="int") -> None:
    chk.zero_point(zero_point, symmetric)
    chk.tensor("w", w)
    chk.dtype_in("w", w, chk.FLOAT_DTYPES)
    chk.ndim("w", w, 2)
    chk.group_size(group_size)
    chk.positive("w.shape[0] (N)", w.shape[0])
    if w.shape[1] == 0 or w.shape[1] % group_size:
        raise ValueError(
            f"w [N, K] needs K divisible by group_size={group_size}, got shape {tuple(w.shape)}"
        )


@_custom_op("qtorch::quantize_int4")
def quantize_int4(
    w: Tensor, group_size: int = 128, symmetric: bool = False, zero_point: str = "int"
) -> tuple[Tensor, Tensor, Tensor]:
    """w [N, K] float -> (qweight uint8 [N, K//2], scales fp32 [N, K//gs], zeros [N, K//gs])
    in canonical storage (API.md); zeros uint8 with zero_point="int", float32 with "float"."""
    _check_quantize_int4(w, group_size, symmetric, zero_point)
    return _kernel("quantize_int4", w.device)(w.contiguous(), group_size, symmetric, zero_point)


@quantize_int4.register_fake
def _(w, group_size=128, symmetric=False, zero_point="int"):
    _check_quantize_int4(w, group_size, symmetric, zero_point)
    n, k = w.shape
    g = k // group_size
    zdt = torch.float32 if zero_point == "float" else torch.uint8
    return (
        w.new_empty((n, k // 2), dtype=torch.uint8),
        w.new_empty((n, g), dtype=torch.float32),
        w.new_empty((n, g), dtype=zdt),
    )


def _check_int4_weights(qweight, scales, zeros, group_size) -> None:
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        chk.tensor(name, t)
    chk.group_size(group_size)
    chk.dtype_in("qweight", qweight, (torch.uint8,))
    chk.dtype_in("scales", scales, (torch.float32,))
    chk.dtype_in("zeros", zeros, chk.INT4_ZERO_DTYPES)
    chk.ndim("qweight", qweight, 2)
    n, k = qweight.shape[0], qweight.shape[1] * 2
    chk.positive("qweight.shape[0] (N)", n)
    if k == 0 or k % group_size:
        raise ValueError(
            f"qweight [N, K//2] needs K={k} divisible by group_size={group_size}, "
            f"got shape {tuple(qweight.shape)}"
        )
    chk.shape("scales", scales, (n, k // group_size), "[N, K // group_size]")
    chk.shape("zeros", zeros, (n, k // group_size), "[N, K // group_size]")
    chk.same_device(qweight=qweight, scales=scales, zeros=zeros)


@_custom_op("qtorch::dequantize_int4")
def dequantize_int4(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """Canonical int4 storage -> ŵ = (q - zero) * scale, fp32 [N, K]."""
    _check_int4_weights(qweight, scales, zeros, group_size)
    return _kernel("dequantize_int4", qweight.device)(
        qweight.contiguous(), scales.contiguous(), zeros.contiguous(), group_size
    )


@dequantize_int4.register_fake
def _(qweight, scales, zeros, group_size):
    _check_int4_weights(qweight, scales, zeros, group_size)
    return qweight.new_empty((qweight.shape[0], qweight.shape[1] * 2), dtype=torch.float32)


def _int4_linear_ok(x, qweight, scales, zeros, group_size, bias) -> bool:
    """The common valid case in a few comparisons (see `_common._int8_linear_ok`)."""
    try:
        n, half_k = qweight.shape
        k = 2 * half_k
        dev = x.device
        return (
            type(group_size) is int
            and group_size in chk.INT4_GROUP_SIZES
            and k > 0
            and n > 0
            and k % group_size == 0
            and x.dtype in _FLOATS
            and qweight.dtype is torch.uint8
            and scales.dtype is torch.float32
            and (zeros.dtype is torch.uint8 or zeros.dtype is torch.float32)
            and x.dim() >= 1
            and x.shape[-1] == k
            and scales.shape == (n, k // group_size)
            and zeros.shape == (n, k // group_size)
            and qweight.device == dev
            and scales.device == dev
            and zeros.device == dev
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


def _check_int4_linear(x, qweight, scales, zeros, group_size, bias) -> None:
    if _int4_linear_ok(x, qweight, scales, zeros, group_size, bias):
        return
    chk.tensor("x", x)
    _check_int4_weights(qweight, scales, zeros, group_size)
    chk.dtype_in("x", x, chk.FLOAT_DTYPES)
    chk.min_ndim("x", x, 1)
    if x.shape[-1] != qweight.shape[1] * 2:
        raise ValueError(
            f"x [..., K] must have K = 2 * qweight.shape[1] = {qweight.shape[1] * 2}, "
            f"got x {tuple(x.shape)} and qweight {tuple(qweight.shape)}"
        )
    chk.bias(bias, qweight.shape[0])
    chk.same_device(x=x, qweight=qweight, bias=bias)


@_custom_op("qtorch::int4_weight_only_linear")
def int4_weight_only_linear(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_size: int,
    bias: Tensor | None = None,
) -> Tensor:
    """W4A16: x [..., K] @ ŵ.T + bias, in x.dtype (fp32 accumulation). Differentiable w.r.t. x
    and bias."""
    _check_int4_linear(x, qweight, scales, zeros, group_size, bias)
    return _linear_call(
        "int4_weight_only_linear",
        x,
        qweight.shape[0],
        qweight.contiguous(),
        scales.contiguous(),
        zeros.contiguous(),
        group_size,
        bias=bias,
    )


@int4_weight_only_linear.register_fake
def _(x, qweight, scales, zeros, group_size, bias=None):
    _check_int4_linear(x, qweight, scales, zeros, group_size, bias)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@_custom_op("qtorch::int4_linear_grad_input")
def int4_linear_grad_input(
    grad_out: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int
) -> Tensor:
    """grad_out [..., N] @ ŵ -> [..., K] in grad_out.dtype (backward of the W4A16 linear)."""
    _check_int4_grad_input(grad_out, qweight, scales, zeros, group_size)
    k = qweight.shape[1] * 2
    if grad_out.numel() == 0:
        return grad_out.new_zeros((*grad_out.shape[:-1], k))
    fn = _kernel("int4_linear_grad_input", grad_out.device)
    out = fn(
        _rows(grad_out), qweight.contiguous(), scales.contiguous(), zeros.contiguous(), group_size
    )
    return out.reshape(*grad_out.shape[:-1], k)


def _check_int4_grad_input(grad_out, qweight, scales, zeros, group_size) -> None:
    _check_int4_weights(qweight, scales, zeros, group_size)
    _check_grad_out(grad_out, qweight.shape[0], "qweight.shape[0]")
    chk.same_device(grad_out=grad_out, qweight=qweight)


@int4_linear_grad_input.register_fake
def _(grad_out, qweight, scales, zeros, group_size):
    _check_int4_grad_input(grad_out, qweight, scales, zeros, group_size)
    return grad_out.new_empty((*grad_out.shape[:-1], qweight.shape[1] * 2))


def _setup_int4_linear(ctx, inputs, output):
    x, qweight, scales, zeros, group_size, bias = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.group_size = group_size
    ctx.bias_grad = bias is not None and bias.requires_grad
    ctx.bias_dtype = None if bias is None else bias.dtype


def _int4_linear_backward(ctx, grad):
    qweight, scales, zeros = ctx.saved_tensors
    gx = None
    if ctx.needs_input_grad[0]:
        gx = int4_linear_grad_input(grad, qweight, scales, zeros, ctx.group_size)
    return gx, None, None, None, None, _bias_grad(ctx, grad)


int4_weight_only_linear.register_autograd(_int4_linear_backward, setup_context=_setup_int4_linear)
