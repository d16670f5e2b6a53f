"""qtorch.nn: quantized drop-in `nn.Linear` replacements and distillation-loss modules."""

from qtorch.nn.linear import Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear
from qtorch.nn.loss import DistillationLoss, FusedLinearDistillationLoss

__all__ = [
    "Int8DynamicLinear",
    "Int8WeightOnlyLinear",
    "Int4WeightOnlyLinear",
    "DistillationLoss",
    "FusedLinearDistillationLoss",
]
