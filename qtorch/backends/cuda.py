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
from qtorch._packed import Layout, register_layout
from qtorch.backends._cuda_pack import pack_int4, pack_int8, unpack_int4_weight, unpack_int8
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


@register_kernel("int8_linear_smooth", "cuda")
def _int8_linear_smooth(x, w_q, w_scale, smooth_scale, bias):
    # x / smooth_scale inside the activation-quantization kernel (csrc/cuda/int8_mm.cu).
    return torch.ops.qtorch_cuda.int8_linear(x, _int8_weight_k16(w_q), w_scale, bias, smooth_scale)


# --- W4A16 -------------------------------------------------------------------------------------


@register_kernel("int4_weight_only_linear", "cuda")
def _int4_weight_only_linear(x, qweight, scales, zeros, group_size, bias):
    if x.dtype not in (torch.float16, torch.bfloat16) or zeros.dtype == torch.float32:
        # The tensor-core kernel takes 16-bit activations and integer zero points (it keeps
        # MAGIC + zero in a 16-bit word, which would round a float zero point): fp32
        # activations and float zero points (zero_point="float") use the reference.
        return _ref_wo.int4_weight_only_linear(x, qweight, scales, zeros, group_size, bias)
    qp, szp = pack_int4(qweight, scales, zeros, group_size, x.dtype)
    return torch.ops.qtorch_cuda.int4_weight_only_linear(
        x, qp, szp, qweight.shape[0], group_size, bias
    )


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


_chunk_loss = _ref_distill.chunk_loss_from(_distillation_loss)


@register_kernel("fused_linear_distillation_loss", "cuda")
def _fused_linear_distillation_loss(*args):
    # The one chunk loop with this backend's loss kernel; fp32 cuBLAS GEMMs (`LinearHead`).
    return _ref_distill.fused_linear_distillation_loss(*args, chunk_loss=_chunk_loss)


# --- layouts owned by the quantized modules (qtorch/_packed.py) --------------------------------
# What the kernels above read, prepared once by a module on a CUDA device. The W4A16 kernel
# reads its scales and zeros in the activations' 16-bit type, which loses what fp32 held, so
# that layout keeps them once more in fp32 (`packed_meta`, [2, N, G]: the scales and the zero
# points) for unpacking bitwise; it is made for the module's activation dtype (bf16 unless the
# module computes in fp16), and a call in another dtype takes the canonical path.


def _grad_int8(grad, weight, n, k, group_size):
    w = weight[0][:, :k] if weight[0].dim() == 2 else unpack_int8(weight[0], n, k)
    g = torch.ops.qtorch.int8_linear_grad_input(grad, w.contiguous(), weight[1])
    if len(weight) > 2:  # SmoothQuant's smooth_scale (w8a8): y = (x / s) ŵᵀ, dx = (grad ŵ) / s
        g = (g.float() / weight[2]).to(g.dtype)
    return g


register_layout(
    Layout(
        "cuda_w8a8",
        "w8a8",
        "cuda",
        -1,
        ("packed_weight", "weight_scale"),
        ("qweight",),
        pack=lambda c, n, k, gs: {"packed_weight": _int8_weight_k16(c["qweight"])},
        unpack=lambda w, n, k, gs: {"qweight": w[0][:, :k].contiguous()},
        # w[2], when given, is SmoothQuant's smooth_scale (qtorch/_packed.py)
        run=lambda x, w, bias, n, k, gs: torch.ops.qtorch_cuda.int8_linear(
            x, w[0], w[1], bias, w[2] if len(w) > 2 else None
        ),
        grad_input=_grad_int8,
    )
)


def _run_w8a16(x, weight, bias, n, k, group_size):
    if x.dtype not in (torch.float16, torch.bfloat16):
        return _ref_wo.int8_weight_only_linear(x, unpack_int8(weight[0], n, k), weight[1], bias)
    if k % 8:
        x = torch.nn.functional.pad(x, (0, -k % 8))
    return torch.ops.qtorch_cuda.int8_weight_only_linear(x, weight[0], weight[1], n, bias)


register_layout(
    Layout(
        "cuda_w8a16",
        "w8a16",
        "cuda",
        -1,
        ("packed_weight", "weight_scale"),
        ("qweight",),
        pack=lambda c, n, k, gs: {"packed_weight": pack_int8(c["qweight"])},
        unpack=lambda w, n, k, gs: {"qweight": unpack_int8(w[0], n, k)},
        run=_run_w8a16,
        grad_input=_grad_int8,
    )
)


def _w4a16_layout(dtype: torch.dtype, name: str) -> Layout:
    def pack(c, n, k, gs):
        qp, szp = pack_int4(c["qweight"], c["scales"], c["zeros"], gs, dtype)
        meta = torch.stack((c["scales"].float(), c["zeros"].float()))
        return {"packed_weight": qp, "packed_scale": szp, "packed_meta": meta}

    def unpack(w, n, k, gs):
        return {
            "qweight": unpack_int4_weight(w[0], n, k),
            "scales": w[2][0].contiguous(),
            "zeros": w[2][1].to(torch.uint8).contiguous(),
        }  # (integers 0..15: exact)

    def run(x, w, bias, n, k, gs):
        if x.dtype != dtype:  # the kernel reads the scales in the activations' type
            c = unpack(w, n, k, gs)
            return torch.ops.qtorch.int4_weight_only_linear(
                x, c["qweight"], c["scales"], c["zeros"], gs, bias
            )
        return torch.ops.qtorch_cuda.int4_weight_only_linear(x, w[0], w[1], n, gs, bias)

    def grad_input(grad, w, n, k, gs):
        c = unpack(w, n, k, gs)
        return torch.ops.qtorch.int4_linear_grad_input(
            grad, c["qweight"], c["scales"], c["zeros"], gs
        )

    return Layout(
        name,
        "w4a16",
        "cuda",
        -1,
        ("packed_weight", "packed_scale", "packed_meta"),
        ("qweight", "scales", "zeros"),
        pack=pack,
        unpack=unpack,
        run=run,
        grad_input=grad_input,
    )


register_layout(_w4a16_layout(torch.float16, "cuda_w4a16_fp16"), dtype=torch.float16)
register_layout(_w4a16_layout(torch.bfloat16, "cuda_w4a16_bf16"))
