"""Backend choice: which implementation of an op runs, resolved per call.

Precedence: `use_backend(...)` scope > `set_backend(...)` > `QTORCH_BACKEND` > "auto".
Backends register kernels with `register_kernel(op, backend)`; each kernel takes the op's
arguments already validated, flattened to 2-D and made contiguous (see `qtorch/ops.py`).

This module is the one owner of that precedence. The C++ paths (the quantized modules' kernel
and eager fast path, csrc/cpu/linear_packed.cpp) only need to know whether the cpu backend
serves CPU tensors now; `set_backend` and `use_backend` push their state to them (the
process-wide choice, and how many scopes are open) and they hand every call they cannot
answer from that to Python.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os
import threading
from collections.abc import Callable

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
# What "auto" tries, fastest first, per device type. Triton on CPU (the interpreter) is for
# testing only and never chosen automatically.
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

_log = logging.getLogger("qtorch")
_KERNELS: dict[str, dict[str, Callable]] = {}  # op name -> backend -> kernel
_STATUS: dict[str, tuple[bool, str]] = {}  # backend -> (available, reason)
_loaded = False
_load_lock = threading.Lock()
_global_choice: str | None = None
_scoped_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "qtorch_backend", default=None
)

try:  # the compiled CPU extension, when built: the C side of the backend state
    from qtorch import _C as _cext
except ImportError:
    _cext = None
else:
    # Its C entry points (the AOTInductor shim of the quantized modules' op) must resolve for
    # libraries loaded later, such as a compiled AOTInductor package: Python loaded it with
    # RTLD_LOCAL; reopening it with RTLD_GLOBAL | RTLD_NOLOAD makes its symbols global.
    import ctypes

    try:
        ctypes.CDLL(_cext.__file__, mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)
    except (OSError, AttributeError):
        pass


def _push_global() -> None:
    if _cext is not None:
        _cext.set_backend_choice(-1 if _global_choice is None else _CODES[_global_choice])


_CODES = {"auto": 0, **{b: i + 1 for i, b in enumerate(BACKENDS)}}


def register_kernel(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: `fn` implements `op` for `backend`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn: Callable) -> Callable:
        _KERNELS.setdefault(op, {})[backend] = fn
        return fn

    return deco


def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not importable ({e})"
    if torch.cuda.is_available():
        return True, "triton with a CUDA device"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "triton interpreter (TRITON_INTERPRET=1), CPU tensors, for testing"
    return False, "no CUDA device and TRITON_INTERPRET is not 1"


def _load_backends() -> None:
    """Import every backend module once; each records why it is unavailable."""
    global _loaded
    if _loaded:
        return
    with _load_lock:
        if _loaded:
            return
        _STATUS["reference"] = (True, "pure PyTorch, any device")
        importlib.import_module("qtorch.backends.reference")
        for name in ("cpu", "triton", "cuda"):
            if name == "triton":
                ok, why = _triton_status()
                if not ok:
                    _STATUS[name] = (ok, why)
                    continue
            try:
                mod = importlib.import_module(f"qtorch.backends.{name}")
                _STATUS[name] = mod.status()
            except ImportError as e:  # a missing build: say why once, quietly
                _STATUS[name] = (False, f"not built or not importable: {e}")
            if not _STATUS[name][0]:
                _log.info("qtorch: backend %r unavailable: %s", name, _STATUS[name][1])
        _loaded = True


def backend_status() -> dict[str, tuple[bool, str]]:
    """{backend: (available, reason)} for every known backend."""
    _load_backends()
    return {b: _STATUS.get(b, (False, "unknown")) for b in BACKENDS}


def available_backends() -> list[str]:
    """Backends usable in this process, a subset of reference, cpu, triton, cuda."""
    return [b for b, (ok, _) in backend_status().items() if ok]


def _check_name(name: str, source: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{source}: backend name must be a str, got {type(name).__name__}")
    if name == "auto":
        return name
    if name not in BACKENDS:
        raise RuntimeError(
            f"{source}: unknown backend {name!r}; expected 'auto' or one of {BACKENDS}"
        )
    ok, why = backend_status()[name]
    if not ok:
        raise RuntimeError(f"{source}: backend {name!r} is not available: {why}")
    return name


def set_backend(name: str) -> None:
    """Set the process-wide backend: "auto" or one of `available_backends()`."""
    global _global_choice
    _global_choice = _check_name(name, "set_backend")
    _push_global()


def clear_backend() -> None:
    """Forget `set_backend`'s choice: QTORCH_BACKEND, else "auto", decides again (tests)."""
    global _global_choice
    _global_choice = None
    _push_global()


def get_backend() -> str:
    """The backend name in force here ("auto" unless overridden)."""
    scoped = _scoped_choice.get()
    if scoped is not None:
        return scoped
    if _global_choice is not None:
        return _global_choice
    env = os.environ.get("QTORCH_BACKEND")
    if env:
        return _check_name(env, "QTORCH_BACKEND environment variable")
    return "auto"


@contextlib.contextmanager
def use_backend(name: str):
    """Scoped override (per thread / async task, via a contextvar)."""
    token = _scoped_choice.set(_check_name(name, "use_backend"))
    if _cext is not None:
        _cext.backend_scopes(1)
    try:
        yield
    finally:
        if _cext is not None:
            _cext.backend_scopes(-1)
        _scoped_choice.reset(token)


def _serves(backend: str, device: torch.device) -> bool:
    if backend == "reference":
        return True
    if backend == "triton":
        return device.type == "cuda" or (
            device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
        )
    return device.type == backend


def resolve(op: str, device: torch.device) -> tuple[str, Callable]:
    """(backend name, kernel) that runs `op` on tensors of `device` now."""
    _load_backends()
    impls = _KERNELS.get(op, {})
    choice = get_backend()
    if choice == "auto":
        for b in _AUTO_ORDER.get(device.type, ("reference",)):
            if b in impls and _STATUS.get(b, (False,))[0]:
                return b, impls[b]
        return "reference", impls["reference"]
    if not _serves(choice, device):
        raise RuntimeError(f"backend {choice!r} cannot run on {device.type} tensors")
    if choice in impls:
        return choice, impls[choice]
    # The named backend has no kernel for this op (yet): the reference serves it.
    return "reference", impls["reference"]


def auto_backend(device: torch.device) -> str:
    """The backend "auto" prefers for tensors on `device` (whatever op)."""
    _load_backends()
    for b in _AUTO_ORDER.get(device.type, ("reference",)):
        if _STATUS.get(b, (False,))[0]:
            return b
    return "reference"


def reference_kernel(op: str) -> Callable:
    _load_backends()
    return _KERNELS[op]["reference"]


def kernel_coverage() -> dict[str, list[str]]:
    """{op: [backends that implement it]} (for `qtorch info`)."""
    _load_backends()
    return {op: sorted(b for b in impls) for op, impls in sorted(_KERNELS.items())}
