"""Knowledge-distillation losses as modules: thin wrappers over `qtorch.ops.distillation_loss`
and `qtorch.ops.fused_linear_distillation_loss` (semantics in API.md, "Distillation loss")."""

from __future__ import annotations

from torch import Tensor, nn

from qtorch import _checks as chk
from qtorch import ops

__all__ = ["DistillationLoss", "FusedLinearDistillationLoss"]


class _DistillationBase(nn.Module):
    def __init__(
        self,
        temperature: float = 1.0,
        alpha: float = 0.5,
        divergence: str = "kl",
        beta: float = 0.5,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        # Fail at construction rather than at the first step. `labels` is only known at call
        # time, so the "alpha must be 1.0 without labels" rule is checked by the op.
        chk.loss_kwargs(temperature, alpha, divergence, beta, reduction, labels=True)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.divergence = divergence
        self.beta = float(beta)
        self.ignore_index = int(ignore_index)
        self.reduction = reduction

    def _kwargs(self) -> dict:
        return dict(
            temperature=self.temperature,
            alpha=self.alpha,
            divergence=self.divergence,
            beta=self.beta,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._kwargs().items())


class DistillationLoss(_DistillationBase):
    """alpha · T² · D(teacher ‖ student) + (1 − alpha) · CE(student, labels), per API.md.

    forward(student_logits [..., V], teacher_logits [..., V], labels [...] int or None,
    num_items_in_batch int / 0-dim tensor / None) -> float32 loss (scalar, or [...] with
    reduction="none"); differentiable w.r.t. student_logits.
    """

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        labels: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
    ) -> Tensor:
        return ops.distillation_loss(
            student_logits,
            teacher_logits,
            labels,
            num_items_in_batch=num_items_in_batch,
            **self._kwargs(),
        )


class FusedLinearDistillationLoss(_DistillationBase):
    """The distillation loss on `student_hidden @ student_weight.T (+ student_bias)` against
    `teacher_hidden @ teacher_weight.T (+ teacher_bias)`, computed `chunk_size` tokens at a time
    so the [tokens, V] logits never exist (None:
    `qtorch.reference.distillation.default_chunk_size`: the rows whose fp32 logits
    fill about 32 MiB, 2^23 values, at most all tokens).

    forward(student_hidden [..., H], student_weight [V, H], teacher_hidden [..., Ht],
    teacher_weight [V, Ht], labels [...] or None, student_bias [V] or None,
    teacher_bias [V] or None, num_items_in_batch) -> float32 loss; differentiable w.r.t.
    student_hidden, student_weight and student_bias (no weight gradient is computed when
    student_weight.requires_grad is False).

    teacher_weight may also be a qtorch quantized linear module (Int8WeightOnlyLinear,
    Int4WeightOnlyLinear, Int8DynamicLinear; in_features Ht, out_features V), e.g. the lm_head
    of a teacher after `qtorch.quantize_`: each chunk's teacher logits are then the module's
    output on the chunk (its own bias; teacher_bias must be None) and its dequantized weight is
    never built (API.md, "Distillation with a quantized teacher").
    """

    def __init__(
        self,
        temperature: float = 1.0,
        alpha: float = 0.5,
        divergence: str = "kl",
        beta: float = 0.5,
        ignore_index: int = -100,
        reduction: str = "mean",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(temperature, alpha, divergence, beta, ignore_index, reduction)
        if chunk_size is not None and (
            not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
        self.chunk_size = chunk_size

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor | nn.Module,
        labels: Tensor | None = None,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
    ) -> Tensor:
        return ops.fused_linear_distillation_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            labels,
            student_bias,
            teacher_bias,
            self.chunk_size,
            num_items_in_batch=num_items_in_batch,
            **self._kwargs(),
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", chunk_size={self.chunk_size!r}"
