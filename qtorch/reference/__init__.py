"""Pure-PyTorch references: the definition of every qtorch op, and the kernel that serves any
device when no compiled backend does. Tests and benchmarks import these; nobody re-writes them."""

from qtorch.reference.distillation import distillation_loss, fused_linear_distillation_loss
from qtorch.reference.int8_mm import (
    int8_linear,
    int8_linear_smooth,
    int8_scaled_mm,
    quantize_int8,
)
from qtorch.reference.weight_only import (
    dequantize_int4,
    int4_weight_only_linear,
    int8_weight_only_linear,
    quantize_int4,
)

__all__ = [
    "quantize_int8",
    "quantize_int4",
    "dequantize_int4",
    "int8_scaled_mm",
    "int8_linear",
    "int8_linear_smooth",
    "int8_weight_only_linear",
    "int4_weight_only_linear",
    "distillation_loss",
    "fused_linear_distillation_loss",
]
