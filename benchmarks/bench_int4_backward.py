"""Training step through a frozen W4A16 layer on CPU: forward + backward w.r.t. x.

    python benchmarks/bench_int4_backward.py

Transfer learning on a quantized backbone back-propagates through its int4 layers:
grad_x = grad_out @ ŵ, with ŵ dequantized per call (the backbone keeps only its int4 weights).
Rows, timed interleaved in one run, K = N = 4096, group 128, fp32 activations:
  reference   the whole op (forward and backward) on the pure-PyTorch reference backend;
  cpu fwd, reference bwd   the cpu forward kernel with the reference backward (what the cpu
              backend did before it had a backward kernel);
  cpu         the cpu backend: the forward kernel, and the backward kernel
              (qtorch_cpu::int4_linear_grad_input: ŵ dequantized in cache-sized column slabs, each
              followed by its slab's fp32 GEMM, so the fp32 [N, K] ŵ never exists);
  bwd         the backward alone (M = 16, 128, 1024): that kernel vs the previous cpu backward,
              the whole ŵ dequantized in one C++ pass (qtorch_cpu::dequantize_int4), then one
              fp32 matmul;
  dequantize  that dequantization alone, cpu kernel vs the reference's tensor ops.
"""

from __future__ import annotations

import statistics
import time

import torch

import qtorch
from qtorch import ops
from qtorch import reference as R

N = K = 4096
GROUP = 128


def main() -> None:
    qw, sc, z = R.quantize_int4(torch.randn(N, K), GROUP, False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, K = N = {N}, "
          f"group {GROUP}, fp32; median of interleaved rounds")
    rows = {}
    for m in (16, 128):
        x = torch.randn(m, K, requires_grad=True)

        def step(fwd, bwd, x=x):
            with qtorch.use_backend(fwd):
                y = ops.int4_weight_only_linear(x, qw, sc, z, GROUP)
            with qtorch.use_backend(bwd):  # CPU autograd runs backward in this thread
                y.sum().backward()

        rows[f"M={m:<4d} fwd+bwd reference"] = lambda step=step: step("reference", "reference")
        rows[f"M={m:<4d} cpu fwd, reference bwd"] = lambda step=step: step("cpu", "reference")
        rows[f"M={m:<4d} fwd+bwd cpu"] = lambda step=step: step("cpu", "cpu")
    for m in (16, 128, 1024):
        g = torch.randn(m, N)
        rows[f"M={m:<4d} bwd: dequantize + matmul"] = lambda g=g: g @ torch.ops.qtorch_cpu.dequantize_int4(
            qw, sc, z, GROUP)
        rows[f"M={m:<4d} bwd: slabs (cpu)"] = lambda g=g: torch.ops.qtorch_cpu.int4_linear_grad_input(
            g, qw, sc, z, GROUP)
    rows["dequantize reference"] = lambda: R.dequantize_int4(qw, sc, z, GROUP)
    rows["dequantize cpu"] = lambda: torch.ops.qtorch_cpu.dequantize_int4(qw, sc, z, GROUP)
    for f in rows.values():
        f()
    ts = {k: [] for k in rows}
    for _ in range(7):
        for k, f in rows.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in ts.items()}
    for k, v in med.items():
        ratio = ""
        if k.endswith("fwd+bwd cpu"):
            before = med[k.replace("fwd+bwd cpu", "cpu fwd, reference bwd")]
            ref = med[k.replace("cpu", "reference")]
            ratio = f"{ref / v:5.2f}x vs reference, {before / v:5.2f}x vs reference backward"
        elif k.endswith("slabs (cpu)"):
            ratio = f"{med[k.replace('slabs (cpu)', 'dequantize + matmul')] / v:5.2f}x vs dequantize + matmul"
        elif k.endswith("cpu"):
            ratio = f"{med[k.replace('cpu', 'reference')] / v:5.2f}x vs reference"
        print(f"  {k:34s} {v * 1e3:8.1f} ms  {ratio}")


if __name__ == "__main__":
    main()
