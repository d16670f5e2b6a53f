"""The `triton` backend: the Triton kernels in `kernels/` (imported as `qtorch._kernels`).

`qtorch._backend` imports this module only when Triton can run: with a CUDA device, or under
`TRITON_INTERPRET=1` on CPU tensors (for tests; never chosen by "auto" on CPU).
quantize_int4 / dequantize_int4 (offline weight conversion) and the linear backward helpers
have no Triton kernel; the reference serves them. The W4A16 kernel reads its own weight
layout, which this adapter prepares from the canonical one, as the cpu and cuda adapters do.
"""

from __future__ import annotations

import torch
import triton

from qtorch._backend import register_kernel
from qtorch._kernels import INTERPRET, distillation, int8_mm, weight_only
from qtorch._packed import Layout, register_layout


def status() -> tuple[bool, str]:
    if torch.cuda.is_available():
        return True, f"Triton {triton.__version__} kernels on CUDA"
    if INTERPRET:
        return True, f"Triton {triton.__version__} interpreter (TRITON_INTERPRET=1), CPU tensors"
    return False, "no CUDA device and TRITON_INTERPRET is not 1"


def kernel_layout(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Canonical (qweight uint8 [N, K//2], scales fp32 [N, G], zeros uint8 [N, G]) ->
    the W4A16 kernel's (qweight_t uint8 [K//2, N], scales_t fp32 [G, N], zeros_t fp32 [G, N]),
    contiguous (`kernels/weight_only.py` says why)."""
    return (
        qweight.t().contiguous(),
        scales.float().t().contiguous(),
        zeros.float().t().contiguous(),
    )


def int4_weight_only_linear(x, qweight, scales, zeros, group_size, bias):
    """x [M, K] float, canonical int4 weight -> [M, N] x.dtype (the kernel contract). An op
    keeps nothing between calls, so the layout is prepared per call; a quantized module keeps
    it (the "triton_w4a16" layout below)."""
    return weight_only.int4_weight_only_linear(x, *kernel_layout(qweight, scales, zeros),
                                               group_size, bias)


def _unpack_int4(weight, n, k, group_size):
    qweight_t, scales_t, zeros_t = weight
    return {"qweight": qweight_t.t().contiguous(), "scales": scales_t.t().contiguous(),
            "zeros": zeros_t.t().to(torch.uint8).contiguous()}  # (integers 0..15: exact)


def _grad_int4(grad, weight, n, k, group_size):
    c = _unpack_int4(weight, n, k, group_size)
    return torch.ops.qtorch.int4_linear_grad_input(grad, c["qweight"], c["scales"], c["zeros"],
                                                   group_size)


# The module layout: what the kernel reads, kept once by a quantized module on a device where
# "auto" picks Triton (a GPU without the CUDA extension). The int8 kernels read the canonical
# layout, so they need none.
register_layout(Layout(
    "triton_w4a16", "w4a16", "triton", -1, ("packed_weight", "packed_scale", "packed_zero"),
    ("qweight", "scales", "zeros"),
    pack=lambda c, n, k, gs: dict(zip(("packed_weight", "packed_scale", "packed_zero"),
                                      kernel_layout(c["qweight"], c["scales"], c["zeros"]))),
    unpack=_unpack_int4,
    run=lambda x, w, bias, n, k, gs: weight_only.int4_weight_only_linear(x, *w, gs, bias),
    grad_input=_grad_int4,
))


register_kernel("quantize_int8", "triton")(int8_mm.quantize_int8)
register_kernel("int8_scaled_mm", "triton")(int8_mm.int8_scaled_mm)
register_kernel("int8_linear", "triton")(int8_mm.int8_linear)
register_kernel("int8_weight_only_linear", "triton")(weight_only.int8_weight_only_linear)
register_kernel("int4_weight_only_linear", "triton")(int4_weight_only_linear)
register_kernel("distillation_loss", "triton")(distillation.distillation_loss)
register_kernel("fused_linear_distillation_loss", "triton")(
    distillation.fused_linear_distillation_loss
)
