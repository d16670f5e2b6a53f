"""Peers: other libraries' implementations of the same job, timed next to qtorch.

Each `add_*` appends `Impl`s (kind "peer") to a `Built` case, or records in `built.skipped`
why a peer is absent (not installed, wrong device, unsupported dtype or shape). Peer weights
are converted from the *same* quantized weights qtorch gets, so both compute the same thing:

    torch._int_mm                       int8 [M, K] @ int8 [K, N] -> int32 (CPU and CUDA);
                                        the per-row/per-channel scales applied in eager
    fbgemm dynamic quantized Linear     torch.ao.nn.quantized.dynamic.Linear, per-channel
                                        int8 weight, activation quantized per tensor (uint8)
    torch._weight_int8pack_mm           W8A16 with per-channel scale
    torch._weight_int4pack_mm_for_cpu   W4A16 (tinygemm layout on CPU); torch dequantizes as
                                        (q - 8) * scale + zero_f, and ours is (q - z) * scale,
                                        so zero_f = (8 - z) * scale
    torch._weight_int4pack_mm           the same on CUDA (bf16 activations only)
    torchao                             quantize_ configs on an nn.Linear, when importable
    Liger-Kernel                        LigerFusedLinearJSD (CUDA/Triton), when importable

Optional peers that are installed but fail to set up (API drift between versions) are
recorded as skipped with the error, never silently dropped and never fatal.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

from qtorch.reference.int8_mm import quantize_int8
from qtorch.reference.weight_only import unpack_int4


def _impl(*args, **kw):
    from qtorch.bench.cases import Impl

    return Impl(*args, **kw)


def _float_kind(dtype):
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _try(built, name: str, setup) -> None:
    """Run `setup() -> Impl` for an optional peer; a failure becomes a skipped entry."""
    try:
        with warnings.catch_warnings():  # e.g. torch.ao's deprecation notice, once per setup
            warnings.simplefilter("ignore")
            impl = setup()
            impl.fn()  # fail here, at setup, not in the middle of the timing loop
        built.impls.append(impl)
    except (
        RuntimeError,
        ValueError,
        TypeError,
        NotImplementedError,
        AttributeError,
        ImportError,
        AssertionError,
    ) as e:
        built.skipped.append((name, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ------------------------------------------------------------------------ int8 GEMM (W8A8)


def add_int8_mm_peers(built, a, b, sa, sb, wbytes) -> None:
    """int8_scaled_mm: torch._int_mm plus the same scaling epilogue in eager."""
    out_dtype = built.dtype
    bt = b.t()  # [K, N] view: _int_mm takes the column-major weight as is

    def setup():
        sa2, sb2 = sa[:, None], sb[None, :]
        return _impl(
            "torch:_int_mm",
            "peer",
            "torch",
            lambda: (torch._int_mm(a, bt) * sa2 * sb2).to(out_dtype),
            wbytes,
            "int8",
        )

    if hasattr(torch, "_int_mm"):
        _try(built, "torch:_int_mm", setup)


def add_w8a8_peers(built, x, w, w_q, w_s, wbytes) -> None:
    """int8_linear (dynamic W8A8): fbgemm's dynamic quantized Linear, quantize + _int_mm in
    eager, torchao's int8 dynamic config."""
    dtype, device = built.dtype, built.device
    if device == "cpu":
        if dtype != torch.float32:
            built.skipped.append(("fbgemm:dynamic_linear", "takes float32 activations only"))
        else:

            def setup_fbgemm():
                import torch.ao.nn.quantized.dynamic as nnqd

                n, k = w_q.shape
                lin = nnqd.Linear(k, n, bias_=False, dtype=torch.qint8)
                qw = torch._make_per_channel_quantized_tensor(
                    w_q.cpu(), w_s.double(), torch.zeros(n, dtype=torch.long), 0
                )
                lin.set_weight_bias(qw, None)
                return _impl(
                    "fbgemm:dynamic_linear",
                    "peer",
                    "fbgemm",
                    lambda: lin(x),
                    wbytes,
                    "int8",
                    note="activation quantized per tensor (uint8)",
                )

            _try(built, "fbgemm:dynamic_linear", setup_fbgemm)
    if hasattr(torch, "_int_mm"):
        bt = w_q.t()

        def setup_int_mm():
            def run():
                q, s = quantize_int8(x)
                return (torch._int_mm(q, bt) * s[:, None] * w_s[None, :]).to(dtype)

            return _impl(
                "torch:quantize+_int_mm",
                "peer",
                "torch",
                run,
                wbytes,
                "int8",
                note="eager per-token quantize, then torch._int_mm",
            )

        _try(built, "torch:quantize+_int_mm", setup_int_mm)
    _add_torchao(built, x, w, "Int8DynamicActivationInt8WeightConfig", {}, wbytes, "int8")


# ------------------------------------------------------------------ weight-only (W8A16/W4A16)


def add_w8a16_peers(built, x, w, w_q, w_s, wbytes) -> None:
    dtype = built.dtype
    if hasattr(torch, "_weight_int8pack_mm"):

        def setup():
            s = w_s.to(dtype)
            return _impl(
                "torch:_weight_int8pack_mm",
                "peer",
                "torch",
                lambda: torch._weight_int8pack_mm(x, w_q, s),
                wbytes,
                _float_kind(dtype),
            )

        _try(built, "torch:_weight_int8pack_mm", setup)
    _add_torchao(built, x, w, "Int8WeightOnlyConfig", {}, wbytes, _float_kind(dtype))


def add_w4a16_peers(built, x, w, qw, sc, zp, gs) -> None:
    dtype, device = built.dtype, built.device
    n, k = w.shape
    q = unpack_int4(qw)  # [N, K] values 0..15
    # torch's int4 packs dequantize (q - 8) * scale + zero_f: zero_f = (8 - z) * scale.
    zero_f = (8.0 - zp.float()) * sc
    sz = torch.stack((sc.t(), zero_f.t()), dim=-1).contiguous()  # [K // gs, N, 2]
    wbytes = n * k // 2 + 2 * n * (k // gs) * torch.empty((), dtype=dtype).element_size()
    if device == "cpu" and hasattr(torch, "_weight_int4pack_mm_for_cpu"):

        def setup_cpu():
            packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            sz_d = sz.to(dtype)
            return _impl(
                "torch:_weight_int4pack_mm_for_cpu",
                "peer",
                "torch",
                lambda: torch._weight_int4pack_mm_for_cpu(x, packed, gs, sz_d),
                wbytes,
                _float_kind(dtype),
            )

        _try(built, "torch:_weight_int4pack_mm_for_cpu", setup_cpu)
    elif device == "cuda" and hasattr(torch, "_weight_int4pack_mm"):
        if dtype != torch.bfloat16:
            built.skipped.append(("torch:_weight_int4pack_mm", "tinygemm takes bfloat16 only"))
        else:

            def setup_cuda():
                # tinygemm's input packing: byte j holds k = 2j in the high nibble.
                u8 = ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8)
                packed = torch._convert_weight_to_int4pack(u8, 8)
                sz_d = sz.to(dtype)
                return _impl(
                    "torch:_weight_int4pack_mm",
                    "peer",
                    "torch",
                    lambda: torch._weight_int4pack_mm(x, packed, gs, sz_d),
                    wbytes,
                    "bf16",
                )

            _try(built, "torch:_weight_int4pack_mm", setup_cuda)
    _add_torchao(
        built, x, w, "Int4WeightOnlyConfig", {"group_size": gs}, wbytes, _float_kind(dtype)
    )


def _add_torchao(built, x, w, config_name: str, config_kw: dict, wbytes: int, kind: str) -> None:
    name = f"torchao:{config_name}"
    if not installed("torchao"):
        built.skipped.append((name, "torchao not installed"))
        return

    def setup():
        import torchao.quantization as tq

        lin = torch.nn.Linear(
            w.shape[1], w.shape[0], bias=False, device=w.device, dtype=built.dtype
        )
        with torch.no_grad():
            lin.weight.copy_(w.to(built.dtype))
        tq.quantize_(lin, getattr(tq, config_name)(**config_kw))
        return _impl(name, "peer", "torchao", lambda: lin(x), wbytes, kind)

    _try(built, name, setup)


# ----------------------------------------------------------------------------- distillation


def add_distillation_peers(built, student, teacher, labels) -> None:
    # Liger-Kernel's unfused KD losses (LigerKLDIVLoss, LigerJSD) take log-probabilities and
    # have no hard-label term, so they time a different computation; not listed as peers.
    if not installed("liger_kernel"):
        built.skipped.append(("liger:*", "Liger-Kernel not installed"))


def add_fused_distillation_peers(built, hs, ws, ht, wt, labels) -> None:
    name = "liger:LigerFusedLinearJSD"
    if not installed("liger_kernel"):
        built.skipped.append((name, "Liger-Kernel not installed"))
        return
    if built.device != "cuda":
        built.skipped.append((name, "Triton kernels need a CUDA device"))
        return

    def setup():
        from liger_kernel.transformers import LigerFusedLinearJSD

        loss_fn = LigerFusedLinearJSD(jsd_beta=0.5, temperature=2.0)

        def run():
            loss = loss_fn(hs, ws, ht, wt, labels)
            return torch.autograd.grad(loss, (hs, ws))

        return _impl(
            name,
            "peer",
            "liger",
            run,
            ws.numel() * ws.element_size() + wt.numel() * wt.element_size(),
            _float_kind(built.dtype),
            note="JSD (beta=0.5) without the hard-label term: a near, not equal, job",
        )

    _try(built, name, setup)
