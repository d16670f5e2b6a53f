"""Peers: other libraries' implementations of the same job, timed next to qtorch. The only
place that sets up another library's kernel for a benchmark (the scripts in benchmarks/ get
theirs from here, through cases.build).

Each `add_*` appends `Impl`s (kind "peer") to a `Built` case, or records in `built.skipped`
why a peer is absent (not installed, wrong device, unsupported dtype or shape). Peer weights
are converted from the *same* quantized weights qtorch gets, so both compute the same thing:

    torch._int_mm                       int8 [M, K] @ int8 [K, N] -> int32 (CPU and CUDA);
                                        the per-row/per-channel scales applied in eager
                                        ("torch:_int_mm(int32 out)": without them)
    fbgemm dynamic quantized Linear     torch.ao.nn.quantized.dynamic.Linear, per-channel
                                        int8 weight, activation quantized per tensor (uint8)
    torch._weight_int8pack_mm           W8A16 with per-channel scale
    torch._weight_int4pack_mm_for_cpu   W4A16 (tinygemm layout on CPU); torch dequantizes as
                                        (q - 8) * scale + zero_f, and ours is (q - z) * scale,
                                        so zero_f = (8 - z) * scale
    torch._weight_int4pack_mm           the same on CUDA (bf16 activations only)
    torchao                             quantize_ configs on an nn.Linear, when importable
    Liger-Kernel                        LigerFusedLinearJSDLoss (chunked_loss, pure PyTorch),
                                        eager and compiled=True, when importable

A peer is set up by `setup(weights) -> call` from a dict of weight tensors; cold timing calls
it again on fresh copies of those tensors (`Impl.copy`). Optional peers that are installed but
fail to set up (API drift between versions) are recorded as skipped with the error, never
silently dropped and never fatal.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable

import torch

from qtorch import reference as R
from qtorch.bench.types import Built, Impl, clone_weights
from qtorch.reference.weight_only import unpack_int4

_SETUP_ERRORS = (
    RuntimeError,
    ValueError,
    TypeError,
    NotImplementedError,
    AttributeError,
    ImportError,
    AssertionError,
)


def float_kind(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _quiet(setup: Callable[[dict], Callable], weights: dict) -> Callable:
    with warnings.catch_warnings():  # e.g. torch.ao's deprecation notice, once per setup
        warnings.simplefilter("ignore")
        return setup(weights)


def _try(
    built: Built,
    name: str,
    backend: str,
    setup: Callable[[dict], Callable],
    weights: dict,
    keys: tuple[str, ...],
    weight_bytes: int,
    compute: str,
    note: str = "",
) -> None:
    """Set up an optional peer from weights[keys] and call it once (fail here, at setup, not in
    the middle of the timing loop); a failure becomes a skipped entry."""
    weights = {k: weights[k] for k in keys}
    try:
        body = _quiet(setup, weights)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            body()
    except _SETUP_ERRORS as e:
        built.skipped.append((name, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
        return
    built.impls.append(
        Impl(
            name,
            "peer",
            backend,
            body,
            weight_bytes,
            compute,
            note=note,
            copy=lambda: _quiet(setup, clone_weights(weights)),
        )
    )


def _with_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


# ------------------------------------------------------------------------ int8 GEMM (W8A8)


def add_int8_mm_peers(built: Built, a, sa, weights: dict, wbytes: int) -> None:
    """int8_scaled_mm: torch._int_mm plus the same scaling epilogue in eager (and, with
    Options.raw_int_mm, torch._int_mm alone: int32 out, the GEMM without any epilogue)."""
    if not hasattr(torch, "_int_mm"):
        built.skipped.append(("torch:_int_mm", "torch._int_mm not in this torch"))
        return
    out_dtype = built.dtype
    sa2 = sa[:, None]

    def setup(w):
        bt, sb2 = w["b"].t(), w["sb"][None, :]  # [K, N] view: _int_mm takes it as is
        return lambda: (torch._int_mm(a, bt) * sa2 * sb2).to(out_dtype)

    _try(built, "torch:_int_mm", "torch", setup, weights, ("b", "sb"), wbytes, "int8")
    if built.options.raw_int_mm:

        def setup_raw(w):
            bt = w["b"].t()
            return lambda: torch._int_mm(a, bt)

        _try(
            built,
            "torch:_int_mm(int32 out)",
            "torch",
            setup_raw,
            weights,
            ("b",),
            wbytes,
            "int8",
            note="int32 out, no scales: the GEMM alone",
        )


def add_w8a8_peers(built: Built, x, weights: dict, wbytes: int) -> None:
    """int8_linear (dynamic W8A8): fbgemm's dynamic quantized Linear, quantize + _int_mm in
    eager, torchao's int8 dynamic config."""
    dtype, device = built.dtype, built.device
    if device == "cpu":
        if dtype != torch.float32:
            built.skipped.append(("fbgemm:dynamic_linear", "takes float32 activations only"))
        else:

            def setup_fbgemm(w):
                import torch.ao.nn.quantized.dynamic as nnqd

                n, k = w["w_q"].shape
                lin = nnqd.Linear(k, n, bias_=w["bias"] is not None, dtype=torch.qint8)
                qw = torch._make_per_channel_quantized_tensor(
                    w["w_q"].cpu(), w["w_s"].double(), torch.zeros(n, dtype=torch.long), 0
                )
                lin.set_weight_bias(qw, w["bias"])
                return lambda: lin(x)

            _try(
                built,
                "fbgemm:dynamic_linear",
                "fbgemm",
                setup_fbgemm,
                weights,
                ("w_q", "w_s", "bias"),
                wbytes,
                "int8",
                note="activation quantized per tensor (uint8)",
            )
    if hasattr(torch, "_int_mm"):

        def setup_int_mm(w):
            bt, w_s, bias = w["w_q"].t(), w["w_s"], w["bias"]

            def run():
                q, s = R.quantize_int8(x)
                return _with_bias(
                    (torch._int_mm(q, bt) * s[:, None] * w_s[None, :]).to(dtype), bias
                )

            return run

        _try(
            built,
            "torch:quantize+_int_mm",
            "torch",
            setup_int_mm,
            weights,
            ("w_q", "w_s", "bias"),
            wbytes,
            "int8",
            note="eager per-token quantize, then torch._int_mm",
        )
    _add_torchao(built, x, weights, "Int8DynamicActivationInt8WeightConfig", {}, wbytes, "int8")


# ------------------------------------------------------------------ weight-only (W8A16/W4A16)


def add_w8a16_peers(built: Built, x, weights: dict, wbytes: int) -> None:
    dtype = built.dtype
    if hasattr(torch, "_weight_int8pack_mm"):

        def setup(w):
            w_q, s, bias = w["w_q"], w["w_s"].to(dtype), w["bias"]
            return lambda: _with_bias(torch._weight_int8pack_mm(x, w_q, s), bias)

        _try(
            built,
            "torch:_weight_int8pack_mm",
            "torch",
            setup,
            weights,
            ("w_q", "w_s", "bias"),
            wbytes,
            float_kind(dtype),
        )
    _add_torchao(built, x, weights, "Int8WeightOnlyConfig", {}, wbytes, float_kind(dtype))


def int4pack_scales_and_zeros(sc: torch.Tensor, zp: torch.Tensor, dtype: torch.dtype):
    """torch's int4 packs dequantize (q - 8) * scale + zero_f: zero_f = (8 - z) * scale, as
    [K // gs, N, 2] (scale, zero_f) in the activations' dtype."""
    zero_f = (8.0 - zp.float()) * sc
    return torch.stack((sc.t(), zero_f.t()), dim=-1).contiguous().to(dtype)


def add_w4a16_peers(built: Built, x, weights: dict, gs: int) -> None:
    dtype, device = built.dtype, built.device
    n, k = weights["w"].shape
    wbytes = n * k // 2 + 2 * n * (k // gs) * torch.empty((), dtype=dtype).element_size()
    keys = ("qw", "sc", "zp", "bias")

    def setup_with(pack, mm):
        def setup(w):
            packed = pack(unpack_int4(w["qw"]))  # from [N, K] values 0..15
            sz, bias = int4pack_scales_and_zeros(w["sc"], w["zp"], dtype), w["bias"]
            return lambda: _with_bias(mm(x, packed, gs, sz), bias)

        return setup

    if device == "cpu" and hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        setup = setup_with(
            lambda q: torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1),
            torch._weight_int4pack_mm_for_cpu,
        )
        name = "torch:_weight_int4pack_mm_for_cpu"
        _try(built, name, "torch", setup, weights, keys, wbytes, float_kind(dtype))
    elif device == "cuda" and hasattr(torch, "_weight_int4pack_mm"):
        if dtype != torch.bfloat16:
            built.skipped.append(("torch:_weight_int4pack_mm", "tinygemm takes bfloat16 only"))
        else:
            # tinygemm's input packing: byte j holds k = 2j in the high nibble.
            setup = setup_with(
                lambda q: torch._convert_weight_to_int4pack(
                    ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8), 8
                ),
                torch._weight_int4pack_mm,
            )
            _try(built, "torch:_weight_int4pack_mm", "torch", setup, weights, keys, wbytes, "bf16")
    _add_torchao(
        built, x, weights, "Int4WeightOnlyConfig", {"group_size": gs}, wbytes, float_kind(dtype)
    )


def _add_torchao(built: Built, x, weights, config_name: str, config_kw: dict, wbytes, kind):
    name = f"torchao:{config_name}"
    if not installed("torchao"):
        built.skipped.append((name, "torchao not installed"))
        return

    def setup(w):
        import torchao.quantization as tq

        fw, bias = w["w"], w["bias"]
        lin = torch.nn.Linear(
            fw.shape[1], fw.shape[0], bias=bias is not None, device=fw.device, dtype=built.dtype
        )
        with torch.no_grad():
            lin.weight.copy_(fw.to(built.dtype))
            if bias is not None:
                lin.bias.copy_(bias)
        tq.quantize_(lin, getattr(tq, config_name)(**config_kw))
        return lambda: lin(x)

    _try(built, name, "torchao", setup, weights, ("w", "bias"), wbytes, kind)


# ----------------------------------------------------------------------------- distillation


def add_distillation_peers(built: Built, student, teacher, labels) -> None:
    # Liger-Kernel's unfused KD losses (LigerKLDIVLoss, LigerJSD) take log-probabilities and
    # have no hard-label term, so they time a different computation; not listed as peers.
    if not installed("liger_kernel"):
        built.skipped.append(("liger:*", "Liger-Kernel not installed"))


def liger_jsd_kwargs(temperature: float, alpha: float, beta: float) -> dict:
    """qtorch's JSD loss settings as LigerFusedLinearJSDLoss's, so both compute one loss.

    qtorch (API.md): alpha · T² · D + (1 − alpha) · CE, D = β·KL(p‖m) + (1 − β)·KL(q‖m),
    m = β·p + (1 − β)·q (p teacher, q student, at temperature T), mean over counted tokens.
    Liger: weight_soft_loss · D' + weight_hard_loss · CE, with D' the same D (its teacher_kl
    carries `beta`, its mixture m = (1 − β)·q + β·p) and no T² factor. So
    weight_soft_loss = alpha · T², weight_hard_loss = 1 − alpha, beta = β, for 0 < β < 1 (at
    β = 0 and 1 Liger switches to KL(p‖q) and KL(q‖p), where qtorch's D is 0)."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"Liger's JSD equals qtorch's only for 0 < beta < 1, got {beta}")
    return dict(
        weight_soft_loss=alpha * temperature**2,
        weight_hard_loss=1.0 - alpha,
        beta=beta,
        temperature=temperature,
    )


def add_fused_distillation_peers(built: Built, hs, ht, weights: dict, labels, loss_kw) -> None:
    """Liger-Kernel's chunked LigerFusedLinearJSDLoss (pure PyTorch; any device), eager
    (compiled=False) and with its per-chunk step under torch.compile (compiled=True, its
    default), on the same tensors, with the loss settings converted (`liger_jsd_kwargs`).
    Only for divergence "jsd": Liger's fused KD loss is JSD."""
    names = ("liger:FusedLinearJSDLoss", "liger:FusedLinearJSDLoss compiled")
    if not installed("liger_kernel"):
        built.skipped += [(n, "Liger-Kernel not installed") for n in names]
        return
    if built.options.divergence != "jsd":
        built.skipped += [
            (n, "Liger's fused KD loss is JSD (Options.divergence='jsd')") for n in names
        ]
        return
    kw = liger_jsd_kwargs(loss_kw["temperature"], loss_kw["alpha"], loss_kw.get("beta", 0.5))
    ws, wt = weights["ws"], weights["wt"]
    for name, compiled in zip(names, (False, True)):

        def setup(w, compiled=compiled):
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

            loss_fn = LigerFusedLinearJSDLoss(compiled=compiled, **kw)
            ws, wt = w["ws"], w["wt"]

            def run():
                loss = loss_fn(hs, ws, ht, wt, labels)
                return torch.autograd.grad(loss, (hs, ws))

            return run

        _try(
            built,
            name,
            "liger",
            setup,
            weights,
            ("ws", "wt"),
            ws.numel() * ws.element_size() + wt.numel() * wt.element_size(),
            float_kind(built.dtype),
            note="the same loss (weights converted: peers.liger_jsd_kwargs); chunk 1024",
        )
