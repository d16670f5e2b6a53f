"""Weight-only linears on the `cpu` backend vs torch's own CPU kernels, weights cold in DRAM.

    python benchmarks/bench_weight_only.py [--ms 1 8 32 128] [--rounds R] [--threads T]
    python benchmarks/bench_weight_only.py --backward      # training through a frozen W4A16
    pytest benchmarks/bench_weight_only.py --benchmark-only        # pytest-benchmark table

A thin driver over `qtorch.bench` (cases "int4_weight_only_linear" and
"int8_weight_only_linear", K = N = 4096, bf16 activations, timed in one group). Rows:
  W4A16  qtorch `Int4WeightOnlyLinear` (group 128, asymmetric; the module a quantized model
         runs, owning its packed weight), the op on canonical weights ("op"), the kernel
         binding on a prepacked weight ("kernel"), vs `torch._weight_int4pack_mm_for_cpu`
         (its int4pack layout, scales-and-zeros [K/gs, N, 2] in x.dtype with
         ŵ = (q - 8) * scale + zero, zero = (8 - z) * scale: qtorch.bench.peers).
  W8A16  `Int8WeightOnlyLinear`, op, kernel vs `torch._weight_int8pack_mm(x, w_q, scale)`.
  dense  `F.linear` with the bf16 and fp32 weight, for scale.
  read   `qtorch_cpu::stream_read` over N*K bytes: the DRAM ceiling, in the same rounds.
"Cold": every implementation cycles through enough copies of its weights (>= 128 MiB in all,
four times the 32 MiB L3) that each call finds its weights in DRAM, not cache (`--hot`: one
copy, each call right after an identical one). Each row gives p20/p50/p80 and
speedup = peer p50 / qtorch p50.

--backward: forward + backward w.r.t. x through a frozen W4A16 layer (transfer learning on a
quantized backbone), K = N = 4096, group 128, fp32, the module on each backend:
  reference                the whole op (forward and backward) on the reference backend;
  cpu fwd, reference bwd   the cpu forward with the reference backward;
  cpu                      the cpu forward and backward kernels (qtorch_cpu::int4_linear_grad_input:
                           ŵ dequantized in cache-sized column slabs, each followed by its
                           slab's fp32 GEMM, so the fp32 [N, K] ŵ never exists);
  bwd                      the backward alone (M = 16, 128, 1024): that kernel vs the whole
                           ŵ dequantized in one pass (qtorch_cpu::dequantize_int4), then one
                           fp32 matmul;
  dequantize               that dequantization alone, cpu kernel vs the reference.
"""

from __future__ import annotations

import argparse

import pytest
import torch

import qtorch
from qtorch import reference as R
from qtorch.bench import cases, ceiling, drivers, timing
from qtorch.bench.types import Impl, Options, Shape

N = K = 4096
GROUP = 128
MS = (1, 8, 32, 128)
READ = "read int8 weight bytes"  # stream_read over N*K bytes (not a GEMM)
W4 = {
    "qtorch:cpu": "qtorch:cpu W4A16",
    "qtorch:cpu:op": "qtorch:cpu W4A16 op",
    "qtorch:cpu:kernel": "qtorch:cpu W4A16 kernel",
    "torch:_weight_int4pack_mm_for_cpu": "torch:_weight_int4pack_mm_for_cpu",
    "torch:F.linear(bfloat16)": "torch:F.linear(bfloat16)",
    "torch:F.linear(float32)": "torch:F.linear(float32)",
    ceiling.NAME: READ,
}
W8 = {
    "qtorch:cpu": "qtorch:cpu W8A16",
    "qtorch:cpu:op": "qtorch:cpu W8A16 op",
    "qtorch:cpu:kernel": "qtorch:cpu W8A16 kernel",
    "torch:_weight_int8pack_mm": "torch:_weight_int8pack_mm",
}
IMPL_NAMES = list(W4.values()) + list(W8.values())


def build_impls(m: int, dtype=torch.bfloat16) -> list[Impl]:
    """The rows of one M: both weight-only cases' implementations under this script's labels."""
    s = Shape(m, K, N)
    opt4 = Options(kernel_rows=True, read_ceiling=True, dense_dtypes=("float32",))
    b4 = cases.build("int4_weight_only_linear", s, dtype, "cpu", ["cpu"], True, opt4)
    b8 = cases.build(
        "int8_weight_only_linear", s, dtype, "cpu", ["cpu"], True, Options(kernel_rows=True)
    )
    return drivers.select(b4, W4) + drivers.select(b8, W8)


def check_peers(m: int = 3) -> dict:
    """Relative error of each W4A16/W8A16 implementation against qtorch.reference, so the
    peers are known to be called right (theirs carries bf16-rounded scales)."""
    s, opt = Shape(m, K, N), Options(reference="always")
    out = {}
    for op, labels in (("int4_weight_only_linear", W4), ("int8_weight_only_linear", W8)):
        built = cases.build(op, s, torch.bfloat16, "cpu", ["cpu", "reference"], True, opt)
        ref = next(i for i in built.impls if i.name == "qtorch:reference").fn()
        keep = {k: v for k, v in labels.items() if k == "qtorch:cpu" or k.startswith("torch:_")}
        out.update(drivers.rel_errors(drivers.select(built, keep), ref))
    return out


# (peer, [qtorch rows it is compared with]); ratio = peer p50 / qtorch p50, > 1: qtorch faster
GROUPS = [
    (
        "torch:_weight_int4pack_mm_for_cpu",
        ["qtorch:cpu W4A16 kernel", "qtorch:cpu W4A16", "qtorch:cpu W4A16 op"],
    ),
    (
        "torch:_weight_int8pack_mm",
        ["qtorch:cpu W8A16 kernel", "qtorch:cpu W8A16", "qtorch:cpu W8A16 op"],
    ),
    ("torch:F.linear(bfloat16)", []),
    ("torch:F.linear(float32)", []),
    (READ, []),
]


# ------------------------------------------------------------------------- backward (--backward)


def backward_impls() -> list[Impl]:
    """The --backward rows: engine implementations over one int4 weight (copied with --cold)."""
    qw, sc, z = R.quantize_int4(torch.randn(N, K), GROUP, False)
    weights = {"qw": qw, "sc": sc, "zp": z, "gs": GROUP, "bias": None}
    wbytes = N * K // 2 + 5 * N * (K // GROUP)
    Q = torch.ops.qtorch_cpu
    impls = []

    def row(name, make, kind="qtorch"):
        impls.append(
            Impl(
                name,
                kind,
                "cpu",
                make(weights),
                wbytes,
                "fp32",
                copy=lambda: make(cases.clone_weights(weights)),
            )
        )

    for m in (16, 128):
        x = torch.randn(m, K, requires_grad=True)

        def step(fwd, bwd, x=x):
            def make(w):
                mod = cases.quantized_module("int4_weight_only_linear", w, K, N)

                def run():
                    with qtorch.use_backend(fwd):
                        y = mod(x)
                    with qtorch.use_backend(bwd):  # CPU autograd runs backward in this thread
                        y.sum().backward()

                return run

            return make

        row(f"M={m:<4d} fwd+bwd reference", step("reference", "reference"))
        row(f"M={m:<4d} cpu fwd, reference bwd", step("cpu", "reference"))
        row(f"M={m:<4d} fwd+bwd cpu", step("cpu", "cpu"))
    for m in (16, 128, 1024):
        g = torch.randn(m, N)
        row(
            f"M={m:<4d} bwd: dequantize + matmul",
            lambda w, g=g: lambda: g @ Q.dequantize_int4(w["qw"], w["sc"], w["zp"], GROUP),
        )
        row(
            f"M={m:<4d} bwd: slabs (cpu)",
            lambda w, g=g: lambda: Q.int4_linear_grad_input(g, w["qw"], w["sc"], w["zp"], GROUP),
        )
    row(
        "dequantize reference",
        lambda w: lambda: R.dequantize_int4(w["qw"], w["sc"], w["zp"], GROUP),
        "baseline",
    )
    row("dequantize cpu", lambda w: lambda: Q.dequantize_int4(w["qw"], w["sc"], w["zp"], GROUP))
    return impls


def backward_main(args) -> None:
    print(
        drivers.header(
            f"K = N = {N}",
            f"group {GROUP}",
            "fp32",
            "one weight (--cold: rotated copies); median of interleaved rounds",
        )
    )
    # One weight by default, as a training step rereads a layer's weight right after its
    # forward; these rows are compute-bound, so rotation would only multiply the run time.
    cfg = timing.TimingConfig(cold=args.cold, rounds=args.rounds or 7, batch_below_s=0.0)
    med = {k: st.median for k, st in drivers.time_rows(backward_impls(), "cpu", cfg).items()}
    for k, v in med.items():
        ratio = ""
        if k.endswith("fwd+bwd cpu"):
            before = med[k.replace("fwd+bwd cpu", "cpu fwd, reference bwd")]
            ref = med[k.replace("cpu", "reference")]
            ratio = f"{ref / v:5.2f}x vs reference, {before / v:5.2f}x vs reference backward"
        elif k.endswith("slabs (cpu)"):
            base = med[k.replace("slabs (cpu)", "dequantize + matmul")]
            ratio = f"{base / v:5.2f}x vs dequantize + matmul"
        elif k.endswith("cpu"):
            ratio = f"{med[k.replace('cpu', 'reference')] / v:5.2f}x vs reference"
        print(f"  {k:34s} {v * 1e3:8.1f} ms  {ratio}")


# ------------------------------------------------------------------------- pytest-benchmark

needs_cpu = drivers.needs_backend("cpu")


@needs_cpu
@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("m", MS)
def test_weight_only_linear(benchmark, m, impl):
    found = {i.name: i for i in build_impls(m)}
    if impl not in found:
        pytest.skip(f"{impl} is not in this torch build")
    benchmark.group = f"weight-only linear M={m} N=K={N} bf16, cold weights"
    benchmark.extra_info.update(
        device="cpu", torch=torch.__version__, threads=torch.get_num_threads(), flop=2 * m * N * K
    )
    drivers.pedantic(benchmark, found[impl], True, rounds=20, warmup_rounds=2)


# --------------------------------------------------------------------------- ratio table


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--clock",
        choices=["wall", "thread"],
        default="wall",
        help="wall: perf_counter; thread: this thread's CPU time (needs --threads 1; "
        "immune to time-slicing when other processes load the machine)",
    )
    ap.add_argument("--ms", type=int, nargs="*", default=list(MS))
    ap.add_argument("--rounds", type=int, default=0, help="rounds per M (default by M)")
    ap.add_argument("--hot", action="store_true", help="one weight copy (L3-resident)")
    ap.add_argument(
        "--backward", action="store_true", help="forward + backward through a frozen W4A16 layer"
    )
    ap.add_argument("--cold", action="store_true", help="--backward: rotate weight copies")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        ap.error("--clock thread measures one thread: use --threads 1")
    if args.backward:
        backward_main(args)
        return
    kernel = torch.ops.qtorch_cpu.weight_only_kernel_name("bfloat16")
    print(
        drivers.header(
            f"clock {args.clock}", f"qtorch cpu ISA {qtorch._C.isa()}", f"kernel {kernel}"
        )
    )
    drivers.print_errors("qtorch.reference (M=3)", check_peers())
    drivers.print_dram_read(
        READ, "N*K bytes", "(weight bytes streamed / p50) / (its bytes / its p50)"
    )
    print(
        "speedup = peer time / qtorch time at p50 (and at p20, the figure least disturbed by "
        "other processes on a shared machine); > 1: qtorch faster. 'kernel' rows call the "
        "binding on its prepacked weight, as the peers are called; 'op' rows call qtorch.ops "
        "on the canonical weights; the others are the qtorch.nn modules."
    )
    print(
        f"{'M':>4s} {'implementation':36s} {'p20/p50/p80 ms':>24s} {'GOP/s':>6s} {'% read':>6s}"
        "  speedup p50 (p20)"
    )
    for m in args.ms:
        impls = build_impls(m)
        wbytes = {i.name: i.weight_bytes for i in impls}
        cfg = timing.TimingConfig(
            cold=not args.hot,
            rounds=args.rounds or (30 if m <= 8 else 12),
            batch_below_s=0.0,
            clock=args.clock,
        )
        res = drivers.time_rows(impls, "cpu", cfg)
        for peer, ours in GROUPS:
            for name in [peer] + ours:
                if name not in res:
                    continue
                st = res[name]
                sp = (
                    f"{res[peer].median / st.median:.2f}x ({res[peer].p20 / st.p20:.2f}x)"
                    if name != peer and peer in res
                    else ""
                )
                pct = ceiling.read_pct(wbytes[name], st.median, wbytes[READ], res[READ].median)
                gops = "" if name == READ else f"{2 * m * N * K / st.median / 1e9:.0f}"
                print(f"{m:4d} {name:36s} {drivers.ms(st):>24s} {gops:>6s} {pct:5.0f}%  {sp}")


if __name__ == "__main__":
    main()
