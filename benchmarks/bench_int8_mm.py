"""W8A8 `int8_linear` on the `cpu` backend vs fbgemm and fp32, K = N = 4096.

    python benchmarks/bench_int8_mm.py [--hot] [--ms 1,8,32,128,512] [--rounds R] [--threads T]
    pytest benchmarks/bench_int8_mm.py --benchmark-only                # pytest-benchmark table

A thin driver over `qtorch.bench` (cases "int8_linear", fp32 activations, with bias), so its
numbers are measured as `qtorch bench --cold` measures them. Rows:
  qtorch:cpu      `qtorch.nn.Int8DynamicLinear` (the module a quantized model runs: it owns
                  its packed weight), backend cpu: per-token activation quantization fused
                  into the A-packing, VNNI GEMM, fused epilogue.
  qtorch:cpu op   `qtorch.ops.int8_linear` on the canonical weights (may pack per call).
  qtorch:kernel   the kernel binding `torch.ops.qtorch_cpu.int8_linear` on a weight
                  packed beforehand, i.e. without the module and qtorch.ops (checks, backend
                  choice), to separate the two costs.
  fbgemm          `torch.ao.nn.quantized.dynamic.Linear` (qint8 per-channel weight, dynamic
                  per-tensor u8 activations), torch's own dynamic W8A8 CPU path.
  F.linear(fp32)  the dense fp32 layer, for scale.
  read weights    `qtorch_cpu::stream_read` over the int8 weight bytes (not a GEMM): the
                  ceiling at small M, in the same rounds.
Weights are cold by default: each implementation cycles through enough weight copies (>= 128
MiB, four times the 32 MiB L3) that every call finds its weights in DRAM; `--hot` uses one
copy and times a call made right after an identical one (weights in L3). The
implementations of one M are timed interleaved (qtorch.bench.timing), each row gives
p20/p50/p80 and ratio = peer p50 / qtorch p50 (> 1: qtorch is faster). The VNNI peak is
measured in the same run with `qtorch_cpu::int8_vnni_peak` (24 independent register-only
vpdpbusd zmm per thread).
"""

from __future__ import annotations

import argparse

import pytest
import torch

import qtorch
from qtorch.bench import cases, ceiling, drivers, timing
from qtorch.bench.types import Options, Shape

N = K = 4096
MS = (1, 8, 32, 128, 512)
READ = "read weights"
LABELS = {
    "qtorch:cpu": "qtorch:cpu",
    "qtorch:cpu:op": "qtorch:cpu op",
    "qtorch:cpu:kernel": "qtorch:kernel",
    "fbgemm:dynamic_linear": "fbgemm",
    "torch:F.linear(float32)": "F.linear(fp32)",
    ceiling.NAME: READ,
}
IMPL_NAMES = list(LABELS.values())
OPTIONS = Options(bias=True, kernel_rows=True, read_ceiling=True)


def build(m: int, backends=("cpu",), options: Options = OPTIONS):
    return cases.build(
        "int8_linear", Shape(m, K, N), torch.float32, "cpu", list(backends), True, options
    )


def build_impls(m: int) -> list:
    """The rows of one M (engine implementations under this script's labels)."""
    return drivers.select(build(m), LABELS)


def check_peers(m: int = 3) -> dict:
    """Relative error of each implementation against qtorch.reference.int8_linear (fbgemm
    quantizes activations per tensor, so it differs by more), to show each is called right."""
    built = build(m, ("cpu", "reference"), Options(bias=True, reference="always"))
    ref = next(i for i in built.impls if i.name == "qtorch:reference").fn()
    labels = {k: v for k, v in LABELS.items() if k in ("qtorch:cpu", "fbgemm:dynamic_linear")}
    labels["torch:F.linear(float32)"] = "F.linear(fp32)"
    return drivers.rel_errors(drivers.select(built, labels), ref)


def rounds_for(m: int) -> int:
    return 40 if m <= 8 else 20 if m <= 128 else 8


# ------------------------------------------------------------------------- pytest-benchmark

needs_cpu = drivers.needs_backend("cpu")


@needs_cpu
@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("m", MS)
def test_int8_linear(benchmark, m, impl):
    it = next(i for i in build_impls(m) if i.name == impl)
    benchmark.group = f"int8_linear M={m} N=K={N} fp32, cold weights"
    benchmark.extra_info.update(
        device="cpu",
        torch=torch.__version__,
        isa=qtorch._C.isa(),
        threads=torch.get_num_threads(),
        flop=2 * m * N * K,
    )
    drivers.pedantic(benchmark, it, True, rounds=20 if m <= 32 else 6, warmup_rounds=4)


# --------------------------------------------------------------------------- ratio table


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hot", action="store_true", help="one weight copy (L3-resident)")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--rounds", type=int, default=0, help="rounds per M (default by M)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ms = [int(v) for v in args.ms.split(",")]
    weights = "hot (1 copy)" if args.hot else "cold (>= 128 MiB of copies)"
    print(drivers.header(f"qtorch cpu ISA {qtorch._C.isa()}", f"weights {weights}"))
    drivers.print_errors("qtorch.reference.int8_linear (M=3)", check_peers())
    peak = ceiling.vnni_peak()
    print(
        f"VNNI peak (vpdpbusd zmm loop, {torch.get_num_threads()} threads): {peak / 1e12:.3f} TOP/s"
    )
    drivers.print_dram_read(
        READ,
        "the int8 weight bytes",
        "the row's weight bytes / p50 against the read's (fp32: 4x bytes)",
    )
    print(
        "ratio = p50 / qtorch:cpu p50 (kernel ratio = p50 / qtorch:kernel p50): > 1 means "
        "qtorch is faster"
    )
    print(
        f"{'M':>4s} {'implementation':16s} {'p20/p50/p80 ms':>24s} {'TOP/s':>7s} "
        f"{'% peak':>7s} {'% read':>7s} {'ratio':>8s} {'kernel ratio':>13s}"
    )
    for m in ms:
        impls = build_impls(m)
        cfg = timing.TimingConfig(
            cold=not args.hot, rounds=args.rounds or rounds_for(m), batch_below_s=0.0
        )
        res = drivers.time_rows(impls, "cpu", cfg)
        wbytes = {i.name: i.weight_bytes for i in impls}
        base, kbase = res["qtorch:cpu"].median, res["qtorch:kernel"].median
        read = res[READ]
        for name, st in res.items():
            p50 = st.median
            if name == READ:
                print(f"{m:4d} {name:16s} {drivers.ms(st):>24s} {N * K / p50 / 1e9:6.1f} GB/s")
                continue
            tops = 2 * m * N * K / p50 / 1e12
            ours = name.startswith("qtorch")
            ratio = "" if ours else f"{p50 / base:7.2f}x"
            kratio = "" if ours else f"{p50 / kbase:7.2f}x"
            pct_read = ceiling.read_pct(wbytes[name], p50, wbytes[READ], read.median)
            print(
                f"{m:4d} {name:16s} {drivers.ms(st):>24s} "
                f"{tops:7.3f} {100 * tops * 1e12 / peak:6.0f}% "
                f"{pct_read:6.0f}% {ratio:>8s} {kratio:>13s}"
            )


if __name__ == "__main__":
    main()
