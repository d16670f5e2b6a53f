"""The qtorch ops: `torch.library` custom ops in namespace `qtorch`, defined by family in
this package, and their public functions `qtorch.ops.<name>`, all made here.

Each op checks its arguments (metadata only, so the fake impl raises the same errors),
flattens leading dims, makes inputs contiguous, asks `qtorch._backend` which kernel runs for
this call, and restores the leading dims. The kernel signatures are in
`qtorch/backends/__init__.py`; the numerics are defined by `qtorch.reference`. The ops live
by family, as the references do: `int8_mm.py` (W8A8), `weight_only.py` (W8A16, W4A16 and the
linears' input gradients), `distillation.py`; `_common.py` holds what they share.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtorch.ops import distillation as _distillation  # noqa: F401  (defines the loss ops)
from qtorch.ops import int8_mm as _int8_mm
from qtorch.ops import weight_only as _weight_only
from qtorch.ops._common import FAST, _check_loss_call_types, _public

__all__ = [
    "quantize_int8",
    "int8_scaled_mm",
    "int8_linear",
    "int8_linear_smooth",
    "int8_weight_only_linear",
    "quantize_int4",
    "dequantize_int4",
    "int4_weight_only_linear",
    "distillation_loss",
    "fused_linear_distillation_loss",
]

quantize_int8 = _public(_int8_mm.quantize_int8)
int8_scaled_mm = _public(_int8_mm.int8_scaled_mm)
int8_linear = _public(_int8_mm.int8_linear, FAST.get("int8_linear"))
int8_linear_smooth = _public(_int8_mm.int8_linear_smooth)
int8_weight_only_linear = _public(
    _weight_only.int8_weight_only_linear, FAST.get("int8_weight_only_linear")
)
quantize_int4 = _public(_weight_only.quantize_int4)
dequantize_int4 = _public(_weight_only.dequantize_int4)
int4_weight_only_linear = _public(
    _weight_only.int4_weight_only_linear, FAST.get("int4_weight_only_linear")
)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    divergence: str = "kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    """Knowledge-distillation loss (API.md): alpha · T² · D(teacher, student) + (1 − alpha) · CE.

    student_logits, teacher_logits [..., V] (fp32/fp16/bf16; float64 computes in float64),
    labels [...] integer or None. Returns a float32 scalar ("mean"/"sum") or per-token [...]
    ("none"); differentiable w.r.t. student_logits, the gradient in the student's dtype.
    """
    _check_loss_call_types(
        {
            "student_logits": (student_logits, False),
            "teacher_logits": (teacher_logits, False),
            "labels": (labels, True),
        },
        num_items_in_batch,
        temperature,
        alpha,
        beta,
    )
    return torch.ops.qtorch.distillation_loss(
        student_logits,
        teacher_logits,
        labels,
        temperature=temperature,
        alpha=alpha,
        divergence=divergence,
        beta=beta,
        ignore_index=ignore_index,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
    )


def fused_linear_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    chunk_size: int | None = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    divergence: str = "kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    """distillation_loss(student_hidden @ student_weight.T + student_bias,
    teacher_hidden @ teacher_weight.T + teacher_bias, labels, ...) without ever holding the
    [tokens, V] logits: chunks of `chunk_size` tokens (default:
    `qtorch.reference.distillation.default_chunk_size`: the rows whose fp32 logits
    fill about 32 MiB, 2^23 values, at most all tokens).

    student_hidden [..., H], student_weight [V, H], teacher_hidden [..., Ht],
    teacher_weight [V, Ht] float, or a qtorch quantized linear module (Int8WeightOnlyLinear,
    Int4WeightOnlyLinear, Int8DynamicLinear) with in_features Ht and out_features V: then each
    chunk's teacher logits are the module's output on the chunk (its own bias; teacher_bias must
    be None), and its dequantized weight is never built (API.md, "Distillation with a quantized
    teacher"; a module is not an op argument, so that route's internal custom ops take what its
    forward runs, and it traces under torch.compile(fullgraph=True) too).
    Differentiable w.r.t. student_hidden, student_weight, student_bias; their gradients are
    computed during the forward pass, accumulated in fp32. No weight gradient is computed when
    student_weight.requires_grad is False.
    """
    from qtorch.nn.linear import _QuantizedLinear  # (qtorch.nn imports qtorch.ops)

    module_teacher = isinstance(teacher_weight, _QuantizedLinear)
    if not module_teacher and not isinstance(teacher_weight, Tensor):
        raise TypeError(
            f"teacher_weight must be a float tensor [V, Ht] or a qtorch quantized linear module "
            f"(Int8WeightOnlyLinear, Int4WeightOnlyLinear, Int8DynamicLinear), got "
            f"{type(teacher_weight).__name__}"
        )
    _check_loss_call_types(
        {
            "student_hidden": (student_hidden, False),
            "student_weight": (student_weight, False),
            "teacher_hidden": (teacher_hidden, False),
            "teacher_weight": (None if module_teacher else teacher_weight, module_teacher),
            "labels": (labels, True),
            "student_bias": (student_bias, True),
            "teacher_bias": (teacher_bias, True),
        },
        num_items_in_batch,
        temperature,
        alpha,
        beta,
    )
    if module_teacher:
        return _distillation.fused_linear_distillation_loss_module_teacher(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            labels,
            student_bias,
            teacher_bias,
            chunk_size,
            temperature=temperature,
            alpha=alpha,
            divergence=divergence,
            beta=beta,
            ignore_index=ignore_index,
            reduction=reduction,
            num_items_in_batch=num_items_in_batch,
        )
    return torch.ops.qtorch.fused_linear_distillation_loss(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        labels,
        student_bias,
        teacher_bias,
        chunk_size,
        temperature=temperature,
        alpha=alpha,
        divergence=divergence,
        beta=beta,
        ignore_index=ignore_index,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
    )
