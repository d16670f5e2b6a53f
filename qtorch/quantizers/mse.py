"""MSE range search (data-free): per int4 group or int8 row, the (scale, zero) of the
candidate range, among RTN's own range shrunk by the factors p in SHRINK (p = 1 is RTN's),
whose reconstruction error Σ_k c_k (w_k - ŵ_k)² is smallest (c_k = 1, or a per-column
weight such as diag(XᵀX) when GPTQ calls it). Candidates on the same grid:

    int8, int4 symmetric      amax' = p · amax
    int4, integer zeros       [lo', hi'] = [p · lo, p · hi]      (0 stays inside; zero rounded)
    int4, float zeros         centre ± p · half-width of [min, max]

Ties keep the larger range, so p = 1 (RTN) wins unless a candidate is strictly better: the
error is never above RTN's for any group.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtorch.quantizers.grid import Grid, fake_quant, params_from_range, rtn_range

# shrink factors tried, RTN's range (1.0) first
SHRINK = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 ... 0.5

_CHUNK = 1 << 16  # elements of w per step: the temporaries stay in cache


def candidate_range(grid: Grid, lo: Tensor, hi: Tensor, p: float) -> tuple[Tensor, Tensor]:
    if p == 1.0:
        return lo, hi
    if grid.kind == "int4_float":
        mid, half = (hi + lo) * 0.5, (hi - lo) * (0.5 * p)
        return mid - half, mid + half
    return lo * p, hi * p


def search(
    grid: Grid, w: Tensor, col_weight: Tensor | None = None, shrink: tuple[float, ...] = SHRINK
) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (scale, zero) float32 [N, G] (G = K // group_size, 1 for int8)."""
    n, k = w.shape
    gs = grid.group_of(k)
    w = w.float()
    scale = torch.empty(n, k // gs, dtype=torch.float32, device=w.device)
    zero = torch.empty_like(scale)
    c = None if col_weight is None else col_weight.float().reshape(1, k // gs, gs)
    rows = max(1, _CHUNK // k)
    for r0 in range(0, n, rows):
        wg = w[r0 : r0 + rows].reshape(-1, k // gs, gs)
        lo, hi = rtn_range(grid, wg)
        best_s = best_z = best_e = None
        for p in shrink:
            s, z = params_from_range(grid, *candidate_range(grid, lo, hi, p))
            d = fake_quant(grid, wg, s[..., None], z[..., None]) - wg
            d = d * d
            if c is not None:
                d = d * c
            e = d.sum(dim=-1)
            if best_e is None:
                best_s, best_z, best_e = s, z, e
                continue
            better = e < best_e
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
            best_e = torch.where(better, e, best_e)
        scale[r0 : r0 + rows], zero[r0 : r0 + rows] = best_s, best_z
    return scale, zero
