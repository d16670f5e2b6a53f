"""The qtorch ops: `torch.library` custom ops in namespace `qtorch`.

Each op checks its arguments (metadata only, so the fake impl raises the same errors),
flattens leading dims, makes inputs contiguous, asks `qtorch._backend` which kernel runs for
this call, and restores the leading dims. The kernel signatures are in
`qtorch/backends/__init__.py`; the numerics are defined by `qtorch.reference`.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
from torch import Tensor

from qtorch import _backend
from qtorch import _checks as chk
from qtorch.reference.distillation import DIVERGENCES, default_chunk_size

__all__ = [
    "quantize_int8",
    "int8_scaled_mm",
    "int8_linear",
    "int8_weight_only_linear",
    "quantize_int4",
    "dequantize_int4",
    "int4_weight_only_linear",
    "distillation_loss",
    "fused_linear_distillation_loss",
]

_OUT_DTYPES = chk.FLOAT_DTYPES


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


# ----------------------------------------------------------------------------- quantize_int8


def _check_quantize_int8(x: Tensor) -> None:
    chk.tensor("x", x)
    chk.dtype_in("x", x, chk.FLOAT_DTYPES)
    chk.min_ndim("x", x, 1)
    chk.positive("x.shape[-1] (K)", x.shape[-1])


@torch.library.custom_op("qtorch::quantize_int8", mutates_args=())
def quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., K] fp32/fp16/bf16 -> (q [..., K] int8, scale [...] fp32), symmetric per row."""
    _check_quantize_int8(x)
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=torch.int8, device=x.device), torch.empty(
            x.shape[:-1], dtype=torch.float32, device=x.device
        )
    q, s = _kernel("quantize_int8", x.device)(_rows(x))
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


@quantize_int8.register_fake
def _(x):
    _check_quantize_int8(x)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


# ---------------------------------------------------------------------------- int8_scaled_mm


def _check_int8_scaled_mm(a, b, scale_a, scale_b, bias, out_dtype) -> None:
    for name, t in (("a", a), ("b", b), ("scale_a", scale_a), ("scale_b", scale_b)):
        chk.tensor(name, t)
    chk.dtype_in("a", a, (torch.int8,))
    chk.dtype_in("b", b, (torch.int8,))
    chk.ndim("a", a, 2)
    chk.ndim("b", b, 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"a [M, K] and b [N, K] must share K, got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )
    chk.positive("K", a.shape[1])
    chk.positive("b.shape[0] (N)", b.shape[0])
    chk.dtype_in("scale_a", scale_a, (torch.float32,))
    chk.dtype_in("scale_b", scale_b, (torch.float32,))
    chk.vector("scale_a", scale_a, a.shape[0], "one per row of a")
    chk.vector("scale_b", scale_b, b.shape[0], "one per row of b")
    chk.bias(bias, b.shape[0])
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of float32, float16, bfloat16, got {out_dtype}")
    chk.same_device(a=a, b=b, scale_a=scale_a, scale_b=scale_b, bias=bias)


@torch.library.custom_op("qtorch::int8_scaled_mm", mutates_args=())
def int8_scaled_mm(
    a: Tensor,
    b: Tensor,
    scale_a: Tensor,
    scale_b: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(a [M, K] int8 @ b [N, K].T in exact int32) * scale_a[:, None] * scale_b[None, :] + bias,
    as out_dtype [M, N]. 2-D only."""
    _check_int8_scaled_mm(a, b, scale_a, scale_b, bias, out_dtype)
    if a.shape[0] == 0:
        return torch.empty((0, b.shape[0]), dtype=out_dtype, device=a.device)
    fn = _kernel("int8_scaled_mm", a.device)
    bias32 = None if bias is None else bias.float().contiguous()
    return fn(a.contiguous(), b.contiguous(), scale_a.reshape(-1).contiguous(),
              scale_b.reshape(-1).contiguous(), bias32, out_dtype)


@int8_scaled_mm.register_fake
def _(a, b, scale_a, scale_b, bias=None, out_dtype=torch.float32):
    _check_int8_scaled_mm(a, b, scale_a, scale_b, bias, out_dtype)
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


# -------------------------------------------------------------------- int8 linears (W8A8, W8A16)


_FLOATS = frozenset(chk.FLOAT_DTYPES)


def _int8_linear_ok(x, w_q, w_scale, bias) -> bool:
    """The common valid case in a few comparisons (the hot path at decode sizes); anything
    else goes through the detailed checks, which name what is wrong."""
    try:
        n, k = w_q.shape
        dev = x.device
        return (
            x.dtype in _FLOATS and w_q.dtype is torch.int8 and w_scale.dtype is torch.float32
            and x.dim() >= 1 and x.shape[-1] == k and k > 0 and n > 0
            and w_scale.dim() == 1 and w_scale.shape[0] == n
            and w_q.device == dev and w_scale.device == dev
            and (bias is None or (bias.dtype in _FLOATS and bias.dim() == 1
                                  and bias.shape[0] == n and bias.device == dev))
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


def _linear_call(op: str, x: Tensor, n: int, *weights, bias=None) -> Tensor:
    out_shape = (*x.shape[:-1], n)
    if x.numel() == 0:
        return torch.empty(out_shape, dtype=x.dtype, device=x.device)
    b = None if bias is None else bias.to(x.dtype).contiguous()
    out = _kernel(op, x.device)(_rows(x), *weights, b)
    return out if x.dim() == 2 else out.reshape(out_shape)


def _int8_linear_fwd(op):
    def fwd(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
        _check_int8_linear(x, w_q, w_scale, bias)
        return _linear_call(op, x, w_q.shape[0], w_q.contiguous(), _vec(w_scale), bias=bias)

    return fwd


def _int8_linear_fake(x, w_q, w_scale, bias=None):
    _check_int8_linear(x, w_q, w_scale, bias)
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


int8_linear = torch.library.custom_op(
    "qtorch::int8_linear", _int8_linear_fwd("int8_linear"), mutates_args=(),
    schema="(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias=None) -> Tensor",
)
int8_linear.__doc__ = """Dynamic W8A8: x [..., K] fp32/fp16/bf16 quantized per token, int8 GEMM
with w_q [N, K] int8 / w_scale [N] fp32, + bias; result [..., N] in x.dtype. Differentiable
w.r.t. x (straight-through activation quantization) and bias."""
int8_linear.register_fake(_int8_linear_fake)

int8_weight_only_linear = torch.library.custom_op(
    "qtorch::int8_weight_only_linear", _int8_linear_fwd("int8_weight_only_linear"),
    mutates_args=(),
    schema="(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias=None) -> Tensor",
)
int8_weight_only_linear.__doc__ = """W8A16: x [..., K] @ (w_q * w_scale[:, None]).T + bias, in
x.dtype (fp32 accumulation). Differentiable w.r.t. x and bias."""
int8_weight_only_linear.register_fake(_int8_linear_fake)


@torch.library.custom_op("qtorch::int8_linear_grad_input", mutates_args=())
def int8_linear_grad_input(grad_out: Tensor, w_q: Tensor, w_scale: Tensor) -> Tensor:
    """grad_out [..., N] @ (w_q * w_scale[:, None]) -> [..., K] in grad_out.dtype (the
    backward of both int8 linears w.r.t. x)."""
    k = w_q.shape[1]
    if grad_out.numel() == 0:
        return grad_out.new_zeros((*grad_out.shape[:-1], k))
    fn = _kernel("int8_linear_grad_input", grad_out.device)
    return fn(_rows(grad_out), w_q.contiguous(), w_scale.reshape(-1).contiguous()).reshape(
        *grad_out.shape[:-1], k
    )


@int8_linear_grad_input.register_fake
def _(grad_out, w_q, w_scale):
    return grad_out.new_empty((*grad_out.shape[:-1], w_q.shape[1]))


def _setup_linear(ctx, inputs, output):
    x, *weights, bias = inputs
    ctx.save_for_backward(*weights)
    ctx.bias_grad = bias is not None and bias.requires_grad
    ctx.bias_dtype = None if bias is None else bias.dtype


def _bias_grad(ctx, grad):
    if not ctx.bias_grad:
        return None
    return grad.reshape(-1, grad.shape[-1]).float().sum(0).to(ctx.bias_dtype)


def _int8_linear_backward(ctx, grad):
    w_q, w_scale = ctx.saved_tensors
    gx = int8_linear_grad_input(grad, w_q, w_scale) if ctx.needs_input_grad[0] else None
    return gx, None, None, _bias_grad(ctx, grad)


int8_linear.register_autograd(_int8_linear_backward, setup_context=_setup_linear)
int8_weight_only_linear.register_autograd(_int8_linear_backward, setup_context=_setup_linear)


# ------------------------------------------------------------------------------------- int4


def _check_quantize_int4(w, group_size, symmetric) -> None:
    chk.tensor("w", w)
    chk.dtype_in("w", w, chk.FLOAT_DTYPES)
    chk.ndim("w", w, 2)
    chk.group_size(group_size)
    chk.positive("w.shape[0] (N)", w.shape[0])
    if w.shape[1] == 0 or w.shape[1] % group_size:
        raise ValueError(
            f"w [N, K] needs K divisible by group_size={group_size}, got shape {tuple(w.shape)}"
        )


@torch.library.custom_op("qtorch::quantize_int4", mutates_args=())
def quantize_int4(
    w: Tensor, group_size: int = 128, symmetric: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """w [N, K] float -> (qweight uint8 [N, K//2], scales fp32 [N, K//gs], zeros uint8 [N, K//gs])
    in canonical storage (API.md)."""
    _check_quantize_int4(w, group_size, symmetric)
    return _kernel("quantize_int4", w.device)(w.contiguous(), group_size, symmetric)


@quantize_int4.register_fake
def _(w, group_size=128, symmetric=False):
    _check_quantize_int4(w, group_size, symmetric)
    n, k = w.shape
    g = k // group_size
    return (w.new_empty((n, k // 2), dtype=torch.uint8), w.new_empty((n, g), dtype=torch.float32),
            w.new_empty((n, g), dtype=torch.uint8))


def _check_int4_weights(qweight, scales, zeros, group_size) -> None:
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        chk.tensor(name, t)
    chk.group_size(group_size)
    chk.dtype_in("qweight", qweight, (torch.uint8,))
    chk.dtype_in("scales", scales, (torch.float32,))
    chk.dtype_in("zeros", zeros, (torch.uint8,))
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


@torch.library.custom_op("qtorch::dequantize_int4", mutates_args=())
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
    """The common valid case in a few comparisons (see `_int8_linear_ok`)."""
    try:
        n, half_k = qweight.shape
        k = 2 * half_k
        dev = x.device
        return (
            type(group_size) is int and group_size in chk.INT4_GROUP_SIZES
            and k > 0 and n > 0 and k % group_size == 0
            and x.dtype in _FLOATS and qweight.dtype is torch.uint8
            and scales.dtype is torch.float32 and zeros.dtype is torch.uint8
            and x.dim() >= 1 and x.shape[-1] == k
            and scales.shape == (n, k // group_size) and zeros.shape == (n, k // group_size)
            and qweight.device == dev and scales.device == dev and zeros.device == dev
            and (bias is None or (bias.dtype in _FLOATS and bias.dim() == 1
                                  and bias.shape[0] == n and bias.device == dev))
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


@torch.library.custom_op("qtorch::int4_weight_only_linear", mutates_args=())
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
    return _linear_call("int4_weight_only_linear", x, qweight.shape[0], qweight.contiguous(),
                        scales.contiguous(), zeros.contiguous(), group_size, bias=bias)


@int4_weight_only_linear.register_fake
def _(x, qweight, scales, zeros, group_size, bias=None):
    _check_int4_linear(x, qweight, scales, zeros, group_size, bias)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("qtorch::int4_linear_grad_input", mutates_args=())
def int4_linear_grad_input(
    grad_out: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int
) -> Tensor:
    """grad_out [..., N] @ ŵ -> [..., K] in grad_out.dtype (backward of the W4A16 linear)."""
    k = qweight.shape[1] * 2
    if grad_out.numel() == 0:
        return grad_out.new_zeros((*grad_out.shape[:-1], k))
    fn = _kernel("int4_linear_grad_input", grad_out.device)
    out = fn(_rows(grad_out), qweight.contiguous(), scales.contiguous(), zeros.contiguous(),
             group_size)
    return out.reshape(*grad_out.shape[:-1], k)


@int4_linear_grad_input.register_fake
def _(grad_out, qweight, scales, zeros, group_size):
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


# ------------------------------------------------------------------------------ distillation
#
# Public ops are CompositeImplicitAutograd: they check, flatten, call an internal custom op
# that returns per-token losses together with the gradient (computed in the same pass over
# the logits, as Liger-Kernel does), and reduce. Autograd flows through the internal op,
# whose backward only rescales the saved gradient.

_REDUCTIONS = ("mean", "sum", "none")


def _check_loss_kwargs(temperature, alpha, divergence, beta, reduction, labels) -> None:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if labels is None and alpha != 1.0:
        raise ValueError(
            f"labels=None leaves no hard-label term, so alpha must be 1.0, got alpha={alpha!r}"
        )


def _check_labels(labels, lead: tuple, name_of_lead: str) -> None:
    if labels is None:
        return
    chk.tensor("labels", labels)
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(lead):
        raise ValueError(
            f"labels must have shape {tuple(lead)} ({name_of_lead} without the last dim), "
            f"got {tuple(labels.shape)}"
        )


def _check_num_items(num_items_in_batch) -> None:
    if num_items_in_batch is None:
        return
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.dim() != 0:
            raise ValueError(
                f"num_items_in_batch must be an int or a 0-dim tensor, got shape "
                f"{tuple(num_items_in_batch.shape)}"
            )
    elif not isinstance(num_items_in_batch, int) or isinstance(num_items_in_batch, bool):
        raise TypeError(
            f"num_items_in_batch must be an int or a 0-dim tensor, got {type(num_items_in_batch).__name__}"
        )
    elif num_items_in_batch < 0:
        raise ValueError(f"num_items_in_batch must be >= 0, got {num_items_in_batch}")


def _loss_kernel(op: str, x: Tensor):
    # float64 (gradcheck) runs the reference in float64; kernels take fp32/fp16/bf16.
    if x.dtype == torch.float64:
        return _backend.reference_kernel(op)
    return _kernel(op, x.device)


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _reduce(tok: Tensor, valid_count, reduction: str, num_items_in_batch) -> Tensor:
    """Per-token losses [M] -> the reduced loss. Zero counted tokens (or a zero
    num_items_in_batch) give 0 and zero gradients, never NaN."""
    if reduction == "none":
        return tok
    total = tok.sum()
    if reduction == "sum":
        return total
    denom = valid_count if num_items_in_batch is None else num_items_in_batch
    if isinstance(denom, torch.Tensor):
        denom = denom.to(device=total.device, dtype=total.dtype)
        safe = torch.where(denom == 0, torch.ones_like(denom), denom)
        return torch.where(denom == 0, torch.zeros_like(total), total / safe)
    return total / denom if denom != 0 else total * 0.0


@torch.library.custom_op("qtorch::_distillation_loss_fwd", mutates_args=())
def _distillation_loss_fwd(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor | None,
    temperature: float,
    alpha: float,
    divergence: str,
    beta: float,
    ignore_index: int,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    """[M, V] logits -> (per-token loss [M], d loss_i / d student_i [M, V] or an empty tensor)."""
    fn = _loss_kernel("distillation_loss", student)
    loss, grad = fn(student.contiguous(), teacher.contiguous(), _c(labels), temperature, alpha,
                    divergence, beta, ignore_index, compute_grad)
    if grad is None:
        grad = student.new_empty((0,))
    return loss, grad


@_distillation_loss_fwd.register_fake
def _(student, teacher, labels, temperature, alpha, divergence, beta, ignore_index, compute_grad):
    acc = _acc_dtype(student)
    grad_shape = student.shape if compute_grad else (0,)
    return student.new_empty(student.shape[:1], dtype=acc), student.new_empty(grad_shape)


def _distill_setup(ctx, inputs, output):
    # Only the loss carries a gradient; materialized grads would fill a zero [M, V] tensor for
    # the saved-gradient output on every backward (54 ms of a 145 ms backward at 2048 x 32000).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])


def _distill_backward(ctx, grad_loss, _grad_grad):
    if grad_loss is None:  # the loss is not in the graph that is being differentiated
        return (None,) * 9
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0 and grad_loss.numel() != 0:
        raise RuntimeError("distillation_loss: backward needs compute_grad=True in forward")
    g = grad * grad_loss[:, None].to(grad.dtype)
    return g, None, None, None, None, None, None, None, None


_distillation_loss_fwd.register_autograd(_distill_backward, setup_context=_distill_setup)


def _labels_flat(labels: Tensor | None) -> Tensor | None:
    return None if labels is None else labels.reshape(-1).to(torch.int64)


def _valid_count(labels: Tensor | None, ignore_index: int, m: int):
    return m if labels is None else (labels != ignore_index).sum()


_DISTILL_SCHEMA_KW = (
    "float temperature=1.0, float alpha=0.5, str divergence=\"kl\", float beta=0.5, "
    "int ignore_index=-100, str reduction=\"mean\""
)

_lib = torch.library.Library("qtorch", "FRAGMENT")
_lib.define(
    "distillation_loss(Tensor student_logits, Tensor teacher_logits, Tensor? labels=None, *, "
    + _DISTILL_SCHEMA_KW + ", Tensor? num_items_in_batch=None) -> Tensor"
)
_lib.define(
    "distillation_loss.int_items(Tensor student_logits, Tensor teacher_logits, "
    "Tensor? labels=None, *, " + _DISTILL_SCHEMA_KW + ", int num_items_in_batch) -> Tensor"
)


def _check_distillation(student_logits, teacher_logits, labels, temperature, alpha, divergence,
                        beta, reduction, num_items_in_batch) -> None:
    chk.tensor("student_logits", student_logits)
    chk.tensor("teacher_logits", teacher_logits)
    allowed = (*chk.FLOAT_DTYPES, torch.float64)
    chk.dtype_in("student_logits", student_logits, allowed)
    chk.dtype_in("teacher_logits", teacher_logits, allowed)
    chk.min_ndim("student_logits", student_logits, 1)
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"student and teacher vocab sizes must match: student_logits {tuple(student_logits.shape)}"
            f" vs teacher_logits {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    chk.positive("student_logits.shape[-1] (V)", student_logits.shape[-1])
    _check_labels(labels, student_logits.shape[:-1], "student_logits")
    _check_loss_kwargs(temperature, alpha, divergence, beta, reduction, labels)
    _check_num_items(num_items_in_batch)
    chk.same_device(student_logits=student_logits, teacher_logits=teacher_logits, labels=labels)


def _distillation_loss_impl(
    student_logits, teacher_logits, labels=None, *, temperature=1.0, alpha=0.5, divergence="kl",
    beta=0.5, ignore_index=-100, reduction="mean", num_items_in_batch=None,
):
    _check_distillation(student_logits, teacher_logits, labels, temperature, alpha, divergence,
                        beta, reduction, num_items_in_batch)
    lead = student_logits.shape[:-1]
    v = student_logits.shape[-1]
    s = student_logits.reshape(-1, v)
    t = teacher_logits.reshape(-1, v).to(s.dtype)  # the kernels take one logits dtype
    lab = _labels_flat(labels)
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    tok, _ = torch.ops.qtorch._distillation_loss_fwd(
        s, t, lab, float(temperature), float(alpha), divergence, float(beta), int(ignore_index),
        compute_grad,
    )
    out = _reduce(tok, _valid_count(lab, ignore_index, s.shape[0]), reduction, num_items_in_batch)
    return out.reshape(lead) if reduction == "none" else out


for _overload in ("distillation_loss", "distillation_loss.int_items"):
    _lib.impl(_overload, _distillation_loss_impl, "CompositeImplicitAutograd")


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    divergence: str = "kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    """Knowledge-distillation loss (API.md): alpha · T² · D(teacher, student) + (1 − alpha) · CE.

    student_logits, teacher_logits [..., V] (fp32/fp16/bf16; float64 computes in float64),
    labels [...] integer or None. Returns a float32 scalar ("mean"/"sum") or per-token [...]
    ("none"); differentiable w.r.t. student_logits, the gradient in the student's dtype.
    """
    _check_loss_call_types({"student_logits": (student_logits, False),
                            "teacher_logits": (teacher_logits, False), "labels": (labels, True)},
                           num_items_in_batch)
    return torch.ops.qtorch.distillation_loss(
        student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha,
        divergence=divergence, beta=beta, ignore_index=ignore_index, reduction=reduction,
        num_items_in_batch=num_items_in_batch,
    )


# ------------------------------------------------------------------ fused linear distillation


def _fused_denominator(labels, ignore_index, m, num_items_t, num_items_i) -> float:
    if num_items_t is not None:
        return float(num_items_t.item())
    if num_items_i >= 0:
        return float(num_items_i)
    return float(m if labels is None else int((labels != ignore_index).sum()))


@torch.library.custom_op("qtorch::_fused_linear_distillation_loss_fwd", mutates_args=())
def _fused_linear_distillation_loss_fwd(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor | None,
    student_bias: Tensor | None,
    teacher_bias: Tensor | None,
    temperature: float,
    alpha: float,
    divergence: str,
    beta: float,
    ignore_index: int,
    reduction: str,
    num_items_t: Tensor | None,
    num_items_i: int,
    chunk_size: int,
    compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """[M, H] hidden states -> (loss, grad_hidden, grad_weight, grad_bias); the loss is reduced
    ("mean"/"sum": grads of the reduced loss) or per token ("none": no grads here, the backward
    recomputes them weighted by the incoming per-token gradient). Absent grads are empty."""
    m = student_hidden.shape[0]
    fn = _loss_kernel("fused_linear_distillation_loss", student_hidden)
    token_scale = None
    if reduction == "mean":
        denom = _fused_denominator(labels, ignore_index, m, num_items_t, num_items_i)
        scale = 0.0 if denom == 0 else 1.0 / denom
        token_scale = torch.full((m,), scale, dtype=_acc_dtype(student_hidden),
                                 device=student_hidden.device)
    compute_grad = compute_grad and reduction != "none"
    tok, gh, gw, gb = fn(
        student_hidden.contiguous(), student_weight.contiguous(), teacher_hidden.contiguous(),
        teacher_weight.contiguous(), _c(labels), _c(student_bias), _c(teacher_bias), token_scale,
        chunk_size, temperature, alpha, divergence, beta, ignore_index, compute_grad,
    )
    if reduction == "none":
        loss = tok
    elif reduction == "sum":
        loss = tok.sum()
    else:
        loss = (tok * token_scale.to(tok.dtype)).sum()
    def empty():
        return student_hidden.new_empty((0,))  # custom-op outputs must not alias each other

    return (loss, empty() if gh is None else gh, empty() if gw is None else gw,
            empty() if gb is None else gb)


@_fused_linear_distillation_loss_fwd.register_fake
def _(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
      teacher_bias, temperature, alpha, divergence, beta, ignore_index, reduction, num_items_t,
      num_items_i, chunk_size, compute_grad):
    acc = _acc_dtype(student_hidden)
    m = student_hidden.shape[0]
    loss = student_hidden.new_empty((m,) if reduction == "none" else (), dtype=acc)
    grads = compute_grad and reduction != "none"
    gh = student_hidden.new_empty(student_hidden.shape if grads else (0,))
    gw = student_weight.new_empty(student_weight.shape if grads else (0,))
    gb = (student_bias.new_empty(student_bias.shape) if grads and student_bias is not None
          else student_hidden.new_empty((0,)))
    return loss, gh, gw, gb


@torch.library.custom_op("qtorch::_fused_linear_distillation_loss_bwd", mutates_args=())
def _fused_linear_distillation_loss_bwd(
    grad_loss: Tensor,
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor | None,
    student_bias: Tensor | None,
    teacher_bias: Tensor | None,
    temperature: float,
    alpha: float,
    divergence: str,
    beta: float,
    ignore_index: int,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """reduction="none" backward: grads of Σ_i grad_loss[i] · loss_i, recomputed chunk by chunk."""
    fn = _loss_kernel("fused_linear_distillation_loss", student_hidden)
    _, gh, gw, gb = fn(
        student_hidden.contiguous(), student_weight.contiguous(), teacher_hidden.contiguous(),
        teacher_weight.contiguous(), _c(labels), _c(student_bias), _c(teacher_bias),
        grad_loss.to(_acc_dtype(student_hidden)).contiguous(), chunk_size, temperature, alpha, divergence, beta,
        ignore_index, True,
    )
    return gh, gw, student_hidden.new_empty((0,)) if gb is None else gb


@_fused_linear_distillation_loss_bwd.register_fake
def _(grad_loss, student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
      student_bias, teacher_bias, temperature, alpha, divergence, beta, ignore_index, chunk_size):
    gb = (student_bias.new_empty(student_bias.shape) if student_bias is not None
          else student_hidden.new_empty((0,)))
    return student_hidden.new_empty(student_hidden.shape), student_weight.new_empty(
        student_weight.shape), gb


def _fused_setup(ctx, inputs, output):
    (sh, sw, th, tw, labels, sb, tb, temperature, alpha, divergence, beta, ignore_index,
     reduction, _nt, _ni, chunk_size, _cg) = inputs
    ctx.set_materialize_grads(False)  # no zero tensors for the saved-gradient outputs
    ctx.reduction = reduction
    ctx.has_bias = sb is not None
    if reduction == "none":
        ctx.save_for_backward(sh, sw, th, tw, labels, sb, tb)
        ctx.args = (temperature, alpha, divergence, beta, ignore_index, chunk_size)
    else:
        ctx.save_for_backward(output[1], output[2], output[3])


def _fused_backward(ctx, grad_loss, *_):
    if grad_loss is None:  # the loss is not in the graph that is being differentiated
        return (None,) * 17
    if ctx.reduction == "none":
        sh, sw, th, tw, labels, sb, tb = ctx.saved_tensors
        gh, gw, gb = _fused_linear_distillation_loss_bwd(grad_loss, sh, sw, th, tw, labels, sb, tb,
                                                         *ctx.args)
    else:
        gh, gw, gb = ctx.saved_tensors
        if gh.numel() == 0 and sum(ctx.needs_input_grad[:2]):
            raise RuntimeError("fused_linear_distillation_loss: forward ran without gradients")
        gh, gw = gh * grad_loss.to(gh.dtype), gw * grad_loss.to(gw.dtype)
        gb = gb * grad_loss.to(gb.dtype)
    gb = gb if ctx.has_bias else None
    return (gh, gw, None, None, None, gb) + (None,) * 11


_fused_linear_distillation_loss_fwd.register_autograd(_fused_backward, setup_context=_fused_setup)

_FUSED_ARGS = (
    "Tensor student_hidden, Tensor student_weight, Tensor teacher_hidden, Tensor teacher_weight, "
    "Tensor? labels=None, Tensor? student_bias=None, Tensor? teacher_bias=None, "
    "int? chunk_size=None, *, " + _DISTILL_SCHEMA_KW
)
_lib.define(
    "fused_linear_distillation_loss(" + _FUSED_ARGS + ", Tensor? num_items_in_batch=None) -> Tensor"
)
_lib.define(
    "fused_linear_distillation_loss.int_items(" + _FUSED_ARGS + ", int num_items_in_batch) -> Tensor"
)


def _check_fused(sh, sw, th, tw, labels, sb, tb, chunk_size, temperature, alpha, divergence,
                 beta, reduction, num_items_in_batch) -> None:
    allowed = (*chk.FLOAT_DTYPES, torch.float64)
    for name, t in (("student_hidden", sh), ("student_weight", sw), ("teacher_hidden", th),
                    ("teacher_weight", tw)):
        chk.tensor(name, t)
        chk.dtype_in(name, t, allowed)
    chk.min_ndim("student_hidden", sh, 1)
    chk.min_ndim("teacher_hidden", th, 1)
    chk.ndim("student_weight", sw, 2)
    chk.ndim("teacher_weight", tw, 2)
    if sh.shape[-1] != sw.shape[1]:
        raise ValueError(f"student_hidden [..., H] and student_weight [V, H] must share H, got "
                         f"{tuple(sh.shape)} and {tuple(sw.shape)}")
    if th.shape[-1] != tw.shape[1]:
        raise ValueError(f"teacher_hidden [..., H] and teacher_weight [V, H] must share H, got "
                         f"{tuple(th.shape)} and {tuple(tw.shape)}")
    if sw.shape[0] != tw.shape[0]:
        raise ValueError(f"student and teacher vocab sizes must match: student_weight "
                         f"{tuple(sw.shape)} vs teacher_weight {tuple(tw.shape)}")
    if sh.shape[:-1] != th.shape[:-1]:
        raise ValueError(f"student_hidden {tuple(sh.shape)} and teacher_hidden {tuple(th.shape)} "
                         f"must have the same leading (token) dims")
    chk.positive("student_weight.shape[0] (V)", sw.shape[0])
    for name, b in (("student_bias", sb), ("teacher_bias", tb)):
        if b is not None:
            chk.tensor(name, b)
            chk.dtype_in(name, b, allowed)
            chk.shape(name, b, (sw.shape[0],), "[V]")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    _check_labels(labels, sh.shape[:-1], "student_hidden")
    _check_loss_kwargs(temperature, alpha, divergence, beta, reduction, labels)
    _check_num_items(num_items_in_batch)
    chk.same_device(student_hidden=sh, student_weight=sw, teacher_hidden=th, teacher_weight=tw,
                    labels=labels, student_bias=sb, teacher_bias=tb)


def _fused_impl(
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
    student_bias=None, teacher_bias=None, chunk_size=None, *, temperature=1.0, alpha=0.5,
    divergence="kl", beta=0.5, ignore_index=-100, reduction="mean", num_items_in_batch=None,
):
    _check_fused(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                 student_bias, teacher_bias, chunk_size, temperature, alpha, divergence, beta,
                 reduction, num_items_in_batch)
    lead = student_hidden.shape[:-1]
    sh = student_hidden.reshape(-1, student_hidden.shape[-1])
    th = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    lab = _labels_flat(labels)
    m, v = sh.shape[0], student_weight.shape[0]
    chunk = chunk_size if chunk_size is not None else default_chunk_size(m, v)
    nt = num_items_in_batch if isinstance(num_items_in_batch, torch.Tensor) else None
    ni = num_items_in_batch if isinstance(num_items_in_batch, int) else -1
    wants_grad = any(t is not None and t.requires_grad
                     for t in (student_hidden, student_weight, student_bias))
    loss, *_ = torch.ops.qtorch._fused_linear_distillation_loss_fwd(
        sh, student_weight, th, teacher_weight, lab, student_bias, teacher_bias,
        float(temperature), float(alpha), divergence, float(beta), int(ignore_index), reduction,
        nt, ni, int(chunk), torch.is_grad_enabled() and wants_grad,
    )
    return loss.reshape(lead) if reduction == "none" else loss


for _overload in ("fused_linear_distillation_loss", "fused_linear_distillation_loss.int_items"):
    _lib.impl(_overload, _fused_impl, "CompositeImplicitAutograd")


def fused_linear_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    chunk_size: int | None = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    divergence: str = "kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    """distillation_loss(student_hidden @ student_weight.T + student_bias,
    teacher_hidden @ teacher_weight.T + teacher_bias, labels, ...) without ever holding the
    [tokens, V] logits: chunks of `chunk_size` tokens (default: ~32 MiB of fp32 logits a chunk).

    student_hidden [..., H], student_weight [V, H], teacher_hidden [..., Ht],
    teacher_weight [V, Ht]. Differentiable w.r.t. student_hidden, student_weight, student_bias;
    their gradients are computed during the forward pass, accumulated in fp32.
    """
    _check_loss_call_types({"student_hidden": (student_hidden, False),
                            "student_weight": (student_weight, False),
                            "teacher_hidden": (teacher_hidden, False),
                            "teacher_weight": (teacher_weight, False), "labels": (labels, True),
                            "student_bias": (student_bias, True),
                            "teacher_bias": (teacher_bias, True)}, num_items_in_batch)
    return torch.ops.qtorch.fused_linear_distillation_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
        teacher_bias, chunk_size, temperature=temperature, alpha=alpha, divergence=divergence,
        beta=beta, ignore_index=ignore_index, reduction=reduction,
        num_items_in_batch=num_items_in_batch,
    )


# ------------------------------------------------------------------------ public entry points
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
    """The public function of `opdef`. `fast`: a C function that runs the common eager call
    on CPU tensors (valid arguments, a weight already packed, the cpu backend in force) and
    returns None for anything else (csrc/cpu/fast_path.cpp); dynamo never traces into it."""
    fn = opdef._init_fn
    sig = inspect.signature(fn)
    tensor_params = {n: "None" in str(p.annotation) for n, p in sig.parameters.items()
                     if str(p.annotation).startswith("Tensor")}

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

    wrapper.op = opdef
    return wrapper


_is_compiling = torch.compiler.is_compiling
try:  # the C++ eager fast path of the CPU linears (absent without the compiled extension)
    from qtorch import _C as _cext

    _cext.fast_init(_backend._scoped_choice, vars(_backend))
    _FAST = {"int8_linear": _cext.fast_int8_linear,
             "int8_weight_only_linear": _cext.fast_int8_weight_only_linear,
             "int4_weight_only_linear": _cext.fast_int4_weight_only_linear}
except (ImportError, AttributeError):
    _FAST = {}


def _check_loss_call_types(tensors: dict, num_items_in_batch) -> None:
    for name, (value, optional) in tensors.items():
        chk.tensor(name, value, optional=optional)
    _check_num_items(num_items_in_batch)


quantize_int8 = _public(quantize_int8)
int8_scaled_mm = _public(int8_scaled_mm)
int8_linear = _public(int8_linear, _FAST.get("int8_linear"))
int8_weight_only_linear = _public(int8_weight_only_linear, _FAST.get("int8_weight_only_linear"))
quantize_int4 = _public(quantize_int4)
dequantize_int4 = _public(dequantize_int4)
int4_weight_only_linear = _public(int4_weight_only_linear, _FAST.get("int4_weight_only_linear"))
