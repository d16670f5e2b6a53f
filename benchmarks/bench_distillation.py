"""Distillation losses on the `cpu` backend vs eager PyTorch, ratios and peak memory in one run.

    python benchmarks/bench_distillation.py [--rounds R] [--threads T]   # ratio + memory table
    pytest benchmarks/bench_distillation.py --benchmark-only             # pytest-benchmark table

A thin driver over `qtorch.bench` (cases "distillation_loss" and
"fused_linear_distillation_loss"; the eager baseline is qtorch.bench.baselines'). Cases:
  distillation_loss     N=2048, V=32000, fp32 and bf16, T=2, alpha=0.5, kl, 10% of the tokens
                        ignored; forward + backward. Eager = log_softmax(s/T),
                        log_softmax(t/T), kl_div(log_target) * T², cross_entropy, autograd,
                        all in fp32 math (bf16 is upcast first, as the contract computes).
  fused_linear          N=4096, V=32000, H=256 fp32: logits = h @ W.T for student and teacher,
                        the same loss, backward to h and W. Eager holds [N, V] logits; qtorch
                        chunks (the default chunk, 64 rows, and the chunked pure-PyTorch
                        reference, the memory baseline).
Implementations of a case are timed interleaved (qtorch.bench.timing); each row gives
p20/p50/p80 over the rounds and speedup = eager p50 / qtorch p50. Peak memory is VmHWM of a
fresh child process per variant (qtorch.bench.memory) minus its VmRSS before the measured
call, after one warm-up call.
"""

from __future__ import annotations

import argparse

import pytest
import torch

import qtorch
from qtorch.bench import cases, drivers, memory, timing
from qtorch.bench.types import Options, Shape

LOSS = Shape(2048, 0, 32000)
FUSED = Shape(4096, 256, 32000)
QUICK = (Shape(64, 0, 1000), Shape(128, 32, 1000))  # --quick: a functional check, not numbers
FUSED_OPTIONS = Options(chunk_sizes=(None, 64), reference="always")
# None: the default chunk (~32 MiB of fp32 logits = 262 rows here); 64: smaller GEMMs.
FUSED_VARIANTS = {
    "qtorch:cpu": ("cpu", None),
    "qtorch:cpu chunk_size=64": ("cpu", 64),
    "qtorch:reference": ("reference", None),
}
EAGER = "torch:eager+autograd"


def loss_impls(dtype, shape: Shape = LOSS) -> list:
    built = cases.build("distillation_loss", shape, dtype, "cpu", ["cpu"], with_peers=False)
    return drivers.select(built, {EAGER: "eager", "qtorch:cpu": "qtorch"})


def fused_impls(shape: Shape = FUSED) -> list:
    built = cases.build(
        "fused_linear_distillation_loss",
        shape,
        torch.float32,
        "cpu",
        ["cpu", "reference"],
        with_peers=False,
        options=FUSED_OPTIONS,
    )
    return drivers.select(built, {EAGER: EAGER, **{n: n for n in FUSED_VARIANTS}})


def peak_bytes(impl: str, shape: Shape = FUSED) -> int:
    """Peak resident memory of one fused-linear step of `impl`, in a fresh interpreter."""
    res = memory.cpu_peak_extra(
        "fused_linear_distillation_loss",
        [shape],
        torch.float32,
        ["cpu", "reference"],
        [impl],
        False,
        torch.get_num_threads(),
        options=FUSED_OPTIONS.as_dict(),
    )
    if "error" in res:
        raise RuntimeError(f"memory child for {impl}: {res['error']}")
    return res[f"{shape.M},{shape.K},{shape.N}|{impl}"]


# ------------------------------------------------------------------------- pytest-benchmark

needs_cpu = drivers.needs_backend("cpu")


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["eager", "qtorch"])
def test_distillation_fwd_bwd(benchmark, impl, dtype):
    it = next(i for i in loss_impls(dtype) if i.name == impl)
    benchmark.group = f"distillation_loss fwd+bwd N=2048 V=32000 {dtype}"
    benchmark.extra_info.update(
        device="cpu", torch=torch.__version__, threads=torch.get_num_threads()
    )
    drivers.pedantic(benchmark, it, False, rounds=5, warmup_rounds=1)


@needs_cpu
@pytest.mark.parametrize("impl", [EAGER, "qtorch:cpu"])
def test_fused_linear_fwd_bwd(benchmark, impl):
    it = next(i for i in fused_impls() if i.name == impl)
    benchmark.group = "fused_linear_distillation fwd+bwd N=4096 V=32000 H=256 fp32"
    benchmark.extra_info.update(
        device="cpu",
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        peak_bytes=peak_bytes(impl),
    )
    drivers.pedantic(benchmark, it, False, rounds=3, warmup_rounds=1)


# --------------------------------------------------------------------------- ratio table


def _ms0(st) -> str:
    return "/".join(f"{v * 1e3:.0f}" for v in st.pcts)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=0, help="rounds (default 7, fused 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a functional check")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loss, fused = QUICK if args.quick else (LOSS, FUSED)
    print(drivers.header(f"qtorch cpu ISA {qtorch._C.isa()}"))
    print(
        f"{'case':52s} {'eager p20/p50/p80 ms':>24s} {'qtorch p20/p50/p80 ms':>24s} {'speedup':>8s}"
    )
    for dtype in (torch.float32, torch.bfloat16):
        cfg = timing.TimingConfig(rounds=args.rounds or 7, batch_below_s=0.0)
        res = drivers.time_rows(loss_impls(dtype, loss), "cpu", cfg)
        e, q = res["eager"], res["qtorch"]
        name = f"distillation_loss fwd+bwd N={loss.M} V={loss.N} {str(dtype)[6:]}"
        print(f"{name:52s} {_ms0(e):>24s} {_ms0(q):>24s} {e.median / q.median:7.2f}x")
    cfg = timing.TimingConfig(rounds=args.rounds or 3, batch_below_s=0.0)
    res = drivers.time_rows(fused_impls(fused), "cpu", cfg)
    e = res[EAGER]
    pe = peak_bytes(EAGER, fused)
    shape = f"N={fused.M} V={fused.N} H={fused.K}"
    print(f"{f'fused_linear {shape} fp32: eager':52s} {_ms0(e):>24s}   peak {pe / 2**20:.0f} MiB")
    for impl, (backend, chunk) in FUSED_VARIANTS.items():
        q = res[impl]
        pq = peak_bytes(impl, fused)
        name = f"fused_linear ... qtorch {backend} chunk_size={chunk or 'default'}"
        print(
            f"{name:52s} {'':>24s} {_ms0(q):>24s} {e.median / q.median:7.2f}x  "
            f"peak {pq / 2**20:.0f} MiB = {100 * pq / pe:.1f}% of eager"
        )
    print(
        "(peak = VmHWM - VmRSS before the measured call, after a warm-up call, each variant "
        "in a fresh process)"
    )


if __name__ == "__main__":
    main()
