"""The machine's roofline: peak compute and memory bandwidth, measured once and cached.

A kernel's best possible time is the roofline bound

    t_roof = max(flop / peak_compute, bytes / bandwidth)

and `% of roofline` in the bench table is t_roof / t_measured. The peaks are *measured* with
the best dense paths PyTorch itself has (a large matmul for compute, a large copy for memory),
not read from a spec sheet, so they are what this machine delivers with this many threads;
qtorch's own kernels are not used, so a kernel can be judged against an independent bound.

Cached as JSON in `$XDG_CACHE_HOME/qtorch/roofline.json` (default `~/.cache/qtorch/`), one
entry per (device, threads, torch version). `get_roofline(measure=False)` is what `qtorch info`
calls: cached values or None, never a measurement.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

CACHE_VERSION = 1


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qtorch" / "roofline.json"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    from qtorch.bench.machine import cpu_model

    return cpu_model()


def _key(device: str, threads: int) -> str:
    return f"{device}|{device_name(device)}|threads={threads}|torch={torch.__version__}"


def _read_cache() -> dict:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    return data.get("entries", {})


def _write_cache(entries: dict) -> None:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1))
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file


def _best_time(fn, device: str, reps: int) -> float:
    """Fastest of `reps` calls after one warm-up: the peak is the best the machine did."""
    fn()
    best = float("inf")
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


# Sizes of the measuring kernels: a GEMM large enough to reach the peak, a copy far larger
# than any cache (256 MiB CPU, 1 GiB GPU) so it streams DRAM.
GEMM_N = {"cpu": 1024, "cuda": 8192}
COPY_BYTES = {"cpu": 256 << 20, "cuda": 1 << 30}


def matmul_kernel(dtype: torch.dtype, n: int, device: str):
    """(call, flop): a dense n x n x n torch.mm, the fp32/bf16/fp16 compute peak's kernel."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return (lambda: torch.mm(a, b)), 2 * n**3


def int_mm_kernel(n: int, device: str):
    """(call, ops): torch._int_mm on n x n int8 operands."""
    a = torch.randint(-127, 128, (n, n), dtype=torch.int8, device=device)
    b = torch.randint(-127, 128, (n, n), dtype=torch.int8, device=device)
    return (lambda: torch._int_mm(a, b)), 2 * n**3


def copy_kernel(nbytes: int, device: str):
    """(call, bytes moved): a copy reads and writes `nbytes` each."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * nbytes


def _matmul_peak(dtype: torch.dtype, n: int, device: str, reps: int) -> float:
    fn, flop = matmul_kernel(dtype, n, device)
    return flop / _best_time(fn, device, reps)


def _int8_peak(n: int, device: str, reps: int) -> tuple[float, str]:
    """Best int8 GEMM rate among PyTorch's own int8 paths (ops/s, path name)."""
    best, path = 0.0, "none"
    if hasattr(torch, "_int_mm"):
        try:
            fn, ops = int_mm_kernel(n, device)
            rate = ops / _best_time(fn, device, reps)
            best, path = rate, "torch._int_mm"
        except RuntimeError:  # no int8 GEMM for this device/build
            pass
    if device == "cpu":
        try:
            rate = _fbgemm_rate(n, reps)
        except (RuntimeError, AttributeError):  # quantized engine absent in this build
            rate = 0.0
        if rate > best:
            best, path = rate, "fbgemm dynamic quantized Linear"
    return best, path


def _fbgemm_rate(n: int, reps: int) -> float:
    import torch.ao.nn.quantized.dynamic as nnqd

    with warnings.catch_warnings():  # torch.ao's deprecation notice for quantized tensors
        warnings.simplefilter("ignore")
        lin = nnqd.Linear(n, n, dtype=torch.qint8)
    x = torch.randn(n, n)
    with torch.inference_mode():
        return 2 * n**3 / _best_time(lambda: lin(x), "cpu", reps)


def _bandwidth(nbytes: int, device: str, reps: int) -> float:
    """Copy bandwidth in bytes/s: a copy reads and writes `nbytes` each."""
    fn, moved = copy_kernel(nbytes, device)
    return moved / _best_time(fn, device, reps)


def measure_peaks(device: str = "cpu") -> dict:
    """Measure the peaks now (~3-8 s on a CPU). Rates in TFLOP/s, TOP/s and GB/s; also the
    load average at the time, since a busy machine measures low peaks."""
    cuda = device == "cuda"
    # best of 10: on a shared CPU most calls lose time slices to other processes, and the
    # peak is what the machine does when it gets them
    n, reps = GEMM_N["cuda" if cuda else "cpu"], 10
    out = {
        "device": device,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "fp32_tflops": _matmul_peak(torch.float32, n, device, reps) / 1e12,
        "bf16_tflops": _matmul_peak(torch.bfloat16, n, device, reps) / 1e12,
    }
    if cuda:
        out["fp16_tflops"] = _matmul_peak(torch.float16, n, device, reps) / 1e12
    int8, path = _int8_peak(n, device, reps)
    out["int8_tops"] = int8 / 1e12
    out["int8_path"] = path
    out["bandwidth_gbps"] = _bandwidth(COPY_BYTES["cuda" if cuda else "cpu"], device, reps) / 1e9
    return out


def get_roofline(measure: bool = False, device: str | None = None, refresh: bool = False):
    """The roofline of `device` (default: cuda if available, else cpu) at the current torch
    thread count, as a flat dict: fp32_tflops, bf16_tflops, (fp16_tflops), int8_tops,
    int8_path, bandwidth_gbps, plus what and when it measured.

    measure=False: the cached entry, or None if none was measured yet (never measures).
    measure=True: the cached entry, measured and cached first if missing (or if refresh).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    key = _key(device, torch.get_num_threads())
    entries = _read_cache()
    if key in entries and not refresh:
        return entries[key]
    if not measure:
        return None
    entry = measure_peaks(device)
    entries = _read_cache()  # re-read: another process may have written meanwhile
    entries[key] = entry
    try:
        _write_cache(entries)
    except OSError:  # a read-only home still gets its numbers, just not cached
        pass
    return entry


def compute_peak(roof: dict | None, kind: str) -> float | None:
    """Peak ops/s for a compute kind: "int8", "fp32", "bf16" or "fp16" (fp16 falls back to
    bf16 where it was not measured: on CPUs both go through the same units)."""
    if not roof:
        return None
    field = {
        "int8": "int8_tops",
        "fp32": "fp32_tflops",
        "bf16": "bf16_tflops",
        "fp16": "fp16_tflops",
    }[kind]
    val = roof.get(field, roof.get("bf16_tflops") if kind == "fp16" else None)
    return None if not val else val * 1e12


def roofline_time(roof: dict | None, flop: float | None, nbytes: float, kind: str):
    """(t_roof seconds, "compute" | "memory") or (None, None) without a roofline."""
    if not roof or not roof.get("bandwidth_gbps"):
        return None, None
    t_mem = nbytes / (roof["bandwidth_gbps"] * 1e9)
    peak = compute_peak(roof, kind)
    t_cmp = flop / peak if flop and peak else 0.0
    return (t_cmp, "compute") if t_cmp > t_mem else (t_mem, "memory")
