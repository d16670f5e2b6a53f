"""`qtorch` command line: info, validate, bench, quantize (`python -m qtorch ...` is the same)."""

from __future__ import annotations

import argparse
import platform
import sys


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import qtorch
    from qtorch import _backend
    from qtorch.bench.machine import cpu_model

    print(
        f"qtorch {qtorch.__version__}  torch {torch.__version__}  python {platform.python_version()}"
    )
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    print(f"CPU: {cpu_model()}  ({torch.get_num_threads()} torch threads)")
    try:
        import qtorch._C as C

        feats = C.cpu_features()
        print(
            "CPU features: "
            + " ".join(f"{k}={'yes' if v else 'no'}" for k, v in sorted(feats.items()))
        )
        print(f"CPU kernel ISA in use: {C.isa()}")
        kernels = C.kernels()  # each family's variant: its CPU feature needs differ
        print(
            "CPU kernels: "
            + "; ".join(f"{f} {kernels[f]}" for f in ("int8_mm", "weight_only", "distillation"))
        )
        from qtorch.backends.cpu import _bf16_gemm_wanted, amx_usable

        print(
            f"AMX usable by torch: {'yes' if amx_usable() else 'no'}; bf16 distillation heads: "
            + (
                "oneMKL bf16 GEMM, fp32 results"
                if _bf16_gemm_wanted()
                else "fp32 GEMMs on slices widened from bf16"
            )
            + " (QTORCH_CPU_BF16_GEMM=1/0 forces)"
        )
    except ImportError as e:
        print(f"CPU features: unknown (qtorch._C not built: {e})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(
                f"CUDA device {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB"
            )
    else:
        print("CUDA: no device")
    print("\nbackends:")
    for name, (ok, why) in _backend.backend_status().items():
        print(f"  {name:<10} {'available  ' if ok else 'unavailable'}  {why}")
    print(f"backend in force: {_backend.get_backend()}")
    print("\nkernels per op (auto on CPU / on CUDA):")
    for op, backends in _backend.kernel_coverage().items():
        if op.endswith("_grad_input"):
            continue
        picks = []
        for dev in ("cpu", "cuda"):
            try:
                picks.append(_backend.resolve(op, torch.device(dev))[0])
            except RuntimeError as e:  # a bad QTORCH_BACKEND, named at the first op
                picks.append(f"error: {e}")
        print(f"  {op:<32} {', '.join(backends):<32} auto: {picks[0]} / {picks[1]}")
    try:
        from qtorch.bench.roofline import get_roofline

        roof = get_roofline(measure=False)
        if roof:
            print("\nroofline (cached, from `qtorch bench`):")
            for k, v in roof.items():
                print(f"  {k}: {v}")
    except ImportError:
        pass
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from qtorch.validate import run_validate

    return run_validate(backends=args.backend, quick=args.quick, verbose=args.verbose)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qtorch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, devices, CPU features, available backends")
    p_info.set_defaults(func=cmd_info)
    p_val = sub.add_parser(
        "validate", help="every available backend against the references; exit 1 on mismatch"
    )
    p_val.add_argument("--backend", action="append", help="only these backends (repeatable)")
    p_val.add_argument("--quick", action="store_true", help="fewer shapes")
    p_val.add_argument("-v", "--verbose", action="store_true", help="one row per case")
    p_val.set_defaults(func=cmd_validate)
    p_bench = sub.add_parser("bench", help="microbenchmarks against PyTorch and installed peers")
    try:
        from qtorch import bench

        bench.add_arguments(p_bench)
        p_bench.set_defaults(func=lambda a: bench.run(a))
    except ImportError as e:
        p_bench.set_defaults(func=lambda a, e=e: print(f"qtorch bench unavailable: {e}") or 1)
    from qtorch import cli_quantize

    p_quant = sub.add_parser(
        "quantize",
        help="quantize a local Hugging Face model and save it (qtorch checkpoint)",
        description=cli_quantize.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli_quantize.add_arguments(p_quant)
    p_quant.set_defaults(func=cli_quantize.run)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
