"""Test setup. Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be
switched on before triton is first imported."""

import os
import sys
import zlib

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import qtorch  # noqa: E402
from qtorch import _backend  # noqa: E402
from qtorch.testing import device_for  # noqa: E402, F401  (the tests import it from here)

try:
    from hypothesis import settings

    settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is a test dependency; tests that need it import it themselves
    pass


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Each test draws the same random numbers whatever ran before it (CI once failed on data
    that depended on test order). QTORCH_TEST_SEED=k draws another set: sweep it to find
    tolerances that only hold by luck."""
    base = int(os.environ.get("QTORCH_TEST_SEED", "0"))
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) + base)
    yield


@pytest.fixture(autouse=True)
def _reset_backend_choice():
    """No test leaks a set_backend() into the next."""
    yield
    _backend.clear_backend()


class OpRecorder(TorchDispatchMode):
    """Records (op overload, numel of its first tensor result) for every op run under it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        self.calls.append((func, first.numel() if isinstance(first, torch.Tensor) else 0))
        return out


def kernel_backends() -> list[str]:
    """Available backends, each one the tests compare against the reference."""
    return qtorch.available_backends()


@pytest.fixture(params=["avx512_vnni", "avx2", "scalar"])
def isa(request):
    """Force one CPU kernel ISA for the test (skipped where the CPU lacks it, or without
    qtorch._C), then restore."""
    C = pytest.importorskip("qtorch._C", reason="qtorch._C (the C++ CPU kernels) is not built")
    before = C.isa()
    got = C.set_isa(request.param)
    try:
        if got != request.param:
            pytest.skip(f"CPU has no {request.param} (best: {got})")
        yield got
    finally:
        C.set_isa(before)


# Skip marks of the backend sections in the family test files (tests/test_<stem>.py).

cpu_kernels = pytest.mark.skipif(
    "cpu" not in qtorch.available_backends(),
    reason="qtorch._C (the C++ CPU kernels) is not built",
)
cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and _backend.backend_status()["cuda"][0]),
    reason="needs a CUDA device and the qtorch._C_cuda extension",
)
TRITON_RUNS = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


def triton_kernels(test):
    """Skip mark of the Triton tests (they need a CUDA device or TRITON_INTERPRET=1, which
    this file sets without a GPU). The interpreter evaluates both sides of tl.where in numpy,
    so masked lanes (-inf - -inf, 0 * inf) raise numpy warnings for values that are then
    discarded: those are ignored."""
    test = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")(test)
    return pytest.mark.skipif(
        not TRITON_RUNS,
        reason="Triton needs a CUDA device or TRITON_INTERPRET=1 (set by tests/conftest.py)",
    )(test)
