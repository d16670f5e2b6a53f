"""Weight-only linears on the `cpu` backend vs torch's own CPU kernels, weights cold in DRAM.

    python benchmarks/bench_weight_only.py                         # interleaved ratio table
    pytest benchmarks/bench_weight_only.py --benchmark-only        # pytest-benchmark table

Cases (issue 5 goals, K = N = 4096, M in 1, 8, 32, 128, bf16 activations, 2 threads):
  W4A16  qtorch `int4_weight_only_linear` (group 128, asymmetric) vs
         `torch._weight_int4pack_mm_for_cpu` (its int4pack layout from
         `torch._convert_weight_to_int4pack_for_cpu(q int32 [N, K], 1)`, scales-and-zeros
         [K/gs, N, 2] in x.dtype with ŵ = (q - 8) * scale + zero, so zero = (8 - z) * scale
         gives the same ŵ as the canonical (q - z) * scale, up to the bf16 rounding of its
         scales). Goal: >= 1.5x at M = 1, >= 2x at M >= 8.
  W8A16  qtorch `int8_weight_only_linear` vs `torch._weight_int8pack_mm(x, w_q, scale)` (scale
         in x.dtype). Goal: >= 1.3x at M = 1, >= 2x at M >= 8.
  dense  `F.linear` with the bf16 and fp32 weight, for scale.
"Cold": every implementation cycles through enough copies of its weights (>= 128 MiB in all,
four times the 32 MiB L3) that each call finds its weights in DRAM, not cache. The ratio table times
the implementations of one M interleaved (round-robin), so load from other processes hits all
alike; each row gives p20/p50/p80 and ratio = peer p50 / qtorch p50.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from _cold import Rotating, copies, dram_bandwidth, pcts  # benchmarks/_cold.py

import qtorch
from qtorch import _backend, ops
from qtorch import reference as R

try:
    from qtorch.backends import cpu as CPU
except ImportError:  # not built: the pytest cases skip, main() needs it
    CPU = None

N = K = 4096
GROUP = 128
MS = (1, 8, 32, 128)




def _weights(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g) * 0.02


def build_impls(m: int, dtype=torch.bfloat16) -> dict:
    """{name: callable} for one M; each callable runs one call on a cold weight copy."""
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(m)).to(dtype)
    # The qtorch rows call the op as a user does, with the backend choice left at "auto":
    assert qtorch.get_backend() == "auto" and _backend.resolve("int4_weight_only_linear", x.device)[0] == "cpu"
    impls = {}

    n4 = copies(N * K // 2)
    q4 = [R.quantize_int4(_weights(i), GROUP, False) for i in range(n4)]

    def ours4(qw, s, z):
        return ops.int4_weight_only_linear(x, qw, s, z, GROUP)

    impls["qtorch:cpu W4A16"] = Rotating(ours4, q4)
    # The same kernel without the op layer (custom-op dispatch, checks, backend choice, cache
    # lookup), called like the peers: on its prepacked weight. Its own weight copies: sharing
    # the op row's would let the row timed second find the weights warm in L3.
    q4k = [R.quantize_int4(_weights(i), GROUP, False) for i in range(n4)]
    packed4 = [(x, *CPU._wo_int4_weight(qw, s, z, GROUP), N, K, GROUP, None) for qw, s, z in q4k]
    impls["qtorch:cpu W4A16 kernel"] = Rotating(torch.ops.qtorch_cpu.int4_weight_only_linear, packed4)
    if hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        peer4 = []
        for qw, s, z in q4:
            q = torch.stack([qw & 15, qw >> 4], -1).reshape(N, K).to(torch.int32)
            sz = torch.stack([s, (8 - z.float()) * s], -1).transpose(0, 1).contiguous().to(dtype)
            peer4.append((x, torch._convert_weight_to_int4pack_for_cpu(q, 1), GROUP, sz))
        impls["torch:_weight_int4pack_mm_for_cpu"] = Rotating(
            torch._weight_int4pack_mm_for_cpu, peer4
        )

    n8 = copies(N * K)
    q8 = [R.quantize_int8(_weights(100 + i)) for i in range(n8)]

    def ours8(w_q, s):
        return ops.int8_weight_only_linear(x, w_q, s)

    impls["qtorch:cpu W8A16"] = Rotating(ours8, q8)
    q8k = [R.quantize_int8(_weights(100 + i)) for i in range(n8)]
    packed8 = [(x, *CPU._wo_int8_weight(w_q, s), N, K, None) for w_q, s in q8k]
    impls["qtorch:cpu W8A16 kernel"] = Rotating(torch.ops.qtorch_cpu.int8_weight_only_linear, packed8)
    if hasattr(torch, "_weight_int8pack_mm"):
        impls["torch:_weight_int8pack_mm"] = Rotating(
            torch._weight_int8pack_mm, [(x, w_q, s.to(dtype)) for w_q, s in q8]
        )

    # The ceiling at small M: a plain streaming read of int8-weight bytes from buffers packed
    # (allocated) as ours are, timed in the same rounds (conditions drift between runs).
    reads = [(CPU._wo_int8_weight(*R.quantize_int8(_weights(300 + i)))[0],) for i in range(n8)]
    impls[READ] = Rotating(torch.ops.qtorch_cpu.stream_read, reads)

    for wdt in (torch.bfloat16, torch.float32):
        nd = copies(N * K * torch.empty((), dtype=wdt).element_size())
        ws = [_weights(200 + i).to(wdt) for i in range(nd)]
        xd = x.to(wdt)
        impls[f"torch:F.linear({str(wdt)[6:]})"] = Rotating(
            lambda w, xd=xd: F.linear(xd, w), [(w,) for w in ws]
        )
    return impls


def check_peers(m: int = 3) -> dict:
    """Relative error of each W4A16/W8A16 implementation against qtorch.reference, so the
    peers are known to be called right (theirs carries bf16-rounded scales)."""
    x = torch.randn(m, K).to(torch.bfloat16)
    qw, s, z = R.quantize_int4(_weights(0), GROUP, False)
    w_q, ws = R.quantize_int8(_weights(1))
    ref4 = R.int4_weight_only_linear(x, qw, s, z, GROUP).float()
    ref8 = R.int8_weight_only_linear(x, w_q, ws).float()
    q = torch.stack([qw & 15, qw >> 4], -1).reshape(N, K).to(torch.int32)
    sz = torch.stack([s, (8 - z.float()) * s], -1).transpose(0, 1).contiguous().to(x.dtype)
    with qtorch.use_backend("cpu"):
        got = {
            "qtorch:cpu W4A16": (ops.int4_weight_only_linear(x, qw, s, z, GROUP), ref4),
            "qtorch:cpu W8A16": (ops.int8_weight_only_linear(x, w_q, ws), ref8),
        }
    got["torch:_weight_int4pack_mm_for_cpu"] = (
        torch._weight_int4pack_mm_for_cpu(
            x, torch._convert_weight_to_int4pack_for_cpu(q, 1), GROUP, sz
        ),
        ref4,
    )
    got["torch:_weight_int8pack_mm"] = (torch._weight_int8pack_mm(x, w_q, ws.to(x.dtype)), ref8)
    return {k: ((o.float() - r).norm() / r.norm()).item() for k, (o, r) in got.items()}



def time_interleaved(impls: dict, rounds: int, clock=time.perf_counter) -> dict:
    """Per-call time of one pass over all of an implementation's weight copies (>= 128 MiB, so
    every call streams its weights from DRAM, as decoding through a model's layers does),
    the implementations in a shuffled order each round. Timing a whole pass, not single calls,
    keeps one row from profiting from what the row before it left in cache."""
    import random

    for fn in impls.values():  # warm-up: every weight copy packed once, thread pool up
        for _ in range(len(getattr(fn, "args", ())) + 2):
            fn()
    ts = {k: [] for k in impls}
    order = list(impls)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            fn = impls[k]
            n = len(getattr(fn, "args", ())) or 1
            t0 = clock()
            for _ in range(n):
                fn()
            ts[k].append((clock() - t0) / n)
    return {k: pcts(v) for k, v in ts.items()}



READ = "read int8 weight bytes"  # stream_read over N*K bytes (not a GEMM)


# Weight bytes each implementation streams per call at N = K = 4096 (metadata included where
# it is per group): for the '% DRAM' column.
def _weight_bytes(name: str) -> float:
    g = N * (K // GROUP)
    return {
        "qtorch:cpu W4A16": N * K / 2 + 5 * g,  # scale f32 + zero u8 per (channel, group)
        "qtorch:cpu W4A16 kernel": N * K / 2 + 5 * g,
        "torch:_weight_int4pack_mm_for_cpu": N * K / 2 + 4 * g,  # bf16 scale and zero
        "qtorch:cpu W8A16": N * K,
        "qtorch:cpu W8A16 kernel": N * K,
        "torch:_weight_int8pack_mm": N * K,
        "torch:F.linear(bfloat16)": 2 * N * K,
        "torch:F.linear(float32)": 4 * N * K,
        READ: N * K,
    }[name]


# ------------------------------------------------------------------------- pytest-benchmark

needs_cpu = pytest.mark.skipif(
    "cpu" not in qtorch.available_backends(), reason="qtorch._C (the cpu backend) is not built"
)
IMPL_NAMES = [
    "qtorch:cpu W4A16",
    "qtorch:cpu W4A16 kernel",
    "torch:_weight_int4pack_mm_for_cpu",
    "qtorch:cpu W8A16",
    "qtorch:cpu W8A16 kernel",
    "torch:_weight_int8pack_mm",
    "torch:F.linear(bfloat16)",
    "torch:F.linear(float32)",
    READ,
]


@needs_cpu
@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("m", MS)
def test_weight_only_linear(benchmark, m, impl):
    impls = build_impls(m)
    if impl not in impls:
        pytest.skip(f"{impl} is not in this torch build")
    benchmark.group = f"weight-only linear M={m} N=K={N} bf16, cold weights"
    benchmark.extra_info.update(
        device="cpu", torch=torch.__version__, threads=torch.get_num_threads(), flop=2 * m * N * K
    )
    benchmark.pedantic(impls[impl], rounds=20, warmup_rounds=2)


# --------------------------------------------------------------------------- ratio table


def main() -> None:
    import argparse

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
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        ap.error("--clock thread measures one thread: use --threads 1")
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, clock {args.clock}, "
        f"qtorch cpu ISA {qtorch._C.isa()}, kernel "
        f"{torch.ops.qtorch_cpu.weight_only_kernel_name('bfloat16')}"
    )
    print(
        "rel. error vs qtorch.reference (M=3):",
        ", ".join(f"{k} {v:.1e}" for k, v in check_peers().items()),
    )
    bw = dram_bandwidth()
    print(f"DRAM streaming read ({torch.get_num_threads()} threads, 512 MiB, huge pages): "
          f"{bw / 1e9:.1f} GB/s (at start; it drifts between ~35 and ~65 GB/s on this VM). "
          f"'{READ}' = qtorch_cpu::stream_read of N*K bytes, timed in the same rounds; "
          f"'% read' = (weight bytes streamed / p50) / (its bytes / its p50)")
    # (peer, [qtorch rows it is compared with]); ratio = peer p50 / qtorch p50, > 1: qtorch faster
    groups = [
        ("torch:_weight_int4pack_mm_for_cpu", ["qtorch:cpu W4A16 kernel", "qtorch:cpu W4A16"]),
        ("torch:_weight_int8pack_mm", ["qtorch:cpu W8A16 kernel", "qtorch:cpu W8A16"]),
        ("torch:F.linear(bfloat16)", []),
        ("torch:F.linear(float32)", []),
        (READ, []),
    ]
    print(
        "speedup = peer time / qtorch time at p50 (and at p20, the figure least disturbed by "
        "other processes on a shared machine); > 1: qtorch faster. 'kernel' rows call the op "
        "on its prepacked weight, as the peers are called; the others go through qtorch.ops."
    )
    print(
        f"{'M':>4s} {'implementation':36s} {'p20/p50/p80 ms':>24s} {'GOP/s':>6s} {'% read':>6s}"
        "  speedup p50 (p20)"
    )
    for m in args.ms:
        impls = build_impls(m)
        res = time_interleaved(impls, rounds=30 if m <= 8 else 12, clock=clock)
        read_bw = N * K / res[READ][1]
        for peer, ours in groups:
            for name in [peer] + ours:
                if name not in res:
                    continue
                p = res[name]
                sp = (
                    f"{res[peer][1] / p[1]:.2f}x ({res[peer][0] / p[0]:.2f}x)"
                    if name != peer and peer in res
                    else ""
                )
                print(
                    f"{m:4d} {name:36s} {'/'.join(f'{v * 1e3:.3f}' for v in p):>24s} "
                    f"{'' if name == READ else f'{2 * m * N * K / p[1] / 1e9:.0f}':>6s} "
                    f"{100 * _weight_bytes(name) / p[1] / read_bw:5.0f}%  {sp}"
                )


if __name__ == "__main__":
    main()
