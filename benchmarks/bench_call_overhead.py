"""Per-call cost of the qtorch op layer and modules on CPU, at a size where the kernel itself is
negligible.

    python benchmarks/bench_call_overhead.py [--rounds R] [--threads T]

Decode runs one small-M linear per layer, and between two calls the previous layers' weights
have streamed through the caches, so the interpreter's objects and the op layer's code are cold.
"cold" rows recreate that: 96 MiB are written before each timed call (qtorch.bench.timing's
evict_bytes). "hot" rows time a call made right after an identical one. The shape is M = 1,
K = N = 64, so the rows show what a call costs beyond the arithmetic, compared with a bare
`torch.empty` (the cheapest call into torch) and with the kernel binding called directly on a
prepacked weight. Op rows are called as a user calls them (backend "auto", grad mode on);
module rows (`qtorch.nn`, loaded with the op rows' weights, what a quantized model calls) run
under `torch.no_grad()`, as inference does.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from qtorch import ops
from qtorch import reference as R
from qtorch.bench import cases, drivers, timing
from qtorch.bench.types import Impl

N = K = 64
EVICT_BYTES = 96 << 20


def build() -> list[Impl]:
    x, xb = torch.randn(1, K), torch.randn(1, K).to(torch.bfloat16)
    w_q, w_scale = R.quantize_int8(torch.randn(N, K))
    qw, sc, z = R.quantize_int4(torch.randn(N, K), 32, False)
    packed = torch.ops.qtorch_cpu.pack_int8_mm(w_q)
    m8 = cases.quantized_module("int8_linear", {"w_q": w_q, "w_s": w_scale}, K, N)
    m4 = cases.quantized_module(
        "int4_weight_only_linear", {"qw": qw, "sc": sc, "zp": z, "gs": 32}, K, N
    )

    def row(name, fn, scope=contextlib.nullcontext):
        return Impl(name, "qtorch", "auto", fn, 0, "fp32", scope=scope)

    return [
        row("torch.empty(1, 64)", lambda: torch.empty(1, 64)),
        row("ops.int8_linear", lambda: ops.int8_linear(x, w_q, w_scale)),
        row(
            "ops.int4_weight_only_linear bf16",
            lambda: ops.int4_weight_only_linear(xb, qw, sc, z, 32),
        ),
        row(
            "binding int8_linear",
            lambda: torch.ops.qtorch_cpu.int8_linear(x, packed, N, w_scale, None),
        ),
        row("module Int8DynamicLinear", lambda: m8(x), torch.no_grad),
        row("module Int4WeightOnlyLinear bf16", lambda: m4(xb), torch.no_grad),
    ]


def measure(impls: list[Impl], rounds: int = 60) -> dict:
    """{(mode, name): Stats}: cold (evicted before each call) and hot, single calls each."""
    out = {}
    for mode, evict in (("cold", EVICT_BYTES), ("hot", 0)):
        cfg = timing.TimingConfig(rounds=rounds, batch_below_s=0.0, evict_bytes=evict)
        for name, st in drivers.time_rows(impls, "cpu", cfg).items():
            out[(mode, name)] = st
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=60, help="samples per call and mode")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; M = 1, K = N = {N}; "
        "cold: 96 MiB written before each call"
    )
    print(f"{'caches':6s} {'call':36s} {'p20/p50/p80 us':>22s}")
    for (mode, k), st in measure(build(), args.rounds).items():
        print(f"{mode:6s} {k:36s} {'/'.join(f'{v * 1e6:.1f}' for v in st.pcts):>22s}")


if __name__ == "__main__":
    main()
