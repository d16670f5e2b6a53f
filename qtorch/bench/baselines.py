"""Plain-PyTorch baselines that take more than one line: what a user writes without qtorch.
The one-liners (F.linear, the reference's eager quantize/dequantize) are inline in cases.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def eager_distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float = 1.0,
    alpha: float = 0.5,
    divergence: str = "kl",
    beta: float = 0.5,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The distillation loss in eager PyTorch, reduction "mean" over counted tokens, fp32 math
    (low-precision logits are upcast first, as the op's contract computes):

        loss = mean over tokens with labels != ignore_index of
               alpha * T² * D(p_t || q_s) + (1 - alpha) * cross_entropy(s, label)

    with q_s = softmax(s / T), p_t = softmax(t / T) and D the divergence: kl = KL(p || q)
    (F.kl_div on log-probabilities), reverse_kl = KL(q || p), jsd = beta * KL(p || m) +
    (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q. Without labels: the mean over all
    tokens of the soft term only. Backward is autograd through all of it."""
    t = temperature
    s32 = student.float()
    log_q = F.log_softmax(s32 / t, dim=-1)
    log_p = F.log_softmax(teacher.float() / t, dim=-1)
    if divergence == "kl":
        d = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    elif divergence == "reverse_kl":
        d = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    elif divergence == "jsd":
        log_m = (beta * log_p.exp() + (1 - beta) * log_q.exp()).log()
        d = beta * F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1) + (
            1 - beta
        ) * F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1)
    else:
        raise ValueError(f"divergence must be kl, reverse_kl or jsd, got {divergence!r}")
    soft = d * (t * t)
    if labels is None:
        return alpha * soft.mean()
    hard = F.cross_entropy(s32, labels, ignore_index=ignore_index, reduction="none")
    keep = (labels != ignore_index).float()
    return ((alpha * soft + (1 - alpha) * hard) * keep).sum() / keep.sum().clamp(min=1)
