"""LoRA adapters on qtorch layers, through PEFT.

    peft_model = qtorch.hf.get_peft_model(model, peft.LoraConfig(r=8, target_modules=...))
    peft_model.save_pretrained(adapter_dir)
    peft_model = qtorch.hf.peft_from_pretrained(model, adapter_dir)      # PeftModel.from_pretrained
    merged = peft_model.merge_and_unload()                               # warns: see below

PEFT lets a library plug in its own LoRA layer for a layer type it does not know through
`LoraConfig._register_custom_module` (experimental in PEFT, per config object):
`register_lora_layers(config)` registers `QtorchLoraLinear` for the three qtorch modules, and
`get_peft_model` / `peft_from_pretrained` call it. A config made elsewhere (e.g. for
`PeftModel.add_adapter`) needs `register_lora_layers(config)` first; without it PEFT says
"Target module Int8DynamicLinear(...) is not supported".

`QtorchLoraLinear` is PEFT's LoRA `Linear` on a frozen qtorch base layer: forward is
base(x) + scale * B(A(dropout(x))), and the gradient reaches the adapters of earlier layers
through the base layers' own backward kernels (qtorch.nn). Plain LoRA only: DoRA and the other
variants, and initializations that read the base weight (PiSSA, OLoRA, LoftQ, ...), need a
float weight and raise. Merging cannot add ΔW to int8/int4 weights exactly: `merge()`
dequantizes, adds ΔW, and re-quantizes with the layer's own config (round to nearest), and warns
with the error that re-quantizing adds (also kept as `layer.merge_error`); `unmerge()`
restores the exact original layer. `merge_and_unload()` leaves the re-quantized layers.

`target_modules="all-linear"` takes the qtorch layers as well as nn.Linear / Conv1D, less the
output layer, as PEFT does for float models.
"""

from __future__ import annotations

import inspect
import warnings

import peft
import torch
from peft.tuners.lora.layer import Linear as _LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from qtorch.hf import _layers
from qtorch.nn import Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear
from qtorch.nn.linear import _QuantizedLinear, canonical_layout

QTORCH_LAYERS = (Int8DynamicLinear, Int8WeightOnlyLinear, Int4WeightOnlyLinear)


def _requantize_like(
    base: _QuantizedLinear, weight: torch.Tensor, bias: nn.Parameter | None
) -> _QuantizedLinear:
    """A module of base's class and config (round to nearest) holding `weight` [N, K]."""
    with torch.device("meta"):
        lin = nn.Linear(base.in_features, base.out_features, bias=False)
    lin.weight = nn.Parameter(weight, requires_grad=False)
    lin.bias = bias
    kw = {}
    if isinstance(base, Int4WeightOnlyLinear):
        kw = {"group_size": base.group_size, "symmetric": base.symmetric}
        if "zero_point" in inspect.signature(type(base).from_float).parameters and hasattr(
            base, "zero_point"
        ):
            kw["zero_point"] = base.zero_point
    with canonical_layout():
        new = type(base).from_float(lin, **kw)
    new._weight_dtype = base._compute_dtype()
    new._hf_conv1d = base.__dict__.get("_hf_conv1d", False)
    new._pack()
    return new


class QtorchLoraLinear(_LoraLinear):
    """PEFT's LoRA Linear on a qtorch base layer (module docstring)."""

    def __init__(
        self, base_layer, adapter_name, config, r: int = 0, lora_alpha: int = 1, **kwargs
    ) -> None:
        if config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to True but a qtorch layer computes x @ W.T "
                "(as nn.Linear does, whatever layer it was made from). Setting "
                "fan_in_fan_out to False.",
                stacklevel=2,
            )
            config.fan_in_fan_out = False
        super().__init__(
            base_layer, adapter_name, config=config, r=r, lora_alpha=lora_alpha, **kwargs
        )
        self.merge_error: dict | None = None

    def _get_in_out_features(self, module):
        if isinstance(module, _QuantizedLinear):
            return module.in_features, module.out_features
        return super()._get_in_out_features(module)

    def _get_base_layer_device_and_dtype(self, base_layer):
        # (reading base_layer.qweight would unpack a packed layout for nothing)
        if isinstance(base_layer, _QuantizedLinear):
            return base_layer._device(), base_layer._compute_dtype()
        return super()._get_base_layer_device_and_dtype(base_layer)

    def resolve_lora_variant(self, *, config, **kwargs):
        variant = super().resolve_lora_variant(config=config, **kwargs)
        if variant is not None:
            raise ValueError(
                f"qtorch layers take plain LoRA only: {type(variant).__name__} needs the float "
                "weight of the base layer; use plain LoRA, or a float base model"
            )
        return None

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """ŵ' = quantize(ŵ + Σ ΔW) with the base layer's config; warns with the error that adds
        (`self.merge_error`). The original base layer is kept for an exact `unmerge`."""
        adapter_names = [
            a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A
        ]
        if not adapter_names:
            return
        base = self.get_base_layer()
        if "smooth_scale" in base._buffers:
            raise ValueError(
                "merging a LoRA adapter into a SmoothQuant layer is not supported: "
                "keep the adapter unmerged"
            )
        w = base.dequantize()
        delta = sum(self.get_delta_weight(a).to(w) for a in adapter_names)
        target = w + delta
        bias = base.bias
        if any(self.lora_bias[a] for a in adapter_names):
            if bias is None:
                raise RuntimeError(
                    "Impossible to merge LoRA with `lora_bias=True` because the "
                    "base layer has no bias."
                )
            new_bias = bias.detach().float() + sum(
                self.lora_B[a].bias.detach().float() * self.scaling[a]
                for a in adapter_names
                if self.lora_bias[a]
            )
            bias = nn.Parameter(new_bias.to(bias.dtype), requires_grad=bias.requires_grad)
        if safe_merge and not (
            torch.isfinite(target).all() and (bias is None or torch.isfinite(bias).all())
        ):
            raise ValueError(
                f"NaNs detected in the merged weights. The adapter(s) "
                f"{adapter_names} seem to be broken"
            )
        new = _requantize_like(base, target, bias)
        err = new.dequantize() - target
        norm = lambda t: t.norm().item()  # noqa: E731
        self.merge_error = {
            "max_abs": err.abs().max().item(),
            "rel_to_delta": norm(err) / max(norm(delta), 1e-30),
            "rel_to_weight": norm(err) / max(norm(target), 1e-30),
        }
        e = self.merge_error
        name = self.kwargs.get("target_name") or type(base).__name__
        warnings.warn(
            f"qtorch: merging LoRA adapter(s) {adapter_names} into {name} "
            f"({type(base).__name__} {base.out_features}x{base.in_features}) re-quantizes "
            f"W + ΔW with the layer's config; that adds an error of {e['rel_to_delta']:.1%} of "
            f"‖ΔW‖ ({e['rel_to_weight']:.2%} of ‖W + ΔW‖, max |error| {e['max_abs']:.3g}) to the "
            "merged weight. Keep the adapter unmerged, or merge it into a float model, for the "
            "exact result.",
            UserWarning,
            stacklevel=2,
        )
        if not self.merged:  # the exact original, for unmerge (not a submodule: not saved)
            self.__dict__["_unmerged_base"] = base
        self.base_layer = new
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Restore the base layer as it was before the first merge (exact)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        original = self.__dict__.pop("_unmerged_base")
        self.base_layer = original.to(self.base_layer._device())
        self.merged_adapters.clear()
        self.merge_error = None

    def __repr__(self) -> str:
        return super().__repr__().replace("lora.Linear", "lora.QtorchLoraLinear", 1)


def register_lora_layers(config):
    """Make PEFT build `QtorchLoraLinear` on qtorch layers for this LoraConfig (PEFT's
    `_register_custom_module`); returns the config."""
    if not isinstance(config, peft.LoraConfig):
        raise TypeError(
            f"qtorch layers take LoRA adapters (peft.LoraConfig), got {type(config).__name__}"
        )
    config._register_custom_module(dict.fromkeys(QTORCH_LAYERS, QtorchLoraLinear))
    return config


def _all_linear(model: nn.Module, config) -> set[str]:
    """Every linear layer (nn.Linear, Conv1D, qtorch) but the output layer: the output
    embedding, or for sequence classification the classifier head."""
    names = {
        n
        for n, m in model.named_modules()
        if isinstance(m, _QuantizedLinear) or _layers.linear_dims(m) is not None
    }
    exclude = None
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        exclude = out
    elif str(getattr(config, "task_type", "")) in ("SEQ_CLS", "TaskType.SEQ_CLS"):
        from peft.utils.constants import SEQ_CLS_HEAD_NAMES

        exclude = next(
            (getattr(model, h) for h in SEQ_CLS_HEAD_NAMES if getattr(model, h, None) is not None),
            None,
        )
    if exclude is not None:
        names -= {n for n, m in model.named_modules() if m is exclude}
    return names


def get_peft_model(model: nn.Module, peft_config, **kwargs):
    """`peft.get_peft_model` for a model with qtorch layers: registers the qtorch LoRA layers
    on `peft_config` and resolves target_modules="all-linear" to the qtorch layers too."""
    register_lora_layers(peft_config)
    tm = peft_config.target_modules
    if isinstance(tm, str) and tm.lower() == "all-linear":
        names = _all_linear(model, peft_config)
        if not names:
            raise ValueError("target_modules='all-linear': the model has no linear layers")
        peft_config.target_modules = names
    return peft.get_peft_model(model, peft_config, **kwargs)


def peft_from_pretrained(
    model: nn.Module,
    model_id,
    adapter_name: str = "default",
    is_trainable: bool = False,
    config=None,
    **kwargs,
):
    """`peft.PeftModel.from_pretrained` for a model with qtorch layers (the adapter config
    read from `model_id` gets the qtorch LoRA layers registered)."""
    if config is None:
        config = peft.PeftConfig.from_pretrained(model_id)
    register_lora_layers(config)
    return peft.PeftModel.from_pretrained(
        model,
        model_id,
        adapter_name=adapter_name,
        is_trainable=is_trainable,
        config=config,
        **kwargs,
    )
