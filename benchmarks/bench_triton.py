"""GPU benchmarks of the `triton` backend (kernels/) against the baselines below.

    python benchmarks/bench_triton.py [--json results.json] [--quick]

Cases (all bf16 unless noted, one process, one device):
  * int8 GEMM at M = N = K = 8192: int8_scaled_mm (scales + bf16 out fused) vs torch._int_mm
    (int32 out, no epilogue) and bf16 torch.matmul.       goal: >= 0.9x _int_mm, >= 1.6x bf16
  * W4A16 / W8A16 decode at M in {1, 4, 16}, K = N = 8192 vs bf16 x @ W.T.   goal: >= 3x (W4A16)
  * fused-linear distillation at B·T = 8192, H = 4096, V = 128256, forward + all gradients,
    vs eager PyTorch (logits, log_softmax, KL / JSD, CE, autograd): time and peak memory.
                                                          goal: >= 2x faster, <= 20% memory
Times are CUDA-event quantiles from triton.testing.do_bench (p20 / p50 / p80, ms; L2 flushed
between calls). Without a CUDA device the script says so and exits 0: nothing here runs under
the interpreter.
"""

# Closures below capture loop variables on purpose: each is timed inside its own iteration.
# ruff: noqa: B023
from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
import torch.nn.functional as F


def _bench(fn, quick):
    from triton.testing import do_bench

    return do_bench(fn, warmup=10 if quick else 50, rep=30 if quick else 200,
                    quantiles=[0.2, 0.5, 0.8])


def _row(rows, case, impl, times, baseline=None, flops=None, bytes_=None, peak_gb=None):
    p20, p50, p80 = times
    r = {"case": case, "impl": impl, "p20_ms": p20, "p50_ms": p50, "p80_ms": p80}
    if baseline is not None:
        r["speedup_vs_baseline"] = baseline / p50
    if flops:
        r["tflops"] = flops / (p50 * 1e-3) / 1e12
    if bytes_:
        r["gb_per_s"] = bytes_ / (p50 * 1e-3) / 1e9
    if peak_gb is not None:
        r["peak_gb"] = peak_gb
    rows.append(r)
    extra = "".join(f"  {k}={r[k]:.3f}" for k in
                    ("speedup_vs_baseline", "tflops", "gb_per_s", "peak_gb") if k in r)
    print(f"{case:<40} {impl:<26} p50 {p50:9.4f} ms (p20 {p20:.4f}, p80 {p80:.4f}){extra}",
          flush=True)


def bench_int8(rows, quick):
    from qtorch._kernels import int8_mm

    from qtorch import reference as R

    for m, n, k in [(8192, 8192, 8192)] + ([] if quick else [(4096, 4096, 4096)]):
        case = f"int8 gemm M={m} N={n} K={k}"
        a_f = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b_f = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        a, sa = R.quantize_int8(a_f)
        b, sb = R.quantize_int8(b_f)
        flops = 2 * m * n * k
        base = _bench(lambda: torch._int_mm(a, b.T), quick)
        _row(rows, case, "torch._int_mm (int32 out)", base, flops=flops)
        bf16 = _bench(lambda: a_f @ b_f.T, quick)
        _row(rows, case, "torch.matmul bf16", bf16, flops=flops)
        t = _bench(lambda: int8_mm.int8_scaled_mm(a, b, sa, sb, None, torch.bfloat16), quick)
        _row(rows, case, "triton int8_scaled_mm", t, baseline=base[1], flops=flops)
        rows[-1]["speedup_vs_bf16"] = bf16[1] / t[1]
        print(f"{'':<40} {'':<26} vs bf16 matmul: {bf16[1] / t[1]:.3f}x", flush=True)
        t = _bench(lambda: int8_mm.int8_linear(a_f, b, sb, None), quick)
        _row(rows, case, "triton int8_linear (+quant)", t, baseline=base[1], flops=flops)


def bench_weight_only(rows, quick):
    from qtorch._kernels import weight_only

    from qtorch import reference as R
    from qtorch.backends import triton as triton_backend

    k = n = 8192
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    qw, sc, z = R.quantize_int4(w, 128, False)
    w8, s8 = R.quantize_int8(w)
    for m in (1, 16) if quick else (1, 4, 16):
        case = f"weight-only M={m} K={k} N={n}"
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        base = _bench(lambda: x @ w.T, quick)
        _row(rows, case, "torch.matmul bf16", base, bytes_=2 * n * k)
        t = _bench(lambda: triton_backend.int4_weight_only_linear(x, qw, sc, z, 128, None), quick)
        _row(rows, case, "triton W4A16 (g128)", t, baseline=base[1],
             bytes_=n * k // 2 + 5 * n * k // 128)
        t = _bench(lambda: weight_only.int8_weight_only_linear(x, w8, s8, None), quick)
        _row(rows, case, "triton W8A16", t, baseline=base[1], bytes_=n * k + 4 * n)


def _eager_distill(hs, ws, ht, wt, labels, divergence, temperature=1.0, alpha=0.5, beta=0.5):
    """What a user writes in plain PyTorch: full logits, log-softmax in fp32, autograd."""
    s = (hs @ ws.T).float()
    with torch.no_grad():
        t = (ht @ wt.T).float()
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    if divergence == "kl":
        d = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    else:  # jsd
        m = beta * log_p.exp() + (1 - beta) * log_q.exp()
        log_m = m.log()
        d = beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (
            log_q.exp() * (log_q - log_m)).sum(-1)
    hard = F.cross_entropy(s, labels, reduction="none")
    return (alpha * temperature**2 * d + (1 - alpha) * hard).mean()


def bench_fused_distill(rows, quick):
    from qtorch._kernels import distillation

    bt, h, v = (2048 if quick else 8192), 4096, 128256
    dt = torch.bfloat16
    hs = torch.randn(bt, h, device="cuda", dtype=dt) / 8
    ws = torch.randn(v, h, device="cuda", dtype=dt) / 8
    ht = torch.randn(bt, h, device="cuda", dtype=dt) / 8
    wt = torch.randn(v, h, device="cuda", dtype=dt) / 8
    labels = torch.randint(0, v, (bt,), device="cuda")
    scale = torch.full((bt,), 1.0 / bt, device="cuda")
    chunk = 1024
    for divergence in ("kl", "jsd"):
        case = f"fused distill {divergence} BT={bt} H={h} V={v}"

        def eager():
            hs_ = hs.detach().requires_grad_(True)
            ws_ = ws.detach().requires_grad_(True)
            _eager_distill(hs_, ws_, ht, wt, labels, divergence).backward()

        def fused():
            distillation.fused_linear_distillation_loss(
                hs, ws, ht, wt, labels, None, None, scale, chunk, 1.0, 0.5, divergence, 0.5,
                -100, True)

        peaks = {}
        for name, fn in (("eager", eager), ("fused", fused)):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base_mem = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            try:
                fn()
                torch.cuda.synchronize()
                peaks[name] = (torch.cuda.max_memory_allocated() - base_mem) / 1e9
            except torch.OutOfMemoryError:
                peaks[name] = None
        if peaks["eager"] is not None:
            t_e = _bench(eager, quick)
            _row(rows, case, "eager PyTorch", t_e, peak_gb=peaks["eager"])
        else:
            t_e = None
            print(f"{case:<40} eager PyTorch: out of memory", flush=True)
        t_f = _bench(fused, quick)
        _row(rows, case, f"triton fused (chunk {chunk})", t_f,
             baseline=t_e[1] if t_e else None, peak_gb=peaks["fused"])
        if peaks["eager"]:
            rows[-1]["memory_vs_eager"] = peaks["fused"] / peaks["eager"]
            print(f"{'':<40} {'':<26} peak memory vs eager: "
                  f"{peaks['fused'] / peaks['eager']:.3f}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the rows (and device/versions) to this file")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton: no CUDA device; these GPU-only benchmarks did not run.")
        return 0
    import triton

    rows: list[dict] = []
    bench_int8(rows, args.quick)
    bench_weight_only(rows, args.quick)
    bench_fused_distill(rows, args.quick)
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "triton": triton.__version__, "python": platform.python_version()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
