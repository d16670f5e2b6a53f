"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers") for one weight W [N, K] given H = XᵀX [K, K] of the layer's
inputs X [M, K], on a fixed grid (qtorch.quantizers.grid).

It minimizes ‖XWᵀ − XŴᵀ‖² column by column: quantizing column k leaves an error
e = (w_k − ŵ_k) / U[k, k] that is pushed onto the columns not yet quantized, W[:, j] −= e·U[k, j]
(j > k), where U is the upper Cholesky factor of (H + λI)⁻¹, λ = damp · mean(diag H). Columns
go in blocks of `block_size`: inside a block the update is per column, the block's total error
reaches the later columns in one GEMM.

act_order: columns in descending diag(H) order (the largest activations first, while many
columns are left to absorb their error). With it the groups are static: each group's
(scale, zero) is fixed beforehand from the original weights (RTN's or the MSE search's), so
groups stay contiguous along K and the canonical storage is unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtorch.quantizers import mse as _mse
from qtorch.quantizers.grid import Grid, codes, params_from_range, rtn_range


def inverse_hessian_factor(h: Tensor, damp: float = 0.01) -> Tensor:
    """U upper-triangular with UᵀU = (H + λI)⁻¹, λ = damp · mean(diag H); fp32. A column
    that never saw a non-zero input (diag 0) gets H[k, k] = 1: its error goes nowhere. If the
    damped H is still not positive definite (rounding), λ grows tenfold, up to 3 times."""
    h = h.float().clone()
    diag = h.diagonal()
    diag[diag == 0] = 1.0
    lam = damp * diag.mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(4):
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if info.item() == 0:
            hinv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info.item() == 0:
                return u
        lam = lam * 10
    raise RuntimeError("GPTQ: the damped Hessian is not positive definite")


def static_params(
    grid: Grid, w: Tensor, use_mse: bool = True, col_weight: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(scale, zero) [N, G] of the original weights: the MSE search's or RTN's."""
    if use_mse:
        return _mse.search(grid, w, col_weight=col_weight)
    n, k = w.shape
    gs = grid.group_of(k)
    return params_from_range(grid, *rtn_range(grid, w.float().reshape(n, k // gs, gs)))


def quantize(
    grid: Grid,
    w: Tensor,
    h: Tensor,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    use_mse: bool = True,
    weighted_mse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """w [N, K] float, h = XᵀX [K, K] -> (codes q float32 [N, K], scale [N, G], zero [N, G])
    on `grid`, with ŵ = (q − zero) · scale per group (module docstring)."""
    n, k = w.shape
    w = w.float()
    scale, zero = static_params(grid, w, use_mse, col_weight=h.diagonal() if weighted_mse else None)
    gs = grid.group_of(k)
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        u = inverse_hessian_factor(h[perm][:, perm], damp)
    else:
        perm = torch.arange(k, device=w.device)
        u = inverse_hessian_factor(h, damp)
    group = perm // gs
    # work transposed: column k of W is the contiguous row k of wt
    wt = w[:, perm].t().contiguous()  # [K, N]
    st = scale.t()[group]  # [K, N] the scale of each (permuted) column's group
    zt = zero.t()[group]
    qt = torch.empty_like(wt)
    inv_d = 1.0 / u.diagonal()
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2]
        err1 = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            col = w1[i]
            q = codes(grid, col, st[j], zt[j])
            qt[j] = q
            e = (col - (q - zt[j]) * st[j]) * inv_d[j]
            err1[i] = e
            if i + 1 < i2 - i1:
                w1[i + 1 :].addr_(u1[i, i + 1 :], e, alpha=-1)
        if i2 < k:
            wt[i2:].addmm_(u[i1:i2, i2:].t(), err1, alpha=-1)
    q = torch.empty_like(w)
    q[:, perm] = qt.t()
    return q, scale, zero
