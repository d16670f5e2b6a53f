"""The `cuda` backend's plumbing (its kernels are tested per family in tests/test_int8_mm.py,
tests/test_weight_only.py and tests/test_distillation.py): that the backend reports "not
built" where qtorch._C_cuda is absent, and the compile check (.ci/cuda_check.sh: nvcc for
sm_80 + sm_90a, no register spills, IMMA / HMMA in the SASS), when nvcc is on PATH.
"""

import importlib
import importlib.util
import os
import shutil
import subprocess

import pytest

import qtorch
from qtorch import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(
    importlib.util.find_spec("qtorch._C_cuda") is not None, reason="qtorch._C_cuda is built here"
)
def test_backend_reports_not_built():
    with pytest.raises(ImportError):
        importlib.import_module("qtorch.backends.cuda")
    ok, why = _backend.backend_status()["cuda"]
    assert not ok and "_C_cuda" in why
    with pytest.raises(RuntimeError, match="cuda"):
        qtorch.set_backend("cuda")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cuda_compile_check(tmp_path):
    """.ci/cuda_check.sh: every .cu compiles for sm_80 and sm_90a without torch, no kernel
    spills registers, the int8 GEMMs contain IMMA and the int4 GEMMs HMMA."""
    r = subprocess.run(
        ["bash", os.path.join(ROOT, ".ci", "cuda_check.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "no spills" in r.stdout
    if os.environ.get("QTORCH_CUDA_PYTHON"):  # CI provides a CUDA torch: the binding must build
        assert "binding compiled, linked and loaded" in r.stdout, r.stdout[-4000:]
    for kernel in (
        "int8_mm_kernel",
        "weight_only_kernel<fp16, false",
        "weight_only_kernel<bf16, true",
        "quantize_int8_kernel",
        "distillation_kernel",
    ):
        assert kernel in r.stdout
