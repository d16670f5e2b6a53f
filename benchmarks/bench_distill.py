"""Distillation loss on the `cpu` backend vs eager PyTorch (pytest-benchmark), ratios in one run.

    pytest benchmarks/bench_distill.py --benchmark-only          # pytest-benchmark table
    python benchmarks/bench_distill.py                           # ratio + memory table only

Cases (issue 5 goals: >= 2x eager fwd+bwd; fused-linear <= 25% of eager's peak memory and no
slower):
  distillation_loss     N=2048, V=32000, fp32 and bf16, T=2, alpha=0.5, kl; forward + backward.
                        Eager = log_softmax(s/T), log_softmax(t/T), kl_div(log_target) * T²,
                        cross_entropy, autograd, all in fp32 math (the contract's numerics; for
                        bf16 it upcasts first, as the contract requires).
  fused_linear          N=4096, V=32000, H=256 fp32: logits = h @ W.T for student and teacher, the
                        same loss, backward to h and W. Eager holds [N, V] logits; qtorch chunks.
                        Peak memory is VmHWM (/proc/self/status) of a fresh child process minus
                        its VmRSS once the inputs exist, so each figure is that variant's own peak.
Each row: p20/p50/p80 over rounds, speedup = eager p50 / qtorch p50.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from _cold import pcts  # benchmarks/_cold.py

import qtorch
from qtorch import ops

T, ALPHA = 2.0, 0.5


def _inputs(n, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g) * 3).to(dtype)
    t = (torch.randn(n, v, generator=g) * 3).to(dtype)
    lab = torch.randint(0, v, (n,), generator=g)
    lab[::17] = -100
    return s, t, lab


def eager_loss(s, t, lab):
    """The loss in plain PyTorch ops (fp32 math), reduction "mean" over counted tokens."""
    s32, t32 = s.float(), t.float()
    valid = lab != -100
    ls = F.log_softmax(s32 / T, -1)
    lt = F.log_softmax(t32 / T, -1)
    soft = (F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1) * valid).sum()
    soft = soft / valid.sum() * T * T
    hard = F.cross_entropy(s32, lab, ignore_index=-100)
    return ALPHA * soft + (1 - ALPHA) * hard


def eager_step(s, t, lab):
    x = s.detach().requires_grad_(True)
    eager_loss(x, t, lab).backward()
    return x.grad


def qtorch_step(s, t, lab):
    x = s.detach().requires_grad_(True)
    with qtorch.use_backend("cpu"):
        ops.distillation_loss(x, t, lab, temperature=T, alpha=ALPHA).backward()
    return x.grad


def eager_fused_step(hs, ws, ht, wt, lab):
    x, w = hs.detach().requires_grad_(True), ws.detach().requires_grad_(True)
    eager_loss(x @ w.T, ht @ wt.T, lab).backward()
    return x.grad, w.grad


def qtorch_fused_step(hs, ws, ht, wt, lab, chunk_size=None, backend="cpu"):
    x, w = hs.detach().requires_grad_(True), ws.detach().requires_grad_(True)
    with qtorch.use_backend(backend):
        ops.fused_linear_distillation_loss(x, w, ht, wt, lab, chunk_size=chunk_size,
                                           temperature=T, alpha=ALPHA).backward()
    return x.grad, w.grad


def _fused_inputs(n=4096, v=32000, h=256, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g).to(dtype)
    ws = (torch.randn(v, h, generator=g) / 16).to(dtype)
    ht = torch.randn(n, h, generator=g).to(dtype)
    wt = (torch.randn(v, h, generator=g) / 16).to(dtype)
    lab = torch.randint(0, v, (n,), generator=g)
    return hs, ws, ht, wt, lab


def _times(fn, rounds, warmup=1):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------------- peak memory (child)

_CHILD = r"""
import json, sys, torch
sys.path.insert(0, {bench_dir!r})
import bench_distill as B
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
inputs = B._fused_inputs()
chunk = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2] != "0" else None
backend = sys.argv[3] if len(sys.argv) > 3 else "cpu"
base = status("VmRSS:")
if sys.argv[1] == "eager":
    B.eager_fused_step(*inputs)
else:
    B.qtorch_fused_step(*inputs, chunk_size=chunk, backend=backend)
print(json.dumps({{"peak": status("VmHWM:") - base}}))
"""


def peak_bytes(variant: str, chunk_size: int | None = None, backend: str = "cpu") -> int:
    """Peak resident memory of one fused-linear step, in a fresh interpreter."""
    code = _CHILD.format(bench_dir=os.path.dirname(os.path.abspath(__file__)))
    argv = [sys.executable, "-c", code, variant, str(chunk_size or 0), backend]
    out = subprocess.run(argv, check=True, capture_output=True,
                         text=True, env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


# ------------------------------------------------------------------------- pytest-benchmark

needs_cpu = pytest.mark.skipif("cpu" not in qtorch.available_backends(),
                               reason="qtorch._C (the cpu backend) is not built")


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["eager", "qtorch"])
def test_distillation_fwd_bwd(benchmark, impl, dtype):
    s, t, lab = _inputs(2048, 32000, dtype)
    step = eager_step if impl == "eager" else qtorch_step
    benchmark.group = f"distillation_loss fwd+bwd N=2048 V=32000 {dtype}"
    benchmark.extra_info.update(device="cpu", torch=torch.__version__, threads=torch.get_num_threads())
    benchmark.pedantic(step, args=(s, t, lab), rounds=5, warmup_rounds=1)


@needs_cpu
@pytest.mark.parametrize("impl", ["eager", "qtorch"])
def test_fused_linear_fwd_bwd(benchmark, impl):
    inputs = _fused_inputs()
    step = eager_fused_step if impl == "eager" else qtorch_fused_step
    benchmark.group = "fused_linear_distillation fwd+bwd N=4096 V=32000 H=256 fp32"
    benchmark.extra_info.update(device="cpu", torch=torch.__version__,
                                threads=torch.get_num_threads(), peak_bytes=peak_bytes(impl))
    benchmark.pedantic(step, args=inputs, rounds=3, warmup_rounds=1)


# --------------------------------------------------------------------------- ratio table


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, qtorch cpu ISA "
          f"{qtorch._C.isa()}")
    print(f"{'case':52s} {'eager p20/p50/p80 ms':>24s} {'qtorch p20/p50/p80 ms':>24s} {'speedup':>8s}")
    for dtype in (torch.float32, torch.bfloat16):
        s, t, lab = _inputs(2048, 32000, dtype)
        e = pcts(_times(lambda: eager_step(s, t, lab), 7))
        q = pcts(_times(lambda: qtorch_step(s, t, lab), 7))
        name = f"distillation_loss fwd+bwd N=2048 V=32000 {str(dtype)[6:]}"
        print(f"{name:52s} {'/'.join(f'{x*1e3:.0f}' for x in e):>24s} "
              f"{'/'.join(f'{x*1e3:.0f}' for x in q):>24s} {e[1] / q[1]:7.2f}x")
    inputs = _fused_inputs()
    e = pcts(_times(lambda: eager_fused_step(*inputs), 3))
    pe = peak_bytes("eager")
    print(f"{'fused_linear N=4096 V=32000 H=256 fp32: eager':52s} "
          f"{'/'.join(f'{x*1e3:.0f}' for x in e):>24s}   peak {pe / 2**20:.0f} MiB")
    # None: the default chunk (~32 MiB of fp32 logits = 262 rows here); 64: smaller GEMMs.
    # The reference backend is the chunked pure-PyTorch path, the memory baseline.
    for backend, chunk in (("cpu", None), ("cpu", 64), ("reference", None)):
        q = pcts(_times(lambda: qtorch_fused_step(*inputs, chunk_size=chunk, backend=backend), 3))
        pq = peak_bytes("qtorch", chunk, backend)
        name = f"fused_linear ... qtorch {backend} chunk_size={chunk or 'default'}"
        print(f"{name:52s} {'':>24s} {'/'.join(f'{x*1e3:.0f}' for x in q):>24s} "
              f"{e[1] / q[1]:7.2f}x  peak {pq / 2**20:.0f} MiB = {100 * pq / pe:.1f}% of eager")
    print("(peak = VmHWM - VmRSS once the inputs exist, each in a fresh process)")


if __name__ == "__main__":
    main()
