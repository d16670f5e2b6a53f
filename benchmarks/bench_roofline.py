"""The roofline's measuring kernels (qtorch/bench/roofline.py) as pytest-benchmark suites, so
the peaks `qtorch bench` divides by can be tracked and compared across machines and runs.

    pytest benchmarks/bench_roofline.py --benchmark-only

Each records the achieved rate in extra_info (TFLOP/s, TOP/s or GB/s).
"""

from __future__ import annotations

import pytest
import torch

N_CPU, N_CUDA = 1024, 8192


def _n(device):
    return N_CUDA if device == "cuda" else N_CPU


def _sync(device):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matmul_peak(benchmark, bench_device, dtype):
    n = _n(bench_device)
    a = torch.randn(n, n, device=bench_device).to(dtype)
    b = torch.randn(n, n, device=bench_device).to(dtype)
    sync = _sync(bench_device)
    benchmark(lambda: (torch.mm(a, b), sync()))
    benchmark.extra_info["tflops"] = 2 * n**3 / benchmark.stats.stats.median / 1e12


def test_int8_mm_peak(benchmark, bench_device):
    if not hasattr(torch, "_int_mm"):
        pytest.skip("torch._int_mm not in this torch")
    n = _n(bench_device)
    a = torch.randint(-127, 128, (n, n), dtype=torch.int8, device=bench_device)
    b = torch.randint(-127, 128, (n, n), dtype=torch.int8, device=bench_device)
    sync = _sync(bench_device)
    benchmark(lambda: (torch._int_mm(a, b), sync()))
    benchmark.extra_info["tops"] = 2 * n**3 / benchmark.stats.stats.median / 1e12


def test_copy_bandwidth(benchmark, bench_device):
    nbytes = (1 << 30) if bench_device == "cuda" else (256 << 20)
    src = torch.ones(nbytes // 4, device=bench_device)
    dst = torch.empty_like(src)
    sync = _sync(bench_device)
    benchmark(lambda: (dst.copy_(src), sync()))
    benchmark.extra_info["gbps"] = 2 * nbytes / benchmark.stats.stats.median / 1e9


@pytest.mark.bench_op("int4_weight_only_linear")
def test_bench_case_fixture_smoke(bench_case, bench_shape):
    """The shared fixture the per-op suites use, over the op's shapes: qtorch's own kernel on
    this device, or the reference where there is none."""
    import qtorch

    backend = "cpu" if "cpu" in qtorch.available_backends() else "reference"
    bench_case("int4_weight_only_linear", f"qtorch:{backend}", bench_shape)
