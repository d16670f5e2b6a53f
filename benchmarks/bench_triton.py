"""GPU benchmarks of the `triton` backend (kernels/) against its baselines.

    python benchmarks/bench_triton.py [--json results.json] [--quick]

Cases (all bf16 unless noted, one process, one device):
  * int8 GEMM at M = N = K = 8192: int8_scaled_mm (scales + bf16 out fused) vs torch._int_mm
    (int32 out, no epilogue) and bf16 torch.matmul.       goal: >= 0.9x _int_mm, >= 1.6x bf16
  * W4A16 / W8A16 decode at M in {1, 4, 16}, K = N = 8192 vs bf16 x @ W.T.   goal: >= 3x (W4A16)
  * fused-linear distillation at B·T = 8192, H = 4096, V = 128256, forward + all gradients,
    vs eager PyTorch (logits, log_softmax, KL / JSD, CE, autograd): time and peak memory.
                                                          goal: >= 2x faster, <= 20% memory
A thin driver over `qtorch.bench`: the cases, peers and the eager baseline are the engine's
(`int8_scaled_mm` through the Triton kernel the backend registered; the linears through the
`qtorch.nn` modules, which own their kernel layout; the fused loss through the op), timed by
its engine on CUDA events: weights cold (rotated over copies of >= 4x the L2), the rows of a
case interleaved, p20 / p50 / p80 in ms. Without a CUDA device the script says so and exits
0: nothing here runs under the interpreter.
"""

from __future__ import annotations

import json
import platform
import sys

import torch

from qtorch.bench import cases, drivers, memory
from qtorch.bench.types import Options, Shape

BF16 = torch.bfloat16
INT8_SHAPES = [(8192, 8192, 8192), (4096, 4096, 4096)]  # (M, N, K); --quick: the first
WO_KN, WO_MS, WO_MS_QUICK = 8192, (1, 4, 16), (1, 16)
FUSED, FUSED_QUICK = (8192, 4096, 128256), (2048, 4096, 128256)  # (B·T, H, V)


def bench_int8(rows, quick, device="cuda", backend="triton"):
    cfg = drivers.gpu_config(device, quick)
    for m, n, k in INT8_SHAPES[:1] if quick else INT8_SHAPES:
        case = f"int8 gemm M={m} N={n} K={k}"
        s = Shape(m, k, n)
        mm = cases.build(
            "int8_scaled_mm",
            s,
            BF16,
            device,
            [backend],
            True,
            Options(raw_int_mm=True, kernel_rows=True),
        )
        lin = cases.build("int8_linear", s, BF16, device, [backend], False, Options(op_rows=False))
        res = drivers.time_selected(
            case,
            [
                (
                    mm,
                    {
                        "torch:_int_mm(int32 out)": "torch._int_mm (int32 out)",
                        "torch:F.linear(bfloat16)": "torch.matmul bf16",
                        f"qtorch:{backend}:kernel": "triton int8_scaled_mm",
                    },
                ),
                (lin, {f"qtorch:{backend}": "triton int8_linear (+quant)"}),
            ],
            device,
            cfg,
        )
        flops = 2 * m * n * k
        base = res.get("torch._int_mm (int32 out)")
        base_ms = base.median * 1e3 if base else None
        bf16 = res.get("torch.matmul bf16")
        for name in ("torch._int_mm (int32 out)", "torch.matmul bf16"):
            if name in res:
                drivers.case_row(rows, case, name, res[name], flops=flops)
        if "triton int8_scaled_mm" in res:
            t = res["triton int8_scaled_mm"]
            r = drivers.case_row(rows, case, "triton int8_scaled_mm", t, base_ms, flops)
            if bf16:
                r["speedup_vs_bf16"] = bf16.median / t.median
                print(f"{'':<40} {'':<26} vs bf16 matmul: {r['speedup_vs_bf16']:.3f}x", flush=True)
        if "triton int8_linear (+quant)" in res:
            drivers.case_row(
                rows,
                case,
                "triton int8_linear (+quant)",
                res["triton int8_linear (+quant)"],
                base_ms,
                flops,
            )


def bench_weight_only(rows, quick, device="cuda", backend="triton"):
    cfg = drivers.gpu_config(device, quick)
    k = n = WO_KN
    for m in WO_MS_QUICK if quick else WO_MS:
        case = f"weight-only M={m} K={k} N={n}"
        s = Shape(m, k, n)
        w4 = cases.build(
            "int4_weight_only_linear", s, BF16, device, [backend], False, Options(op_rows=False)
        )
        w8 = cases.build(
            "int8_weight_only_linear", s, BF16, device, [backend], False, Options(op_rows=False)
        )
        res = drivers.time_selected(
            case,
            [
                (
                    w4,
                    {
                        "torch:F.linear(bfloat16)": "torch.matmul bf16",
                        f"qtorch:{backend}": "triton W4A16 (g128)",
                    },
                ),
                (w8, {f"qtorch:{backend}": "triton W8A16"}),
            ],
            device,
            cfg,
        )
        base = res.get("torch.matmul bf16")
        base_ms = base.median * 1e3 if base else None
        for name, nbytes, ref in (
            ("torch.matmul bf16", 2 * n * k, None),
            ("triton W4A16 (g128)", n * k // 2 + 5 * n * k // 128, base_ms),
            ("triton W8A16", n * k + 4 * n, base_ms),
        ):
            if name in res:
                drivers.case_row(rows, case, name, res[name], baseline=ref, bytes_=nbytes)


def _peak_gb(fn, device) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    try:
        return memory.cuda_peak_extra(fn) / 1e9
    except torch.OutOfMemoryError:
        return None


def bench_fused_distill(rows, quick, device="cuda", backend="triton"):
    cfg = drivers.gpu_config(device, quick)
    bt, h, v = FUSED_QUICK if quick else FUSED
    chunk = 1024
    eager_label, fused_label = "eager PyTorch", f"triton fused (chunk {chunk})"
    for divergence in ("kl", "jsd"):
        case = f"fused distill {divergence} BT={bt} H={h} V={v}"
        built = cases.build(
            "fused_linear_distillation_loss",
            Shape(bt, h, v, K2=h),
            BF16,
            device,
            [backend],
            False,
            Options(divergence=divergence, chunk_sizes=(chunk,)),
        )
        labels = {
            "torch:eager+autograd": eager_label,
            f"qtorch:{backend} chunk_size={chunk}": fused_label,
        }
        impls = drivers.select(built, labels)
        peaks = {i.name: _peak_gb(i.fn, device) for i in impls}
        if device == "cuda" and peaks.get(eager_label) is None:
            print(f"{case:<40} eager PyTorch: out of memory", flush=True)
            impls = [i for i in impls if i.name != eager_label]
        res = drivers.time_rows(impls, device, cfg)
        t_e = res.get(eager_label)
        if t_e:
            drivers.case_row(rows, case, eager_label, t_e, peak_gb=peaks[eager_label])
        if fused_label in res:
            r = drivers.case_row(
                rows,
                case,
                fused_label,
                res[fused_label],
                baseline=t_e.median * 1e3 if t_e else None,
                peak_gb=peaks[fused_label],
            )
            if peaks.get(eager_label) and peaks.get(fused_label) is not None:
                r["memory_vs_eager"] = peaks[fused_label] / peaks[eager_label]
                print(
                    f"{'':<40} {'':<26} peak memory vs eager: {r['memory_vs_eager']:.3f}",
                    flush=True,
                )


def main(argv=None) -> int:
    args = drivers.gpu_arguments(__doc__).parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton: no CUDA device; these GPU-only benchmarks did not run.")
        return 0
    import triton

    rows: list[dict] = []
    bench_int8(rows, args.quick)
    bench_weight_only(rows, args.quick)
    bench_fused_distill(rows, args.quick)
    if args.json:
        meta = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "python": platform.python_version(),
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
