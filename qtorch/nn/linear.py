"""Quantized drop-in replacements for `nn.Linear`.

Each module holds its weight once, already quantized, and runs through the qtorch ops, so the
backend chosen at call time (`qtorch.use_backend`, `QTORCH_BACKEND`, "auto") serves it.

    Int8DynamicLinear     W8A8   qweight int8 [N, K], weight_scale fp32 [N], bias
    Int8WeightOnlyLinear  W8A16  qweight int8 [N, K], weight_scale fp32 [N], bias
    Int4WeightOnlyLinear  W4A16  qweight uint8 [N, K // 2], scales fp32 [N, K // gs],
                                 zeros uint8 [N, K // gs] (float32 with zero_point="float"),
                                 bias
    Int8DynamicLinear with SmoothQuant: also smooth_scale fp32 [K]

Those are the canonical buffers of API.md, what `state_dict` holds. Where the backend that
"auto" picks on the module's device wants another layout (the cpu backend's VNNI-packed int8,
its 16-channel int4 blocks; qtorch/_packed.py), the module owns that layout instead: it packs
its canonical buffers once (in `from_float`, `load_state_dict`, `.to()`, or its first call),
keeps the packed buffers (non-persistent) and drops the canonical ones it derived them from, so
one copy of the weight is resident. Anything that asks for a canonical buffer (the attribute,
`state_dict()`) gets it back: the module unpacks (bitwise) and runs from the canonical buffers
again, which it packs once more only when nothing else holds a reference to them. So a write
into them by any route (`.data`, numpy, `load_state_dict`, inference mode) is always seen, and
no result is computed from stale data; while someone holds them, calls pack per call.

Weights are frozen (buffers, no gradient); forward is differentiable w.r.t. the input and the
bias, so heads or adapters on top of a quantized backbone train. `bias` stays a float
`nn.Parameter` and follows `.to(dtype)` as in `nn.Linear`; the quantized buffers and their
fp32 scales never change dtype (see `_QuantizedLinear._apply`).

There is no float `weight`: reading or assigning `module.weight` raises an AttributeError that
says what to do (`dequantize()` for the float32 weight; tie, resize or merge weights before
quantizing). Code written for `nn.Linear` that reads `.weight` (weight tying, embedding
resizing, adapter merging) thus fails loudly instead of working on a copy whose writes would be
lost.

A loader that fills a model's modules one at a time and then hands the model to code that
rewrites non-persistent buffers (transformers' `from_pretrained` does, for every such buffer)
keeps the modules canonical until it is done: `module._pack_deferred = True`, and modules made
inside `with canonical_layout():` (e.g. by `from_float`) start canonical. It then clears the
flag and calls `module._pack()`.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import warnings

import torch
from torch import Tensor, nn

from qtorch import _backend, _checks, _packed, ops, quantizers, smoothquant
from qtorch.quantizers.grid import grid_for

__all__ = ["Int8DynamicLinear", "Int8WeightOnlyLinear", "Int4WeightOnlyLinear"]

try:  # the C++ eager fast path of the packed layouts (csrc/cpu/linear_packed.cpp)
    from qtorch._C import fast_linear as _fast_linear
    from qtorch._C import use_counts as _use_counts
except ImportError:
    _fast_linear = _use_counts = None

_is_compiling = torch.compiler.is_compiling
_warned_shared = False
_canonical_only = contextvars.ContextVar("qtorch_canonical_only", default=False)

_NO_WEIGHT = (
    "{cls} has no float `weight`: it holds its weight quantized ({buffers}). Use "
    "`.dequantize()` for the float32 weight [out_features, in_features]. Code that ties, resizes "
    "or merges weights (e.g. transformers' tie_weights / resize_token_embeddings) must run before "
    "quantizing, or on a layer kept in float (quantize_'s filter_fn, "
    "QtorchConfig(modules_to_not_convert=[...]))."
)


@contextlib.contextmanager
def canonical_layout():
    """Quantized modules made or loaded inside keep their canonical buffers (no packed layout)
    until `_pack()` is called outside it; see the module docstring."""
    token = _canonical_only.set(True)
    try:
        yield
    finally:
        _canonical_only.reset(token)


def _storage_counts(t: Tensor) -> tuple[int, int, int]:
    """(references to t's TensorImpl, references to its storage, Python references to the
    storage's Python object), not counting this call's. The storage's Python object is made
    first: once anything has asked for it (`t.untyped_storage()`, as safetensors, transformers'
    save_pretrained and huggingface_hub do for every tensor they save), torch keeps it, and its
    reference to the storage, for the storage's lifetime, so the counts of a tensor nobody else
    holds are those of `_SOLE` below, whether or not it was asked for before."""
    s = t.untyped_storage()
    if _use_counts is not None:
        impl, storage = _use_counts(t)
    else:  # without the extension only these private accessors tell (no public route)
        impl, storage = t._use_count(), torch._C._storage_Use_Count(s._cdata)
    return impl, storage, sys.getrefcount(s)


def _sole_counts() -> tuple[int, int, int]:
    return _storage_counts(torch.empty(1))


_SOLE = _sole_counts()  # the counts of a tensor that nothing else holds


def _sole_owner(buffers: dict, name: str) -> bool:
    """Nothing but `buffers` refers to buffers[name]: no other Python reference, no other
    tensor sharing its storage (views, `.data`, numpy), no C++ holder (autograd, DLPack)."""
    t = buffers[name]
    if sys.getrefcount(t) > 3:  # the dict's, `t` and getrefcount's argument
        return False
    return _storage_counts(t) == _SOLE


def _own(t: Tensor) -> Tensor:
    """t, or a copy of it when it shares its storage (a view of another tensor, a memory map),
    so that the module can later tell that nothing else holds its buffer."""
    return t if _storage_counts(t)[1:] == _SOLE[1:] else t.clone()


def _calibrated(linear: nn.Linear, algorithm: str, grid) -> dict[str, Tensor]:
    """The canonical buffers of a data-free non-RTN algorithm for linear's weight."""
    quantizers.check_algorithm(algorithm)
    if algorithm == "gptq":
        raise ValueError(
            'algorithm="gptq" needs calibration data: use qtorch.quantize_(model, '
            "config, calibration_data=...)"
        )
    return quantizers.quantize_weight(grid, linear.weight.detach(), algorithm)


class _QuantizedLinear(nn.Module):
    """Shared plumbing: shapes, bias, the packed layout, dtype-stable buffers, repr."""

    _FAMILY: str = ""  # "w8a8" | "w8a16" | "w4a16" (qtorch/_packed.py)
    _OP: str = ""  # the public qtorch op the module computes
    _pack_deferred: bool = False  # True: stay canonical until a loader clears it (docstring)

    def __init__(self, in_features: int, out_features: int, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias)
        self.bias = bias
        self._layout: _packed.Layout | None = None
        for name in ("packed_weight", "packed_scale", "packed_zero", "packed_meta"):
            self.register_buffer(name, None, persistent=False)

    @classmethod
    def _from_quantized(cls, linear: nn.Linear, buffers: dict[str, Tensor], **init_kw):
        """A module of `linear`'s shape and bias holding `buffers` (canonical storage, made by
        a weight quantizer: qtorch.quantizers). The dict is emptied: the module must be the
        buffers' only holder to pack them."""
        cls._check_linear(linear)
        mod = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias,
            device=linear.weight.device,
            **init_kw,
        )
        mod._weight_dtype = linear.weight.dtype
        while buffers:
            name, t = buffers.popitem()
            setattr(mod, name, _own(t))
            del t
        mod._pack()
        return mod

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

    # -- the layout --------------------------------------------------------------------------

    def _group_size(self) -> int:
        return 0

    def _compute_dtype(self) -> torch.dtype:
        """The activations' dtype this module most likely sees (a layout may depend on it):
        its bias's, else that of the weight it was made from."""
        bias = self._parameters.get("bias")
        if bias is not None:
            return bias.dtype
        return self.__dict__.get("_weight_dtype", torch.float32)

    def _device(self) -> torch.device:
        b = self._buffers
        t = b["qweight"] if b.get("qweight") is not None else b["packed_weight"]
        return t.device

    def _pack(self) -> bool:
        """Canonical -> the layout of the backend "auto" picks on this device, if it has one
        and nothing but this module holds the canonical buffers it replaces. True if packed."""
        if self._layout is not None:
            return True
        if self._pack_deferred or _canonical_only.get():
            return False
        layout = _packed.layout_for(self._FAMILY, self._device(), self._compute_dtype())
        if layout is None or not self._layout_takes(layout):
            return False
        b = self._buffers
        if not all(_sole_owner(b, name) for name in layout.derived):
            global _warned_shared
            if not _warned_shared:
                _warned_shared = True
                warnings.warn(
                    f"qtorch: a {type(self).__name__}'s canonical weight buffers are referenced "
                    f"outside the module (e.g. a kept `.qweight` or `state_dict()`), so it "
                    f"repacks its weight on every call until those references are gone",
                    stacklevel=3,
                )
            return False
        canon = {name: b[name] for name in _packed.FAMILIES[self._FAMILY][2]}
        packed = layout.pack(canon, self.out_features, self.in_features, self._group_size())
        del canon
        for name, t in packed.items():
            b[name] = t
        self._layout = layout
        for name in layout.derived:
            b[name] = None
        return True

    def _layout_takes(self, layout: _packed.Layout) -> bool:
        """Whether `layout` can hold this module's weight (else it runs canonical)."""
        return True

    def _extra_weight(self) -> list[Tensor]:
        """Tensors the module passes after its layout's buffers (SmoothQuant's smooth_scale)."""
        return []

    def _unpack(self) -> None:
        """The packed layout -> the canonical buffers (bitwise), which the module then runs
        from; the packed buffers are dropped."""
        layout = self._layout
        if layout is None:
            return
        b = self._buffers
        weight = [b[name] for name in layout.buffers]
        canon = layout.unpack(weight, self.out_features, self.in_features, self._group_size())
        del weight
        for name, t in canon.items():
            b[name] = t
        self._layout = None
        for name in layout.buffers:
            if name not in canon and name.startswith("packed_"):
                b[name] = None

    def _canonical(self) -> dict[str, Tensor]:
        """The canonical buffers without changing the module's state (unpacked copies when
        packed), for `dequantize`."""
        layout = self._layout
        if layout is None:
            return {name: self._buffers[name] for name in _packed.FAMILIES[self._FAMILY][2]}
        weight = [self._buffers[name] for name in layout.buffers]
        return layout.canonical(weight, self.out_features, self.in_features, self._group_size())

    def _no_weight(self) -> AttributeError:
        buffers = ", ".join(_packed.FAMILIES[self._FAMILY][2]) if self._FAMILY else "buffers"
        return AttributeError(_NO_WEIGHT.format(cls=type(self).__name__, buffers=buffers))

    def __setattr__(self, name: str, value) -> None:
        if name == "weight":  # a float weight set here would be ignored by forward
            raise self._no_weight()
        # Assigning a canonical buffer the packed layout replaced: run from the canonical
        # buffers again (the packed ones are stale now).
        layout = self.__dict__.get("_layout")
        if layout is not None and name in layout.derived:
            self._unpack()
        super().__setattr__(name, value)

    def __getattr__(self, name: str):
        if name == "weight":
            raise self._no_weight()
        # A canonical buffer the packed layout replaced: unpack (its writes must be seen).
        layout = self.__dict__.get("_layout")
        if layout is not None and name in layout.derived:
            self._unpack()
        return super().__getattr__(name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._unpack()  # the state dict holds (and aliases) the canonical buffers
        super()._save_to_state_dict(destination, prefix, keep_vars)

    # What a state dict may hold for each canonical buffer (API.md, "Modules"): integer buffers
    # by exact dtype and value range (load_state_dict would otherwise cast a float qweight by
    # truncation, wrap an int32 300 or take a zero point of 200 without a word); float scales,
    # which only warn when non-finite (a NaN scale is a valid float, but its outputs are NaN).
    _INT_BUFFERS: dict = {}  # key -> (dtype, (lo, hi) | None)
    _SCALE_BUFFERS: tuple = ()

    # Buffers that may also come as float32 (int4 zeros with zero_point="float"): then they
    # are checked as scales are (finite, or a warning), not by the integer rule.
    _FLOAT_OK: tuple = ()

    def _check_state(self, state_dict, prefix) -> None:
        float_keys = []
        for key, (dtype, bounds) in self._INT_BUFFERS.items():
            t = state_dict.get(prefix + key)
            if not isinstance(t, Tensor):
                continue  # missing keys are load_state_dict's to report
            if key in self._FLOAT_OK and t.dtype == torch.float32:
                float_keys.append(key)
                continue
            if t.dtype != dtype:
                raise TypeError(
                    f"{prefix + key} must have dtype {dtype} in the state dict of "
                    f"{type(self).__name__}, got {t.dtype}"
                )
            if bounds is not None and t.numel() and not t.is_meta:
                lo, hi = bounds
                bad = (t < lo) | (t > hi)
                if bool(bad.any()):
                    raise ValueError(
                        f"{prefix + key} must hold values in [{lo}, {hi}], got "
                        f"{int(t[bad][0])} ({int(bad.sum())} value(s) out of range)"
                    )
        for key in (*self._SCALE_BUFFERS, *float_keys):
            t = state_dict.get(prefix + key)
            if not isinstance(t, Tensor):
                continue
            if not t.is_floating_point():
                raise TypeError(
                    f"{prefix + key} must be a float32 tensor in the state dict of "
                    f"{type(self).__name__}, got {t.dtype}"
                )
            if t.numel() and not t.is_meta and not bool(torch.isfinite(t).all()):
                warnings.warn(
                    f"{prefix + key} holds non-finite values (NaN or inf): the outputs "
                    f"that use them will be NaN or inf",
                    RuntimeWarning,
                    stacklevel=4,
                )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        self._check_state(state_dict, prefix)
        self._unpack()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._pack()

    def _apply(self, fn, recurse=True):
        # nn.Module._apply hands every float buffer to fn, so `model.to(torch.bfloat16)` would
        # round the fp32 scales to bf16 (and quantize them a second time). Keep every buffer's
        # dtype and take only the device from fn's result. A packed layout belongs to one
        # device's backend: unpack, move, and pack again for the new device.
        self._unpack()
        self._apply_keeping_dtypes(fn, recurse)
        self._pack()
        return self

    def _apply_keeping_dtypes(self, fn, recurse):
        # (a function of its own: the references it takes die with it, so _pack can tell
        # that nothing but the module holds the buffers)
        keep = {name: t for name, t in self._buffers.items() if t is not None}
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self.__dict__.get("_weight_dtype", torch.float32)))
        if isinstance(probe, Tensor) and probe.is_floating_point():
            self._weight_dtype = probe.dtype  # what .half() / .to(bf16) make it compute in
        for name, old in keep.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)

    # -- forward -----------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        layout = self._layout
        if layout is None and not _is_compiling() and self._pack():
            layout = self._layout
        bias = self._parameters.get("bias")
        if layout is None:
            kind, weight = self._canonical_spec()
            return _run_canonical(kind, weight, bias, self._group_size(), x)
        b = self._buffers
        weight = [b[name] for name in layout.buffers] + self._extra_weight()
        return _run_layout(
            layout, weight, bias, self.out_features, self.in_features, self._group_size(), x
        )

    def _forward_spec(self) -> tuple:
        """What `forward` computes, as op arguments: (kind, tensors, bias, n, k, group_size),
        run by `run_forward_spec(spec, x)`. kind is "packed:<layout>" (tensors: the layout's
        buffers, then `_extra_weight`) or the module's canonical op (`_canonical_spec`). The
        fused distillation loss passes a quantized teacher head this way through its custom op
        (a module is not an op argument), so that route traces under torch.compile too.
        Packs the weight first in eager mode, as forward does."""
        if self._layout is None and not _is_compiling():
            self._pack()
        layout = self._layout
        bias = self._parameters.get("bias")
        n, k, gs = self.out_features, self.in_features, self._group_size()
        if layout is None:
            kind, weight = self._canonical_spec()
            return kind, weight, bias, n, k, gs
        b = self._buffers
        weight = [b[name] for name in layout.buffers] + self._extra_weight()
        return "packed:" + layout.name, weight, bias, n, k, gs

    def _canonical_spec(self) -> tuple[str, list[Tensor]]:
        """(canonical op name, its weight tensors): what the module runs unpacked."""
        raise NotImplementedError

    def dequantize(self) -> Tensor:
        """The weight the module multiplies by: float32 [out_features, in_features]."""
        raise NotImplementedError

    def _format(self) -> str:
        raise NotImplementedError

    def extra_repr(self) -> str:
        choice = _backend.get_backend()
        device = self._device()
        try:
            served = _backend.resolve(self._OP, device)[0]
            backend = served if choice == served else f"{choice} -> {served}"
        except RuntimeError:  # e.g. use_backend("cuda") while the module is on the CPU
            backend = f"{choice} (cannot run on {device.type})"
        layout = "canonical" if self._layout is None else self._layout.name
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self._format()}, backend={backend}, layout={layout}"
        )


class _Int8Linear(_QuantizedLinear):
    """Per-output-channel symmetric int8 weight: ŵ[n, k] = qweight[n, k] * weight_scale[n]."""

    _INT_BUFFERS = {"qweight": (torch.int8, None)}
    _SCALE_BUFFERS = ("weight_scale",)

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
    def from_float(cls, linear: nn.Linear, algorithm: str = "rtn"):
        """Quantize `linear.weight` once (qtorch.ops.quantize_int8, per output channel; with
        algorithm="mse" the per-row range of qtorch.quantizers.mse). The new module reuses
        `linear.bias` (the same Parameter, no copy). "gptq" needs calibration data: use
        qtorch.quantize_(..., calibration_data=...)."""
        cls._check_linear(linear)
        if algorithm != "rtn":
            return cls._from_quantized(linear, _calibrated(linear, algorithm, grid_for("int8")))
        mod = cls(
            linear.in_features, linear.out_features, bias=linear.bias, device=linear.weight.device
        )
        mod._weight_dtype = linear.weight.dtype
        qweight, scale = ops.quantize_int8(linear.weight.detach())
        mod.qweight, mod.weight_scale = _own(qweight), _own(scale)
        del qweight, scale
        mod._pack()
        return mod

    def dequantize(self) -> Tensor:
        c = self._canonical()
        return c["qweight"].float() * c["weight_scale"][:, None]


class Int8DynamicLinear(_Int8Linear):
    """W8A8 dynamic: x [..., K] is quantized per token at run time, int8 x int8 GEMM with exact
    int32 accumulation, rescaled by scale_x[m] * weight_scale[n]; output [..., N] in x.dtype.
    The backward treats activation quantization as the identity (straight-through):
    dx = grad @ ŵ.

    SmoothQuant (API.md "Calibrated quantization"; `from_float(linear, smooth_scale=s)`): one
    more buffer, `smooth_scale` fp32 [K] (registered, and in the state dict, only then); qweight / weight_scale
    are the int8 weight of W · diag(s), and the forward is int8_linear(x / s, ...), the division
    fused into each backend's activation quantization (qtorch.ops.int8_linear_smooth)."""

    _OP = "int8_linear"
    _FAMILY = "w8a8"

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        algorithm: str = "rtn",
        smoothquant_alpha: float | None = None,
        *,
        act_absmax: Tensor | None = None,
        smooth_scale: Tensor | None = None,
    ):
        """Quantize `linear.weight` once (qtorch.ops.quantize_int8, per output channel; with
        algorithm="mse" the per-row range of qtorch.quantizers.mse). Reuses `linear.bias`.
        SmoothQuant: with `smooth_scale` s (fp32 [in_features], positive), or with
        `smoothquant_alpha` and `act_absmax` (max|x_k| fp32 [in_features] over calibration
        inputs, from which s = qtorch.smoothquant.smooth_scale(act_absmax, W, alpha)), the
        weight quantized (by `algorithm`, "rtn" or "mse") is W · diag(s) and the module
        divides its input by s."""
        cls._check_linear(linear)
        w = linear.weight.detach()
        if smooth_scale is None and smoothquant_alpha is not None:
            if act_absmax is None:
                raise ValueError(
                    "smoothquant_alpha needs the layer's input statistics: pass act_absmax, or "
                    "quantize through qtorch.quantize_(..., calibration_data=...)"
                )
            if act_absmax.shape != (linear.in_features,):
                raise ValueError(
                    f"act_absmax must have shape ({linear.in_features},), got "
                    f"{tuple(act_absmax.shape)}"
                )
            smooth_scale = smoothquant.smooth_scale(act_absmax, w, smoothquant_alpha)
        if smooth_scale is None:
            return super().from_float(linear, algorithm)
        _checks.smooth_scale(smooth_scale, linear.in_features, w.device)
        quantizers.check_algorithm(algorithm)
        if algorithm == "gptq":
            raise ValueError(
                "SmoothQuant with algorithm='gptq' is not supported yet: use "
                "algorithm='rtn' or 'mse'"
            )
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias, device=w.device)
        mod._weight_dtype = w.dtype
        ws = w.float() * smooth_scale[None, :]
        if algorithm == "mse":
            c = quantizers.quantize_weight(grid_for("int8"), ws, "mse")
            qweight, scale = c.pop("qweight"), c.pop("weight_scale")
        else:
            qweight, scale = ops.quantize_int8(ws)
        del ws
        mod.qweight, mod.weight_scale = _own(qweight), _own(scale)
        mod.register_buffer("smooth_scale", smooth_scale.detach().clone())  # fp32 [K]
        del qweight, scale
        mod._pack()
        return mod

    def _extra_weight(self) -> list[Tensor]:
        s = self._buffers.get("smooth_scale")
        return [] if s is None else [s]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A SmoothQuant checkpoint loads into a module made without it (e.g. quantize_ with
        # the same config but other calibration data, or an empty module): it gains the buffer.
        key = prefix + "smooth_scale"
        if key in state_dict and self._buffers.get("smooth_scale") is None:
            self.register_buffer(
                "smooth_scale",
                torch.ones(self.in_features, dtype=torch.float32, device=self._device()),
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def dequantize(self) -> Tensor:
        """The weight the module multiplies x by: float32 [N, K], (ŵ of W · diag(s)) / s with
        SmoothQuant."""
        w = super().dequantize()
        s = self._buffers.get("smooth_scale")
        return w if s is None else w / s[None, :]

    def _format(self) -> str:
        smooth = ", smoothquant" if self._buffers.get("smooth_scale") is not None else ""
        return f"bits=8, weight=int8 per-channel, activation=int8 dynamic per-token{smooth}"

    def _canonical_spec(self) -> tuple[str, list[Tensor]]:
        s = self._buffers.get("smooth_scale")
        if s is not None:
            return "int8_linear_smooth", [self.qweight, self.weight_scale, s]
        return "int8_linear", [self.qweight, self.weight_scale]


class Int8WeightOnlyLinear(_Int8Linear):
    """W8A16: x [..., K] @ ŵ.T + bias with fp32 accumulation, output [..., N] in x.dtype."""

    _OP = "int8_weight_only_linear"
    _FAMILY = "w8a16"

    def _format(self) -> str:
        return "bits=8, weight=int8 per-channel, activation=x.dtype"

    def _canonical_spec(self) -> tuple[str, list[Tensor]]:
        return "int8_weight_only_linear", [self.qweight, self.weight_scale]


class Int4WeightOnlyLinear(_QuantizedLinear):
    """W4A16, group-wise asymmetric (or symmetric) int4 weight, canonical storage (API.md):
    ŵ[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g], g = k // group_size; q packed two per
    byte, element k in the low nibble of byte k // 2 when k is even, the high nibble when odd.
    Output [..., N] in x.dtype, fp32 accumulation."""

    _OP = "int4_weight_only_linear"
    _FAMILY = "w4a16"
    # qweight: two nibbles a byte, so every uint8 is valid; a zero point is one int4 code.
    _INT_BUFFERS = {"qweight": (torch.uint8, None), "zeros": (torch.uint8, (0, 15))}
    _SCALE_BUFFERS = ("scales",)
    _FLOAT_OK = ("zeros",)  # zero_point="float": float32 zeros (API.md)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool | nn.Parameter | None = True,
        group_size: int = 128,
        symmetric: bool = False,
        device=None,
        zero_point: str = "int",
    ) -> None:
        """An empty module, e.g. to `load_state_dict` into; `from_float` fills one.
        zero_point="float": float32 zeros (API.md "Calibrated quantization")."""
        _checks.group_size(group_size)
        _checks.zero_point(zero_point, symmetric)
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
        self._zero_point = zero_point
        zdt = torch.float32 if zero_point == "float" else torch.uint8
        self.register_buffer(
            "zeros", torch.full((out_features, groups), 8, dtype=zdt, device=device)
        )

    @property
    def zero_point(self) -> str:
        """ "int" (uint8 zeros) or "float" (float32 zeros): what the zeros buffer holds."""
        return self._zero_point

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        group_size: int = 128,
        symmetric: bool = False,
        algorithm: str = "rtn",
        zero_point: str = "int",
        awq: bool = False,
    ):
        """Quantize `linear.weight` once (qtorch.ops.quantize_int4). Needs
        in_features % group_size == 0 (ValueError otherwise). Reuses `linear.bias`. With
        algorithm="mse" the ranges come from qtorch.quantizers.mse; "gptq" and awq=True need
        calibration data: use qtorch.quantize_(..., calibration_data=...)."""
        cls._check_linear(linear)
        if awq:
            raise ValueError(
                "awq=True needs calibration data and the layer's input producer: use "
                "qtorch.quantize_(model, Int4WeightOnlyConfig(..., awq=True), calibration_data=...)"
            )
        if algorithm != "rtn":
            if linear.in_features % group_size:
                raise ValueError(
                    f"in_features={linear.in_features} must be divisible by group_size={group_size}"
                )
            grid = grid_for("int4", group_size, symmetric, zero_point)
            return cls._from_quantized(
                linear,
                _calibrated(linear, algorithm, grid),
                group_size=group_size,
                symmetric=symmetric,
                zero_point=zero_point,
            )
        mod = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias,
            group_size=group_size,
            symmetric=symmetric,
            device=linear.weight.device,
            zero_point=zero_point,
        )
        mod._weight_dtype = linear.weight.dtype
        qweight, scales, zeros = ops.quantize_int4(
            linear.weight.detach(), group_size, symmetric, zero_point
        )
        mod.qweight, mod.scales, mod.zeros = _own(qweight), _own(scales), _own(zeros)
        del qweight, scales, zeros
        mod._pack()
        return mod

    def _group_size(self) -> int:
        return self.group_size

    def _layout_takes(self, layout: _packed.Layout) -> bool:
        # The CUDA W4A16 layout keeps MAGIC + zero in a 16-bit word, which would round a float
        # zero point: such a module stays canonical there (the op then serves it exactly).
        z = self._buffers.get("zeros")
        return not (layout.backend == "cuda" and z is not None and z.dtype == torch.float32)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # zeros of the other kind (float32 for a module made with integer zero points, or the
        # reverse): the buffer takes the checkpoint's dtype, as the state dict says which grid.
        z = state_dict.get(prefix + "zeros")
        if isinstance(z, Tensor) and z.dtype in _checks.INT4_ZERO_DTYPES:
            self._unpack()
            cur = self._buffers.get("zeros")
            if cur is not None and cur.dtype != z.dtype:
                self._buffers["zeros"] = cur.to(z.dtype)
                self._zero_point = "float" if z.dtype == torch.float32 else "int"
            del cur  # (a reference held here would keep the module from packing)
        del z
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def dequantize(self) -> Tensor:
        c = self._canonical()
        return ops.dequantize_int4(c["qweight"], c["scales"], c["zeros"], self.group_size)

    def _format(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        if self.zero_point == "float":
            kind += ", float zero points"
        return f"bits=4, group_size={self.group_size}, {kind}, activation=x.dtype"

    def _canonical_spec(self) -> tuple[str, list[Tensor]]:
        return "int4_weight_only_linear", [self.qweight, self.scales, self.zeros]


def _run_layout(layout, weight, bias, n, k, gs, x):
    if _fast_linear is not None and layout.code >= 0 and not _is_compiling():
        out = _fast_linear(x, layout.code, n, k, gs, bias, *weight)
        if out is not None:
            return out
    _checks.tensor("x", x)  # the dispatcher would reject a non-tensor with a RuntimeError
    return torch.ops.qtorch.linear_packed(x, *_packed.flat(weight), bias, layout.name, n, k, gs)


def _run_canonical(kind, weight, bias, gs, x):
    if kind == "int4_weight_only_linear":
        return ops.int4_weight_only_linear(x, *weight, gs, bias)
    if kind in ("int8_linear", "int8_linear_smooth", "int8_weight_only_linear"):
        return getattr(ops, kind)(x, *weight, bias)
    raise ValueError(f"unknown quantized linear kind {kind!r}")


def run_forward_spec(spec: tuple, x: Tensor) -> Tensor:
    """A quantized linear module's forward from its `_forward_spec()` (kind, tensors, bias, n,
    k, group_size): the module's own kernel, the same calls as its forward, whether it runs
    as a module or, as a teacher head, inside the fused distillation loss's custom op."""
    kind, weight, bias, n, k, gs = spec
    if kind.startswith("packed:"):
        layout = _packed.layout_named(kind[len("packed:") :])
        return _run_layout(layout, weight, bias, n, k, gs, x)
    return _run_canonical(kind, weight, bias, gs, x)
