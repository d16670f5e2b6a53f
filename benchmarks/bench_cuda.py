"""GPU benchmarks of the `cuda` backend (csrc/cuda/) against its baselines:
torch._int_mm (int8), bf16 torch.matmul (W4A16), the Triton backend, and the reference loss.

    python benchmarks/bench_cuda.py [--json results.json] [--quick]

A thin driver over `qtorch.bench`: cases, peers and baselines are the engine's, timed by its
engine on CUDA events (weights cold: rotated over copies of >= 4x the L2; the rows of a case
interleaved; p20 / p50 / p80 in ms), each row with the ratio to the case's baseline. The
kernels the `cuda` backend registered are called without the op layer where a kernel takes
the canonical weight (int8_scaled_mm, quantize_int8, distillation_loss); the linears run
through the `qtorch.nn` modules, which own their kernel layout. Exits with a message (status
0) when there is no CUDA device or the cuda backend is not built.

Goals: int8 GEMM >= 0.9x torch._int_mm at 8192^3; W4A16 >= 3x bf16 at M <= 16.
"""

from __future__ import annotations

import json
import platform
import sys

import torch

import qtorch
from qtorch import _backend
from qtorch.bench import cases, drivers
from qtorch.bench.types import Options, Shape

W = (34, 22)  # widths of the case and implementation columns
INT8_SHAPES = [(8192, 8192, 8192), (4096, 4096, 4096), (16, 4096, 11008), (1, 4096, 4096)]
INT4_KN = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]  # (K, N)
INT4_MS, INT4_MS_QUICK = [1, 4, 16, 64], [1, 16]
QUANT_SHAPES = [(4096, 4096), (16, 4096)]
DISTILL_SHAPES, DISTILL_QUICK = [(4096, 32000), (2048, 128256)], [(1024, 32000)]


def _ms(stats):
    return None if stats is None else stats.median * 1e3


def _one_case(rows, case, built, labels, base_label, cfg, device, flops=None, nbytes=None):
    """Time the labelled rows of one case together and print each against `base_label`."""
    res = drivers.time_selected(case, [(built, labels)], device, cfg, W)
    base = _ms(res.get(base_label))
    for name in labels.values():
        if name in res:
            drivers.case_row(rows, case, name, res[name], base, flops, nbytes, widths=W)


def bench_int8(rows, quick, triton_ok, device="cuda", backend="cuda"):
    cfg = drivers.gpu_config(device, quick)
    bf16 = torch.bfloat16
    for m, k, n in INT8_SHAPES[:2] if quick else INT8_SHAPES:
        case = f"int8 mm M={m} K={k} N={n}"
        backends = [backend] + (["triton"] if triton_ok else [])
        built = cases.build(
            "int8_scaled_mm",
            Shape(m, k, n),
            bf16,
            device,
            backends,
            True,
            Options(raw_int_mm=True, kernel_rows=True),
        )
        labels = {
            # torch._int_mm needs M > 16 and K, N multiples of 8: the baseline exists where it does
            "torch:_int_mm(int32 out)": "torch._int_mm (s32 out)",
            "torch:F.linear(bfloat16)": "bf16 matmul",
            f"qtorch:{backend}:kernel": "cuda int8_scaled_mm",
        }
        if triton_ok:
            labels["qtorch:triton"] = "triton int8_scaled_mm"
        _one_case(rows, case, built, labels, "torch._int_mm (s32 out)", cfg, device, 2 * m * n * k)


def bench_int4(rows, quick, triton_ok, device="cuda", backend="cuda"):
    cfg = drivers.gpu_config(device, quick)
    for k, n in INT4_KN[:1] if quick else INT4_KN:
        for dtype in (torch.bfloat16, torch.float16):
            dname = str(dtype)[6:]
            for m in INT4_MS_QUICK if quick else INT4_MS:
                case = f"W4A16 {dname} M={m} K={k} N={n}"
                s = Shape(m, k, n)
                backends = [backend] + (["triton"] if triton_ok else [])
                opt = Options(op_rows=False)
                w4 = cases.build("int4_weight_only_linear", s, dtype, device, backends, False, opt)
                labels4 = {
                    f"torch:F.linear({dname})": f"{dname} matmul",
                    f"qtorch:{backend}": "cuda int4 (Marlin-style)",
                }
                if triton_ok:
                    labels4["qtorch:triton"] = "triton int4"
                groups = [(w4, labels4)]
                w8_case = m in (1, 16) and dtype == torch.bfloat16
                if w8_case:
                    w8 = cases.build(
                        "int8_weight_only_linear", s, dtype, device, [backend], False, opt
                    )
                    groups.append((w8, {f"qtorch:{backend}": "cuda W8A16"}))
                res = drivers.time_selected(case, groups, device, cfg, W)
                base = _ms(res.get(f"{dname} matmul"))
                flops = 2 * m * n * k
                if f"{dname} matmul" in res:
                    drivers.case_row(
                        rows,
                        case,
                        f"{dname} matmul",
                        res[f"{dname} matmul"],
                        base,
                        flops,
                        2 * n * k,
                        widths=W,
                    )
                if "cuda int4 (Marlin-style)" in res:
                    drivers.case_row(
                        rows,
                        case,
                        "cuda int4 (Marlin-style)",
                        res["cuda int4 (Marlin-style)"],
                        base,
                        flops,
                        n * k // 2,
                        widths=W,
                    )
                if "triton int4" in res:
                    drivers.case_row(rows, case, "triton int4", res["triton int4"], base, widths=W)
                if "cuda W8A16" in res:
                    drivers.case_row(
                        rows,
                        case.replace("W4A16", "W8A16"),
                        "cuda W8A16",
                        res["cuda W8A16"],
                        base,
                        flops,
                        n * k,
                        widths=W,
                    )


def bench_quantize(rows, quick, device="cuda", backend="cuda"):
    cfg = drivers.gpu_config(device, quick)
    for m, k in QUANT_SHAPES:
        case = f"quantize_int8 bf16 M={m} K={k}"
        built = cases.build(
            "quantize_int8",
            Shape(m, k, 0),
            torch.bfloat16,
            device,
            [backend],
            False,
            Options(kernel_rows=True),
        )
        labels = {"torch:eager": "reference (torch ops)", f"qtorch:{backend}:kernel": "cuda"}
        _one_case(rows, case, built, labels, labels["torch:eager"], cfg, device, None, 3 * m * k)


def bench_distill(rows, quick, triton_ok, device="cuda", backend="cuda"):
    cfg = drivers.gpu_config(device, quick)
    for m, v in DISTILL_QUICK if quick else DISTILL_SHAPES:
        for div in ("kl", "jsd"):
            case = f"distill {div} bf16 M={m} V={v} (loss+grad)"
            backends = ["reference", backend] + (["triton"] if triton_ok else [])
            built = cases.build(
                "distillation_loss",
                Shape(m, 0, v),
                torch.bfloat16,
                device,
                backends,
                False,
                Options(divergence=div, kernel_rows=True, reference="always"),
            )
            labels = {
                "qtorch:reference:kernel": "reference (torch ops)",
                f"qtorch:{backend}:kernel": "cuda",
            }
            if triton_ok:
                labels["qtorch:triton:kernel"] = "triton"
            # bytes: read s and t (twice, three times for jsd) + write grad
            nbytes = m * v * 2 * 3
            _one_case(rows, case, built, labels, "reference (torch ops)", cfg, device, None, nbytes)


def main(argv=None):
    args = drivers.gpu_arguments(__doc__).parse_args(argv)
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
