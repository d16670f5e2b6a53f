"""Before/after A/B of the redesign through the public API only, so the same file runs on both
trees (the tree before the redesign has no qtorch.bench engine of today's shape).

    PYTHONPATH=<tree> python benchmarks/results/redesign/ab_public.py <section> [...]

Sections: overhead, gemm, distill, compile. Each row is the p20/p50/p80 of single calls, and a
ratio against a baseline timed in the same process, interleaved round by round with it:
  overhead  M = 1, K = N = 64: ops and modules (qtorch.nn via quantize_), cold (96 MiB written
            before each call) and hot; baseline torch.empty(1, 64)
  gemm      W8A8 / W8A16 / W4A16 (g128) modules from quantize_ on nn.Linear(4096, 4096), M = 1
            and 128, fp32 input, inference mode, 4 module copies rotated (weights not
            cache-resident); baseline F.linear fp32 on 4 rotated fp32 weights
  distill   distillation_loss fwd+bwd N = 2048, V = 32000 (kl, T = 2, alpha = 0.5, labels) fp32
            and bf16; fused_linear_distillation_loss fwd+bwd N = 2048, V = 32000, H = 256 fp32;
            baseline an eager PyTorch formula of the same loss
  compile   60 W8A8 linears 576 <-> 1536 eager / torch.compile(fullgraph=True) / export +
            AOTInductor, M = 1 and 128 (qtorch.inductor_options() where the tree has it)
This file is a record of the measurement, kept beside its output, not a benchmark driver.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

import qtorch
from qtorch import ops

torch.set_num_threads(2)
FLUSH = torch.empty(24 << 20)


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))]


def run(rows: dict, rounds: int, cold: bool = False, warm: int = 2):
    for f in rows.values():
        for _ in range(warm):
            f()
    ts = {k: [] for k in rows}
    for _ in range(rounds):
        for k, f in rows.items():
            if cold:
                FLUSH.fill_(1.0)
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    return {k: (pct(v, 0.2), statistics.median(v), pct(v, 0.8)) for k, v in ts.items()}


def show(res, base, unit=1e3, uname="ms"):
    b = res[base][1]
    for k, (a, m, c) in res.items():
        print(
            f"  {k:44s} {a * unit:9.3f} {m * unit:9.3f} {c * unit:9.3f} {uname}  "
            f"{'baseline' if k == base else f'{m / b:7.2f}x baseline'}"
        )
    sys.stdout.flush()


def qmodule(cfg, k, n, dtype=torch.float32):
    m = torch.nn.Sequential(torch.nn.Linear(k, n))
    qtorch.quantize_(m, cfg)
    return m.to(dtype) if dtype != torch.float32 else m


def overhead():
    K = N = 64
    x, xb = torch.randn(1, K), torch.randn(1, K, dtype=torch.bfloat16)
    wq, ws = ops.quantize_int8(torch.randn(N, K))
    qw, sc, z = ops.quantize_int4(torch.randn(N, K), 32, False)
    m8 = qmodule(qtorch.Int8DynamicConfig(), K, N)
    m4 = qmodule(qtorch.Int4WeightOnlyConfig(32), K, N)
    m4b = torch.nn.Sequential(torch.nn.Linear(K, N, dtype=torch.bfloat16))
    qtorch.quantize_(m4b, qtorch.Int4WeightOnlyConfig(32))
    rows = {
        "torch.empty(1, 64)": lambda: torch.empty(1, 64),
        "ops.int8_linear": lambda: ops.int8_linear(x, wq, ws),
        "ops.int4_weight_only_linear bf16": lambda: ops.int4_weight_only_linear(xb, qw, sc, z, 32),
    }
    mrows = {
        "torch.empty(1, 64)": lambda: torch.empty(1, 64),
        "module W8A8 (no_grad)": lambda: m8(x),
        "module W4A16 fp32 (no_grad)": lambda: m4(x),
        "module W4A16 bf16 (no_grad)": lambda: m4b(xb),
    }
    for cold in (False, True):
        print(f"overhead M=1 K=N=64, {'cold (96 MiB written before each call)' if cold else 'hot'}")
        show(run(rows, 300, cold), "torch.empty(1, 64)", 1e6, "us")
        with torch.no_grad():
            show(run(mrows, 300, cold), "torch.empty(1, 64)", 1e6, "us")


def gemm():
    K = N = 4096
    ws = [torch.randn(N, K) * 0.02 for _ in range(4)]
    cfgs = {
        "W8A8": qtorch.Int8DynamicConfig(),
        "W8A16": qtorch.Int8WeightOnlyConfig(),
        "W4A16 g128": qtorch.Int4WeightOnlyConfig(128),
    }
    mods = {}
    for name, cfg in cfgs.items():
        lst = []
        for w in ws:
            lin = torch.nn.Linear(K, N, bias=False)
            lin.weight.data.copy_(w)
            s = torch.nn.Sequential(lin)
            qtorch.quantize_(s, cfg)
            lst.append(s)
        mods[name] = lst
    for M in (1, 128):
        x = torch.randn(M, K)
        it = {"i": 0}

        def rot(fn):
            def f():
                it["i"] = (it["i"] + 1) % 4
                return fn(it["i"])

            return f

        rows = {"F.linear fp32": rot(lambda i: F.linear(x, ws[i]))}
        for name, lst in mods.items():
            rows[name] = rot(lambda i, lst=lst: lst[i](x))
        print(f"gemm K=N=4096 M={M}, fp32 x, inference mode, 4 rotated weights")
        with torch.inference_mode():
            show(run(rows, 40 if M == 1 else 12), "F.linear fp32")


def eager_loss(s, t, y, T=2.0, alpha=0.5):
    s32, t32 = s.float(), t.float()
    kl = (
        F.kl_div(
            F.log_softmax(s32 / T, -1),
            F.log_softmax(t32 / T, -1),
            log_target=True,
            reduction="none",
        ).sum(-1)
        * T
        * T
    )
    ce = F.cross_entropy(s32, y, reduction="none")
    return (alpha * kl + (1 - alpha) * ce).mean()


def _distill_one(N, V, y, dt):
    s = torch.randn(N, V, dtype=dt, requires_grad=True)
    t = torch.randn(N, V, dtype=dt)

    def q():
        ops.distillation_loss(s, t, y, temperature=2.0, alpha=0.5).backward()
        s.grad = None

    def e():
        eager_loss(s, t, y).backward()
        s.grad = None

    print(f"distillation_loss fwd+bwd N={N} V={V} {dt}")
    show(run({"eager": e, "qtorch": q}, 6, warm=1), "eager")


def distill():
    N, V, H = 2048, 32000, 256
    y = torch.randint(0, V, (N,))
    for dt in (torch.float32, torch.bfloat16):
        _distill_one(N, V, y, dt)
    hs = torch.randn(N, H, requires_grad=True)
    ht = torch.randn(N, H)
    wsd = (torch.randn(V, H) * 0.05).requires_grad_()
    wt = torch.randn(V, H) * 0.05

    def fq():
        ops.fused_linear_distillation_loss(
            hs, wsd, ht, wt, y, temperature=2.0, alpha=0.5
        ).backward()
        hs.grad = wsd.grad = None

    def fe():
        eager_loss(hs @ wsd.t(), ht @ wt.t(), y).backward()
        hs.grad = wsd.grad = None

    print(f"fused_linear_distillation_loss fwd+bwd N={N} V={V} H={H} fp32")
    show(run({"eager": fe, "qtorch": fq}, 5, warm=1), "eager")


def compile_():
    d0, d1 = 576, 1536
    layers = [torch.nn.Linear(d0, d1) if i % 2 == 0 else torch.nn.Linear(d1, d0) for i in range(60)]
    model = torch.nn.Sequential(*layers).eval()
    qtorch.quantize_(model, qtorch.Int8DynamicConfig())
    opts = qtorch.inductor_options() if hasattr(qtorch, "inductor_options") else {}
    for M in (1, 128):
        x = torch.randn(M, d0)
        rows = {"eager": lambda: model(x)}
        with torch.inference_mode():
            c = torch.compile(model, fullgraph=True)
            c(x)
            rows["torch.compile"] = lambda: c(x)
            try:
                ep = torch.export.export(model, (x,))
                path = torch._inductor.aoti_compile_and_package(ep, inductor_configs=opts)
                a = torch._inductor.aoti_load_package(path)
                a(x)
                rows["export+AOTInductor"] = lambda: a(x)
            except Exception as exc:  # noqa: BLE001 - reported, not hidden
                print(f"  export+AOTInductor failed: {type(exc).__name__}: {str(exc)[:120]}")
            print(
                f"compile 60 W8A8 linears {d0}<->{d1} M={M}, inference mode"
                f"{' (inductor_options)' if opts else ''}"
            )
            show(run(rows, 60 if M == 1 else 15), "eager")


if __name__ == "__main__":
    print(f"qtorch from {qtorch.__file__}; torch {torch.__version__}, 2 threads")
    for sec in sys.argv[1:]:
        {"overhead": overhead, "gemm": gemm, "distill": distill, "compile": compile_}[sec]()
