"""A W8A8-quantized model eager vs `torch.compile` vs `torch.export` + AOTInductor, on CPU.

    python benchmarks/bench_compile.py [--ms 1,128] [--rounds R] [--threads 2]
    python benchmarks/bench_compile.py --layers 2 --dims 64,128 --ms 1 --rounds 2  # smoke

The model: 60 nn.Linear alternating 576 -> 1536 and 1536 -> 576 (SmolLM2-135M's FFN sizes)
in an nn.Sequential, quantized with `quantize_(model, Int8DynamicConfig())`, run under
`torch.inference_mode()` with 2 threads at M = 1 (decode) and M = 128. Variants:
  eager                 the quantized model as is
  torch.compile         `torch.compile(model, fullgraph=True)` (compiled before timing)
  export+AOTInductor    `torch.export.export` -> `torch._inductor.aoti_compile_and_package`
                        -> `aoti_load_package` (one package per M)
A thin driver over `qtorch.bench` (qtorch.bench.compiled builds the variants; the timing is
the engine's: the variants of one M interleaved, p20/p50/p80, ratio = eager p50 / this p50,
> 1: faster than eager). A variant that fails to build or run prints the exception's first
line instead of times. "max |diff|" is the largest difference from eager's output.
"""

from __future__ import annotations

import argparse

import torch

from qtorch.bench import compiled, drivers, timing


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="1,128", help="token counts M (comma-separated)")
    ap.add_argument("--rounds", type=int, default=0, help="samples per variant (default by M)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--layers", type=int, default=60, help="number of linears (default 60)")
    ap.add_argument("--dims", default="576,1536", help="the two alternating feature sizes")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dims = tuple(int(v) for v in args.dims.split(","))
    model = compiled.w8a8_model(args.layers, dims)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.layers} W8A8 "
        f"linears {dims[0]}<->{dims[1]} (Int8DynamicConfig), inference mode; ratio = eager "
        f"p50 / this p50 (> 1: faster than eager)"
    )
    print(f"{'M':>4s} {'variant':20s} {'p20/p50/p80 ms':>24s} {'vs eager':>9s} {'max |diff|':>11s}")
    for m in (int(v) for v in args.ms.split(",")):
        x = torch.randn(m, dims[0], generator=torch.Generator().manual_seed(m))
        built = compiled.variants(model, x)
        impls = [v for v in built if not isinstance(v, tuple)]
        cfg = timing.TimingConfig(rounds=args.rounds or (30 if m <= 16 else 10), batch_below_s=0.0)
        res = drivers.time_rows(impls, "cpu", cfg)
        ref = next(i for i in impls if i.name == compiled.EAGER).fn()
        eager = res[compiled.EAGER].median
        for v in built:
            if isinstance(v, tuple):
                name, err = v
                print(f"{m:4d} {name:20s} failed: {err}")
                continue
            st = res[v.name]
            diff = compiled.max_abs_diff(ref, v.fn())
            print(
                f"{m:4d} {v.name:20s} {drivers.ms(st):>24s} {eager / st.median:8.2f}x {diff:11.2e}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
