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

from qtorch import _cache
from qtorch._backend import register_kernel
from qtorch._kernels import INTERPRET, distillation, int8_mm, weight_only


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


def _int4_packed(qweight, scales, zeros):
    # Keyed on qweight (the big tensor); scales/zeros are part of the key by identity and
    # version so a module that swaps them in place gets a fresh layout.
    key = ("triton_w4a16", id(scales), _cache._version(scales), id(zeros), _cache._version(zeros))
    return _cache.packed(qweight, key, lambda: kernel_layout(qweight, scales, zeros))


def int4_weight_only_linear(x, qweight, scales, zeros, group_size, bias):
    """x [M, K] float, canonical int4 weight -> [M, N] x.dtype (the kernel contract)."""
    return weight_only.int4_weight_only_linear(x, *_int4_packed(qweight, scales, zeros),
                                               group_size, bias)


register_kernel("quantize_int8", "triton")(int8_mm.quantize_int8)
register_kernel("int8_scaled_mm", "triton")(int8_mm.int8_scaled_mm)
register_kernel("int8_linear", "triton")(int8_mm.int8_linear)
register_kernel("int8_weight_only_linear", "triton")(weight_only.int8_weight_only_linear)
register_kernel("int4_weight_only_linear", "triton")(int4_weight_only_linear)
register_kernel("distillation_loss", "triton")(distillation.distillation_loss)
register_kernel("fused_linear_distillation_loss", "triton")(
    distillation.fused_linear_distillation_loss
)
