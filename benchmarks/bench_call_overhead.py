"""Per-call cost of the qtorch op layer on CPU, at a size where the kernel itself is negligible.

    python benchmarks/bench_call_overhead.py

Decode runs one small-M linear per layer, and between two calls the previous layers' weights
have streamed through the caches, so the interpreter's objects and the op layer's code are cold.
"cold" rows recreate that: 96 MiB are written before each timed call. "hot" rows time a call
made right after an identical one. The shape is M = 1, K = N = 64, so the rows show what a
call costs beyond the arithmetic, compared with a bare `torch.empty` (the cheapest call into
torch) and with the kernel binding called directly on a prepacked weight.
"""

from __future__ import annotations

import time

import torch
from _cold import pcts  # benchmarks/_cold.py

from qtorch import ops
from qtorch import reference as R

N = K = 64


def build() -> dict:
    from qtorch.backends import cpu as CPU

    x, xb = torch.randn(1, K), torch.randn(1, K).to(torch.bfloat16)
    w_q, w_scale = R.quantize_int8(torch.randn(N, K))
    qw, sc, z = R.quantize_int4(torch.randn(N, K), 32, False)
    packed = CPU._int8_vnni_weight(w_q)
    return {
        "torch.empty(1, 64)": lambda: torch.empty(1, 64),
        "ops.int8_linear": lambda: ops.int8_linear(x, w_q, w_scale),
        "ops.int4_weight_only_linear bf16": lambda: ops.int4_weight_only_linear(xb, qw, sc, z, 32),
        "binding int8_linear": lambda: torch.ops.qtorch_cpu.int8_linear(
            x, packed, N, w_scale, None),
    }


def measure(fns: dict, rounds: int = 60) -> dict:
    flush = torch.empty(24 << 20)  # 96 MiB
    for f in fns.values():
        f()
    out = {}
    for mode in ("cold", "hot"):
        ts = {k: [] for k in fns}
        for _ in range(rounds):
            for k, f in fns.items():
                if mode == "cold":
                    flush.fill_(1.0)
                else:
                    f()
                t0 = time.perf_counter()
                f()
                ts[k].append(time.perf_counter() - t0)
        for k, v in ts.items():
            out[(mode, k)] = pcts(v)
    return out


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; M = 1, K = N = {N}; "
          "cold: 96 MiB written before each call")
    print(f"{'caches':6s} {'call':36s} {'p20/p50/p80 us':>22s}")
    for (mode, k), p in measure(build()).items():
        print(f"{mode:6s} {k:36s} {'/'.join(f'{v * 1e6:.1f}' for v in p):>22s}")


if __name__ == "__main__":
    main()
