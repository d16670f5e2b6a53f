"""SmoothQuant for W8A8 (Xiao et al. 2023): move the activations' outlier channels into the
weight before both are quantized to int8.

Per input channel k of a linear y = x Wᵀ, with statistics from calibration inputs:

    s_k = max|x_k|^α / max|w_k|^(1−α)          (max over tokens, resp. over output channels)
    y   = (x / s) (W · diag(s))ᵀ

so the module stores quantize_int8(W · diag(s)) and divides x by s inside its per-token
activation quantization (every backend fuses the division there: no extra pass over x). α = 0
leaves the activations alone (s = 1/max|w_k|), α = 1 moves all their range into the weight.

Guards (so s is finite and positive): both maxima are clamped to at least `EPS` before the
powers, and a channel whose activation or weight maximum is 0 (never active, or a zero weight
column) gets s_k = 1: smoothing it cannot help, and a tiny s_k would blow up a later input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["EPS", "smooth_scale", "input_absmax", "run_calibration"]

EPS = 1e-5


def smooth_scale(act_absmax: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """act_absmax fp32 [K] (max|x_k| over the calibration tokens), weight [N, K] float,
    alpha in [0, 1] -> s fp32 [K] (module docstring), on weight's device."""
    a = act_absmax.to(device=weight.device, dtype=torch.float32)
    w = weight.detach().float().abs().amax(dim=0)
    s = a.clamp(min=EPS).pow(alpha) / w.clamp(min=EPS).pow(1.0 - alpha)
    return torch.where((a == 0) | (w == 0), torch.ones_like(s), s).contiguous()


def run_calibration(model: nn.Module, calibration_data) -> None:
    """Call model on every item: a Tensor as model(t), a tuple as model(*t), a dict as
    model(**t); without autograd."""
    with torch.no_grad():
        for item in calibration_data:
            if isinstance(item, dict):
                model(**item)
            elif isinstance(item, tuple):
                model(*item)
            else:
                model(item)


def input_absmax(model: nn.Module, calibration_data, want) -> dict[int, Tensor]:
    """{id(linear): max|x_k| fp32 [K]} over every input each `nn.Linear` of `model` for which
    `want(fqn, linear)` is true receives while `model` runs `calibration_data` (in eval mode).
    A layer never called has no entry. Forward pre-hooks record the maxima; the hooks are
    removed and every submodule's training flag is restored, whatever happens."""
    stats: dict[int, Tensor] = {}

    def record(mod, args):
        x = args[0] if args else None
        if not isinstance(x, Tensor) or x.shape[-1] != mod.in_features or x.numel() == 0:
            return
        m = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        old = stats.get(id(mod))
        stats[id(mod)] = m if old is None else torch.maximum(old, m.to(old.device))

    handles = []
    modes = [(m, m.training) for m in model.modules()]
    seen: set[int] = set()
    try:
        for fqn, mod in model.named_modules(remove_duplicate=False):
            if isinstance(mod, nn.Linear) and id(mod) not in seen and want(fqn, mod):
                seen.add(id(mod))
                handles.append(mod.register_forward_pre_hook(record))
        model.eval()
        run_calibration(model, calibration_data)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return stats
