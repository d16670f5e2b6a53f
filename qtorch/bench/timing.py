"""The one timing engine: `qtorch bench` and every script in benchmarks/ time through it, so
their numbers are measured the same way and can be compared.

- Warm-up first (a first call may pack a weight; that is a one-time cost, not the steady state
  a model sees): `warmup` untimed passes over every implementation (all of its copies).
- Cold weights (`cold`): an implementation with a weight cycles through enough copies of it
  (`copies`: >= `cold_bytes`, 128 MiB, four times the 32 MiB L3 of the CPU the README numbers
  come from) that every call finds its weight in DRAM, as decoding through a model's layers
  does; a sample is the per-call time of one pass over all copies (`Rotating`), so no row
  profits from what the row before it left in cache. A pass longer than `max_sample_s` is
  timed in windows of consecutive calls instead (the rotation carries on across samples, so
  each copy is still reused only after all the others). Ops without a weight (quantize_int8,
  distillation_loss) take activations that a model has just produced: they are timed hot.
- Hot: each sample follows an untimed identical call (weights where that call left them);
  calls shorter than `batch_below_s` are timed in batches so timer overhead does not dominate.
- Evict (`evict_bytes`): a buffer that size is written before each sample, so the code and the
  interpreter's objects are cold too (benchmarks/bench_call_overhead.py: the per-call cost
  between the layers of a decode step).
- Implementations of one case are *interleaved*, one sample each per round, in a new
  (seeded) shuffled order each round, so slow drift (thermal, another process on a shared
  machine) hits all alike and no implementation always follows the same one; ratios come
  from the same rounds.
- Reported: p20, p50 (median), p80 of the samples (`percentiles`), never the mean or minimum.
- CUDA: CUDA events around each sample (one pass of the copies, or the batch).
"""

from __future__ import annotations

import contextlib
import gc
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

COLD_BYTES = 128 << 20
# Weights of 128 KiB and less would need more copies; that many objects cost more to build
# than their timing is worth, and such calls are dominated by their fixed cost anyway.
MAX_COPIES = 1024


def quantile(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list (q in [0, 1])."""
    if not sorted_xs:
        return math.nan
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def percentiles(times: Sequence[float]) -> tuple[float, float, float]:
    """(p20, p50, p80) of a list of times: the one percentile function of every benchmark."""
    xs = sorted(times)
    return quantile(xs, 0.2), quantile(xs, 0.5), quantile(xs, 0.8)


@dataclass(frozen=True)
class Stats:
    median: float
    p20: float
    p80: float
    n: int

    @classmethod
    def of(cls, times: list[float]) -> Stats:
        p20, p50, p80 = percentiles(times)
        return cls(p50, p20, p80, len(times))

    @property
    def pcts(self) -> tuple[float, float, float]:
        return self.p20, self.median, self.p80


@dataclass
class TimingConfig:
    target_s: float = 0.4  # time budget per implementation per case
    min_reps: int = 5
    max_reps: int = 200
    warmup: int = 1  # untimed passes before the first timed one
    cold: bool = False  # weights rotated over copies of >= cold_bytes (see the docstring)
    batch_below_s: float = 1e-4  # hot calls shorter than this are timed in batches
    cold_bytes: int = COLD_BYTES
    max_sample_s: float = 1.0  # cold: a longer pass over the copies is timed in windows
    rounds: int | None = None  # a fixed number of samples each, instead of target_s
    evict_bytes: int = 0  # > 0: write this many bytes before every sample of a plain call
    clock: str = "wall"  # "wall" (perf_counter) or "thread" (this thread's CPU time)
    seed: int = 0  # of the per-round shuffle


def cold_bytes_for(device: str) -> int:
    """Bytes of weight copies that keep weights out of cache: COLD_BYTES on a CPU (the LLC
    size sysfs reports is unreliable on VMs, so it is not used), four times the L2 on a GPU."""
    if device != "cuda":
        return COLD_BYTES
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or (64 << 20)
    return max(COLD_BYTES, 4 * l2)


def copies(weight_bytes: int, cold_bytes: int = COLD_BYTES, max_copies: int = MAX_COPIES) -> int:
    """How many copies of a weight keep every call's weight in DRAM: >= cold_bytes in all."""
    if weight_bytes <= 0:
        return 1
    return max(1, min(max_copies, math.ceil(cold_bytes / weight_bytes)))


class Rotating:
    """Calls each of `calls` in turn (one per weight copy); timed as one pass over all."""

    def __init__(self, calls: Sequence[Callable[[], object]]):
        if not calls:
            raise ValueError("Rotating needs at least one call")
        self.calls, self.i = list(calls), 0

    def __len__(self) -> int:
        return len(self.calls)

    def __call__(self):
        self.i = (self.i + 1) % len(self.calls)
        return self.calls[self.i]()


def rotations(impls, cfg: TimingConfig) -> tuple[dict, dict, dict]:
    """({name: Rotating or body}, {name: scope}, {name: copies or None}) for `time_group`:
    with cfg.cold every implementation that has a weight and can copy it rotates over
    `copies(weight_bytes)` copies; the others (copies None) are timed hot."""
    fns, scopes, ncopies = {}, {}, {}
    for impl in impls:
        if cfg.cold and impl.copy is not None and impl.weight_bytes > 0:
            n = copies(impl.weight_bytes, cfg.cold_bytes)
            fns[impl.name] = Rotating([impl.body] + [impl.copy() for _ in range(n - 1)])
            ncopies[impl.name] = n
        else:
            fns[impl.name] = impl.body
            ncopies[impl.name] = None
        scopes[impl.name] = impl.scope
    return fns, scopes, ncopies


def _clock(cfg: TimingConfig) -> Callable[[], float]:
    if cfg.clock == "wall":
        return time.perf_counter
    if cfg.clock == "thread":
        return time.thread_time
    raise ValueError(f"clock must be 'wall' or 'thread', got {cfg.clock!r}")


class _Sampler:
    """One sample of one implementation: the calls it makes, timed on the CPU clock or with
    CUDA events (returned as an event pair, read after the final synchronize)."""

    def __init__(self, device: str, cfg: TimingConfig):
        self.cuda = device == "cuda"
        self.clock = _clock(cfg)
        self.evict = None
        if cfg.evict_bytes > 0:
            self.evict = torch.empty(cfg.evict_bytes // 4, device=device)

    def __call__(self, fn, calls: int, hot: bool):
        if self.evict is not None:
            self.evict.fill_(1.0)
        elif hot:
            fn()  # untimed: the timed call follows an identical one
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            return start, end, calls
        t0 = self.clock()
        for _ in range(calls):
            fn()
        return (self.clock() - t0) / calls

    def read(self, sample) -> float:
        if not self.cuda:
            return sample
        start, end, calls = sample
        return start.elapsed_time(end) / 1e3 / calls


def time_group(
    fns: dict[str, Callable],
    device: str,
    cfg: TimingConfig,
    scopes: dict[str, Callable[[], contextlib.AbstractContextManager]] | None = None,
) -> dict[str, Stats]:
    """Time every callable of `fns` (the implementations of one case), interleaved.

    A `Rotating` value is timed cold (one pass over its copies per sample), any other
    callable hot (or after an eviction, with cfg.evict_bytes). Each sample runs inside
    `scopes[name]()` (e.g. the qtorch backend of that row, `torch.no_grad`), entered outside
    the timed window. Each callable runs the whole operation (backward included where the case
    has one); on CUDA it is synchronized around. Returns {name: Stats in seconds}.
    """
    scopes = scopes or {}
    nullscope = contextlib.nullcontext
    sampler = _Sampler(device, cfg)
    cuda = sampler.cuda

    window: dict[str, int] = {}  # calls per cold sample: the pass, or a part of a long one

    def calls_of(name, inner):
        fn = fns[name]
        return window.get(name, len(fn)) if isinstance(fn, Rotating) else inner

    def sample(name, inner):
        fn = fns[name]
        with scopes.get(name, nullscope)():
            return sampler(fn, calls_of(name, inner), hot=not isinstance(fn, Rotating))

    gc.collect()
    # Warm-up passes, then one timed sample per implementation that sizes its repetitions;
    # it is kept as the first sample where the samples are single calls or passes.
    est: dict[str, float] = {}
    for name, fn in fns.items():
        with scopes.get(name, nullscope)():
            for _ in range(cfg.warmup * calls_of(name, 1)):
                fn()
            if isinstance(fn, Rotating) and len(fn) > 1:
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize()
                t1 = max(time.perf_counter() - t0, 1e-9)
                window[name] = max(1, min(len(fn), int(cfg.max_sample_s / t1)))
        if cuda:
            torch.cuda.synchronize()
        s = sample(name, 1)
        if cuda:
            torch.cuda.synchronize()
        est[name] = max(sampler.read(s), 1e-9)

    inner = {
        n: 1
        if (cuda or isinstance(fns[n], Rotating) or cfg.evict_bytes or t >= cfg.batch_below_s)
        else min(100, math.ceil(cfg.batch_below_s / t))
        for n, t in est.items()
    }
    reps = {}
    for n, t in est.items():
        if cfg.rounds is not None:
            reps[n] = max(1, cfg.rounds)
            continue
        rotating = isinstance(fns[n], Rotating)
        # what one sample costs: the timed calls, plus the untimed call before a hot one
        cost = t * (calls_of(n, 1) if rotating else inner[n] + (0 if cfg.evict_bytes else 1))
        reps[n] = int(min(cfg.max_reps, max(cfg.min_reps, cfg.target_s / max(cost, 1e-9))))
    samples: dict[str, list] = {n: [est[n]] if inner[n] == 1 else [] for n in fns}
    names = list(fns)
    rng = random.Random(cfg.seed)
    for _ in range(max(reps.values(), default=0)):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            if len(samples[name]) < reps[name]:
                samples[name].append(sample(name, inner[name]))
    if cuda:
        torch.cuda.synchronize()
    return {
        n: Stats.of([s if isinstance(s, float) else sampler.read(s) for s in v])
        for n, v in samples.items()
    }


def time_impls(impls, device: str, cfg: TimingConfig) -> tuple[dict[str, Stats], dict]:
    """Time `Impl`s (qtorch.bench.types) of one case: their bodies, in their scopes, cold
    over weight copies when cfg.cold. Returns ({name: Stats}, {name: copies rotated, or None
    where timed hot})."""
    fns, scopes, ncopies = rotations(impls, cfg)
    stats = time_group(fns, device, cfg, scopes)
    del fns
    return stats, ncopies
