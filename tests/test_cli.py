"""The command line: `qtorch info` and `qtorch validate` (in-process and as `python -m`)."""

import subprocess
import sys

import pytest

from qtorch import _backend
from qtorch.cli import main


def test_info_lists_backends_and_features(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("reference", "cpu", "triton", "cuda"):
        assert name in out
    assert "torch" in out and "kernels per op" in out
    if "cpu" in _backend.available_backends():
        assert "avx512_vnni=" in out and "CPU kernel ISA in use" in out
        assert "CPU kernels: int8_mm " in out and "; distillation " in out


def test_info_says_whether_amx_is_usable_and_which_bf16_head_runs(capsys, monkeypatch):
    """Machines printing the same CPU model name differ in AMX, and the default bf16
    distillation head follows it (QTORCH_CPU_BF16_GEMM forces either way): `qtorch info`
    says both, from the cpu backend's own probe and choice."""
    if "cpu" not in _backend.available_backends():
        pytest.skip("qtorch._C not built: `qtorch info` prints no AMX line")
    from qtorch.backends import cpu as cpu_backend

    for usable in (True, False):
        monkeypatch.setattr(cpu_backend, "_AMX", usable)
        for flag in ("", "0", "1"):
            monkeypatch.setenv("QTORCH_CPU_BF16_GEMM", flag)
            assert main(["info"]) == 0
            out = capsys.readouterr().out
            assert f"AMX usable by torch: {'yes' if usable else 'no'};" in out
            mkl = flag == "1" or (flag == "" and usable)
            mkl = mkl and cpu_backend._ops.bf16_gemm_available()
            want = "oneMKL bf16 GEMM" if mkl else "fp32 GEMMs on slices widened from bf16"
            assert f"bf16 distillation heads: {want}" in out


def test_validate_reference_quick(capsys):
    assert main(["validate", "--backend", "reference", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "MISMATCH" not in out and " 0 failed" in out


def test_validate_detects_a_wrong_kernel(capsys):
    """A kernel that is off by a little must make validate fail (exit 1)."""
    ref = _backend._KERNELS["int8_weight_only_linear"]["reference"]
    _backend._KERNELS["int8_weight_only_linear"]["reference"] = lambda *a: ref(*a) * 1.01
    try:
        assert main(["validate", "--backend", "reference", "--quick"]) == 1
    finally:
        _backend._KERNELS["int8_weight_only_linear"]["reference"] = ref
    assert "MISMATCH" in capsys.readouterr().out


def test_python_m_qtorch():
    out = subprocess.run([sys.executable, "-m", "qtorch", "info"], capture_output=True, text=True)
    assert out.returncode == 0 and "backends:" in out.stdout
