"""Timing done so that ratios between implementations can be trusted.

- Warm-up first (the first call of a qtorch kernel repacks its weight once; that is a
  one-time cost, not the steady state a model sees).
- Enough repetitions: as many as fit in `target_s` per implementation, within
  [min_reps, max_reps]; calls shorter than ~100 us are timed in small batches so timer
  overhead does not dominate.
- Implementations of one case are *interleaved*, one sample each per round, in a rotating
  order, so slow drift (thermal, another process on a shared machine) hits all of them alike.
- We report the median and the 20th/80th percentiles, never the mean or the minimum.
- CUDA: CUDA events around each call and an L2 flush (writing a 256 MiB buffer) before each
  sample, as `triton.testing.do_bench` does; CPU "cold" mode flushes the last-level cache by
  read-modify-writing a buffer twice its size, so weights come from DRAM, as in decode.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def quantile(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list (q in [0, 1])."""
    if not sorted_xs:
        return math.nan
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Stats:
    median: float
    p20: float
    p80: float
    n: int

    @classmethod
    def of(cls, times: list[float]) -> Stats:
        xs = sorted(times)
        return cls(quantile(xs, 0.5), quantile(xs, 0.2), quantile(xs, 0.8), len(xs))


@dataclass
class TimingConfig:
    target_s: float = 0.4  # time budget per implementation per case
    min_reps: int = 5
    max_reps: int = 200
    warmup: int = 1  # untimed calls before the first timed one
    cold: bool = False  # CPU: flush the LLC before every sample
    batch_below_s: float = 1e-4  # calls shorter than this are timed in batches


class Flusher:
    """Evicts caches before a sample: L2 on CUDA, the LLC on CPU."""

    def __init__(self, device: str, llc_bytes: int | None):
        if device == "cuda":
            self.buf = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
        else:
            # Twice the LLC (64 MiB if unknown); read-modify-write so every line passes through
            # the cache (a plain memset may use non-temporal stores that bypass it).
            self.buf = torch.zeros(2 * (llc_bytes or (32 << 20)), dtype=torch.uint8)
        self.device = device

    def __call__(self) -> None:
        if self.device == "cuda":
            self.buf.zero_()
        else:
            self.buf.add_(1)


def _cpu_sample(fn: Callable, inner: int, flush: Flusher | None) -> float:
    if flush is not None:
        flush()
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def _cuda_sample(fn: Callable, flush: Flusher) -> tuple:
    flush()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    return start, end


def time_group(
    fns: dict[str, Callable], device: str, cfg: TimingConfig, flusher: Flusher | None = None
) -> dict[str, Stats]:
    """Time every callable of `fns` (the implementations of one case), interleaved.

    Each callable runs the whole operation (incl. backward where the case has one) and returns
    anything; on CUDA it is synchronized around. Returns {name: Stats in seconds}.
    """
    cuda = device == "cuda"
    if cuda and flusher is None:
        flusher = Flusher("cuda", None)
    flush = flusher if (cuda or cfg.cold) else None
    gc.collect()

    # Warm-up calls, then one timed call per implementation that sizes its repetitions; that
    # call is kept as the first sample where samples are single un-flushed calls (CPU, warm).
    est: dict[str, float] = {}
    for name, fn in fns.items():
        for _ in range(cfg.warmup):
            fn()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        est[name] = max(time.perf_counter() - t0, 1e-7)

    reps = {n: int(min(cfg.max_reps, max(cfg.min_reps, cfg.target_s / t))) for n, t in est.items()}
    inner = {
        n: 1
        if (cuda or cfg.cold or t >= cfg.batch_below_s)
        else min(100, math.ceil(cfg.batch_below_s / t))
        for n, t in est.items()
    }
    samples: dict[str, list] = {
        n: [est[n]] if not (cuda or cfg.cold) and inner[n] == 1 else [] for n in fns
    }
    names = list(fns)
    for rnd in range(max(reps.values())):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]  # rotate who goes first
        for name in order:
            if len(samples[name]) >= reps[name]:
                continue
            if cuda:
                samples[name].append(_cuda_sample(fns[name], flush))
            else:
                samples[name].append(_cpu_sample(fns[name], inner[name], flush))
    if cuda:
        torch.cuda.synchronize()
        samples = {n: [s.elapsed_time(e) / 1e3 for s, e in ev] for n, ev in samples.items()}
    return {n: Stats.of(t) for n, t in samples.items()}
