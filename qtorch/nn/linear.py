"""Quantized drop-in replacements for `nn.Linear`.

Each module stores its weight once, already quantized, in the canonical layout of API.md
(the state dict holds exactly these buffers), and runs through the `qtorch.ops` custom ops, so
the backend chosen at call time (`qtorch.use_backend`, `QTORCH_BACKEND`, "auto") serves it and
any backend-specific repacking is cached by the backend, never stored here.

    Int8DynamicLinear     W8A8   qweight int8 [N, K], weight_scale fp32 [N], bias
    Int8WeightOnlyLinear  W8A16  qweight int8 [N, K], weight_scale fp32 [N], bias
    Int4WeightOnlyLinear  W4A16  qweight uint8 [N, K // 2], scales fp32 [N, K // gs],
                                 zeros uint8 [N, K // gs], bias

Weights are frozen (buffers, no gradient); forward is differentiable w.r.t. the input and the
bias, so heads or adapters on top of a quantized backbone train. `bias` stays a float
`nn.Parameter` and follows `.to(dtype)` as in `nn.Linear`; the quantized buffers and their
fp32 scales never change dtype (see `_QuantizedLinear._apply`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qtorch import _backend, _checks, ops

__all__ = ["Int8DynamicLinear", "Int8WeightOnlyLinear", "Int4WeightOnlyLinear"]


class _QuantizedLinear(nn.Module):
    """Shared plumbing: shapes, bias, dtype-stable buffers, repr."""

    # Buffers whose dtype is part of the format (fp32 scales): `.to(dtype)`, `.half()` and
    # friends must move them between devices but never cast them.
    _FIXED_DTYPE_BUFFERS: tuple[str, ...] = ()
    _OP: str = ""  # the qtorch op forward calls, for the backend shown in extra_repr

    def __init__(self, in_features: int, out_features: int, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias)
        self.bias = bias

    @staticmethod
    def _check_linear(linear: nn.Module) -> None:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if linear.weight.dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(
                f"linear.weight must be float32, float16 or bfloat16, got {linear.weight.dtype}"
            )
        if linear.in_features < 1 or linear.out_features < 1:
            raise ValueError(
                f"linear must have in_features, out_features >= 1, got "
                f"({linear.in_features}, {linear.out_features})"
            )

    def _apply(self, fn, recurse=True):
        # nn.Module._apply hands every float buffer to fn, so `model.to(torch.bfloat16)` would
        # round the fp32 scales to bf16 (and quantize them a second time). Keep the originals
        # and take only the device from fn's result.
        keep = {name: self._buffers[name] for name in self._FIXED_DTYPE_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    def dequantize(self) -> Tensor:
        """The weight the module multiplies by: float32 [out_features, in_features]."""
        raise NotImplementedError

    def _format(self) -> str:
        raise NotImplementedError

    def extra_repr(self) -> str:
        choice = _backend.get_backend()
        device = self._buffers["qweight"].device
        try:
            served = _backend.resolve(self._OP, device)[0]
            backend = served if choice == served else f"{choice} -> {served}"
        except RuntimeError:  # e.g. use_backend("cuda") while the module is on the CPU
            backend = f"{choice} (cannot run on {device.type})"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self._format()}, backend={backend}"
        )


class _Int8Linear(_QuantizedLinear):
    """Per-output-channel symmetric int8 weight: ŵ[n, k] = qweight[n, k] * weight_scale[n]."""

    _FIXED_DTYPE_BUFFERS = ("weight_scale",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool | nn.Parameter | None = True,
        device=None,
    ) -> None:
        """An empty module (zeros), e.g. to `load_state_dict` into; `from_float` fills one."""
        if bias is True:
            bias = nn.Parameter(torch.zeros(out_features, device=device))
        elif bias is False:
            bias = None
        super().__init__(in_features, out_features, bias)
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer(
            "weight_scale", torch.ones(out_features, dtype=torch.float32, device=device)
        )

    @classmethod
    def from_float(cls, linear: nn.Linear):
        """Quantize `linear.weight` once (qtorch.ops.quantize_int8, per output channel). The
        new module reuses `linear.bias` (the same Parameter, no copy)."""
        cls._check_linear(linear)
        qweight, scale = ops.quantize_int8(linear.weight.detach())
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias,
                  device=linear.weight.device)
        mod.qweight = qweight
        mod.weight_scale = scale
        return mod

    def dequantize(self) -> Tensor:
        return self.qweight.float() * self.weight_scale[:, None]


class Int8DynamicLinear(_Int8Linear):
    """W8A8 dynamic: x [..., K] is quantized per token at run time, int8 x int8 GEMM with exact
    int32 accumulation, rescaled by scale_x[m] * weight_scale[n]; output [..., N] in x.dtype.
    The backward treats activation quantization as the identity (straight-through):
    dx = grad @ ŵ."""

    _OP = "int8_linear"

    def _format(self) -> str:
        return "bits=8, weight=int8 per-channel, activation=int8 dynamic per-token"

    def forward(self, x: Tensor) -> Tensor:
        return ops.int8_linear(x, self.qweight, self.weight_scale, self.bias)


class Int8WeightOnlyLinear(_Int8Linear):
    """W8A16: x [..., K] @ ŵ.T + bias with fp32 accumulation, output [..., N] in x.dtype."""

    _OP = "int8_weight_only_linear"

    def _format(self) -> str:
        return "bits=8, weight=int8 per-channel, activation=x.dtype"

    def forward(self, x: Tensor) -> Tensor:
        return ops.int8_weight_only_linear(x, self.qweight, self.weight_scale, self.bias)


class Int4WeightOnlyLinear(_QuantizedLinear):
    """W4A16, group-wise asymmetric (or symmetric) int4 weight, canonical storage (API.md):
    ŵ[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g], g = k // group_size; q packed two per
    byte, element k in the low nibble of byte k // 2 when k is even, the high nibble when odd.
    Output [..., N] in x.dtype, fp32 accumulation."""

    _FIXED_DTYPE_BUFFERS = ("scales",)
    _OP = "int4_weight_only_linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool | nn.Parameter | None = True,
        group_size: int = 128,
        symmetric: bool = False,
        device=None,
    ) -> None:
        """An empty module, e.g. to `load_state_dict` into; `from_float` fills one."""
        _checks.group_size(group_size)
        if in_features % group_size:
            raise ValueError(
                f"in_features={in_features} must be divisible by group_size={group_size}"
            )
        if bias is True:
            bias = nn.Parameter(torch.zeros(out_features, device=device))
        elif bias is False:
            bias = None
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size
        self.symmetric = bool(symmetric)
        groups = in_features // group_size
        self.register_buffer(
            "qweight",
            torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device),
        )
        self.register_buffer(
            "scales", torch.ones(out_features, groups, dtype=torch.float32, device=device)
        )
        self.register_buffer(
            "zeros", torch.full((out_features, groups), 8, dtype=torch.uint8, device=device)
        )

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 128, symmetric: bool = False):
        """Quantize `linear.weight` once (qtorch.ops.quantize_int4). Needs
        in_features % group_size == 0 (ValueError otherwise). Reuses `linear.bias`."""
        cls._check_linear(linear)
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias,
                  group_size=group_size, symmetric=symmetric, device=linear.weight.device)
        qweight, scales, zeros = ops.quantize_int4(linear.weight.detach(), group_size, symmetric)
        mod.qweight, mod.scales, mod.zeros = qweight, scales, zeros
        return mod

    def dequantize(self) -> Tensor:
        return ops.dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size)

    def _format(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"bits=4, group_size={self.group_size}, {kind}, activation=x.dtype"

    def forward(self, x: Tensor) -> Tensor:
        return ops.int4_weight_only_linear(
            x, self.qweight, self.scales, self.zeros, self.group_size, self.bias
        )
