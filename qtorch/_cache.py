"""Once-per-weight caches for backend-specific weight layouts.

The canonical layout (API.md) is what modules store; a backend that wants another layout
calls `packed(weight, key, fn)` and gets `fn(weight)` computed on first use and reused
until the weight tensor dies or is modified in place (its `_version` changes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _version(t: torch.Tensor) -> int:
    # Inference tensors (made under torch.inference_mode) have no version counter: their
    # in-place updates, possible only inside inference mode, are not seen.
    return -1 if t.is_inference() else t._version


def packed(weight: torch.Tensor, key: Any, fn: Callable[[], Any]) -> Any:
    """Return fn() cached on (weight, key); recomputed if `weight` changed in place."""
    slot = _CACHE.get(weight)
    if slot is None:
        slot = {}
        _CACHE[weight] = slot
    hit = slot.get(key)
    version = _version(weight)
    if hit is not None and hit[0] == version:
        return hit[1]
    value = fn()
    slot[key] = (version, value)
    return value


def clear() -> None:
    _CACHE.clear()
