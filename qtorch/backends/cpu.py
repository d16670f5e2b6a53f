"""The `cpu` backend: compiled C++ kernels in qtorch._C (ops in the `qtorch_cpu` namespace)."""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension)

from qtorch import _C  # ImportError here means "not built"; _backend records why


def status() -> tuple[bool, str]:
    return True, f"C++ CPU kernels, ISA {_C.isa()}"


# Kernel registrations are added per op by the CPU kernel files (see qtorch/backends/__init__.py).
