"""Quantizing a transformers model that is already loaded, so that `save_pretrained` writes a
qtorch checkpoint: `quantize_model(model, QtorchConfig(...), calibration_data=None)`.

It is also the two-step recipe for the calibrated algorithms (load the float model, then
quantize it with calibration data), and what `from_pretrained` runs after loading when its
QtorchConfig carries calibration_data.
"""

from __future__ import annotations

import inspect

from torch import nn

import qtorch
from qtorch.hf import _layers
from qtorch.hf.config import QtorchConfig
from qtorch.hf.quantizer import QtorchHfQuantizer, finish, tied_module_names


def quantize_model(
    model: nn.Module, config: QtorchConfig, calibration_data=None, progress: bool = False
) -> nn.Module:
    """Quantize a loaded transformers `model` in place with `config` and make it a qtorch model
    for transformers (model.hf_quantizer, config.quantization_config), so that
    `save_pretrained` writes its qtorch checkpoint and `from_pretrained` reloads it.

    Layers follow the same rules as quantizing on load: `modules_to_not_convert` (None: the
    output embedding, tied weights, the last module) stay float, a layer tied to another is
    kept float so the tie holds, and nn.Linear and transformers' Conv1D layers are converted.
    `calibration_data` (model inputs, as `qtorch.quantize_` takes them) is needed by GPTQ and
    SmoothQuant. `progress`: a progress bar over the layers (data-free configs). Returns
    `model`."""
    if not isinstance(config, QtorchConfig):
        raise TypeError(f"config must be a qtorch.hf.QtorchConfig, got {type(config).__name__}")
    previous = getattr(model, "hf_quantizer", None)
    if previous is not None:
        method = getattr(previous.quantization_config, "quant_method", None)
        if getattr(method, "value", method) != "gguf":
            raise ValueError(f"model is already quantized ({method}); load it in float")
        # a GGUF file loads dequantized, in float: what is left of GGUF is its bookkeeping
        previous.remove_quantization_config(model)
    quantizer = QtorchHfQuantizer(config, pre_quantized=False)
    _check_no_other_config(model, quantizer)
    if calibration_data is None:
        calibration_data = config.calibration_data
    if config.needs_calibration() and calibration_data is None:
        raise ValueError(
            f"QtorchConfig(algorithm={config.algorithm!r}, smoothquant_alpha="
            f"{config.smoothquant_alpha!r}, awq={config.awq!r}) needs calibration_data (model inputs)"
        )
    _quantize_loaded(model, quantizer, calibration_data, progress=progress)
    quantizer.warn_skipped()
    # what from_pretrained(..., quantization_config=config) leaves on the model
    model.hf_quantizer = quantizer
    quantizer.pre_quantized = True  # from now on the model holds quantized weights
    model.is_quantized = True
    model.quantization_method = config.quant_method
    model.config.quantization_config = config
    for mod in model.modules():
        if hasattr(mod, "config") and hasattr(mod.config, "to_dict"):
            mod.config._is_quantized = True
    return model


def _check_no_other_config(model: nn.Module, quantizer: QtorchHfQuantizer) -> None:
    """A qtorch checkpoint describes one config: a layer quantized otherwise before (e.g. by
    qtorch.quantize_ with another config) would be reloaded as the wrong module."""
    want = _layers.module_class(quantizer.qcfg)
    for name, mod in model.named_modules():
        if not isinstance(mod, _layers._QuantizedLinear):
            continue
        same = type(mod) is want and (
            want is not qtorch.nn.Int4WeightOnlyLinear
            or (mod.group_size, mod.symmetric)
            == (quantizer.qcfg.group_size, quantizer.qcfg.symmetric)
        )
        if not same:
            raise ValueError(
                f"{name} is already a {type(mod).__name__} ({mod._format()}), which "
                f"{quantizer.quantization_config.config} does not describe: a qtorch checkpoint "
                "holds one config; load the model in float and quantize it with one config"
            )


def _quantize_loaded(
    model: nn.Module, quantizer: QtorchHfQuantizer, calibration_data, progress: bool = False
) -> None:
    """Convert the float layers of a loaded model (module docstring of qtorch.hf.quantizer)."""
    quantizer.skip = quantizer.skip_list(model)
    quantizer.tied = tied_module_names(model)
    candidates = []
    for name, module in model.named_modules():
        dims = _layers.linear_dims(module)
        if dims is None or _layers.skipped_by(name, quantizer.skip) is not None:
            continue
        if name in quantizer.tied:
            quantizer.skipped[name] = (
                f"tied to {quantizer.tied[name]}; kept in float so the tie "
                "holds (tie_word_embeddings=False unties it)"
            )
            continue
        candidates.append((name, module))
    if calibration_data is not None or quantizer.quantization_config.needs_calibration():
        _quantize_calibrated(model, quantizer, candidates, calibration_data)
    else:
        bar = _progress(candidates, progress)
        for name, module in bar:
            new = _layers.quantize_layer(module, module.weight, quantizer.qcfg)
            if isinstance(new, str):
                quantizer.skipped[name] = new
                continue
            new._pack_deferred = True
            _layers.replace(model, name, new)
            quantizer.converted.append(name)
            del module
        finish(model, quantizer.converted)


def _progress(items, on: bool):
    if not on:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="Quantizing", unit="layer")


def _quantize_calibrated(model, quantizer, candidates, calibration_data) -> None:
    """Through qtorch.quantize_ (which runs the model on the calibration data): Conv1D layers
    become the equivalent nn.Linear first, and those it leaves float become Conv1D again."""
    if "calibration_data" not in inspect.signature(qtorch.quantize_).parameters:
        raise ValueError("calibration_data: this qtorch's quantize_ has no calibrated algorithms")
    conv1d = {}
    for name, module in candidates:
        if _layers.linear_dims(module)[2]:
            conv1d[name] = module
            _layers.replace(model, name, _layers.as_linear(module, module.weight))
    names = {name for name, _ in candidates}
    qtorch.quantize_(
        model,
        quantizer.qcfg,
        filter_fn=lambda mod, fqn: fqn in names,
        calibration_data=calibration_data,
    )
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, _layers._QuantizedLinear):
            mod._hf_conv1d = name in conv1d
            quantizer.converted.append(name)
        elif name in conv1d:  # left float: the original Conv1D (same weight) goes back
            _layers.replace(model, name, conv1d[name])
