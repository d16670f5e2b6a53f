"""The vocabulary-parallel fused-linear distillation loss on 1 and 2 ranks: time and peak memory
per rank (gloo on localhost, CPU).

    python benchmarks/bench_distributed.py [--vocab 49152 128256] [--ranks 1 2] [--rounds 3]
                                           [--threads T] [--json out.json]
    python benchmarks/bench_distributed.py --quick        # tiny shapes: a functional check

Case: N = 4096 tokens, H = 576 (student and teacher hidden size), V = 49152 and V = 128256,
fp32, T = 2, alpha = 0.5, kl, 10% of the tokens ignored; forward + backward to the hidden
states and the student head (its bias too). Rows:

  single process   `qtorch.ops.fused_linear_distillation_loss` on the whole heads (backend
                   "auto"), the op the distributed one must match
  W ranks          `qtorch.distributed.fused_linear_distillation_loss`, each rank holding V / W
                   rows of both heads (W = 1: a group of one)

Every row runs in fresh processes (torch.multiprocessing spawn), so no allocator history or
other row's buffers count. Each rank builds only its own rows, makes one warm-up call, then
measures its peak memory over one call as qtorch.bench.memory's child does (VmHWM after a
reset, minus VmRSS before the call: what the call needs beyond its inputs; with a fixed glibc
mmap threshold, MALLOC_MMAP_THRESHOLD_=128 KiB unless set, so that memory freed by the
warm-up call is not resident and reused unseen), then times the
call with the engine (qtorch.bench.timing: p20/p50/p80 over `--rounds` samples, each after a
cache-evicting write rather than an untimed repeat of a multi-second call). The rounds are
fixed, so every rank makes the same calls; the collectives keep the ranks in step. The chunk
is the op's default for the whole vocabulary (about 32 MiB of fp32 logits), so each rank's
[chunk, V / W] block of logits halves from W = 1 to W = 2 ("logit block").

Threads: `--threads` (default: torch's count here) is split between the ranks of a row, so
every row uses the same cores; on a 2-core machine W = 2 runs two 1-thread ranks.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile

import torch

N, H = 4096, 576
VOCABS = (49152, 128256)
QUICK = dict(tokens=64, hidden=32, vocabs=(1000,), rounds=2)


def _inputs(spec: dict, rows: int, rank: int) -> dict:
    """This rank's rows of both heads and the (replicated) tokens; nothing vocabulary-sized
    beyond the rank's own rows is ever made."""
    n, h = spec["tokens"], spec["hidden"]
    g = torch.Generator().manual_seed(0)
    x = {
        "sh": torch.randn(n, h, generator=g).requires_grad_(),
        "th": torch.randn(n, h, generator=g),
    }
    labels = torch.randint(0, spec["vocab"], (n,), generator=g)
    labels[::10] = -100
    x["labels"] = labels
    g.manual_seed(1 + rank)
    x["sw"] = (torch.randn(rows, h, generator=g) / h**0.5).requires_grad_()
    x["sb"] = torch.zeros(rows).requires_grad_()
    x["tw"] = torch.randn(rows, h, generator=g) / h**0.5
    return x


def _call(spec: dict, x: dict):
    import qtorch
    import qtorch.distributed as qdist

    kw = dict(temperature=2.0, alpha=0.5, divergence="kl")
    if spec["mode"] == "single":

        def loss():
            return qtorch.ops.fused_linear_distillation_loss(
                x["sh"], x["sw"], x["th"], x["tw"], x["labels"], x["sb"], **kw
            )
    else:

        def loss():
            return qdist.fused_linear_distillation_loss(
                x["sh"], x["sw"], x["th"], x["tw"], x["labels"], x["sb"], **kw
            )

    def step():
        for k in ("sh", "sw", "sb"):
            x[k].grad = None  # each call makes its gradients afresh, as a training step does
        loss().backward()

    return step


def _rank_main(rank: int, spec: dict) -> None:
    import torch.distributed as dist

    from qtorch.bench import memory, timing
    from qtorch.reference.distillation import default_chunk_size
    from qtorch.testing import reset_vm_hwm, vm_hwm_kib

    torch.set_num_threads(spec["threads"])
    world = spec["ranks"]
    if spec["mode"] == "dist":
        dist.init_process_group(
            "gloo", init_method=f"file://{spec['store']}", rank=rank, world_size=world
        )
    v = spec["vocab"]
    rows = v // world + (1 if rank < v % world else 0)
    x = _inputs(spec, rows, rank)
    step = _call(spec, x)
    step()  # warm (and every rank past its first collectives)
    gc.collect()
    base = memory._status_kib("VmRSS")
    if not reset_vm_hwm():
        raise RuntimeError("cannot reset VmHWM (/proc/self/clear_refs not writable)")
    step()
    peak = max(vm_hwm_kib() - base, 0) * 1024
    cfg = timing.TimingConfig(
        rounds=spec["rounds"], warmup=0, batch_below_s=0.0, evict_bytes=32 << 20
    )
    st = timing.time_group({"loss": step}, "cpu", cfg)["loss"]
    chunk = default_chunk_size(spec["tokens"], v)
    out = {
        "rank": rank,
        "rows": rows,
        "chunk": chunk,
        "threads": spec["threads"],
        "p20_ms": st.p20 * 1e3,
        "p50_ms": st.median * 1e3,
        "p80_ms": st.p80 * 1e3,
        "samples": st.n,
        "peak_bytes": peak,
        "logit_block_bytes": chunk * rows * 4,
    }
    with open(os.path.join(spec["out"], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    if spec["mode"] == "dist":
        dist.barrier()
        dist.destroy_process_group()


def run_row(
    mode: str, ranks: int, vocab: int, tokens: int, hidden: int, rounds: int, threads: int
) -> list[dict]:
    """One row: `ranks` fresh processes; each rank's result."""
    # A fixed glibc mmap threshold: every block of logits is mapped at allocation and unmapped
    # at free, so VmRSS follows the live memory. Glibc's default threshold grows to 32 MiB
    # after the first such free, and blocks below it then come from the heap, where the
    # warm-up call leaves them resident: the measured call would reuse them and look free.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 << 10))
    with tempfile.TemporaryDirectory() as d:
        spec = {
            "mode": mode,
            "ranks": ranks,
            "vocab": vocab,
            "tokens": tokens,
            "hidden": hidden,
            "rounds": rounds,
            "threads": max(1, threads // ranks),
            "out": d,
            "store": os.path.join(d, "store"),
        }
        torch.multiprocessing.start_processes(
            _rank_main, args=(spec,), nprocs=ranks, start_method="spawn"
        )
        res = []
        for r in range(ranks):
            with open(os.path.join(d, f"rank{r}.json")) as f:
                res.append(json.load(f))
    return res


def main(argv=None) -> None:
    from qtorch.bench import drivers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=list(VOCABS))
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, default=N)
    ap.add_argument("--hidden", type=int, default=H)
    ap.add_argument("--rounds", type=int, default=3, help="timed samples per rank")
    ap.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch threads per row, split between its ranks",
    )
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a functional check")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.hidden = QUICK["tokens"], QUICK["hidden"]
        args.vocab, args.rounds = list(QUICK["vocabs"]), QUICK["rounds"]
    print(drivers.header(f"{args.threads} threads per row, split between its ranks", "gloo"))
    print(
        f"{'case':34s} {'row':16s} {'rank':>4s} {'rows':>7s} {'p20/p50/p80 ms':>26s} "
        f"{'peak MiB':>9s} {'logit block MiB':>16s}"
    )
    rows = []
    for v in args.vocab:
        case = f"N={args.tokens} V={v} H={args.hidden} fp32"
        for mode, w in [("single", 1)] + [("dist", w) for w in args.ranks]:
            label = "single process" if mode == "single" else f"{w} rank{'s' if w > 1 else ''}"
            for r in run_row(mode, w, v, args.tokens, args.hidden, args.rounds, args.threads):
                r.update(case=case, row=label, vocab=v, ranks=w)
                rows.append(r)
                ms = f"{r['p20_ms']:.0f}/{r['p50_ms']:.0f}/{r['p80_ms']:.0f}"
                print(
                    f"{case:34s} {label:16s} {r['rank']:4d} {r['rows']:7d} {ms:>26s} "
                    f"{r['peak_bytes'] / 2**20:9.0f} {r['logit_block_bytes'] / 2**20:16.1f}",
                    flush=True,
                )
    print(
        "(peak = VmHWM - VmRSS before the measured call, after a warm-up call, per rank in a "
        "fresh process; logit block = one [chunk, rows] fp32 block)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "argv": sys.argv[1:], "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
