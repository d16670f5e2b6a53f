"""The `cpu` backend: compiled C++ kernels in qtorch._C (ops in the `qtorch_cpu` namespace)."""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension)

from qtorch import _C  # ImportError here means "not built"; _backend records why


def status() -> tuple[bool, str]:
    return True, f"C++ CPU kernels, ISA {_C.isa()}"


# Kernel registrations are added per op by the CPU kernel files (see qtorch/backends/__init__.py).

# --- int8 W8A8 kernels (quantize_int8, int8_scaled_mm, int8_linear) -------------------------
# (section owned by the int8 CPU work)

from qtorch._backend import register_kernel  # noqa: E402
from qtorch._cache import _version  # noqa: E402
from qtorch._cache import packed as _packed  # noqa: E402


def _int8_pack_weight_op(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.qtorch_cpu.pack_int8_mm(w)


def _int8_vnni_weight(w: torch.Tensor) -> torch.Tensor:
    """w int8 [N, K] -> the VNNI-packed weight (u8 bytes; layout in csrc/cpu/kernels/int8_mm.h),
    packed once per weight tensor and reused until it dies or changes in place."""
    return _packed(w, "cpu_int8_vnni", lambda: _int8_pack_weight_op(w))


@register_kernel("quantize_int8", "cpu")
def _quantize_int8(x):
    return torch.ops.qtorch_cpu.quantize_int8(x)


@register_kernel("int8_scaled_mm", "cpu")
def _int8_scaled_mm(a, b, scale_a, scale_b, bias, out_dtype):
    return torch.ops.qtorch_cpu.int8_scaled_mm(
        a, _int8_vnni_weight(b), b.shape[0], scale_a, scale_b, bias, out_dtype
    )


# The eager fast path (csrc/cpu/fast_path.cpp) serves later calls on the same weight from C++;
# the linears below register each packed weight there (weakly: the Python cache owns it).
_KIND_W8A8, _KIND_W8A16, _KIND_W4A16 = 0, 1, 2


@register_kernel("int8_linear", "cpu")
def _int8_linear(x, w_q, w_scale, bias):
    wp = _int8_vnni_weight(w_q)
    _C.fast_put(_KIND_W8A8, w_q, None, None, 0, [wp])
    return torch.ops.qtorch_cpu.int8_linear(x, wp, w_q.shape[0], w_scale, bias)


# --- weight-only kernels (int8_weight_only_linear, quantize_int4, dequantize_int4,
#     int4_weight_only_linear) ---------------------------------------------------------------
# (section owned by the weight-only CPU work)
# Weights are repacked once into 16-channel blocks (layout in csrc/cpu/kernels/weight_only.h) and
# dequantized inside the kernel; quantize_int4 runs once per weight, so the reference serves
# it. dequantize_int4 and the int4 backward (which dequantizes per call, in slabs) have C++
# kernels.


def _wo_int4_weight(qweight, scales, zeros, group_size):
    """Canonical int4 (qweight u8 [N, K/2], scales f32 [N, G], zeros u8 [N, G]) -> [w, scale,
    zero] packed once per weight. The packed form also depends on scales and zeros, so their
    identity and version are part of the key (a module holds all three for its lifetime)."""
    key = ("cpu_wo_int4", group_size, scales.data_ptr(), _version(scales), zeros.data_ptr(),
           _version(zeros))
    return _packed(qweight, key, lambda: torch.ops.qtorch_cpu.pack_int4_weight_only(
        qweight, scales.float(), zeros, group_size))


def _wo_int8_weight(w_q, w_scale):
    """w_q s8 [N, K], w_scale [N] -> [w, scale] packed once per weight."""
    key = ("cpu_wo_int8", w_scale.data_ptr(), _version(w_scale))
    return _packed(w_q, key, lambda: torch.ops.qtorch_cpu.pack_int8_weight_only(w_q, w_scale.float()))


@register_kernel("int8_weight_only_linear", "cpu")
def _int8_weight_only_linear(x, w_q, w_scale, bias):
    w, s = _wo_int8_weight(w_q, w_scale)
    _C.fast_put(_KIND_W8A16, w_q, w_scale, None, 0, [w, s])
    return torch.ops.qtorch_cpu.int8_weight_only_linear(x, w, s, w_q.shape[0], w_q.shape[1], bias)


@register_kernel("int8_linear_grad_input", "cpu")
def _int8_linear_grad_input(grad_out, w_q, w_scale):
    """Backward of both int8 linears w.r.t. x: grad_out [M, N] @ (w_q * w_scale[:, None]).

    = (grad_out * w_scale) @ w_q, i.e. the W8A16 kernel on w_q.T [K, N] with unit channel
    scales (transposed and packed once per weight). The scaling and the kernel run in fp32, as
    the reference does, so low-precision gradients lose nothing before the one final rounding.
    """
    n, k = w_q.shape
    wt, st = _packed(w_q, "cpu_wo_int8_T", lambda: torch.ops.qtorch_cpu.pack_int8_weight_only(
        w_q.t().contiguous(), torch.ones(k, dtype=torch.float32)))
    g = grad_out.float() * w_scale
    return torch.ops.qtorch_cpu.int8_weight_only_linear(g, wt, st, k, n, None).to(grad_out.dtype)


@register_kernel("int4_weight_only_linear", "cpu")
def _int4_weight_only_linear(x, qweight, scales, zeros, group_size, bias):
    w, s, z = _wo_int4_weight(qweight, scales, zeros, group_size)
    _C.fast_put(_KIND_W4A16, qweight, scales, zeros, group_size, [w, s, z])
    return torch.ops.qtorch_cpu.int4_weight_only_linear(
        x, w, s, z, qweight.shape[0], qweight.shape[1] * 2, group_size, bias
    )


@register_kernel("dequantize_int4", "cpu")
def _dequantize_int4(qweight, scales, zeros, group_size):
    return torch.ops.qtorch_cpu.dequantize_int4(qweight, scales.float(), zeros, group_size)


@register_kernel("int4_linear_grad_input", "cpu")
def _int4_linear_grad_input(grad_out, qweight, scales, zeros, group_size):
    """grad_out [M, N] @ ŵ [N, K] in fp32 as the reference, with ŵ dequantized per call (a
    frozen backbone keeps only its int4 weights) in cache-sized column slabs, each followed by
    its slab's fp32 BLAS GEMM, so the fp32 [N, K] ŵ never exists."""
    return torch.ops.qtorch_cpu.int4_linear_grad_input(grad_out, qweight, scales.float(), zeros,
                                                group_size)


# --- distillation kernels (distillation_loss, fused_linear_distillation_loss) ---------------
# (section owned by the distillation CPU work) csrc/cpu/distillation.cpp: one pass per row for the
# online softmax statistics of s/T, s and t/T, then the loss terms and d loss / d s; rows in
# parallel. The fused-linear op chunks tokens (fp32 logits by BLAS, gradient written over the
# chunk's logits in place), so [M, V] never exists.


@register_kernel("distillation_loss", "cpu")
def _distillation_loss(student, teacher, labels, temperature, alpha, divergence, beta,
                       ignore_index, compute_grad):
    loss, grad = torch.ops.qtorch_cpu.distillation_loss(
        student, teacher, labels, temperature, alpha, divergence, beta, ignore_index,
        compute_grad,
    )
    return loss, grad if compute_grad else None


@register_kernel("fused_linear_distillation_loss", "cpu")
def _fused_linear_distillation_loss(student_hidden, student_weight, teacher_hidden,
                                    teacher_weight, labels, student_bias, teacher_bias,
                                    token_scale, chunk_size, temperature, alpha, divergence,
                                    beta, ignore_index, compute_grad):
    loss, gh, gw, gb = torch.ops.qtorch_cpu.fused_linear_distillation_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
        teacher_bias, token_scale, chunk_size if chunk_size is not None else 0, temperature,
        alpha, divergence, beta, ignore_index, compute_grad,
    )
    if not compute_grad:
        return loss, None, None, None
    return loss, gh, gw, gb if student_bias is not None else None
