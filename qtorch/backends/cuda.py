"""The `cuda` backend: CUDA C++ kernels in qtorch._C_cuda (ops in the `qtorch_cuda` namespace).

csrc/cuda/int8_mm.cu       quantize_int8, int8_scaled_mm, int8_linear (mma.sync s8 tensor cores)
csrc/cuda/weight_only.cu   int4_weight_only_linear (W4A16, Marlin-style) and
                           int8_weight_only_linear (W8A16, same kernel), fp16/bf16 activations
csrc/cuda/distillation.cu  distillation_loss, and the loss inside fused_linear_distillation_loss

Ops without a CUDA kernel here (quantize_int4, dequantize_int4, the backward helpers), and fp32
activations of the weight-only linears, are served by the reference. Importing this module raises ImportError when
the extension was not built (no CUDA torch or no nvcc at build time); `_backend` records why.
"""

from __future__ import annotations

import torch

from qtorch import _C_cuda  # noqa: F401  ImportError here means "not built"
from qtorch._backend import register_kernel
from qtorch.backends._cuda_pack import pack_int4, pack_int8
from qtorch.reference import distillation as _ref_distill
from qtorch.reference import weight_only as _ref_wo

_DIVERGENCE_CODE = {"kl": 0, "reverse_kl": 1, "jsd": 2}


def status() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "qtorch._C_cuda is built but no CUDA device is visible"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"the CUDA kernels need sm_80 or newer, device is sm_{major}{minor}"
    return True, f"CUDA C++ kernels ({_C_cuda.archs()}) on {torch.cuda.get_device_name()}"


# --- int8 W8A8 ---------------------------------------------------------------------------------


@register_kernel("quantize_int8", "cuda")
def _quantize_int8(x):
    return torch.ops.qtorch_cuda.quantize_int8(x)


@register_kernel("int8_scaled_mm", "cuda")
def _int8_scaled_mm(a, b, scale_a, scale_b, bias, out_dtype):
    # K not a multiple of 16 is zero-padded per call inside the binding (cp.async moves 16 bytes).
    return torch.ops.qtorch_cuda.int8_scaled_mm(a, b, scale_a, scale_b, bias, out_dtype)


def _int8_weight_k16(w_q):
    """w_q [N, K] int8 -> [N, K rounded up to 16], zero padded (per call for an op)."""
    k = w_q.shape[1]
    if k % 16 == 0:
        return w_q
    return torch.nn.functional.pad(w_q, (0, -k % 16)).contiguous()


@register_kernel("int8_linear", "cuda")
def _int8_linear(x, w_q, w_scale, bias):
    return torch.ops.qtorch_cuda.int8_linear(x, _int8_weight_k16(w_q), w_scale, bias)


# --- W4A16 -------------------------------------------------------------------------------------


@register_kernel("int4_weight_only_linear", "cuda")
def _int4_weight_only_linear(x, qweight, scales, zeros, group_size, bias):
    if x.dtype not in (torch.float16, torch.bfloat16):
        # The tensor-core kernel takes 16-bit activations; fp32 ones use the reference.
        return _ref_wo.int4_weight_only_linear(x, qweight, scales, zeros, group_size, bias)
    qp, szp = pack_int4(qweight, scales, zeros, group_size, x.dtype)
    return torch.ops.qtorch_cuda.int4_weight_only_linear(x, qp, szp, qweight.shape[0], group_size, bias)


@register_kernel("int8_weight_only_linear", "cuda")
def _int8_weight_only_linear(x, w_q, w_scale, bias):
    if x.dtype not in (torch.float16, torch.bfloat16):
        return _ref_wo.int8_weight_only_linear(x, w_q, w_scale, bias)
    qp = pack_int8(w_q)
    k = x.shape[1]
    if k % 8:  # the kernel moves x in 16-byte pieces; the packed weight is 0 past K
        x = torch.nn.functional.pad(x, (0, -k % 8))
    return torch.ops.qtorch_cuda.int8_weight_only_linear(x, qp, w_scale, w_q.shape[0], bias)


# --- distillation ------------------------------------------------------------------------------


@register_kernel("distillation_loss", "cuda")
def _distillation_loss(
    student, teacher, labels, temperature, alpha, divergence, beta, ignore_index, compute_grad
):
    # A data-dependent check (one sync): out-of-range labels are a ValueError, not garbage.
    _ref_distill.check_labels(labels, student.shape[-1], ignore_index)
    s, t = student, teacher
    if s.dtype != t.dtype:  # the kernel reads both in one dtype; fp32 loses nothing
        s, t = s.float(), t.float()
    loss, grad = torch.ops.qtorch_cuda.distillation_loss(
        s,
        t,
        labels,
        float(temperature),
        float(alpha),
        _DIVERGENCE_CODE[divergence],
        float(beta),
        int(ignore_index),
        bool(compute_grad),
    )
    if not compute_grad:
        return loss, None
    return loss, grad.to(student.dtype)


@register_kernel("fused_linear_distillation_loss", "cuda")
def _fused_linear_distillation_loss(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    labels,
    student_bias,
    teacher_bias,
    token_scale,
    chunk_size,
    temperature,
    alpha,
    divergence,
    beta,
    ignore_index,
    compute_grad,
):
    # The reference's chunk loop (cuBLAS matmuls per chunk) with this backend's loss kernel.
    return _ref_distill.fused_linear_distillation_loss(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        labels,
        student_bias,
        teacher_bias,
        token_scale,
        chunk_size,
        temperature,
        alpha,
        divergence,
        beta,
        ignore_index,
        compute_grad,
        loss_kernel=_distillation_loss,
    )
