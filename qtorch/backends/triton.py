"""The `triton` backend: the Triton kernels in `kernels/` (imported as `qtorch._kernels`).

`qtorch._backend` imports this module only when Triton can run: with a CUDA device, or under
`TRITON_INTERPRET=1` on CPU tensors (for tests; never chosen by "auto" on CPU).
quantize_int4 / dequantize_int4 (offline weight conversion) and the linear backward helpers
have no Triton kernel; the reference serves them.
"""

from __future__ import annotations

import torch
import triton

from qtorch._backend import register_kernel
from qtorch._kernels import INTERPRET, distillation, int4_mm, int8_mm, quantize


def status() -> tuple[bool, str]:
    if torch.cuda.is_available():
        return True, f"Triton {triton.__version__} kernels on CUDA"
    if INTERPRET:
        return True, f"Triton {triton.__version__} interpreter (TRITON_INTERPRET=1), CPU tensors"
    return False, "no CUDA device and TRITON_INTERPRET is not 1"


register_kernel("quantize_int8", "triton")(quantize.quantize_int8)
register_kernel("int8_scaled_mm", "triton")(int8_mm.int8_scaled_mm)
register_kernel("int8_linear", "triton")(int8_mm.int8_linear)
register_kernel("int8_weight_only_linear", "triton")(int8_mm.int8_weight_only_linear)
register_kernel("int4_weight_only_linear", "triton")(int4_mm.int4_weight_only_linear)
register_kernel("distillation_loss", "triton")(distillation.distillation_loss)
register_kernel("fused_linear_distillation_loss", "triton")(
    distillation.fused_linear_distillation_loss
)
