"""The `triton` backend: the Triton kernels in `kernels/` (imported as `qtorch._kernels`).

`qtorch._backend` imports this module only when Triton can run: with a CUDA device, or under
`TRITON_INTERPRET=1` on CPU tensors (for tests; never chosen by "auto" on CPU).
quantize_int4 / dequantize_int4 (offline weight conversion) and the linear backward helpers
have no Triton kernel; the reference serves them. The W4A16 kernel reads its own weight
layout, which this adapter prepares from the canonical one, as the cpu and cuda adapters do.
"""

from __future__ import annotations

import torch
import triton

from qtorch._backend import register_kernel
from qtorch._kernels import INTERPRET, distillation, int8_mm, weight_only
from qtorch._packed import Layout, register_layout
from qtorch.reference import distillation as _ref_distill


def status() -> tuple[bool, str]:
    if torch.cuda.is_available():
        return True, f"Triton {triton.__version__} kernels on CUDA"
    if INTERPRET:
        return True, f"Triton {triton.__version__} interpreter (TRITON_INTERPRET=1), CPU tensors"
    return False, "no CUDA device and TRITON_INTERPRET is not 1"


def kernel_layout(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Canonical (qweight uint8 [N, K//2], scales fp32 [N, G], zeros uint8 or fp32 [N, G]) ->
    the W4A16 kernel's (qweight_t uint8 [K//2, N], scales_t fp32 [G, N], zeros_t [G, N] in
    zeros' dtype, which the kernel widens to fp32 exactly), contiguous
    (`kernels/weight_only.py` says why)."""
    return (
        qweight.t().contiguous(),
        scales.float().t().contiguous(),
        zeros.t().contiguous(),
    )


def int4_weight_only_linear(x, qweight, scales, zeros, group_size, bias):
    """x [M, K] float, canonical int4 weight -> [M, N] x.dtype (the kernel contract). An op
    keeps nothing between calls, so the layout is prepared per call; a quantized module keeps
    it (the "triton_w4a16" layout below)."""
    return weight_only.int4_weight_only_linear(
        x, *kernel_layout(qweight, scales, zeros), group_size, bias
    )


def _unpack_int4(weight, n, k, group_size):
    qweight_t, scales_t, zeros_t = weight
    return {
        "qweight": qweight_t.t().contiguous(),
        "scales": scales_t.t().contiguous(),
        "zeros": zeros_t.t().contiguous(),
    }  # (its dtype kept: uint8 or float32)


def _grad_int4(grad, weight, n, k, group_size):
    c = _unpack_int4(weight, n, k, group_size)
    return torch.ops.qtorch.int4_linear_grad_input(
        grad, c["qweight"], c["scales"], c["zeros"], group_size
    )


# The module layout: what the kernel reads, kept once by a quantized module on a device where
# "auto" picks Triton (a GPU without the CUDA extension). The int8 kernels read the canonical
# layout, so they need none.
register_layout(
    Layout(
        "triton_w4a16",
        "w4a16",
        "triton",
        -1,
        ("packed_weight", "packed_scale", "packed_zero"),
        ("qweight", "scales", "zeros"),
        pack=lambda c, n, k, gs: dict(
            zip(
                ("packed_weight", "packed_scale", "packed_zero"),
                kernel_layout(c["qweight"], c["scales"], c["zeros"]),
            )
        ),
        unpack=_unpack_int4,
        run=lambda x, w, bias, n, k, gs: weight_only.int4_weight_only_linear(x, *w, gs, bias),
        grad_input=_grad_int4,
    )
)


# --- fused linear distillation: the one chunk loop with Triton's per-chunk loss kernel --------

_HALF = (torch.float16, torch.bfloat16)
# torch.mm(a, b, out_dtype=torch.float32): a 16-bit GEMM that writes fp32 (torch >= 2.8, CUDA).
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()
# Rows of dW formed per GEMM: bounds the fp32 temporary to 16384 x H (256 MiB at H = 4096)
# instead of a second [V, H] fp32 buffer.
_GW_ROWS = 16384


def _mm_fp32(a, b, out=None):
    """a @ b of 16-bit operands, each product formed and summed in fp32, written as fp32."""
    return torch.mm(a, b, out_dtype=torch.float32, out=out)


class Mixed16Head:
    """`LinearHead`'s interface (qtorch/reference/distillation.py) for 16-bit hidden states and
    weight on CUDA: the operands stay 16-bit (tensor-core GEMMs, no fp32 copy of W) and cuBLAS
    forms every product in fp32, so the logits are the fp32 accumulator, never rounded to 16
    bits. The backward GEMMs read the chunk's gradient rounded once to 16 bits (a [chunk, V]
    16-bit scratch, made once per call) and accumulate dW in fp32 from fp32 products."""

    def __init__(self, weight, bias, acc):
        self.acc = acc
        self.weight = weight
        self.bias = bias.to(acc) if bias is not None else None
        self._g16 = None

    def operand(self, h):
        return h

    def logits(self, x, out):
        _mm_fp32(x, self.weight.T, out=out)
        if self.bias is not None:
            out += self.bias
        return out

    def backward(self, g, x, grad_input, grad_weight):
        n = g.shape[0]
        if self._g16 is None or self._g16.shape[0] < n:
            self._g16 = torch.empty(g.shape, dtype=self.weight.dtype, device=g.device)
        g16 = self._g16[:n]
        g16.copy_(g)
        if grad_input is not None:
            torch.mm(g16, self.weight, out=grad_input)
        if grad_weight is not None:
            g16_t = g16.T
            for r0 in range(0, g16_t.shape[0], _GW_ROWS):
                grad_weight[r0 : r0 + _GW_ROWS] += _mm_fp32(g16_t[r0 : r0 + _GW_ROWS], x)


def fused_linear_distillation_loss(
    student_hidden, student_weight, teacher_hidden, teacher_weight, *args
):
    """The kernel contract's fused_linear_distillation_loss: the one chunk loop with the Triton
    loss kernel. GEMMs: `Mixed16Head` when hidden states and weights share one 16-bit dtype on
    CUDA, else `LinearHead` (fp32 GEMMs; the interpreter, fp32 inputs, mixed dtypes)."""
    tensors = (student_hidden, student_weight, teacher_hidden, teacher_weight)
    mixed16 = (
        _MM_OUT_DTYPE
        and student_hidden.is_cuda
        and student_hidden.dtype in _HALF
        and all(x.dtype == student_hidden.dtype for x in tensors if isinstance(x, torch.Tensor))
    )  # (not a quantized teacher's ModuleHead)
    return _ref_distill.fused_linear_distillation_loss(
        *tensors,
        *args,
        chunk_loss=distillation.chunk_loss,
        head=Mixed16Head if mixed16 else _ref_distill.LinearHead,
    )


register_kernel("quantize_int8", "triton")(int8_mm.quantize_int8)
register_kernel("int8_scaled_mm", "triton")(int8_mm.int8_scaled_mm)
register_kernel("int8_linear", "triton")(int8_mm.int8_linear)
register_kernel("int8_linear_smooth", "triton")(int8_mm.int8_linear_smooth)
register_kernel("int8_weight_only_linear", "triton")(weight_only.int8_weight_only_linear)
register_kernel("int4_weight_only_linear", "triton")(int4_weight_only_linear)
register_kernel("distillation_loss", "triton")(distillation.distillation_loss)
register_kernel("fused_linear_distillation_loss", "triton")(fused_linear_distillation_loss)
