"""Benchmark cases: per op, the shapes, the inputs, and every implementation to time.

A case is (op, Shape, dtype, device). `build(...)` makes the inputs once and returns a `Built`
whose `impls` are zero-argument callables over those inputs:

    kind "qtorch"    qtorch under `qtorch.use_backend(b)`, one per backend that registered a
                     kernel for the op (`qtorch._backend.kernel_coverage()`). For the linears
                     "qtorch:<b>" is the quantized module (qtorch.nn, loaded with the same
                     canonical weights the op rows get), which owns its kernel layout: what a
                     model runs. For int8_linear "qtorch:<b>:smoothquant" is the same module
                     with SmoothQuant's smooth_scale (x / s fused into its activation
                     quantization; same weights, same run: its ratio to "qtorch:<b>" is the
                     cost of smoothing). "qtorch:<b>:op" is the op called on the canonical weights
                     (Options.op_rows; it may pack the weight per call). "qtorch:<b>:kernel"
                     (Options.kernel_rows) skips the op layer: on cpu the C++ binding on a
                     weight packed beforehand, elsewhere the backend's registered kernel
    kind "baseline"  plain PyTorch: F.linear on float weights (fp32/bf16), the eager
                     formula for quantize/dequantize, eager log_softmax + kl_div +
                     cross_entropy with autograd for the losses (baselines.py)
    kind "peer"      other libraries doing the same job (peers.py), when installed
    kind "ceiling"   the streaming read of the weight bytes (ceiling.py, Options.read_ceiling)

Shape fields, per op (the `--shapes M,K,N` option uses the same meaning):

    quantize_int8                     x [M, K]                     (N unused)
    int8_scaled_mm / *_linear         x [M, K] @ w [N, K].T        (tokens, in, out features)
    dequantize_int4                   w [N, K]                     (M unused)
    distillation_loss                 logits [M, N]                (tokens, vocab; K unused)
    fused_linear_distillation_loss    hidden [M, K] @ W [N, K].T   (tokens, hidden, vocab);
                                      teacher hidden K2 (default K)

The distillation cases time forward + backward (what a training step pays); all other
cases time the forward. Linear weights use a real model's (K, N); int4 uses group size 128
where K allows, else the largest of 64/32 that divides K. The weights of a case (not its
activations) are what cold timing copies and rotates (timing.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

import qtorch
from qtorch import _backend, ops
from qtorch import reference as R
from qtorch.bench import ceiling, peers
from qtorch.bench.baselines import eager_distillation_loss
from qtorch.bench.types import Built, Impl, Options, Shape, clone_weights
from qtorch.reference.distillation import default_chunk_size

__all__ = [
    "OPS",
    "LINEAR_OPS",
    "MODULE_FOR",
    "Shape",
    "Options",
    "Impl",
    "Built",
    "build",
    "shapes_for",
    "shape_problem",
    "eager_distillation_loss",
]

OPS = (
    "quantize_int8",
    "int8_scaled_mm",
    "int8_linear",
    "int8_weight_only_linear",
    "int4_weight_only_linear",
    "dequantize_int4",
    "distillation_loss",
    "fused_linear_distillation_loss",
)
LINEAR_OPS = ("int8_scaled_mm", "int8_linear", "int8_weight_only_linear", "int4_weight_only_linear")
# The quantized module that runs each linear op in a model (qtorch.nn).
MODULE_FOR = {
    "int8_linear": "Int8DynamicLinear",
    "int8_weight_only_linear": "Int8WeightOnlyLinear",
    "int4_weight_only_linear": "Int4WeightOnlyLinear",
}

# Loss settings timed for both distillation ops by default (Options.temperature / alpha):
# Hinton-style KD with a hard-label term.
LOSS_KW = dict(temperature=Options.temperature, alpha=Options.alpha)
IGNORE_FRACTION = 0.1  # share of tokens labelled ignore_index (padding), as in real batches


# Real models' layer shapes.  (K, N) = (in, out features) of the FFN up-projection.
MINILM = (384, 1536, "MiniLM-L6 ffn")  # sentence-transformers/all-MiniLM-L6-v2
SMOLLM2 = (576, 1536, "SmolLM2-135M ffn")
LLAMA7B = (4096, 11008, "Llama-7B ffn")
SMOLLM2_VOCAB = 49152
SMOLLM2_HEAD = (576, SMOLLM2_VOCAB, "SmolLM2-135M lm_head")
SMOLLM2_360M_HIDDEN = 960  # the teacher in SmolLM2-360M -> 135M distillation


def _lin(ms, k, n, label):
    return [Shape(m, k, n, f"{label} M={m}") for m in ms]


DEFAULT_SHAPES: dict[str, list[Shape]] = {
    "linear": (
        _lin((1, 16, 128), *MINILM)
        + _lin((1, 16, 128), *SMOLLM2)
        + _lin((1, 16, 128), *LLAMA7B)
        + _lin((1, 16), *SMOLLM2_HEAD)
    ),
    "quantize_int8": [
        Shape(1, 4096, 0, "Llama-7B token"),
        Shape(16, 4096, 0, "Llama-7B 16 tok"),
        Shape(128, 4096, 0, "Llama-7B 128 tok"),
        Shape(128, 384, 0, "MiniLM 128 tok"),
        Shape(2048, 576, 0, "SmolLM2 2k tok"),
    ],
    "dequantize_int4": [
        Shape(0, 384, 1536, "MiniLM ffn"),
        Shape(0, 576, 1536, "SmolLM2 ffn"),
        Shape(0, 4096, 11008, "Llama-7B ffn"),
        Shape(0, 576, SMOLLM2_VOCAB, "SmolLM2 lm_head"),
    ],
    "distillation_loss": [
        Shape(m, 0, SMOLLM2_VOCAB, f"SmolLM2 vocab, {m} tok") for m in (64, 256, 1024)
    ],
    "fused_linear_distillation_loss": [
        Shape(m, 576, SMOLLM2_VOCAB, f"SmolLM2 360M->135M, {m} tok", K2=SMOLLM2_360M_HIDDEN)
        for m in (64, 256)
    ],
}
QUICK_SHAPES: dict[str, list[Shape]] = {
    "linear": _lin((1, 16), *SMOLLM2) + _lin((1,), *LLAMA7B),
    "quantize_int8": [Shape(16, 4096, 0, "Llama-7B 16 tok"), Shape(128, 576, 0, "SmolLM2 128 tok")],
    "dequantize_int4": [Shape(0, 576, 1536, "SmolLM2 ffn")],
    "distillation_loss": [Shape(64, 0, SMOLLM2_VOCAB, "SmolLM2 vocab, 64 tok")],
    "fused_linear_distillation_loss": [
        Shape(16, 576, SMOLLM2_VOCAB, "SmolLM2 360M->135M, 16 tok", K2=SMOLLM2_360M_HIDDEN)
    ],
}


def shapes_for(op: str, quick: bool) -> list[Shape]:
    table = QUICK_SHAPES if quick else DEFAULT_SHAPES
    return list(table["linear" if op in LINEAR_OPS else op])


def x_axis(op: str, shape: Shape) -> tuple[str, int]:
    """What the plot puts on the x axis for this op."""
    if op == "dequantize_int4":
        return "weight elements N*K", shape.N * shape.K
    return "M (tokens)", shape.M


def group_size_for(k: int) -> int | None:
    for gs in (128, 64, 32):
        if k % gs == 0:
            return gs
    return None


def shape_problem(op: str, shape: Shape) -> str | None:
    """Why this op cannot run at this shape (None if it can)."""
    need = {"quantize_int8": "MK", "dequantize_int4": "NK", "distillation_loss": "MN"}.get(
        op, "MKN"
    )
    for f in need:
        if getattr(shape, f) < 1:
            return f"{f} must be >= 1 for {op}"
    if op in ("int4_weight_only_linear", "dequantize_int4") and group_size_for(shape.K) is None:
        return f"K={shape.K} is not a multiple of 32 (the smallest int4 group size)"
    return None


def _esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_compute_kind = peers.float_kind


def _in_backend(backend: str, fn: Callable) -> Callable:
    """fn run under `qtorch.use_backend(backend)`, as a user scopes a call. The name is
    validated here, once, so an unavailable backend fails at build time."""
    with qtorch.use_backend(backend):
        pass

    def run():
        with qtorch.use_backend(backend):
            return fn()

    return run


def _reference_is_cheap(op: str, s: Shape) -> bool:
    """The reference runs int8 GEMMs in float64 and dequantizes whole weights per call: a
    row for it only where that stays quick (it is a baseline, not a contender)."""
    if op in ("int8_scaled_mm", "int8_linear"):
        return s.M * s.K * s.N <= 1e8 and s.N * s.K <= 4e6
    if op in ("int8_weight_only_linear", "int4_weight_only_linear"):
        return s.N * s.K <= 4e6 and s.M * s.K * s.N <= 4e8
    if op == "distillation_loss":
        return s.M * s.N <= 1e6
    if op == "fused_linear_distillation_loss":
        return s.M * s.N * (s.K + (s.K2 or s.K)) <= 1e9
    return True


def _qtorch_backends(built: Built, backends: list[str]) -> list[str]:
    """The backends that get qtorch rows; the others are recorded as skipped."""
    coverage = _backend.kernel_coverage().get(built.op, [])
    compiled = [b for b in backends if b != "reference" and b in coverage]
    out = []
    for b in backends:
        name = f"qtorch:{b}"
        if b not in coverage:
            built.skipped.append((name, f"no {b} kernel registered for {built.op}"))
        elif (
            b == "reference"
            and compiled
            and built.options.reference == "cheap"
            and not _reference_is_cheap(built.op, built.shape)
        ):
            built.skipped.append((name, "reference is slow at this size; rows only where cheap"))
        else:
            out.append(b)
    return out


def _qtorch_impl(
    name: str,
    b: str,
    make: Callable[[dict], Callable],
    weights: dict | None,
    weight_bytes: int,
    compute: str,
    note: str = "",
) -> Impl:
    """A qtorch row on backend b: make(weights) -> the call; copies from cloned weights."""
    body = make(weights or {})
    return Impl(
        name,
        "qtorch",
        b,
        _in_backend(b, body),
        weight_bytes,
        compute,
        note=note,
        body=body,
        scope=lambda: qtorch.use_backend(b),
        copy=None if not weights else (lambda: make(clone_weights(weights))),
    )


def _add_qtorch(built, backends, make, weight_bytes, compute, weights=None, note="") -> list:
    """One "qtorch:<b>" row per backend with a kernel; returns those backends."""
    served = _qtorch_backends(built, backends)
    for b in served:
        built.impls.append(
            _qtorch_impl(f"qtorch:{b}", b, make, weights, weight_bytes, compute, note=note)
        )
    return served


def _gen(device: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)


def _randn(shape, dtype, device, scale=1.0):
    return (torch.randn(shape, generator=_gen(device), device=device) * scale).to(dtype)


def _baseline(name, fn_of, weights, weight_bytes, compute, note="") -> Impl:
    return Impl(
        name,
        "baseline",
        "torch",
        fn_of(weights),
        weight_bytes,
        compute,
        note=note,
        copy=None if not weights else (lambda: fn_of(clone_weights(weights))),
    )


def quantized_module(op: str, w: dict, k: int, n: int) -> torch.nn.Module:
    """The qtorch.nn module of a linear op, loaded with the canonical weights in `w` (what
    `from_float` would have produced), frozen for inference."""
    from qtorch import nn as qnn

    bias = w.get("bias")
    device = (w.get("w_q") if "w_q" in w else w["qw"]).device
    if op == "int4_weight_only_linear":
        mod = qnn.Int4WeightOnlyLinear(
            k, n, bias=bias is not None, group_size=w["gs"], device=device
        )
        state = {"qweight": w["qw"], "scales": w["sc"], "zeros": w["zp"]}
    else:
        mod = getattr(qnn, MODULE_FOR[op])(k, n, bias=bias is not None, device=device)
        state = {"qweight": w["w_q"], "weight_scale": w["w_s"]}
        if w.get("smooth") is not None:  # SmoothQuant (Int8DynamicLinear adopts the buffer)
            state["smooth_scale"] = w["smooth"]
    if bias is not None:
        state["bias"] = bias
    mod.load_state_dict(state)
    if bias is not None:
        mod.to(bias.dtype)  # the bias in the activations' dtype, as the op rows get it
    return mod.requires_grad_(False)


def _kernel_make(op: str, x: torch.Tensor, out_dtype, n: int, k: int):
    """The cpu kernel binding on a weight packed beforehand: make(weights) -> call."""
    Q = torch.ops.qtorch_cpu

    if op == "int8_scaled_mm":

        def make(w):
            bp = Q.pack_int8_mm(w["b"])
            a, sa, sb, bias = w["a"], w["sa"], w["sb"], w.get("bias")
            return lambda: Q.int8_scaled_mm(a, bp, n, sa, sb, bias, out_dtype)

    elif op == "int8_linear":

        def make(w):
            wp, w_s, bias = Q.pack_int8_mm(w["w_q"]), w["w_s"], w.get("bias")
            return lambda: Q.int8_linear(x, wp, n, w_s, bias)

    elif op == "int8_weight_only_linear":

        def make(w):
            wp, s = Q.pack_int8_weight_only(w["w_q"], w["w_s"].float())
            bias = w.get("bias")
            return lambda: Q.int8_weight_only_linear(x, wp, s, n, k, bias)

    else:

        def make(w):
            gs = w["gs"]
            wp, s, z = Q.pack_int4_weight_only(w["qw"], w["sc"].float(), w["zp"], gs)
            bias = w.get("bias")
            return lambda: Q.int4_weight_only_linear(x, wp, s, z, n, k, gs, bias)

    return make


def _add_registered_kernels(
    built: Built,
    served: list[str],
    call: Callable,
    weights: dict | None = None,
    weight_bytes: int = 0,
    compute: str = "fp32",
    skip: tuple[str, ...] = (),
) -> None:
    """A "qtorch:<b>:kernel" row per served backend not in `skip` (Options.kernel_rows): the
    kernel that backend registered for the op (`qtorch._backend.resolve`), called as
    `call(kernel, weights)` without the op layer's checks and dispatch."""
    if not built.options.kernel_rows:
        return
    for b in served:
        if b in skip:
            continue
        with qtorch.use_backend(b):
            got, kernel = _backend.resolve(built.op, torch.device(built.device))
        if got != b:
            continue
        built.impls.append(
            _qtorch_impl(
                f"qtorch:{b}:kernel",
                b,
                lambda w, kernel=kernel: lambda: call(kernel, w),
                weights,
                weight_bytes,
                compute,
                note="the backend's registered kernel, without the op layer",
            )
        )


def _build_linear(op, s, dtype, device, backends, with_peers, opt: Options):
    m, k, n = s.M, s.K, s.N
    es = _esize(dtype)
    x = _randn((m, k), dtype, device)
    w = _randn((n, k), torch.float32, device, 0.02)
    bias = _randn((n,), dtype, device, 0.1) if opt.bias else None
    float_kind = _compute_kind(dtype)
    out_bytes = m * n * es
    built = Built(op, s, dtype, device, 2.0 * m * k * n, m * k * es + out_bytes, options=opt)

    for wname in dict.fromkeys((str(dtype).split(".")[1], *opt.dense_dtypes)):
        wdt = getattr(torch, wname)
        xd = x if wdt == dtype else x.to(wdt)

        def dense(d, xd=xd):
            return lambda: F.linear(xd, d["w"], d["bias"])

        dw = {"w": w.to(wdt), "bias": None if bias is None else bias.to(wdt)}
        built.impls.append(
            _baseline(
                f"torch:F.linear({wname})", dense, dw, n * k * _esize(wdt), _compute_kind(wdt)
            )
        )

    int8_wbytes = n * k + 4 * n  # int8 [N, K] + fp32 scale [N]
    if op == "int8_scaled_mm":
        a, sa = R.quantize_int8(x)
        b, sb = R.quantize_int8(w)
        built.other_bytes = m * k + 4 * m + out_bytes
        weights = {"b": b, "sb": sb, "bias": bias}

        def make(wt):
            bb, sbb, bi = wt["b"], wt["sb"], wt["bias"]
            return lambda: ops.int8_scaled_mm(a, bb, sa, sbb, bi, dtype)

        served = _add_qtorch(built, backends, make, int8_wbytes, "int8", weights)
        _add_registered_kernels(
            built,
            served,
            lambda kern, wt: kern(a, wt["b"], sa, wt["sb"], wt["bias"], dtype),
            weights,
            int8_wbytes,
            "int8",
            skip=("cpu",),
        )
        if opt.kernel_rows and "cpu" in served:
            kmake = _kernel_make(op, x, dtype, n, k)
            built.impls.append(
                _qtorch_impl(
                    "qtorch:cpu:kernel",
                    "cpu",
                    lambda wt: kmake({**wt, "a": a, "sa": sa}),
                    weights,
                    int8_wbytes,
                    "int8",
                    note="the C++ binding on a weight packed beforehand",
                )
            )
        if with_peers:
            peers.add_int8_mm_peers(built, a, sa, {**weights, "w": w}, int8_wbytes)
    else:
        if op == "int4_weight_only_linear":
            gs = group_size_for(k)
            qw, sc, zp = R.quantize_int4(w, gs)
            weights = {"qw": qw, "sc": sc, "zp": zp, "gs": gs, "bias": bias}
            # nibbles + fp32 scale + u8 zero per group
            wbytes, compute = n * k // 2 + 5 * n * (k // gs), float_kind

            def make_op(wt):
                q, sc_, zp_, bi = wt["qw"], wt["sc"], wt["zp"], wt["bias"]
                return lambda: ops.int4_weight_only_linear(x, q, sc_, zp_, gs, bi)

        else:
            w_q, w_s = R.quantize_int8(w)
            weights = {"w_q": w_q, "w_s": w_s, "bias": bias}
            wbytes, compute = int8_wbytes, "int8" if op == "int8_linear" else float_kind
            fn = getattr(ops, op)

            def make_op(wt):
                q, s_, bi = wt["w_q"], wt["w_s"], wt["bias"]
                return lambda: fn(x, q, s_, bi)

        def make_module(wt):
            mod = quantized_module(op, wt, k, n)
            return lambda: mod(x)

        served = _add_qtorch(
            built,
            backends,
            make_module,
            wbytes,
            compute,
            weights,
            note=f"qtorch.nn.{MODULE_FOR[op]}",
        )
        if op == "int8_linear":
            # s = 1: the same weights and result as "qtorch:<b>" (so its row checks like the
            # others), while the kernel runs its smoothed path (a division per element costs
            # the same whatever s holds).
            smooth = torch.ones(k, device=device)

            def make_smooth(wt):
                mod = quantized_module(op, {**wt, "smooth": smooth}, k, n)
                return lambda: mod(x)

            for b in served:
                built.impls.append(
                    _qtorch_impl(
                        f"qtorch:{b}:smoothquant",
                        b,
                        make_smooth,
                        weights,
                        wbytes,
                        compute,
                        note="Int8DynamicLinear with smooth_scale (SmoothQuant): x / s fused "
                        "into the activation quantization; within 5% of qtorch:<b> at M = 1",
                    )
                )
        if opt.op_rows:
            for b in served:
                if b == "reference":  # nothing to pack: the module runs exactly the op
                    continue
                built.impls.append(
                    _qtorch_impl(
                        f"qtorch:{b}:op",
                        b,
                        make_op,
                        weights,
                        wbytes,
                        compute,
                        note=f"qtorch.ops.{op} on the canonical weights (may pack per call)",
                    )
                )
        if opt.kernel_rows and "cpu" in served:
            built.impls.append(
                _qtorch_impl(
                    "qtorch:cpu:kernel",
                    "cpu",
                    _kernel_make(op, x, dtype, n, k),
                    weights,
                    wbytes,
                    compute,
                    note="the C++ binding on a weight packed beforehand",
                )
            )
        if with_peers:
            full = {**weights, "w": w}
            if op == "int8_linear":
                peers.add_w8a8_peers(built, x, full, wbytes)
            elif op == "int8_weight_only_linear":
                peers.add_w8a16_peers(built, x, full, wbytes)
            else:
                peers.add_w4a16_peers(built, x, full, gs)
    _add_ceiling(built, n, k)
    return built


def _add_ceiling(built: Built, n: int, k: int) -> None:
    if not built.options.read_ceiling:
        return
    if built.device != "cpu" or not ceiling.available():
        built.skipped.append((ceiling.NAME, "needs qtorch._C and CPU tensors"))
        return
    built.impls.append(ceiling.read_ceiling(n, k))


def _build_quantize_int8(s, dtype, device, backends, with_peers, opt):
    x = _randn((s.M, s.K), dtype, device)
    built = Built(
        "quantize_int8",
        s,
        dtype,
        device,
        None,
        s.M * s.K * (_esize(dtype) + 1) + 4 * s.M,
        options=opt,
    )
    built.impls.append(
        Impl("torch:eager", "baseline", "torch", lambda: R.quantize_int8(x), 0, "fp32")
    )
    served = _add_qtorch(built, backends, lambda _: lambda: ops.quantize_int8(x), 0, "fp32")
    _add_registered_kernels(built, served, lambda kern, _: kern(x))
    return built


def _build_dequantize_int4(s, dtype, device, backends, with_peers, opt):
    gs = group_size_for(s.K)
    qw, sc, zp = R.quantize_int4(_randn((s.N, s.K), torch.float32, device, 0.02), gs)
    weights = {"qw": qw, "sc": sc, "zp": zp}
    wbytes = s.N * s.K // 2 + 5 * s.N * (s.K // gs)
    built = Built("dequantize_int4", s, dtype, device, None, 4 * s.N * s.K, options=opt)

    def eager(w):
        return lambda: R.dequantize_int4(w["qw"], w["sc"], w["zp"], gs)

    def make(w):
        return lambda: ops.dequantize_int4(w["qw"], w["sc"], w["zp"], gs)

    built.impls.append(_baseline("torch:eager", eager, weights, wbytes, "fp32"))
    served = _add_qtorch(built, backends, make, wbytes, "fp32", weights)
    _add_registered_kernels(
        built, served, lambda kern, w: kern(w["qw"], w["sc"], w["zp"], gs), weights, wbytes
    )
    _add_ceiling(built, s.N, s.K)
    return built


def _labels(m: int, v: int, device: str) -> torch.Tensor:
    g = _gen(device)
    labels = torch.randint(0, v, (m,), generator=g, device=device)
    drop = torch.rand(m, generator=g, device=device) < IGNORE_FRACTION
    return labels.masked_fill(drop, -100)


def _build_distillation(s, dtype, device, backends, with_peers, opt):
    m, v = s.M, s.N
    es = _esize(dtype)
    student = _randn((m, v), dtype, device, 2.0).requires_grad_(True)
    teacher = _randn((m, v), dtype, device, 2.0) + 0.5
    labels = _labels(m, v, device)
    kw = dict(temperature=opt.temperature, alpha=opt.alpha, divergence=opt.divergence)
    # Minimum traffic: read both logits once, write the student gradient once.
    built = Built("distillation_loss", s, dtype, device, None, 3 * m * v * es, options=opt)
    kind = _compute_kind(dtype)

    def eager():
        loss = eager_distillation_loss(student, teacher, labels, **kw)
        return torch.autograd.grad(loss, student)

    built.impls.append(Impl("torch:eager+autograd", "baseline", "torch", eager, 0, kind))

    def make(_):
        def run():
            loss = ops.distillation_loss(student, teacher, labels, **kw)
            return torch.autograd.grad(loss, student)

        return run

    served = _add_qtorch(built, backends, make, 0, kind)
    # the kernels compute the loss per token and its gradient in one call (no autograd)
    args = (
        labels,
        opt.temperature,
        opt.alpha,
        opt.divergence,
        0.5,  # beta, the jsd mixture weight (the ops' default)
        -100,
        True,
    )
    s_ = student.detach()
    _add_registered_kernels(built, served, lambda kern, _: kern(s_, teacher, *args), compute=kind)
    if with_peers:
        peers.add_distillation_peers(built, student, teacher, labels)
    return built


def _build_fused(s, dtype, device, backends, with_peers, opt):
    m, h, v = s.M, s.K, s.N
    ht = s.K2 or s.K
    es = _esize(dtype)
    hs = _randn((m, h), dtype, device).requires_grad_(True)
    ht_ = _randn((m, ht), dtype, device)
    weights = {
        "ws": _randn((v, h), dtype, device, 0.05).requires_grad_(True),
        "wt": _randn((v, ht), dtype, device, 0.05),
    }
    labels = _labels(m, v, device)
    kw = dict(temperature=opt.temperature, alpha=opt.alpha, divergence=opt.divergence)
    # student logits, teacher logits, grad_hidden and grad_weight GEMMs
    flop = 2.0 * m * v * (3 * h + ht)
    wbytes = v * (h + ht) * es
    # + the gradient of the student weight written once, hidden states in, grad_hidden out
    built = Built(
        "fused_linear_distillation_loss",
        s,
        dtype,
        device,
        flop,
        v * h * es + m * (2 * h + ht) * es,
        options=opt,
    )
    kind = _compute_kind(dtype)

    def eager(w):
        ws, wt = w["ws"], w["wt"]

        def run():
            logits_s = F.linear(hs, ws)
            with torch.no_grad():
                logits_t = F.linear(ht_, wt)
            loss = eager_distillation_loss(logits_s, logits_t, labels, **kw)
            return torch.autograd.grad(loss, (hs, ws))

        return run

    built.impls.append(_baseline("torch:eager+autograd", eager, weights, wbytes, kind))
    for chunked in (True, False):
        built.impls.append(
            _baseline(
                "torch:four GEMMs" + (" (qtorch's chunks)" if chunked else " (unchunked)"),
                _four_gemms(hs, ht_, chunked),
                weights,
                wbytes,
                kind,
                note="the floor: the two logits GEMMs, grad_hidden and grad_weight, no loss",
            )
        )

    def make_for(chunk):
        def make(w):
            ws, wt = w["ws"], w["wt"]

            def run():
                loss = ops.fused_linear_distillation_loss(
                    hs, ws, ht_, wt, labels, chunk_size=chunk, **kw
                )
                return torch.autograd.grad(loss, (hs, ws))

            return run

        return make

    served = _qtorch_backends(built, backends)
    for b in served:
        for chunk in opt.chunk_sizes:
            name = f"qtorch:{b}" + ("" if chunk is None else f" chunk_size={chunk}")
            built.impls.append(_qtorch_impl(name, b, make_for(chunk), weights, wbytes, kind))

    def make_bf16_gemm(w):
        # the cpu backend's bf16 heads on the bf16 x bf16 -> fp32 GEMM whatever the machine
        # (its default takes it only with AMX): both paths measured in one run
        inner = make_for(None)(w)

        def run():
            before = os.environ.get("QTORCH_CPU_BF16_GEMM")
            os.environ["QTORCH_CPU_BF16_GEMM"] = "1"
            try:
                return inner()
            finally:
                if before is None:
                    del os.environ["QTORCH_CPU_BF16_GEMM"]
                else:
                    os.environ["QTORCH_CPU_BF16_GEMM"] = before

        return run

    if "cpu" in served and device == "cpu":
        if dtype != torch.bfloat16:
            built.skipped.append(("qtorch:cpu bf16 GEMM", "bf16 inputs only"))
        elif not torch.ops.qtorch_cpu.bf16_gemm_available():
            built.skipped.append(("qtorch:cpu bf16 GEMM", "no cblas_gemm_bf16bf16f32 in torch"))
        else:
            built.impls.append(
                _qtorch_impl(
                    "qtorch:cpu bf16 GEMM",
                    "cpu",
                    make_bf16_gemm,
                    weights,
                    wbytes,
                    kind,
                    note="QTORCH_CPU_BF16_GEMM=1: bf16 heads on oneMKL's bf16 -> fp32 GEMM",
                )
            )

    def make_quantized(quant):
        def make(w):
            # the teacher head as a qtorch module (API.md, "Distillation with a quantized
            # teacher"), quantized once here, outside the timed call
            head = quantized_teacher_head(w["wt"], quant)
            ws = w["ws"]

            def run():
                loss = ops.fused_linear_distillation_loss(hs, ws, ht_, head, labels, **kw)
                return torch.autograd.grad(loss, (hs, ws))

            return run

        return make

    for quant in opt.teacher_quant:
        if quant == "w4a16" and ht % TEACHER_QUANT_GROUP:
            built.skipped += [
                (
                    f"qtorch:{b} {quant} teacher",
                    f"teacher hidden {ht} is not a "
                    f"multiple of the int4 group {TEACHER_QUANT_GROUP}",
                )
                for b in served
            ]
            continue
        qbytes = v * h * es + _quantized_bytes(quantized_teacher_head(weights["wt"], quant))
        for b in served:
            built.impls.append(
                _qtorch_impl(
                    f"qtorch:{b} {quant} teacher", b, make_quantized(quant), weights, qbytes, kind
                )
            )
    if with_peers:
        peers.add_fused_distillation_peers(built, hs, ht_, weights, labels, kw)
    return built


def _four_gemms(hs, ht, chunked: bool):
    """The GEMMs every fused-linear distillation step does, alone: student and teacher
    logits of each chunk (h @ W.T, in the inputs' dtype as the loss's GEMMs), grad_hidden
    (g @ Ws) and grad_weight (Σ gᵀ @ h, accumulated over chunks), where g stands for the
    chunk's logit gradient (the student logits themselves: same shape, no loss math). With
    chunked=True the rows go in qtorch's default chunk (default_chunk_size), else in one
    piece, holding [N, V] logits."""

    def fn_of(w):
        ws, wt = w["ws"], w["wt"]
        m, v = hs.shape[0], ws.shape[0]
        step = default_chunk_size(m, v) if chunked else m
        h_, t_ = hs.detach(), ht.detach()

        def run():
            grad_h = torch.empty_like(h_)
            grad_w = torch.zeros_like(ws, dtype=torch.float32)
            for r0 in range(0, m, step):
                hc = h_[r0 : r0 + step]
                g = hc @ ws.detach().t()
                t = t_[r0 : r0 + step] @ wt.t()
                del t
                grad_h[r0 : r0 + step] = g @ ws.detach()
                if g.dtype == torch.float32:
                    grad_w.addmm_(g.t(), hc)
                else:  # a 16-bit GEMM (fp32 accumulation inside), summed in fp32
                    grad_w += g.t() @ hc
            return grad_h, grad_w

        return run

    return fn_of


TEACHER_QUANT_GROUP = 64  # divides SmolLM2's 576 and 960


def quantized_teacher_head(wt: torch.Tensor, quant: str) -> torch.nn.Module:
    """The teacher head weight [V, Ht] as a qtorch quantized linear ("w8a16" or "w4a16")."""
    from qtorch import nn as qnn

    lin = torch.nn.Linear(wt.shape[1], wt.shape[0], bias=False, device=wt.device, dtype=wt.dtype)
    with torch.no_grad():
        lin.weight.copy_(wt)
    if quant == "w4a16":
        return qnn.Int4WeightOnlyLinear.from_float(lin, group_size=TEACHER_QUANT_GROUP)
    if quant == "w8a16":
        return qnn.Int8WeightOnlyLinear.from_float(lin)
    raise ValueError(f"teacher_quant must be 'w8a16' or 'w4a16', got {quant!r}")


def _quantized_bytes(mod: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in mod.buffers() if t is not None)


def build(
    op: str,
    shape: Shape,
    dtype: torch.dtype,
    device: str,
    backends: list[str],
    with_peers: bool = True,
    options: Options | None = None,
) -> Built:
    """Inputs and every implementation of one case (see the module docstring)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    problem = shape_problem(op, shape)
    if problem:
        raise ValueError(problem)
    opt = options or Options()
    if op in LINEAR_OPS:
        return _no_grad_build(_build_linear, op, shape, dtype, device, backends, with_peers, opt)
    if op == "quantize_int8":
        return _no_grad_build(_build_quantize_int8, shape, dtype, device, backends, with_peers, opt)
    if op == "dequantize_int4":
        return _no_grad_build(
            _build_dequantize_int4, shape, dtype, device, backends, with_peers, opt
        )
    if op == "distillation_loss":  # the losses time a backward: their inputs require grad
        return _build_distillation(shape, dtype, device, backends, with_peers, opt)
    return _build_fused(shape, dtype, device, backends, with_peers, opt)


def _no_grad_build(builder, *args):
    with torch.no_grad():
        return builder(*args)
