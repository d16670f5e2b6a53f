"""The `cpu` backend: compiled C++ kernels in qtorch._C (ops in the `qtorch_cpu` namespace)."""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension)

from qtorch import _C  # ImportError here means "not built"; _backend records why


def status() -> tuple[bool, str]:
    return True, f"C++ CPU kernels, ISA {_C.isa()}"


# Kernel registrations are added per op by the CPU kernel files (see qtorch/backends/__init__.py).

# --- int8 W8A8 kernels (quantize_int8, int8_scaled_mm, int8_linear) -------------------------
# (section owned by the int8 CPU work)

# --- weight-only kernels (int8_weight_only_linear, quantize_int4, dequantize_int4,
#     int4_weight_only_linear) ---------------------------------------------------------------
# (section owned by the weight-only CPU work)

# --- distillation kernels (distillation_loss, fused_linear_distillation_loss) ---------------
# (section owned by the distillation CPU work)
