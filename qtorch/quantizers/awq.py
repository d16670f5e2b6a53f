"""Activation-aware channel scaling (after AWQ, Lin et al. 2023, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration") for a group of layers reading one input X.

A layer computes X Wᵀ = (X / s)(W · diag(s))ᵀ for any positive s [K]: scaling up the columns
of the input channels that carry large activations gives them a finer share of their group's
grid, and the division of X by s is folded into whatever produced X (a norm's weight, or the
rows of the layer before; qtorch/calibrate.py finds and checks that producer). s is searched
as s = mean|x|^a, a in ALPHAS, normalised to a geometric mean of 1, minimising the group's
output error after quantization

    err(s) = tr(ΔW' H' ΔW'ᵀ),   W' = W · diag(s),  H' = H / (s sᵀ),  ΔW' = W' − Q(W')

(H = XᵀX of the layer's inputs, Q the grid's RTN, or MSE-search, rounding): the error of
X Wᵀ itself, since (X / s)(W' − Q(W'))ᵀ = X Wᵀ − (X / s) Q(W')ᵀ. a = 0 (s = 1, no scaling) is
a candidate, so the chosen s is never worse than none on this measure.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtorch.quantizers import mse as _mse
from qtorch.quantizers.grid import Grid, fake_quant, params_from_range, rtn_range

ALPHAS = tuple(i / 10 for i in range(11))


def output_error(grid: Grid, w: Tensor, h: Tensor, use_mse: bool = False) -> Tensor:
    """tr(ΔW H ΔWᵀ) (a float32 scalar) of w's quantization on `grid` (RTN ranges, or the MSE
    search's)."""
    n, k = w.shape
    gs = grid.group_of(k)
    if use_mse:
        scale, zero = _mse.search(grid, w)
    else:
        scale, zero = params_from_range(grid, *rtn_range(grid, w.reshape(n, k // gs, gs)))
    wq = fake_quant(grid, w.reshape(n, k // gs, gs), scale[..., None], zero[..., None])
    dw = w - wq.reshape(n, k)
    return ((dw @ h) * dw).sum()


def search_scale(
    grid: Grid,
    w: Tensor,
    h: Tensor,
    x_absmean: Tensor,
    *,
    alphas: tuple[float, ...] = ALPHAS,
    use_mse: bool = False,
    max_rows: int = 512,
) -> tuple[Tensor | None, float]:
    """(s float32 [K], a) minimising err(s) (module docstring) for the stacked weights w [N, K]
    of a group reading inputs with H = XᵀX [K, K] and per-channel mean|x| `x_absmean` [K];
    (None, 0.0) when no a > 0 beats s = 1. Channels that never saw a non-zero input keep
    s = 1 (their columns have no error to weigh). The error is summed over at most
    `max_rows` rows of w, evenly spaced (the rows are independent given H; the choice of a
    is a group-wide one)."""
    w = w.float()
    if w.shape[0] > max_rows:
        w = w[:: -(-w.shape[0] // max_rows)]
    h = h.float()
    m = x_absmean.float()
    live = m > 0
    if not bool(live.any()):
        return None, 0.0
    best_err = output_error(grid, w, h, use_mse)
    best: tuple[Tensor | None, float] = (None, 0.0)
    logm = torch.log(torch.where(live, m, torch.ones_like(m)))
    for a in alphas:
        if a == 0:
            continue
        ls = a * logm
        ls = torch.where(live, ls - ls[live].mean(), torch.zeros_like(ls))
        s = torch.exp(ls)
        err = output_error(grid, w * s, h / s[:, None] / s[None, :], use_mse)
        if bool(torch.isfinite(err)) and err < best_err:
            best_err, best = err, (s, a)
    return best
