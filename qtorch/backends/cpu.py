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
from qtorch._cache import packed as _packed  # noqa: E402


def _int8_vnni_weight(w: torch.Tensor) -> torch.Tensor:
    """w int8 [N, K] -> the VNNI-packed weight (u8 bytes; layout in csrc/cpu/kernels/int8_mm.h),
    packed once per weight tensor and reused until it dies or changes in place."""
    return _packed(w, "cpu_int8_vnni", lambda: torch.ops.qtorch_cpu.int8_pack_weight(w))


@register_kernel("quantize_int8", "cpu")
def _quantize_int8(x):
    return torch.ops.qtorch_cpu.quantize_int8(x)


@register_kernel("int8_scaled_mm", "cpu")
def _int8_scaled_mm(a, b, scale_a, scale_b, bias, out_dtype):
    return torch.ops.qtorch_cpu.int8_scaled_mm_packed(
        a, _int8_vnni_weight(b), b.shape[0], scale_a, scale_b, bias, out_dtype
    )


@register_kernel("int8_linear", "cpu")
def _int8_linear(x, w_q, w_scale, bias):
    return torch.ops.qtorch_cpu.int8_linear_packed(
        x, _int8_vnni_weight(w_q), w_q.shape[0], w_scale, bias
    )


# --- weight-only kernels (int8_weight_only_linear, quantize_int4, dequantize_int4,
#     int4_weight_only_linear) ---------------------------------------------------------------
# (section owned by the weight-only CPU work)

# --- distillation kernels (distillation_loss, fused_linear_distillation_loss) ---------------
# (section owned by the distillation CPU work)
