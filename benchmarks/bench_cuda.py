"""GPU benchmarks of the `cuda` backend (csrc/cuda/) against the baselines the issue names:
torch._int_mm (int8), bf16 torch.matmul (W4A16), the Triton backend, and the reference loss.

    python benchmarks/bench_cuda.py [--json results.json] [--quick]

Times are CUDA-event medians from triton.testing.do_bench (p20 / p50 / p80, ms), all cases in
one process on one device, reported with the ratio to the case's baseline. Exits with a
message (status 0) when there is no CUDA device or the cuda backend is not built.

Goals (issue 6): int8 GEMM >= 0.9x torch._int_mm at 8192^3; W4A16 >= 3x bf16 at M <= 16.
"""

# Closures below capture loop variables on purpose: each is timed inside its own iteration.
# ruff: noqa: B023
from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

import qtorch
from qtorch import _backend, ops
from qtorch import reference as R


def _bench(fn, quick):
    from triton.testing import do_bench

    p20, p50, p80 = do_bench(
        fn, warmup=10 if quick else 50, rep=30 if quick else 200, quantiles=[0.2, 0.5, 0.8]
    )
    return p20, p50, p80


def _row(rows, case, impl, times, baseline=None, flops=None, bytes_=None):
    p20, p50, p80 = times
    r = {"case": case, "impl": impl, "p20_ms": p20, "p50_ms": p50, "p80_ms": p80}
    if baseline is not None:
        r["speedup_vs_baseline"] = baseline / p50
    if flops:
        r["tflops"] = flops / (p50 * 1e-3) / 1e12
    if bytes_:
        r["gb_per_s"] = bytes_ / (p50 * 1e-3) / 1e9
    rows.append(r)
    extra = "".join(
        f"  {k}={r[k]:.3f}" for k in ("speedup_vs_baseline", "tflops", "gb_per_s") if k in r
    )
    print(
        f"{case:<34} {impl:<22} p50 {p50:9.4f} ms (p20 {p20:.4f}, p80 {p80:.4f}){extra}", flush=True
    )


def bench_int8(rows, quick, triton_ok):
    shapes = [(8192, 8192, 8192), (4096, 4096, 4096), (16, 4096, 11008), (1, 4096, 4096)]
    if quick:
        shapes = shapes[:2]
    for m, k, n in shapes:
        case = f"int8 mm M={m} K={k} N={n}"
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
        b = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        sa = torch.rand(m, device="cuda") / 100
        sb = torch.rand(n, device="cuda") / 100
        flops = 2 * m * n * k
        # torch._int_mm needs M > 16 and K, N multiples of 8: the baseline exists where it does
        base = None
        if m > 16:
            bt = b.T
            base = _bench(lambda: torch._int_mm(a, bt), quick)
            _row(rows, case, "torch._int_mm (s32 out)", base, base[1], flops)
        xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        _row(
            rows,
            case,
            "bf16 matmul",
            _bench(lambda: xb @ wb.T, quick),
            base[1] if base else None,
            flops,
        )
        _row(
            rows,
            case,
            "cuda int8_scaled_mm",
            _bench(
                lambda: torch.ops.qtorch_cuda.int8_scaled_mm(a, b, sa, sb, None, torch.bfloat16),
                quick,
            ),
            base[1] if base else None,
            flops,
        )
        if triton_ok:

            def tri():
                with qtorch.use_backend("triton"):
                    return ops.int8_scaled_mm(a, b, sa, sb, None, torch.bfloat16)

            _row(
                rows,
                case,
                "triton int8_scaled_mm",
                _bench(tri, quick),
                base[1] if base else None,
                flops,
            )


def bench_int4(rows, quick, triton_ok):
    ks_ns = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]
    ms = [1, 4, 16, 64] if not quick else [1, 16]
    gs = 128
    for k, n in ks_ns if not quick else ks_ns[:1]:
        w = torch.randn(n, k, device="cuda")
        q, s, z = R.quantize_int4(w, gs)
        wb = w.to(torch.bfloat16)
        for dtype in (torch.bfloat16, torch.float16):
            for m in ms:
                case = f"W4A16 {str(dtype)[6:]} M={m} K={k} N={n}"
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                wd = wb.to(dtype)
                base = _bench(lambda: x @ wd.T, quick)
                _row(
                    rows, case, f"{str(dtype)[6:]} matmul", base, base[1], 2 * m * n * k, 2 * n * k
                )

                def cuda_fn():
                    with qtorch.use_backend("cuda"):
                        return ops.int4_weight_only_linear(x, q, s, z, gs)

                cuda_fn()  # packs the weight once (cached)
                _row(
                    rows,
                    case,
                    "cuda int4 (Marlin-style)",
                    _bench(cuda_fn, quick),
                    base[1],
                    2 * m * n * k,
                    n * k // 2,
                )
                if triton_ok:

                    def tri():
                        with qtorch.use_backend("triton"):
                            return ops.int4_weight_only_linear(x, q, s, z, gs)

                    tri()
                    _row(rows, case, "triton int4", _bench(tri, quick), base[1])
                if m in (1, 16) and dtype == torch.bfloat16:
                    w8, s8 = R.quantize_int8(w)

                    def w8_fn():
                        with qtorch.use_backend("cuda"):
                            return ops.int8_weight_only_linear(x, w8, s8)

                    w8_fn()
                    _row(
                        rows,
                        case.replace("W4A16", "W8A16"),
                        "cuda W8A16",
                        _bench(w8_fn, quick),
                        base[1],
                        2 * m * n * k,
                        n * k,
                    )


def bench_quantize(rows, quick):
    for m, k in [(4096, 4096), (16, 4096)]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        case = f"quantize_int8 bf16 M={m} K={k}"
        base = _bench(lambda: R.quantize_int8(x), quick)
        _row(rows, case, "reference (torch ops)", base, base[1], None, 3 * m * k)
        _row(
            rows,
            case,
            "cuda",
            _bench(lambda: torch.ops.qtorch_cuda.quantize_int8(x), quick),
            base[1],
            None,
            3 * m * k,
        )


def bench_distill(rows, quick, triton_ok):
    shapes = [(4096, 32000), (2048, 128256)] if not quick else [(1024, 32000)]
    for m, v in shapes:
        s = torch.randn(m, v, device="cuda", dtype=torch.bfloat16)
        t = torch.randn(m, v, device="cuda", dtype=torch.bfloat16)
        labels = torch.randint(0, v, (m,), device="cuda")
        for div in ("kl", "jsd"):
            case = f"distill {div} bf16 M={m} V={v} (loss+grad)"
            args = (labels, 2.0, 0.5, div, 0.5, -100, True)
            base = _bench(lambda: R.distillation_loss(s, t, *args), quick)
            # bytes: read s and t (twice, three times for jsd) + write grad
            nbytes = m * v * 2 * 3
            _row(rows, case, "reference (torch ops)", base, base[1], None, nbytes)
            code = {"kl": 0, "reverse_kl": 1, "jsd": 2}[div]
            _row(
                rows,
                case,
                "cuda",
                _bench(
                    lambda: torch.ops.qtorch_cuda.distillation_loss(
                        s, t, labels, 2.0, 0.5, code, 0.5, -100, True
                    ),
                    quick,
                ),
                base[1],
                None,
                nbytes,
            )
            if triton_ok:

                def tri():
                    with qtorch.use_backend("triton"):
                        return _backend.resolve("distillation_loss", s.device)[1](s, t, *args)

                _row(rows, case, "triton", _bench(tri, quick), base[1], None, nbytes)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the rows and machine info here")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device; nothing measured")
        return 0
    status = _backend.backend_status()
    if not status["cuda"][0]:
        print(f"bench_cuda: cuda backend unavailable: {status['cuda'][1]}")
        return 0
    triton_ok = status["triton"][0]
    info = {
        "device": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "qtorch": getattr(qtorch, "__version__", "?"),
        "python": platform.python_version(),
    }
    print(json.dumps(info))
    rows: list[dict] = []
    torch.manual_seed(0)
    bench_int8(rows, args.quick, triton_ok)
    bench_int4(rows, args.quick, triton_ok)
    bench_quantize(rows, args.quick)
    bench_distill(rows, args.quick, triton_ok)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
