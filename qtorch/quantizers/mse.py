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

from qtorch._backend import resolve
from qtorch.quantizers.grid import KINDS, Grid, params_from_range, rtn_range

# shrink factors tried, RTN's range (1.0) first
SHRINK = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 ... 0.5

_CHUNK = 1 << 20  # elements of w times candidates per step: the temporaries stay in cache


def candidate_range(grid: Grid, lo: Tensor, hi: Tensor, p: float) -> tuple[Tensor, Tensor]:
    if p == 1.0:
        return lo, hi
    if grid.kind == "int4_float":
        mid, half = (hi + lo) * 0.5, (hi - lo) * (0.5 * p)
        return mid - half, mid + half
    return lo * p, hi * p


def _sq_error(grid: Grid, w: Tensor, s: Tensor, z: Tensor) -> Tensor:
    """(fake_quant(grid, w, s, z) − w)², the same operations as grid.codes / grid.dequant,
    in place on one temporary."""
    t = w / s
    t.round_()
    if grid.kind == "int8":
        t.clamp_(-127, 127)
    elif grid.kind == "int4_sym":
        t.clamp_(-8, 7).add_(8)
    elif grid.kind == "int4":
        t.add_(z).clamp_(0, 15)
    else:  # int4_float: round(w / s + z)
        t = (w / s).add_(z).round_().clamp_(0, 15)
    t.sub_(z).mul_(s).sub_(w)
    return t.mul_(t)


def search(
    grid: Grid, w: Tensor, col_weight: Tensor | None = None, shrink: tuple[float, ...] = SHRINK
) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (scale, zero) float32 [N, G] (G = K // group_size, 1 for int8), by the
    kernel "mse_search" of the backend in force (the C++ CPU kernel on the CPU;
    `search_reference` defines it and serves everywhere else)."""
    _, kernel = resolve("mse_search", w.device)
    return kernel(grid, w, col_weight, shrink)


def search_reference(
    grid: Grid, w: Tensor, col_weight: Tensor | None = None, shrink: tuple[float, ...] = SHRINK
) -> tuple[Tensor, Tensor]:
    """The reference of `search`. All candidates of a chunk of rows are evaluated in one
    broadcast [P, rows, G, gs]; the first smallest error wins (p = 1 first: RTN unless a
    candidate is strictly better)."""
    n, k = w.shape
    gs = grid.group_of(k)
    w = w.float()
    scale = torch.empty(n, k // gs, dtype=torch.float32, device=w.device)
    zero = torch.empty_like(scale)
    c = None if col_weight is None else col_weight.float().reshape(1, k // gs, gs)
    rows = max(1, _CHUNK // (k * len(shrink)))
    for r0 in range(0, n, rows):
        wg = w[r0 : r0 + rows].reshape(-1, k // gs, gs)
        lo, hi = rtn_range(grid, wg)
        cand = [params_from_range(grid, *candidate_range(grid, lo, hi, p)) for p in shrink]
        s = torch.stack([sz[0] for sz in cand])  # [P, rows, G]
        z = torch.stack([sz[1] for sz in cand])
        d = _sq_error(grid, wg, s[..., None], z[..., None])
        if c is not None:
            d.mul_(c)
        e = d.sum(dim=-1).nan_to_num_(nan=float("inf"))  # [P, rows, G]
        best = e.argmin(dim=0, keepdim=True)  # the first of equal minima
        scale[r0 : r0 + rows] = s.gather(0, best)[0]
        zero[r0 : r0 + rows] = z.gather(0, best)[0]
    return scale, zero


def search_cpu(
    grid: Grid, w: Tensor, col_weight: Tensor | None = None, shrink: tuple[float, ...] = SHRINK
) -> tuple[Tensor, Tensor]:
    """`search` by the C++ kernel (csrc/cpu/gptq.cpp): the reference's float32 operations per
    group, fused, with the sum over a group taken in order (so near-equal candidates may be
    chosen differently from the reference, never a worse one by more than that rounding)."""
    k = w.shape[1]
    cw = None if col_weight is None else col_weight.float().contiguous()
    return torch.ops.qtorch_cpu.mse_search(
        w.float().contiguous(), cw, grid.group_of(k), KINDS.index(grid.kind), list(shrink)
    )
