"""The roofline's measuring kernels (qtorch/bench/roofline.py) as pytest-benchmark suites, so
the peaks `qtorch bench` divides by can be tracked and compared across machines and runs.

    pytest benchmarks/bench_roofline.py --benchmark-only

Each records the achieved rate in extra_info (TFLOP/s, TOP/s or GB/s). The kernels and their
sizes are the roofline module's own (`matmul_kernel`, `int_mm_kernel`, `copy_kernel`).
"""

from __future__ import annotations

import pytest
import torch

from qtorch.bench import roofline


def _n(device):
    return roofline.GEMM_N[device]


def _sync(device):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matmul_peak(benchmark, bench_device, dtype):
    fn, flop = roofline.matmul_kernel(dtype, _n(bench_device), bench_device)
    sync = _sync(bench_device)
    benchmark(lambda: (fn(), sync()))
    benchmark.extra_info["tflops"] = flop / benchmark.stats.stats.median / 1e12


def test_int8_mm_peak(benchmark, bench_device):
    if not hasattr(torch, "_int_mm"):
        pytest.skip("torch._int_mm not in this torch")
    fn, ops = roofline.int_mm_kernel(_n(bench_device), bench_device)
    sync = _sync(bench_device)
    benchmark(lambda: (fn(), sync()))
    benchmark.extra_info["tops"] = ops / benchmark.stats.stats.median / 1e12


def test_copy_bandwidth(benchmark, bench_device):
    fn, moved = roofline.copy_kernel(roofline.COPY_BYTES[bench_device], bench_device)
    sync = _sync(bench_device)
    benchmark(lambda: (fn(), sync()))
    benchmark.extra_info["gbps"] = moved / benchmark.stats.stats.median / 1e9


@pytest.mark.bench_op("int4_weight_only_linear")
def test_bench_case_fixture_smoke(bench_case, bench_shape):
    """The shared fixture the per-op suites use, over the op's shapes: qtorch's own kernel on
    this device, or the reference where there is none."""
    import qtorch

    backend = "cpu" if "cpu" in qtorch.available_backends() else "reference"
    bench_case("int4_weight_only_linear", f"qtorch:{backend}", bench_shape)
