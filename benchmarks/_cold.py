"""Shared by the CPU benches: weights kept cold by rotating over copies and the DRAM
streaming-read ceiling (bench_int8_mm.py, bench_weight_only.py), and percentiles (also
bench_distill.py, bench_call_overhead.py)."""

from __future__ import annotations

import math
import statistics

import torch

COLD_BYTES = 128 << 20  # 4x the L3; more copies also average out where each lands in DRAM


def copies(weight_bytes: int, hot: bool = False) -> int:
    """How many copies of a weight keep every call's weights in DRAM (1 when `hot`)."""
    return 1 if hot else max(1, math.ceil(COLD_BYTES / weight_bytes))


class Rotating:
    """Calls fn(*args_i) with i cycling over the copies."""

    def __init__(self, fn, args_list):
        self.fn, self.args, self.i = fn, args_list, 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.args)
        return self.fn(*self.args[self.i])


def pcts(ts):
    """(p20, p50, p80) of a list of times."""
    q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else [ts[0]] * 9
    return q[1], statistics.median(ts), q[7]


def dram_bandwidth() -> float:
    """Bytes/s of a streaming read on all torch threads (qtorch_cpu::dram_read_bandwidth: a
    512 MiB huge-page buffer, like the packed weights), best of 5 passes: the ceiling of any
    implementation at M = 1, where each call streams its weights from DRAM once."""
    return torch.ops.qtorch_cpu.dram_read_bandwidth(512 << 20, 5)
