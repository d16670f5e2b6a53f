"""What the scripts in benchmarks/ share: pick rows of engine cases under the labels a script
prints, time them in one interleaved group, check them against the reference, and print the
one-line-per-implementation format of the GPU scripts. Nothing here times or builds anything
the engine does not: a script is a choice of cases, labels and a table layout."""

from __future__ import annotations

import dataclasses
import sys

import torch

from qtorch.bench import timing
from qtorch.bench.types import Built, Impl


def needs_backend(name: str):
    """A pytest mark that skips a benchmark when qtorch backend `name` is not available."""
    import pytest

    import qtorch

    return pytest.mark.skipif(
        name not in qtorch.available_backends(),
        reason=f"the {name} backend is not available here",
    )


def gpu_config(device: str, quick: bool) -> timing.TimingConfig:
    """The GPU scripts' timing: weights cold over >= 4x the L2, ~0.2 s per implementation."""
    return timing.TimingConfig(
        target_s=0.03 if quick else 0.2,
        warmup=1 if quick else 3,
        cold=True,
        cold_bytes=timing.cold_bytes_for(device),
    )


def gpu_arguments(doc: str):
    """The GPU scripts' command line: --json PATH, --quick."""
    import argparse

    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--json", help="write the rows and machine info to this file")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    return p


def time_selected(case: str, chosen: list, device: str, cfg, widths=(40, 26)) -> dict:
    """{label: Stats} of the rows chosen from several cases ([(Built, {name: label})]), timed
    in one group; a row a case could not build is printed as not run and left out."""
    impls = []
    for built, labels in chosen:
        impls += select(built, labels)
        for label, why in missing(built, labels).items():
            skip_line(case, label, why, widths)
    return time_rows(impls, device, cfg)


def select(built: Built, labels: dict[str, str]) -> list[Impl]:
    """The implementations of `built` named in `labels` ({engine name: printed label}),
    renamed to their labels, in the order of `labels`; names the case lacks are left out
    (`missing` says why)."""
    found = {i.name: i for i in built.impls}
    return [dataclasses.replace(found[n], name=lab) for n, lab in labels.items() if n in found]


def missing(built: Built, labels: dict[str, str]) -> dict[str, str]:
    """{label: why} for the names in `labels` that `built` has no implementation for."""
    names = {i.name for i in built.impls}
    why = dict(built.skipped)
    return {lab: why.get(n, "not built") for n, lab in labels.items() if n not in names}


def time_rows(impls: list[Impl], device: str, cfg: timing.TimingConfig) -> dict:
    """{label: Stats} of `impls` timed in one interleaved group, in the order given."""
    stats, _ = timing.time_impls(impls, device, cfg)
    return {i.name: stats[i.name] for i in impls}


def rel_errors(impls: list[Impl], ref: torch.Tensor) -> dict[str, float]:
    """{label: ||out - ref|| / ||ref||} of one call of each (output or its first element)."""
    out = {}
    with torch.no_grad():
        for i in impls:
            y = i.fn()
            y = y[0] if isinstance(y, tuple | list) else y
            out[i.name] = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
    return out


def header(*parts: str) -> str:
    """The first line of a CPU script's table: torch version, threads, whether AMX is usable
    (machines that print the same CPU model name differ in it), then `parts`."""
    try:  # torch's bf16 GEMM speed and qtorch's bf16 head follow it
        from qtorch.backends.cpu import amx_usable

        amx = "AMX usable" if amx_usable() else "no AMX"
    except ImportError:  # qtorch._C not built
        amx = "AMX unknown"
    return ", ".join(
        (f"torch {torch.__version__}", f"{torch.get_num_threads()} threads", amx, *parts)
    )


def print_dram_read(read_label: str, what: str, pct: str) -> None:
    """The DRAM streaming-read rate at the start (ceiling.dram_read_bandwidth) and what the
    script's read row (`read_label`, reading `what`) and its '% read' column mean."""
    from qtorch.bench import ceiling

    bw = ceiling.dram_read_bandwidth()
    print(
        f"DRAM streaming read ({torch.get_num_threads()} threads, 512 MiB, huge pages): "
        f"{bw / 1e9:.1f} GB/s (at start; it drifts between ~35 and ~65 GB/s on this VM). "
        f"'{read_label}' = qtorch_cpu::stream_read of {what}, timed in the same rounds; "
        f"'% read' = {pct}"
    )


def print_errors(what: str, errors: dict[str, float]) -> None:
    """One line: each implementation's relative error against `what` (from rel_errors)."""
    print(f"rel. error vs {what}:", ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))


def ms(stats) -> str:
    """ "p20/p50/p80" in ms, three decimals."""
    return "/".join(f"{v * 1e3:.3f}" for v in stats.pcts)


def pedantic(benchmark, impl: Impl, cold: bool, rounds: int, warmup_rounds: int):
    """pytest-benchmark over one implementation: its body in its scope, cold over weight
    copies as the engine rotates them (each timed call takes the next copy)."""
    fns, _, _ = timing.rotations([impl], timing.TimingConfig(cold=cold))
    with impl.scope():
        return benchmark.pedantic(fns[impl.name], rounds=rounds, warmup_rounds=warmup_rounds)


def case_row(
    rows: list,
    case: str,
    impl: str,
    stats,
    baseline: float | None = None,
    flops: float | None = None,
    bytes_: float | None = None,
    peak_gb: float | None = None,
    widths: tuple[int, int] = (40, 26),
) -> dict:
    """Append and print one row of the GPU scripts' format: p20/p50/p80 in ms, the ratio to
    the case's baseline p50 (ms), TFLOP/s, GB/s and peak memory where given."""
    p20, p50, p80 = (v * 1e3 for v in stats.pcts)
    r = {"case": case, "impl": impl, "p20_ms": p20, "p50_ms": p50, "p80_ms": p80}
    if baseline is not None:
        r["speedup_vs_baseline"] = baseline / p50
    if flops:
        r["tflops"] = flops / (p50 * 1e-3) / 1e12
    if bytes_:
        r["gb_per_s"] = bytes_ / (p50 * 1e-3) / 1e9
    if peak_gb is not None:
        r["peak_gb"] = peak_gb
    rows.append(r)
    extra = "".join(
        f"  {k}={r[k]:.3f}"
        for k in ("speedup_vs_baseline", "tflops", "gb_per_s", "peak_gb")
        if k in r
    )
    wc, wi = widths
    print(
        f"{case:<{wc}} {impl:<{wi}} p50 {p50:9.4f} ms (p20 {p20:.4f}, p80 {p80:.4f}){extra}",
        flush=True,
    )
    return r


def skip_line(case: str, impl: str, why: str, widths: tuple[int, int] = (40, 26)) -> None:
    print(f"{case:<{widths[0]}} {impl:<{widths[1]}} not run: {why}", file=sys.stdout, flush=True)
