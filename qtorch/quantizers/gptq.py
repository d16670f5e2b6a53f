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

from qtorch._backend import resolve
from qtorch.quantizers import mse as _mse
from qtorch.quantizers.grid import KINDS, Grid, codes, params_from_range, rtn_range


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


def gptq_block_reference(
    w1: Tensor, u1: Tensor, st: Tensor, zt: Tensor, inv_d: Tensor, q: Tensor, err: Tensor, kind: int
) -> None:
    """The per-column loop inside one column block (kernel "gptq_block"; the C++ CPU kernel,
    csrc/cpu/gptq.cpp, computes the same bits). w1 [B, N]: the block's columns of W transposed
    (row i = column i, updated in place), u1 [B, B] the factor's block, st / zt [B, N] each
    column's scale / zero, inv_d [B] = 1 / diag(U) on the block; writes the codes into q and
    the scaled errors into err [B, N]. kind: index into grid.KINDS. For i = 0 .. B-1:
        q[i] = codes(w1[i]);  err[i] = (w1[i] - (q[i] - zt[i]) st[i]) inv_d[i]
        w1[j] -= u1[i, j] err[i]   (j > i)"""
    grid = Grid(KINDS[kind], 1)
    b = w1.shape[0]
    for i in range(b):
        col = w1[i]
        qi = codes(grid, col, st[i], zt[i])
        q[i] = qi
        e = (col - (qi - zt[i]) * st[i]) * inv_d[i]
        err[i] = e
        if i + 1 < b:
            # the product rounded, then the difference (not addr_, which may fuse the two)
            w1[i + 1 :].sub_(torch.outer(u1[i, i + 1 :], e))


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
    refit: bool = False,
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
    _, block_kernel = resolve("gptq_block", w.device)
    kind = KINDS.index(grid.kind)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2]
        err1 = torch.empty_like(w1)
        block_kernel(
            w1,
            u[i1:i2, i1:i2].contiguous(),
            st[i1:i2],
            zt[i1:i2],
            inv_d[i1:i2].contiguous(),
            qt[i1:i2],
            err1,
            kind,
        )
        if i2 < k:
            wt[i2:].addmm_(u[i1:i2, i2:].t(), err1, alpha=-1)
    q = torch.empty_like(w)
    q[:, perm] = qt.t()
    if refit:
        scale = refit_scales(grid, w, q, scale, zero, h)
    return q, scale, zero


def refit_scales(
    grid: Grid,
    w: Tensor,
    q: Tensor,
    scale: Tensor,
    zero: Tensor,
    h: Tensor,
    *,
    rows: int = 128,
) -> Tensor:
    """The scales [N, G] that minimise the layer's output error ‖X(W − Ŵ)ᵀ‖² over the scales
    alone, the codes q and zeros fixed: per row, ŵ = A s with A[k, g] = (q_k − z_g) on group
    g's columns, so s solves (AᵀHA) s = AᵀH w, a G×G system. The grid is unchanged (zeros
    stay what they were). A row keeps its old scales unless the new ones are finite, positive
    and give a strictly smaller error."""
    n, k = w.shape
    gs = grid.group_of(k)
    g = k // gs
    w = w.float()
    h = h.float()
    hr = h.reshape(k, g, gs)
    out = scale.clone()
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        v = (q[r0:r1].reshape(r1 - r0, g, gs) - zero[r0:r1, :, None]).float()  # [R, G, gs]
        # b[r, i, h'] = Σ_{j in group h'} H[i, j] v[r, j]
        b = torch.einsum("ihs,rhs->rih", hr, v)  # [R, K, G]
        c = torch.einsum("rgs,rgsh->rgh", v, b.reshape(r1 - r0, g, gs, g))  # AᵀHA [R, G, G]
        hw = w[r0:r1] @ h  # (H w) per row, H symmetric
        rhs = (v * hw.reshape(r1 - r0, g, gs)).sum(-1)  # AᵀH w [R, G]
        old = scale[r0:r1].float()

        def err(s):  # ‖X(w − ŵ)ᵀ‖² − wᵀHw = sᵀCs − 2 rᵀs, for the true C and r
            return (s[:, None, :] @ c @ s[:, :, None]).reshape(-1) - 2 * (rhs * s).sum(-1)

        # a group whose codes all sit on its zero (C's row and column 0) has a free scale:
        # its equation becomes s_g = old_g; the others get a relative ridge of 1e-6
        d = c.diagonal(dim1=-2, dim2=-1)
        dead = d == 0
        lam = 1e-6 * d.mean(-1, keepdim=True)
        a = c.clone()
        a.diagonal(dim1=-2, dim2=-1).copy_(torch.where(dead, torch.ones_like(d), d + lam))
        sol = torch.linalg.solve_ex(a, torch.where(dead, old, rhs))[0]
        ok = torch.isfinite(sol).all(-1) & (sol > 0).all(-1) & (err(sol) < err(old))
        out[r0:r1] = torch.where(ok[:, None], sol, old)
    return out
