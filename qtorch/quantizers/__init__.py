"""Weight quantizers onto the fixed grids of API.md: "rtn" (round to nearest), "mse" (range
search, data-free) and "gptq" (Hessian error feedback, needs the layer's H = XᵀX). Each
returns the module's canonical buffers, so every kernel serves every algorithm.

    grid.py   the grids and canonical storage      mse.py   the range search
    gptq.py   GPTQ for one weight                  qtorch/calibrate.py   capturing H on a model
"""

from __future__ import annotations

from torch import Tensor

from qtorch.quantizers import gptq, mse
from qtorch.quantizers.grid import Grid, codes, grid_for, params_from_range, rtn_range, to_storage

ALGORITHMS = ("rtn", "mse", "gptq")


def check_algorithm(algorithm) -> None:
    if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")


def quantize_weight(
    grid: Grid,
    w: Tensor,
    algorithm: str,
    h: Tensor | None = None,
) -> dict[str, Tensor]:
    """w [N, K] float -> the canonical buffers (grid.to_storage) of `algorithm` on `grid`.
    "gptq" needs h = XᵀX [K, K] of the layer's inputs; with h=None (a layer the calibration
    data never reached) it falls back to "mse"."""
    check_algorithm(algorithm)
    w = w.detach().float()
    n, k = w.shape
    gs = grid.group_of(k)
    if algorithm == "gptq" and h is not None:
        q, scale, zero = gptq.quantize(grid, w, h)
        return to_storage(grid, q, scale, zero)
    if algorithm == "rtn":
        scale, zero = params_from_range(grid, *rtn_range(grid, w.reshape(n, k // gs, gs)))
    else:
        scale, zero = mse.search(grid, w)
    q = codes(grid, w.reshape(n, k // gs, gs), scale[..., None], zero[..., None])
    return to_storage(grid, q.reshape(n, k), scale, zero)


__all__ = ["ALGORITHMS", "Grid", "check_algorithm", "grid_for", "quantize_weight"]
