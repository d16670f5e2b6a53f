"""The fixed quantization grids of API.md, as functions of (scale, zero) that every
weight quantizer (RTN, MSE, GPTQ) shares, so that all of them land on the same canonical
storage.

    Grid("int8")                 per row, symmetric: q in -127..127, ŵ = q * s
    Grid("int4_sym", gs)         per group: q = clamp(round(w / s), -8, 7) + 8, ŵ = (q - 8) * s
    Grid("int4", gs)             per group, integer zero z in 0..15:
                                 q = clamp(round(w / s) + z, 0, 15), ŵ = (q - z) * s
    Grid("int4_float", gs)       per group, float32 zero (API.md zero_point="float"):
                                 q = clamp(round(w / s + z), 0, 15), ŵ = (q - z) * s

`scale` / `zero` broadcast against `w` (per row [N, 1], per group [N, G, 1], or per column
[N]); all math in float32, round half to even (torch.round), as the references compute.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

KINDS = ("int8", "int4_sym", "int4", "int4_float")


@dataclasses.dataclass(frozen=True)
class Grid:
    kind: str
    group_size: int | None = None  # None: one group per row (int8)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"grid kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def symmetric(self) -> bool:
        return self.kind in ("int8", "int4_sym")

    def groups(self, k: int) -> int:
        return 1 if self.group_size is None else k // self.group_size

    def group_of(self, k: int) -> int:
        return k if self.group_size is None else self.group_size


def grid_for(
    family: str, group_size: int | None = None, symmetric: bool = False, zero_point: str = "int"
) -> Grid:
    """The grid of a config: family "int8" (both int8 configs) or "int4"."""
    if family == "int8":
        return Grid("int8")
    if symmetric:
        if zero_point != "int":
            raise ValueError('zero_point="float" needs symmetric=False')
        return Grid("int4_sym", group_size)
    if zero_point not in ("int", "float"):
        raise ValueError(f'zero_point must be "int" or "float", got {zero_point!r}')
    return Grid("int4" if zero_point == "int" else "int4_float", group_size)


def params_from_range(grid: Grid, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """(scale, zero) float32 of the range [lo, hi] (asymmetric kinds) or of amax = hi
    (symmetric kinds, lo ignored). With lo, hi the group's RTN range these are RTN's own."""
    if grid.kind == "int8":
        return torch.where(hi == 0, torch.ones_like(hi), hi / 127), torch.zeros_like(hi)
    if grid.kind == "int4_sym":
        return torch.where(hi == 0, torch.ones_like(hi), hi / 7), torch.full_like(hi, 8.0)
    scale = torch.where(hi == lo, torch.ones_like(hi), (hi - lo) / 15)
    if grid.kind == "int4":
        return scale, torch.clamp(torch.round(-lo / scale), 0, 15)
    return scale, -lo / scale


def rtn_range(grid: Grid, wg: Tensor) -> tuple[Tensor, Tensor]:
    """RTN's (lo, hi) of groups along the last dim of wg (API.md): amax for the symmetric
    kinds (lo = -amax), min/max widened to contain 0 for integer zeros, the group's own
    min/max for float zeros."""
    if grid.symmetric:
        amax = wg.abs().amax(dim=-1)
        return -amax, amax
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    if grid.kind == "int4":
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    return lo, hi


def codes(grid: Grid, w: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """The grid codes q (float32) of w: int8 -127..127, int4 0..15 (API.md formulas)."""
    if grid.kind == "int8":
        return torch.clamp(torch.round(w / scale), -127, 127)
    if grid.kind == "int4_sym":
        return torch.clamp(torch.round(w / scale), -8, 7) + 8
    if grid.kind == "int4":
        return torch.clamp(torch.round(w / scale) + zero, 0, 15)
    return torch.clamp(torch.round(w / scale + zero), 0, 15)


def dequant(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """ŵ = (q - zero) * scale (zero = 0 for int8)."""
    return (q - zero) * scale


def fake_quant(grid: Grid, w: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return dequant(codes(grid, w, scale, zero), scale, zero)


def to_storage(grid: Grid, q: Tensor, scale: Tensor, zero: Tensor) -> dict[str, Tensor]:
    """Codes q [N, K] (float) and per-group scale / zero [N, G] -> the canonical buffers of
    the module: int8 {qweight int8 [N, K], weight_scale fp32 [N]}; int4 {qweight uint8
    [N, K // 2] (k even: low nibble of byte k // 2), scales fp32 [N, G], zeros uint8 [N, G]
    (float32 for float zeros)}."""
    if grid.kind == "int8":
        return {
            "qweight": q.to(torch.int8).contiguous(),
            "weight_scale": scale.reshape(-1).float().contiguous(),
        }
    q8 = q.to(torch.uint8)
    qweight = (q8[:, 0::2] | (q8[:, 1::2] << 4)).contiguous()
    zdtype = torch.float32 if grid.kind == "int4_float" else torch.uint8
    return {
        "qweight": qweight,
        "scales": scale.float().contiguous(),
        "zeros": zero.to(zdtype).contiguous(),
    }


def from_storage(grid: Grid, tensors: dict[str, Tensor]) -> Tensor:
    """ŵ float32 [N, K] from the canonical buffers, by the formulas of API.md."""
    if grid.kind == "int8":
        return tensors["qweight"].float() * tensors["weight_scale"][:, None]
    qw = tensors["qweight"]
    q = torch.stack((qw & 0xF, qw >> 4), dim=-1).reshape(qw.shape[0], -1).float()
    n, k = q.shape
    gs = grid.group_size
    w = (q.reshape(n, k // gs, gs) - tensors["zeros"].float()[..., None]) * tensors["scales"][
        ..., None
    ]
    return w.reshape(n, k)
