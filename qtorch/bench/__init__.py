"""`qtorch bench`: every op x every available backend, against plain PyTorch and peers.

    qtorch bench                         default shapes from real models, every op/backend
    qtorch bench --quick                 a few shapes, few reps (< 2 minutes on 2 CPU cores)
    qtorch bench --op int8_linear --backend cpu --shapes 1,4096,11008 16,4096,11008
    qtorch bench --json out.json --plot plots/

The one benchmark engine: the scripts in benchmarks/ are thin drivers over these modules, so
every number in the README is measured the same way. Modules: types (Shape, Options, Impl,
Built), cases (shapes, inputs, qtorch and baseline implementations), peers (other
libraries), baselines (plain-PyTorch formulas), ceiling (the same-round streaming-read
ceiling), timing (interleaved rounds, cold weights by rotating copies, p20/p50/p80),
roofline (measured peaks, cached), memory (VmHWM of a fresh child / CUDA peak), report
(table, JSON, plots), machine (what it ran on). The JSON schema is documented in
docs/bench_json_schema.md.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from datetime import datetime, timezone

__all__ = ["add_arguments", "run"]

_DTYPES = ("float32", "bfloat16", "float16")


def _shape_arg(text: str):
    from qtorch.bench.cases import Shape

    parts = text.split(",")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        vals = None
    if vals is None or len(vals) not in (3, 4) or any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(
            f"--shapes takes M,K,N (or M,K,N,K2 for a teacher hidden size) as non-negative "
            f"integers, got {text!r}"
        )
    return Shape(*vals[:3], label=f"user {text}", K2=vals[3] if len(vals) == 4 else None)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `qtorch bench` options to `parser`."""
    from qtorch._backend import BACKENDS
    from qtorch.bench.cases import OPS

    parser.add_argument(
        "--op",
        nargs="+",
        choices=OPS,
        metavar="OP",
        help=f"ops to time (default: all): {', '.join(OPS)}",
    )
    parser.add_argument(
        "--backend",
        nargs="+",
        choices=BACKENDS,
        metavar="BACKEND",
        help="qtorch backends to time (default: every available one; triton "
        "only with a GPU, its CPU interpreter is a test tool)",
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        type=_shape_arg,
        metavar="M,K,N",
        help="shapes instead of the defaults; per op: quantize_int8 x[M,K]; "
        "linears x[M,K] @ w[N,K].T; dequantize_int4 w[N,K]; "
        "distillation_loss logits[M,N]; fused: hidden[M,K], vocab N "
        "(M,K,N,K2 sets the teacher hidden size)",
    )
    parser.add_argument(
        "--dtype",
        nargs="+",
        choices=_DTYPES,
        metavar="DTYPE",
        help="activation/logit dtypes (default: float32 on CPU, bfloat16 on CUDA)",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="few shapes, few repetitions (under 2 minutes on a small CPU)",
    )
    parser.add_argument(
        "--divergence",
        choices=("kl", "reverse_kl", "jsd"),
        default="jsd",
        help="divergence of the distillation cases (default jsd: Liger-Kernel's fused KD "
        "loss, a peer when installed, is JSD)",
    )
    parser.add_argument("--json", metavar="PATH", help="write all rows, machine and versions")
    parser.add_argument(
        "--plot",
        metavar="PATH",
        help="one figure per op (PATH.png -> PATH_<op>.png, or a directory); "
        "needs matplotlib (pip install qtorch-kernels[plot])",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="torch CPU threads (default: torch's default)",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="cold weights: every case with a weight rotates over copies of it (>= 128 MiB "
        "in all), so each call reads its weight from DRAM, as decoding through a model "
        "does; adds the streaming-read ceiling row on CPU (always on for CUDA)",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="peak memory per call (CPU: peak RSS in a child process; always on for CUDA)",
    )
    parser.add_argument("--no-peers", action="store_true", help="only qtorch and the baseline")
    parser.add_argument(
        "--target-time",
        type=float,
        metavar="S",
        help="seconds of samples per implementation per case (default 0.4, --quick 0.04)",
    )
    parser.add_argument(
        "--refresh-roofline", action="store_true", help="re-measure the cached roofline"
    )
    parser.add_argument(
        "--no-roofline",
        action="store_true",
        help="neither measure nor use a roofline (no %%roof column)",
    )


def _command_line(args: argparse.Namespace) -> str:
    """The canonical command that reproduces `args` (recorded in the JSON)."""
    parts = ["qtorch", "bench"]
    for opt in ("op", "backend", "dtype"):
        if getattr(args, opt):
            parts += [f"--{opt}", *getattr(args, opt)]
    if args.shapes:
        parts += ["--shapes"] + [
            ",".join(str(v) for v in (s.M, s.K, s.N) + ((s.K2,) if s.K2 else ()))
            for s in args.shapes
        ]
    for opt in ("device", "threads", "target_time", "json", "plot"):
        v = getattr(args, opt)
        if v is not None:
            parts += [f"--{opt.replace('_', '-')}", str(v)]
    for flag in ("quick", "cold", "memory", "no_peers", "refresh_roofline", "no_roofline"):
        if getattr(args, flag):
            parts.append(f"--{flag.replace('_', '-')}")
    return shlex.join(parts)


class _Progress:
    """A one-line progress bar on stderr (a terminal), or one line per op (a pipe or file)."""

    def __init__(self, total: int):
        self.total, self.done, self.tty = total, 0, sys.stderr.isatty()
        self.last_op = None
        self.t0 = time.perf_counter()

    def step(self, op: str, text: str) -> None:
        self.done += 1
        if self.tty:
            bar = "#" * int(20 * self.done / self.total)
            sys.stderr.write(f"\r[{bar:<20}] {self.done}/{self.total} {op} {text:<40}")
            sys.stderr.flush()
        elif op != self.last_op:
            sys.stderr.write(f"bench: {op} ({time.perf_counter() - self.t0:.0f} s)\n")
            sys.stderr.flush()
        self.last_op = op

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()


def _row(built, impl, stats, roof, copies: int | None, threads: int) -> dict:
    from qtorch.bench.cases import x_axis
    from qtorch.bench.roofline import roofline_time

    s = built.shape
    # the read ceiling moves the weight bytes and nothing else; it does no arithmetic
    ceiling = impl.kind == "ceiling"
    flop = None if ceiling else built.flop
    nbytes = impl.weight_bytes + (0 if ceiling else built.other_bytes)
    t_roof, bound = roofline_time(roof, flop, nbytes, impl.compute)
    x_label, x = x_axis(built.op, s)
    med = stats.median
    panel = (
        s.text(built.op).split(" ", 1)[1]
        if built.op not in ("dequantize_int4",)
        else "int4 weights"
    )
    if built.op == "quantize_int8":
        panel = f"K={s.K}"
    return {
        "op": built.op,
        "impl": impl.name,
        "kind": impl.kind,
        "backend": impl.backend,
        "shape": s.as_dict(),
        "shape_text": s.text(built.op),
        "shape_label": s.label,
        "dtype": str(built.dtype).split(".")[1],
        "device": built.device,
        "threads": threads,
        "cold": copies is not None,
        "copies": copies,
        "n": stats.n,
        "median_s": med,
        "p20_s": stats.p20,
        "p80_s": stats.p80,
        "flop": flop,
        "bytes": nbytes,
        "weight_bytes": impl.weight_bytes,
        "compute": impl.compute,
        "unit": "TOP/s" if impl.compute == "int8" else "TFLOP/s",
        "tflops": None if not flop else flop / med / 1e12,
        "gbps": nbytes / med / 1e9,
        "weight_gbps": impl.weight_bytes / med / 1e9 if impl.weight_bytes else None,
        "roofline_s": t_roof,
        "roofline_pct": None if t_roof is None else 100.0 * t_roof / med,
        "bound": bound,
        "note": impl.note,
        "x": x,
        "x_label": x_label,
        "panel": panel,
        "peak_mem_bytes": None,
        "mem_kind": None,
        "read_pct": None,
    }


def _add_read_pct(case_rows: list[dict]) -> None:
    """% of read: each row's weight rate against the streaming-read row of the same rounds."""
    from qtorch.bench.ceiling import read_pct

    ceil = next((r for r in case_rows if r["kind"] == "ceiling"), None)
    if ceil is None:
        return
    for r in case_rows:
        if r["weight_bytes"]:
            r["read_pct"] = read_pct(
                r["weight_bytes"], r["median_s"], ceil["weight_bytes"], ceil["median_s"]
            )


def _add_speedups(case_rows: list[dict]) -> None:
    base = next((r for r in case_rows if r["kind"] == "baseline"), None)
    peers = [r for r in case_rows if r["kind"] == "peer"]
    best_peer = min(peers, key=lambda r: r["median_s"]) if peers else None
    for r in case_rows:
        versus = r["kind"] != "ceiling"  # a plain read does not do the job: no speedups
        r["baseline"] = base["impl"] if base else None
        r["speedup_vs_baseline"] = base["median_s"] / r["median_s"] if base and versus else None
        r["best_peer"] = best_peer["impl"] if best_peer else None
        r["speedup_vs_best_peer"] = (
            best_peer["median_s"] / r["median_s"]
            if best_peer and r is not best_peer and versus
            else None
        )
        r["speedup_vs"] = {
            o["impl"]: o["median_s"] / r["median_s"] for o in case_rows if o is not r
        }


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by `args` (from `add_arguments`). Returns an exit code:
    0 done, 1 a qtorch implementation failed, 2 bad arguments."""
    import torch

    from qtorch import _backend
    from qtorch.bench import cases, machine, report, timing
    from qtorch.bench.roofline import get_roofline

    t_start = time.perf_counter()
    err = sys.stderr
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("qtorch bench: error: --device cuda but torch sees no CUDA device", file=err)
        return 2
    available = _backend.available_backends()
    if args.backend:
        missing = [b for b in args.backend if b not in available]
        if missing:
            status = _backend.backend_status()
            for b in missing:
                print(
                    f"qtorch bench: error: backend {b!r} is not available: {status[b][1]}", file=err
                )
            return 2
        backends = list(args.backend)
        wrong = [b for b in backends if b in ("cpu", "cuda") and b != device]
        if wrong:
            print(
                f"qtorch bench: error: backend {wrong[0]!r} cannot run on {device} tensors "
                f"(use --device {wrong[0]})",
                file=err,
            )
            return 2
        if device == "cpu" and "triton" in backends:
            print(
                "qtorch bench: warning: triton on CPU is the interpreter (a test tool); its "
                "times say nothing about GPU speed",
                file=err,
            )
    else:  # every backend that serves this device; never the Triton CPU interpreter
        backends = [
            b
            for b in available
            if b == "reference" or b == device or (b == "triton" and device == "cuda")
        ]
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                "qtorch bench: error: --plot needs matplotlib, which is not installed "
                "(pip install matplotlib, or qtorch-kernels[plot])",
                file=err,
            )
            return 2
    if args.target_time is not None and not (
        args.target_time > 0 and math.isfinite(args.target_time)
    ):
        print(f"qtorch bench: error: --target-time must be > 0, got {args.target_time}", file=err)
        return 2
    dtypes = [
        getattr(torch, d)
        for d in (args.dtype or (["bfloat16"] if device == "cuda" else ["float32"]))
    ]
    ops = list(args.op or cases.OPS)
    threads = torch.get_num_threads()

    cfg = (
        timing.TimingConfig(target_s=0.04, min_reps=3, max_reps=30, warmup=1)
        if args.quick
        else timing.TimingConfig(warmup=2)
    )
    if args.target_time is not None:
        cfg.target_s = args.target_time
    # Cold weights by rotation (timing.py) on request, and always on CUDA, where a GPU's L2
    # would otherwise hold any weight of a few tens of MB between calls.
    cfg.cold = bool(args.cold or device == "cuda")
    cfg.cold_bytes = timing.cold_bytes_for(device)
    options = cases.Options(
        read_ceiling=bool(args.cold and device == "cpu"),
        divergence=getattr(args, "divergence", "jsd"),
        teacher_quant=("w4a16",),  # fused loss: also an int4 teacher head (a qtorch module)
    )

    roof = None
    if not args.no_roofline:
        t_roof = time.perf_counter()
        roof = get_roofline(measure=True, device=device, refresh=args.refresh_roofline)
        if time.perf_counter() - t_roof > 0.5:
            print(
                f"bench: measured the roofline in {time.perf_counter() - t_roof:.1f} s "
                f"(cached for next time)",
                file=err,
            )

    plan = []
    for op in ops:
        for dtype in dtypes:
            for shape in args.shapes or cases.shapes_for(op, args.quick):
                plan.append((op, dtype, shape))
    progress = _Progress(len(plan))
    rows, skipped, failures = [], [], []
    for op, dtype, shape in plan:
        progress.step(op, shape.text(op))
        problem = cases.shape_problem(op, shape)
        if problem:
            skipped.append({"op": op, "impl": "*", "shape": shape.as_dict(), "reason": problem})
            continue
        built = cases.build(
            op, shape, dtype, device, backends, with_peers=not args.no_peers, options=options
        )
        for name, why in built.skipped:
            skipped.append({"op": op, "impl": name, "shape": shape.as_dict(), "reason": why})
        ok = []
        for impl in built.impls:
            try:
                impl.fn()  # a failing implementation is reported, not timed
                ok.append(impl)
            except Exception as e:  # noqa: BLE001  (any kernel error must reach the report)
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                skipped.append(
                    {
                        "op": op,
                        "impl": impl.name,
                        "shape": shape.as_dict(),
                        "reason": f"failed: {msg}",
                    }
                )
                if impl.kind == "qtorch":
                    failures.append(f"{op} {impl.name} {shape.text(op)}: {msg}")
        stats, ncopies = timing.time_impls(ok, device, cfg)
        case_rows = [_row(built, i, stats[i.name], roof, ncopies[i.name], threads) for i in ok]
        if device == "cuda":
            from qtorch.bench.memory import cuda_peak_extra

            for r, i in zip(case_rows, ok, strict=True):
                r["peak_mem_bytes"], r["mem_kind"] = cuda_peak_extra(i.fn), "cuda_max_allocated"
        _add_speedups(case_rows)
        _add_read_pct(case_rows)
        case_rows.sort(key=lambda r: r["median_s"])
        rows.extend(case_rows)
        del built, ok
    progress.close()
    load = machine.machine_info(device).get("load_avg_1m")
    oversubscribed = (
        device == "cpu"
        and load is not None
        and threads > 1
        and load > (machine.os_cpu_count() or 1)
    )

    if args.memory and device == "cpu":
        _cpu_memory(rows, ops, dtypes, backends, not args.no_peers, args.threads, err, options)

    print(report.format_table(rows, roof))
    sk = report.format_skipped(skipped)
    if sk:
        print("\n" + sk)
    wall = time.perf_counter() - t_start
    print(
        f"\nwall time {wall:.1f} s; qtorch {__import__('qtorch').__version__}, torch "
        f"{torch.__version__}, {machine.cpu_model()}, {threads} threads, load average "
        f"{machine.machine_info(device).get('load_avg_1m', float('nan')):.2f} "
        f"(timings on a shared machine are noisy: compare ratios within one run)"
    )
    if oversubscribed:
        print(
            f"warning: load average {load:.1f} on {machine.os_cpu_count()} cores: the machine "
            f"is oversubscribed, so {threads}-thread timings include waits for preempted "
            f"worker threads; --threads 1 gives steadier ratios",
            file=err,
        )
    if args.json:
        doc = {
            "schema": report.SCHEMA,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": _command_line(args),
            "argv": sys.argv,
            "wall_s": wall,
            "machine": machine.machine_info(device),
            "versions": machine.versions(),
            "backends": backends,
            "kernel_coverage": _backend.kernel_coverage(),
            "timing": {**cfg.__dict__, "cold_decode": bool(args.cold)},
            "roofline": roof,
            "rows": rows,
            "skipped": skipped,
            "failures": failures,
        }
        report.write_json(args.json, doc)
        print(f"wrote {args.json}")
    if args.plot and rows:
        for p in report.plot(rows, roof, args.plot):
            print(f"wrote {p}")
    if failures:
        print("\nFAILED qtorch implementations:\n  " + "\n  ".join(failures), file=err)
        return 1
    return 0


def _cpu_memory(rows, ops, dtypes, backends, with_peers, threads, err, options) -> None:
    """Fill peak_mem_bytes from one fresh child process per (op, dtype)."""
    from qtorch.bench.cases import Shape
    from qtorch.bench.memory import cpu_peak_extra

    for op in ops:
        for dtype in dtypes:
            dname = str(dtype).split(".")[1]
            rs = [r for r in rows if r["op"] == op and r["dtype"] == dname]
            if not rs:
                continue
            shapes = list({tuple(r["shape"].items()): r["shape"] for r in rs}.values())
            shape_objs = [Shape(s["M"], s["K"], s["N"], K2=s.get("K2")) for s in shapes]
            res = cpu_peak_extra(
                op,
                shape_objs,
                dtype,
                backends,
                sorted({r["impl"] for r in rs}),
                with_peers,
                threads,
                options=options.as_dict(),
            )
            if "error" in res:
                print(f"bench: memory for {op}: {res['error']}", file=err)
                continue
            for r in rs:
                s = r["shape"]
                v = res.get(f"{s['M']},{s['K']},{s['N']}|{r['impl']}")
                if v is not None:
                    r["peak_mem_bytes"], r["mem_kind"] = v, "rss_child_vmhwm"
