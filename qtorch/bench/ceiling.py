"""Same-run ceilings of the CPU: what no implementation can beat, measured next to them.

    read_ceiling    a case's "read:stream_read" row: `qtorch_cpu::stream_read` over N*K bytes
                    allocated as packed weights are (huge pages), timed in the same rounds as
                    the GEMMs, so "% of read" compares against the memory as it was then (the
                    DRAM rate of a VM drifts between runs and even within one)
    read_pct        100 * (a row's weight bytes / its time) / (the ceiling's bytes / its time)
    dram_read_bandwidth, vnni_peak   one-off probes printed at the top of a driver's table

All need qtorch._C (the cpu backend); `available()` says whether it is there.
"""

from __future__ import annotations

import torch

from qtorch.bench.types import Impl

NAME = "read:stream_read"


def available() -> bool:
    try:
        return hasattr(torch.ops.qtorch_cpu, "stream_read")
    except (AttributeError, RuntimeError):
        return False


def _buffer(n: int, k: int) -> torch.Tensor:
    # The int8 weight packing allocates as every packed weight does (huge-page aligned), so
    # the read runs over memory laid out like the GEMMs' weights.
    import qtorch.backends.cpu  # noqa: F401  (loads qtorch._C, which defines the op)

    return torch.ops.qtorch_cpu.pack_int8_mm(torch.ones(n, k, dtype=torch.int8))


def read_ceiling(n: int, k: int) -> Impl:
    """The streaming read of an int8 [N, K] weight's bytes (kind "ceiling", not a GEMM)."""

    def make(buf=None):
        buf = _buffer(n, k) if buf is None else buf
        return lambda: torch.ops.qtorch_cpu.stream_read(buf)

    first = _buffer(n, k)
    return Impl(
        NAME,
        "ceiling",
        "qtorch_cpu",
        make(first),
        first.numel() * first.element_size(),  # the packing may pad N and K
        "int8",
        note="reads the int8 weight bytes once, no arithmetic: the DRAM ceiling at small M",
        copy=make,
    )


def read_pct(weight_bytes: float, t: float, ceiling_bytes: float, t_ceiling: float) -> float:
    """How close a row streams its weight to the plain read: 100 = as fast as the read."""
    return 100.0 * (weight_bytes / t) / (ceiling_bytes / t_ceiling)


def dram_read_bandwidth(nbytes: int = 512 << 20, passes: int = 5) -> float:
    """Bytes/s of a streaming read on all torch threads (`qtorch_cpu::dram_read_bandwidth`: a
    512 MiB huge-page buffer, like the packed weights), best of `passes`: the ceiling of any
    implementation at M = 1, where each call streams its weights from DRAM once."""
    import qtorch.backends.cpu  # noqa: F401

    return torch.ops.qtorch_cpu.dram_read_bandwidth(nbytes, passes)


def vnni_peak(iters: int = 20_000_000, tries: int = 3) -> float:
    """int ops/s of register-only vpdpbusd on all torch threads, best of `tries`."""
    import qtorch.backends.cpu  # noqa: F401

    return max(torch.ops.qtorch_cpu.int8_vnni_peak(iters) for _ in range(tries))
