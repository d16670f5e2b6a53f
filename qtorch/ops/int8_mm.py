"""W8A8 int8 ops: quantize_int8, int8_scaled_mm, int8_linear (definitions:
`qtorch.reference.int8_mm`). The public functions are made in `qtorch/ops/__init__.py`."""

from __future__ import annotations

import torch
from torch import Tensor

from qtorch import _checks as chk
from qtorch.ops._common import (
    _INT8_LINEAR_SCHEMA,
    _bias_grad,
    _check_int8_linear,
    _custom_op,
    _int8_linear_call,
    _int8_linear_fake,
    _kernel,
    _linear_call,
    _rows,
    _setup_linear,
    _vec,
)
from qtorch.ops.weight_only import _int8_linear_backward, int8_linear_grad_input

_OUT_DTYPES = chk.FLOAT_DTYPES

# ----------------------------------------------------------------------------- quantize_int8


def _check_quantize_int8(x: Tensor) -> None:
    chk.tensor("x", x)
    chk.dtype_in("x", x, chk.FLOAT_DTYPES)
    chk.min_ndim("x", x, 1)
    chk.positive("x.shape[-1] (K)", x.shape[-1])


@_custom_op("qtorch::quantize_int8")
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
    chk.exact_k(a.shape[1])
    chk.positive("b.shape[0] (N)", b.shape[0])
    chk.dtype_in("scale_a", scale_a, (torch.float32,))
    chk.dtype_in("scale_b", scale_b, (torch.float32,))
    chk.vector("scale_a", scale_a, a.shape[0], "one per row of a")
    chk.vector("scale_b", scale_b, b.shape[0], "one per row of b")
    chk.bias(bias, b.shape[0])
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of float32, float16, bfloat16, got {out_dtype}")
    chk.same_device(a=a, b=b, scale_a=scale_a, scale_b=scale_b, bias=bias)


@_custom_op("qtorch::int8_scaled_mm")
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
    return fn(
        a.contiguous(),
        b.contiguous(),
        scale_a.reshape(-1).contiguous(),
        scale_b.reshape(-1).contiguous(),
        bias32,
        out_dtype,
    )


@int8_scaled_mm.register_fake
def _(a, b, scale_a, scale_b, bias=None, out_dtype=torch.float32):
    _check_int8_scaled_mm(a, b, scale_a, scale_b, bias, out_dtype)
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


# ------------------------------------------------------------------------------- int8_linear


@_custom_op("qtorch::int8_linear", schema=_INT8_LINEAR_SCHEMA)
def int8_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """Dynamic W8A8: x [..., K] fp32/fp16/bf16 quantized per token, int8 GEMM with
    w_q [N, K] int8 / w_scale [N] fp32, + bias; result [..., N] in x.dtype. Differentiable
    w.r.t. x (straight-through activation quantization) and bias."""
    _check_k(w_q)
    return _int8_linear_call("int8_linear", x, w_q, w_scale, bias)


def _check_k(w_q) -> None:
    # W8A8 accumulates int8 products in int32 like int8_scaled_mm, so the same K bound holds
    # (W8A16 accumulates in fp32 and has none).
    if isinstance(w_q, Tensor) and w_q.dim() == 2:
        chk.exact_k(w_q.shape[1])


@int8_linear.register_fake
def _(x, w_q, w_scale, bias=None):
    _check_k(w_q)
    return _int8_linear_fake(x, w_q, w_scale, bias)


int8_linear.register_autograd(_int8_linear_backward, setup_context=_setup_linear)


# ------------------------------------------------------------------------ int8_linear_smooth


def _check_int8_linear_smooth(x, w_q, w_scale, smooth_scale, bias) -> None:
    _check_int8_linear(x, w_q, w_scale, bias)
    chk.smooth_scale(smooth_scale, w_q.shape[1], w_q.device)


@_custom_op("qtorch::int8_linear_smooth")
def int8_linear_smooth(
    x: Tensor, w_q: Tensor, w_scale: Tensor, smooth_scale: Tensor, bias: Tensor | None = None
) -> Tensor:
    """SmoothQuant W8A8 (API.md "Calibrated quantization"): int8_linear(x / smooth_scale, w_q,
    w_scale, bias), with x [..., K] float, smooth_scale fp32 [K], w_q [N, K] int8 the weight of
    W · diag(smooth_scale), w_scale [N] fp32. The division is fused into the per-token
    quantization of x (definition: `qtorch.reference.int8_mm.int8_linear_smooth`). Result
    [..., N] in x.dtype; differentiable w.r.t. x (straight-through: dx = grad @ ŵ / s) and
    bias."""
    _check_int8_linear_smooth(x, w_q, w_scale, smooth_scale, bias)
    return _linear_call(
        "int8_linear_smooth",
        x,
        w_q.shape[0],
        w_q.contiguous(),
        _vec(w_scale),
        smooth_scale.contiguous(),
        bias=bias,
    )


@int8_linear_smooth.register_fake
def _(x, w_q, w_scale, smooth_scale, bias=None):
    _check_int8_linear_smooth(x, w_q, w_scale, smooth_scale, bias)
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


def _int8_linear_smooth_backward(ctx, grad):
    """y = (x / s) ŵᵀ with quantization straight-through: dx = (grad @ ŵ) / s."""
    w_q, w_scale, smooth_scale = ctx.saved_tensors
    gx = None
    if ctx.needs_input_grad[0]:
        g = int8_linear_grad_input(grad, w_q, w_scale)
        gx = (g.float() / smooth_scale).to(g.dtype)
    return gx, None, None, None, _bias_grad(ctx, grad)


int8_linear_smooth.register_autograd(_int8_linear_smooth_backward, setup_context=_setup_linear)
