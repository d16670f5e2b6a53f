"""Distillation losses on the `cpu` backend vs eager PyTorch, ratios and peak memory in one run.

    python benchmarks/bench_distillation.py [--rounds R] [--threads T] [--only liger]
        [--liger-shape M,H,V] [--dtype fp32 bf16]                         # ratio + memory table
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
  fused vs Liger        N=4096, V=49152 (SmolLM2's vocabulary), H=576, fp32 and bf16, JSD
                        beta=0.5, T=1, alpha=0.5 (--liger-shape M,H,V for other sizes):
                        eager, Liger-Kernel's chunked LigerFusedLinearJSDLoss (eager and
                        compiled=True, when importable; settings converted by
                        qtorch.bench.peers.liger_jsd_kwargs: Liger has no T² factor, and its
                        weight_soft_loss = alpha · T², weight_hard_loss = 1 - alpha), qtorch
                        (cpu), and qtorch with the teacher head an int4 module (group 64). Before
                        timing, the relative difference of each row's grad_hidden to qtorch's
                        is printed (the losses agree: tests/test_bench.py). For the int4 head,
                        "+head" adds the teacher head's resident bytes (fp32 weight or int4
                        buffers) to its peak, since the head is an input either way.
                        Two floor rows: the four GEMMs of the step alone (both logits,
                        grad_hidden, grad_weight; no loss), in qtorch's default chunks and
                        unchunked, and qtorch's time over theirs.
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
LIGER = Shape(4096, 576, cases.SMOLLM2_VOCAB)
# JSD beta=0.5, T=1, alpha=0.5: the settings of the measurement
LIGER_OPTIONS = Options(divergence="jsd", temperature=1.0, alpha=0.5, teacher_quant=("w4a16",))
LIGER_ROWS = {
    EAGER: "eager",
    "liger:FusedLinearJSDLoss": "liger",
    "liger:FusedLinearJSDLoss compiled": "liger compiled=True",
    "qtorch:cpu": "qtorch",
    "qtorch:cpu bf16 GEMM": "qtorch, bf16 GEMM forced on",
    "qtorch:cpu w4a16 teacher": "qtorch int4 teacher head",
    "torch:four GEMMs (qtorch's chunks)": "four GEMMs, qtorch's chunks",
    "torch:four GEMMs (unchunked)": "four GEMMs, unchunked",
}
FLOOR_ROWS = ("four GEMMs, qtorch's chunks", "four GEMMs, unchunked")


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


def liger_built(dtype, shape: Shape = LIGER):
    """The fused-linear JSD case with the Liger peers and the int4-teacher row."""
    return cases.build(
        "fused_linear_distillation_loss", shape, dtype, "cpu", ["cpu"], True, LIGER_OPTIONS
    )


def liger_peaks(dtype, shape: Shape = LIGER) -> dict:
    """{engine name: peak bytes above the inputs, or why not} for the LIGER_ROWS, each in a
    fresh child process."""
    out = {}
    for impl in LIGER_ROWS:
        res = memory.cpu_peak_extra(
            "fused_linear_distillation_loss",
            [shape],
            dtype,
            ["cpu"],
            [impl],
            True,
            torch.get_num_threads(),
            options=LIGER_OPTIONS.as_dict(),
        )
        out[impl] = res.get(f"{shape.M},{shape.K},{shape.N}|{impl}", res.get("error", "not run"))
    return out


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
    ap.add_argument(
        "--only", choices=("loss", "fused", "liger"), nargs="+", help="sections (default all)"
    )
    ap.add_argument(
        "--liger-shape",
        type=_mhv,
        default=LIGER,
        metavar="M,H,V",
        help=f"tokens, hidden, vocab of the Liger section (default {LIGER.M},{LIGER.K},{LIGER.N})",
    )
    ap.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        nargs="+",
        default=("fp32", "bf16"),
        help="input dtypes of the Liger section (default both)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loss, fused = QUICK if args.quick else (LOSS, FUSED)
    liger = QUICK[1] if args.quick else args.liger_shape
    sections = args.only or ("loss", "fused", "liger")
    print(drivers.header(f"qtorch cpu ISA {qtorch._C.isa()}"))
    if "loss" in sections or "fused" in sections:
        _loss_and_fused(args, loss, fused, sections)
    if "liger" in sections:
        for name in args.dtype:
            _liger_section(args, {"fp32": torch.float32, "bf16": torch.bfloat16}[name], liger)


def _mhv(text: str) -> Shape:
    m, h, v = (int(x) for x in text.split(","))
    return Shape(m, h, v)


def _liger_section(args, dtype, shape: Shape) -> None:
    built = liger_built(dtype, shape)
    impls = drivers.select(built, LIGER_ROWS)
    for label, why in drivers.missing(built, LIGER_ROWS).items():
        print(f"  {label}: not run: {why}")
    kind = str(dtype)[6:]
    print(
        f"\nfused_linear fwd+bwd N={shape.M} V={shape.N} H={shape.K} {kind}: JSD beta=0.5, "
        f"T=1, alpha=0.5, 10% of the tokens ignored; Liger's settings converted "
        f"(qtorch.bench.peers.liger_jsd_kwargs)"
    )
    # each row returns (grad_hidden, grad_weight); drivers.rel_errors runs without autograd
    grads = {i.name: i.fn() for i in impls if i.name not in FLOOR_ROWS}
    ref = grads["qtorch"]
    errors = {
        name: max(
            (a.float() - b.float()).norm().item() / b.float().norm().item()
            for a, b in zip(g, ref, strict=True)
        )
        for name, g in grads.items()
    }
    del grads
    drivers.print_errors("qtorch (grad_hidden, grad_weight), the larger", errors)
    cfg = timing.TimingConfig(rounds=args.rounds or 3, batch_below_s=0.0)
    res = drivers.time_rows(impls, "cpu", cfg)
    peaks = liger_peaks(dtype, shape)
    labels = {v: k for k, v in LIGER_ROWS.items()}
    head_fp32 = shape.N * shape.K * torch.finfo(dtype).bits // 8
    q = res["qtorch"].median
    print(
        f"{'impl':28s} {'p20/p50/p80 ms':>20s} {'vs qtorch':>9s} {'peak MiB':>9s} "
        f"{'+head MiB':>10s}"
    )
    for i in impls:
        st, peak = res[i.name], peaks[labels[i.name]]
        head = head_fp32
        if i.name == "qtorch int4 teacher head":
            head = i.weight_bytes - shape.N * shape.K * torch.finfo(dtype).bits // 8
        if isinstance(peak, int):
            mem = f"{peak / 2**20:9.0f} {(peak + head) / 2**20:10.0f}"
        else:
            mem = f"  not measured: {peak}"
        print(f"{i.name:28s} {_ms0(st):>20s} {st.median / q:8.2f}x {mem}")
    floor = res[FLOOR_ROWS[0]].median
    print(
        f"qtorch / four GEMMs (qtorch's chunks) = {q / floor:.2f}x; "
        f"qtorch / four GEMMs (unchunked) = {q / res[FLOOR_ROWS[1]].median:.2f}x; "
        "the GEMM rows compute no loss (their memory includes the logit-sized stand-in for the "
        "gradient)"
    )
    print(
        "(peak = VmHWM - VmRSS before the measured call, after a warm-up call, each row in a "
        "fresh process; +head adds the teacher head's resident bytes: the weight [V, H] in "
        f"{kind}, or the int4 module's buffers)"
    )


def _loss_and_fused(args, loss, fused, sections) -> None:
    if "loss" not in sections:
        return _fused_section(args, fused)
    print(
        f"{'case':52s} {'eager p20/p50/p80 ms':>24s} {'qtorch p20/p50/p80 ms':>24s} {'speedup':>8s}"
    )
    for dtype in (torch.float32, torch.bfloat16):
        cfg = timing.TimingConfig(rounds=args.rounds or 7, batch_below_s=0.0)
        res = drivers.time_rows(loss_impls(dtype, loss), "cpu", cfg)
        e, q = res["eager"], res["qtorch"]
        name = f"distillation_loss fwd+bwd N={loss.M} V={loss.N} {str(dtype)[6:]}"
        print(f"{name:52s} {_ms0(e):>24s} {_ms0(q):>24s} {e.median / q.median:7.2f}x")
    if "fused" in sections:
        _fused_section(args, fused)


def _fused_section(args, fused) -> None:
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
