"""W8A8 `int8_linear` on the `cpu` backend vs fbgemm and fp32, K = N = 4096.

    python benchmarks/bench_int8_mm.py [--hot] [--ms 1,8,32,128,512]   # interleaved ratio table
    pytest benchmarks/bench_int8_mm.py --benchmark-only                # pytest-benchmark table

Cases (issue 5 goal: >= 1.0x fbgemm at every M, >= 1.3x at M = 1, >= 85% of the VNNI peak at
M >= 128; all threads torch has, fp32 activations, bias):
  qtorch:cpu      `qtorch.ops.int8_linear`, backend "auto" (= cpu) (per-token activation
                  quantization fused into the A-packing, VNNI GEMM, fused epilogue).
  qtorch:kernel   the kernel binding `torch.ops.qtorch_cpu.int8_linear` on a weight
                  packed beforehand, i.e. without qtorch.ops (checks, backend choice, packed-
                  weight cache), to separate the two costs.
  fbgemm          `torch.ao.nn.quantized.dynamic.Linear` (qint8 per-channel weight, dynamic
                  per-tensor u8 activations), torch's own dynamic W8A8 CPU path.
  F.linear(fp32)  the dense fp32 layer, for scale.
Weights are cold by default: each implementation cycles through enough weight copies (>= 128 MiB,
four times the 32 MiB L3) that every call finds its weights in DRAM; `--hot` uses one copy and
times a second, back-to-back call (weights in L3).
The table times the implementations of one M interleaved (round-robin), so load from other
processes on the machine hits all alike; each row gives p20/p50/p80 and ratio = peer p50 /
qtorch p50 (> 1: qtorch is faster). The VNNI peak is measured in the same run with
`qtorch_cpu::int8_vnni_peak` (24 independent register-only vpdpbusd zmm per thread).
"""

from __future__ import annotations

import argparse
import random
import time

import pytest
import torch
import torch.nn.functional as F
from _cold import Rotating, copies, dram_bandwidth, pcts  # benchmarks/_cold.py

import qtorch
from qtorch import _backend, ops
from qtorch import reference as R

N = K = 4096
MS = (1, 8, 32, 128, 512)
READ = "read weights"  # stream_read over the same bytes (not a GEMM)
IMPL_NAMES = ["qtorch:cpu", "qtorch:kernel", "fbgemm", "F.linear(fp32)", READ]




def _layer(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g) * 0.02, torch.randn(N, generator=g) * 0.1


def _fbgemm(w: torch.Tensor, bias: torch.Tensor):
    w_q, w_scale = R.quantize_int8(w)
    qw = torch._make_per_channel_quantized_tensor(w_q, w_scale.double(),
                                                  torch.zeros(N, dtype=torch.long), 0)
    lin = torch.ao.nn.quantized.dynamic.Linear(K, N, dtype=torch.qint8)
    lin.set_weight_bias(qw, bias)
    return lin


def build_impls(m: int, hot: bool = False) -> dict:
    """{name: callable} for one M; each call runs one layer on a (cold) weight copy."""
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(m))
    # The qtorch rows call the op as a user does, with the backend choice left at "auto":
    assert qtorch.get_backend() == "auto" and _backend.resolve("int8_linear", x.device)[0] == "cpu"
    impls = {}
    n8 = copies(N * K, hot)
    layers = [_layer(i) for i in range(n8)]
    q8 = [(*R.quantize_int8(w), b) for w, b in layers]

    def ours(w_q, w_scale, b):
        return ops.int8_linear(x, w_q, w_scale, b)

    impls["qtorch:cpu"] = Rotating(ours, q8)
    from qtorch.backends import cpu as CPU

    def kernel(w_packed, w_scale, b):  # the kernel binding alone, weight packed beforehand
        return torch.ops.qtorch_cpu.int8_linear(x, w_packed, N, w_scale, b)

    # own weight copies, so neither qtorch row warms the cache for the other
    kq = [R.quantize_int8(w) + (b,) for w, b in layers]
    impls["qtorch:kernel"] = Rotating(kernel, [(CPU._int8_vnni_weight(wq), ws, b)
                                                for wq, ws, b in kq])
    # The ceiling at small M: a plain streaming read of the same bytes, from buffers packed
    # (allocated) as ours are, timed in the same rounds (conditions drift between runs).
    reads = [(CPU._int8_vnni_weight(R.quantize_int8(w)[0]),) for w, _ in layers]
    impls[READ] = Rotating(torch.ops.qtorch_cpu.stream_read, reads)
    fb = [_fbgemm(w, b) for w, b in layers]
    impls["fbgemm"] = Rotating(lambda lin: lin(x), [(lin,) for lin in fb])
    nd = copies(4 * N * K, hot)
    dense = [_layer(i) for i in range(nd)]
    impls["F.linear(fp32)"] = Rotating(lambda w, b: F.linear(x, w, b), dense)
    return impls


def check_peers(m: int = 3) -> dict:
    """Relative error of each implementation against qtorch.reference.int8_linear (fbgemm
    quantizes activations per tensor, so it differs by more), to show each is called right."""
    x = torch.randn(m, K)
    w, b = _layer(0)
    w_q, w_scale = R.quantize_int8(w)
    ref = R.int8_linear(x, w_q, w_scale, b)
    with qtorch.use_backend("cpu"):
        got = {"qtorch:cpu": ops.int8_linear(x, w_q, w_scale, b), "fbgemm": _fbgemm(w, b)(x),
               "F.linear(fp32)": F.linear(x, w, b)}
    return {k: ((o - ref).norm() / ref.norm()).item() for k, o in got.items()}



def time_interleaved(impls: dict, rounds: int, hot: bool = False) -> dict:
    """Round-robin over the implementations, in a shuffled order each round. Cold: per-call
    time of one pass over all weight copies (the rotation keeps weights out of cache). Hot: each turn makes one untimed call first, so the turn's
    timed call finds the weights that the other implementations evicted back in cache."""
    for fn in impls.values():  # warm-up: packing caches, thread pool
        for _ in range(len(getattr(fn, "args", [0])) + 1):
            fn()
    ts = {k: [] for k in impls}
    order = list(impls)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)  # no implementation always follows the same one (e.g. the cache-
        for k in order:     # flushing fp32 layer)
            fn = impls[k]
            if hot:
                fn()
                t0 = time.perf_counter()
                fn()
                ts[k].append(time.perf_counter() - t0)
                continue
            # Cold: time a whole pass over the >= 128 MiB of weight copies, as decoding through
            # a model's layers does; single calls were moved by what the previous row left in
            # cache.
            n = len(getattr(fn, "args", [0]))
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            ts[k].append((time.perf_counter() - t0) / n)
    return {k: pcts(v) for k, v in ts.items()}



def vnni_peak() -> float:
    """int ops/s of register-only vpdpbusd on all torch threads, best of 3."""
    return max(torch.ops.qtorch_cpu.int8_vnni_peak(20_000_000) for _ in range(3))


# ------------------------------------------------------------------------- pytest-benchmark

needs_cpu = pytest.mark.skipif("cpu" not in qtorch.available_backends(),
                               reason="qtorch._C (the cpu backend) is not built")


@needs_cpu
@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("m", MS)
def test_int8_linear(benchmark, m, impl):
    fn = build_impls(m)[impl]
    benchmark.group = f"int8_linear M={m} N=K={N} fp32, cold weights"
    benchmark.extra_info.update(device="cpu", torch=torch.__version__, isa=qtorch._C.isa(),
                                threads=torch.get_num_threads(), flop=2 * m * N * K)
    benchmark.pedantic(fn, rounds=20 if m <= 32 else 6, warmup_rounds=4)


# --------------------------------------------------------------------------- ratio table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hot", action="store_true", help="one weight copy (L3-resident)")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--rounds", type=int, default=0, help="rounds per M (default by M)")
    args = ap.parse_args()
    ms = [int(v) for v in args.ms.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, qtorch cpu ISA "
          f"{qtorch._C.isa()}, weights {'hot (1 copy)' if args.hot else 'cold (>= 128 MiB of copies)'}")
    print("rel. error vs qtorch.reference.int8_linear (M=3):",
          ", ".join(f"{k} {v:.1e}" for k, v in check_peers().items()))
    peak = vnni_peak()
    print(f"VNNI peak (vpdpbusd zmm loop, {torch.get_num_threads()} threads): {peak / 1e12:.3f} TOP/s")
    bw = dram_bandwidth()
    print(f"DRAM streaming read ({torch.get_num_threads()} threads, 512 MiB, huge pages): "
          f"{bw / 1e9:.1f} GB/s (at start; it drifts between ~35 and ~65 GB/s on this VM). "
          f"'{READ}' = qtorch_cpu::stream_read of the int8 weight bytes, timed in the same "
          f"rounds; '% read' = its p50 / the row's p50 (weight bytes scaled: fp32 4x)")
    print("ratio = p50 / qtorch:cpu p50 (kernel ratio = p50 / qtorch:kernel p50): > 1 means "
          "qtorch is faster")
    print(f"{'M':>4s} {'implementation':16s} {'p20/p50/p80 ms':>24s} {'TOP/s':>7s} "
          f"{'% peak':>7s} {'% read':>7s} {'ratio':>8s} {'kernel ratio':>13s}")
    for m in ms:
        res = time_interleaved(build_impls(m, args.hot),
                               args.rounds or (40 if m <= 8 else 20 if m <= 128 else 8), args.hot)
        base, kbase = res["qtorch:cpu"][1], res["qtorch:kernel"][1]
        read = res[READ][1]
        for name, p in res.items():
            ms_ = '/'.join(f'{v * 1e3:.3f}' for v in p)
            if name == READ:
                print(f"{m:4d} {name:16s} {ms_:>24s} {N * K / p[1] / 1e9:6.1f} GB/s")
                continue
            tops = 2 * m * N * K / p[1] / 1e12
            ours = name.startswith("qtorch")
            ratio = "" if ours else f"{p[1] / base:7.2f}x"
            kratio = "" if ours else f"{p[1] / kbase:7.2f}x"
            scale = 4 if name.startswith("F.linear") else 1
            print(f"{m:4d} {name:16s} {ms_:>24s} "
                  f"{tops:7.3f} {100 * tops * 1e12 / peak:6.0f}% "
                  f"{100 * scale * read / p[1]:6.0f}% {ratio:>8s} {kratio:>13s}")


if __name__ == "__main__":
    main()
