"""Argument checks at the op boundary: wrong dtype -> TypeError, wrong shape -> ValueError,
each naming the argument and what it got. They read metadata only, so the fake (meta)
implementations run them too and torch.compile raises the same errors."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT4_GROUP_SIZES = (32, 64, 128, 256)


def tensor(name: str, t, *, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def dtype_in(name: str, t: torch.Tensor, allowed) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def ndim(name: str, t: torch.Tensor, n: int) -> None:
    if t.dim() != n:
        raise ValueError(f"{name} must be {n}-D, got shape {tuple(t.shape)}")


def min_ndim(name: str, t: torch.Tensor, n: int) -> None:
    if t.dim() < n:
        raise ValueError(f"{name} must have at least {n} dim(s), got shape {tuple(t.shape)}")


def shape(name: str, t: torch.Tensor, expected: tuple, why: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        extra = f" ({why})" if why else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{extra}, got {tuple(t.shape)}")


def positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def same_device(**tensors) -> None:
    devs = {k: v.device for k, v in tensors.items() if v is not None}
    if len({(d.type, d.index) for d in devs.values()}) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devs.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def vector(name: str, t: torch.Tensor, length: int, what: str) -> None:
    """A per-row/per-column vector: [length] (or [length, 1], as torch._scaled_mm takes)."""
    if not (t.dim() == 1 or (t.dim() == 2 and t.shape[1] == 1)) or t.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},) ({what}), got {tuple(t.shape)}")


def bias(t, n: int) -> None:
    if t is None:
        return
    tensor("bias", t)
    dtype_in("bias", t, FLOAT_DTYPES)
    shape("bias", t, (n,), "out_features")


def group_size(gs: int) -> None:
    if not isinstance(gs, int) or isinstance(gs, bool):
        raise TypeError(f"group_size must be an int, got {type(gs).__name__}")
    if gs not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {gs}")
