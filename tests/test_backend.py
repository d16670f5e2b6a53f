"""Backend choice: explicit > scoped > process-wide > QTORCH_BACKEND > auto, resolved per call."""

import subprocess
import sys
import threading

import pytest
import torch

import qtorch
from qtorch import _backend, ops


def test_reference_always_available():
    assert "reference" in qtorch.available_backends()
    assert set(qtorch.available_backends()) <= {"reference", "cpu", "triton", "cuda"}


def test_unknown_or_unavailable_backend_raises_at_once():
    with pytest.raises(RuntimeError, match="unknown backend"):
        qtorch.set_backend("tpu")
    with pytest.raises(RuntimeError, match="unknown backend"):
        with qtorch.use_backend("nope"):
            pass
    for name, (ok, _why) in _backend.backend_status().items():
        if not ok:
            with pytest.raises(RuntimeError, match=f"'{name}' is not available"):
                qtorch.set_backend(name)
    with pytest.raises(TypeError):
        qtorch.set_backend(3)


def test_scoped_override_wins_and_restores():
    qtorch.set_backend("reference")
    assert qtorch.get_backend() == "reference"
    with qtorch.use_backend("auto"):
        assert qtorch.get_backend() == "auto"
        with qtorch.use_backend("reference"):
            assert qtorch.get_backend() == "reference"
        assert qtorch.get_backend() == "auto"
    assert qtorch.get_backend() == "reference"


def test_choice_is_resolved_per_call():
    """The kernel that runs follows the choice in force at call time, not at import."""
    seen = []
    ref = _backend._KERNELS["quantize_int8"]["reference"]

    def spy(x):
        seen.append("spy")
        return ref(x)

    _backend._KERNELS["quantize_int8"]["reference"] = spy
    try:
        x = torch.randn(2, 8)
        with qtorch.use_backend("reference"):
            ops.quantize_int8(x)
        assert seen == ["spy"]
        if "cpu" in _backend._KERNELS["quantize_int8"] and "cpu" in qtorch.available_backends():
            with qtorch.use_backend("cpu"):
                ops.quantize_int8(x)
            assert seen == ["spy"]
    finally:
        _backend._KERNELS["quantize_int8"]["reference"] = ref


def test_use_backend_is_per_thread():
    results = {}
    barrier = threading.Barrier(2)

    def worker(name, choice):
        with qtorch.use_backend(choice):
            barrier.wait()
            results[name] = qtorch.get_backend()
            barrier.wait()

    threads = [
        threading.Thread(target=worker, args=("a", "reference")),
        threading.Thread(target=worker, args=("b", "auto")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"a": "reference", "b": "auto"}


def test_auto_picks_a_compiled_cpu_kernel_when_built():
    with qtorch.use_backend("auto"):
        name, _ = _backend.resolve("int8_linear", torch.device("cpu"))
    if "cpu" in qtorch.available_backends() and "cpu" in _backend._KERNELS["int8_linear"]:
        assert name == "cpu"
    else:
        assert name == "reference"


def test_named_backend_cannot_serve_another_device():
    if "cpu" not in qtorch.available_backends():
        pytest.skip("cpu backend not built")
    with qtorch.use_backend("cpu"):
        with pytest.raises(RuntimeError, match="cannot run on cuda tensors"):
            _backend.resolve("int8_linear", torch.device("cuda"))


def _run_child(code, env_extra):
    import os

    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def test_env_variable_default_and_bad_value():
    ok = _run_child("import qtorch; print(qtorch.get_backend())", {"QTORCH_BACKEND": "reference"})
    assert ok.returncode == 0 and ok.stdout.strip() == "reference"
    # importing never raises; the first op does, naming the variable
    bad = _run_child(
        "import qtorch, torch\nqtorch.ops.quantize_int8(torch.randn(2, 4))",
        {"QTORCH_BACKEND": "warp-drive"},
    )
    assert bad.returncode != 0
    assert "QTORCH_BACKEND" in bad.stderr and "warp-drive" in bad.stderr


def test_package_works_without_compiled_extension():
    """The reference path serves every op when qtorch._C is missing; the reason is recorded."""
    code = (
        "import sys, torch\n"
        "sys.modules['qtorch._C'] = None  # makes `import qtorch._C` raise ImportError\n"
        "import qtorch\n"
        "from qtorch import _backend\n"
        "print(qtorch.available_backends())\n"
        "print(_backend.backend_status()['cpu'][1])\n"
        "x = torch.randn(3, 64)\n"
        "q, s = qtorch.ops.quantize_int8(x)\n"
        "print(qtorch.ops.int8_linear(x, q, s).shape)\n"
    )
    out = _run_child(code, {"QTORCH_BACKEND": ""})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "'cpu'" not in lines[0]
    assert "not built" in lines[1]
    assert lines[2] == "torch.Size([3, 3])"
