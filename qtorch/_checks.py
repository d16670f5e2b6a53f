"""Argument checks at the op boundary: wrong dtype -> TypeError, wrong shape -> ValueError,
each naming the argument and what it got. They read metadata only, so the fake (meta)
implementations run them too and torch.compile raises the same errors."""

from __future__ import annotations

import math

import torch

from qtorch.reference.distillation import DIVERGENCES

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT4_GROUP_SIZES = (32, 64, 128, 256)
INT4_ZERO_POINTS = ("int", "float")
INT4_ZERO_DTYPES = (torch.uint8, torch.float32)  # zero_point="int" / "float"
REDUCTIONS = ("mean", "sum", "none")


def tensor(name: str, t, *, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def dtype_in(name: str, t: torch.Tensor, allowed) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(
            f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}"
        )


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


# Exact int32 accumulation of int8 products (|a·b| <= 128 · 128) holds while
# 128 · 128 · K <= 2^31 - 1; beyond it the int8 GEMMs raise rather than wrap.
MAX_EXACT_K = (2**31 - 1) // (128 * 128)  # 131071


def exact_k(k: int) -> None:
    if k > MAX_EXACT_K:
        raise ValueError(
            f"K = {k} is too large for exact int32 accumulation of int8 products "
            f"(128 · 128 · K must be <= 2^31 - 1, so K <= {MAX_EXACT_K})"
        )


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


def zero_point(zp: str, symmetric: bool) -> None:
    """int4 zero_point: "int" (uint8 zeros) or "float" (float32 zeros, asymmetric only)."""
    if zp not in INT4_ZERO_POINTS:
        raise ValueError(f"zero_point must be one of {INT4_ZERO_POINTS}, got {zp!r}")
    if zp == "float" and symmetric:
        raise ValueError('zero_point="float" is asymmetric int4 only; got symmetric=True')


def smooth_scale(s, k: int, device) -> None:
    """SmoothQuant's per-input-channel divisor: float32 [K], on the weights' device."""
    tensor("smooth_scale", s)
    if s.dtype != torch.float32:
        raise TypeError(f"smooth_scale must be float32, got {s.dtype}")
    if s.dim() != 1 or s.shape[0] != k:
        raise ValueError(f"smooth_scale must have shape [K] = ({k},), got {tuple(s.shape)}")
    if s.device != device:
        raise ValueError(f"smooth_scale must be on {device}, got {s.device}")


# -------------------------------------------------------- distillation losses (ops and nn)


# The temperatures the losses accept. Below 0.01, s / T overflows fp32 for logits of ordinary
# size (|s| > 3e36 · T) and T² · D underflows, so kernels that divide in fp32 return inf/NaN
# where float64 math is finite; above 100 every softmax is flat to fp32 precision (D ~ 1e-8).
TEMPERATURE_RANGE = (0.01, 100.0)


def number(name: str, value) -> None:
    """A Python int or float (not a bool, a Tensor or a str): the schema types it `float`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a Python number (int or float), got {type(value).__name__} {value!r}"
        )


def loss_scalars(temperature, alpha, beta) -> None:
    """The float keywords of the distillation losses: numbers, in range."""
    number("temperature", temperature)
    number("alpha", alpha)
    number("beta", beta)
    lo, hi = TEMPERATURE_RANGE
    if not math.isfinite(temperature) or not lo <= temperature <= hi:
        raise ValueError(
            f"temperature must be a finite number in [{lo}, {hi}], got {temperature!r}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")


def loss_kwargs(temperature, alpha, divergence, beta, reduction, labels) -> None:
    """The loss keywords of both distillation losses. `labels` only needs to say whether
    labels are given (None: no hard-label term, so alpha must be 1.0)."""
    loss_scalars(temperature, alpha, beta)
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if labels is None and alpha != 1.0:
        raise ValueError(
            f"labels=None leaves no hard-label term, so alpha must be 1.0, got alpha={alpha!r}"
        )


def loss_labels(labels, lead: tuple, name_of_lead: str) -> None:
    """labels: None, or an integer tensor shaped like the logits without the last dim."""
    if labels is None:
        return
    tensor("labels", labels)
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(lead):
        raise ValueError(
            f"labels must have shape {tuple(lead)} ({name_of_lead} without the last dim), "
            f"got {tuple(labels.shape)}"
        )


def num_items_in_batch(value) -> None:
    """None, an int >= 0 or a 0-dim tensor (the "mean" denominator)."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(
                f"num_items_in_batch must be an int or a 0-dim tensor, got shape "
                f"{tuple(value.shape)}"
            )
    elif not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(
            f"num_items_in_batch must be an int or a 0-dim tensor, got {type(value).__name__}"
        )
    elif value < 0:
        raise ValueError(f"num_items_in_batch must be >= 0, got {value}")
