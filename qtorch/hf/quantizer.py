"""`QtorchHfQuantizer`: what transformers' `from_pretrained` calls for quant_method "qtorch".

Quantizing while loading (`from_pretrained(path, quantization_config=QtorchConfig(...))`):
transformers reads one checkpoint tensor at a time and, for each weight that
`param_needs_quantization` claims, hands it to `QtorchQuantize.convert`, which replaces that
layer by its qtorch module at once; the float weight is then dropped (and its pages of the
checkpoint's memory map released, qtorch/hf/_memory.py). Peak memory is the quantized model
plus about one layer in float. With calibration data (GPTQ, SmoothQuant) the float model is
loaded whole and quantized after loading by `qtorch.quantize_`, which needs the activations.

Loading a saved qtorch checkpoint (`from_pretrained(dir)`, config.json has quant_method
"qtorch"): the checkpoint's header says which layers are quantized (those with a `qweight`);
before any weight is read those layers become empty qtorch modules on the meta device,
transformers assigns the checkpoint's canonical buffers to them by name, and after loading each
module checks them through its own `load_state_dict` (shapes, dtypes) and packs them for its
backend. No float weight of a quantized layer is ever built.

Every module stays in its canonical layout until loading is over: transformers replaces all
non-persistent buffers (where packed layouts live) after loading, so packing happens last, in
`_process_model_after_weight_loading`.
"""

from __future__ import annotations

import inspect
import os
import warnings

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer

import qtorch
from qtorch import _packed
from qtorch.hf import _layers, _memory
from qtorch.hf.config import QtorchConfig
from qtorch.nn.linear import _own, _QuantizedLinear

_DTYPES = {
    "I8": torch.int8,
    "U8": torch.uint8,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


def checkpoint_entries(files: list[str]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """key -> (dtype, shape) of every tensor in the checkpoint files, read from their headers
    (safetensors) or as meta tensors (torch pickles); no tensor data is read."""
    out = {}
    for path in files or []:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    s = f.get_slice(key)
                    out[key] = (_DTYPES.get(s.get_dtype(), None), tuple(s.get_shape()))
        else:
            sd = torch.load(path, map_location="meta", weights_only=True)
            out.update({k: (v.dtype, tuple(v.shape)) for k, v in sd.items()})
    return out


def _resolve(model: nn.Module, name: str) -> str | None:
    """The model's module name for a checkpoint module name, allowing for a base-model prefix
    that one has and the other has not (a ...ForCausalLM checkpoint loaded as the base model,
    or the reverse), as transformers does for keys."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [name]
    if prefix:
        candidates += [name.removeprefix(prefix + "."), f"{prefix}.{name}"]
    for cand in candidates:
        try:
            model.get_submodule(cand)
            return cand
        except AttributeError:
            continue
    return None


def tied_module_names(model: nn.Module) -> dict[str, str]:
    """module -> the parameter it is tied with, for both ends of every tie transformers keeps
    (`all_tied_weights_keys`, target -> source)."""
    out = {}
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        t_mod, s_mod = target.rpartition(".")[0], source.rpartition(".")[0]
        out[t_mod] = source
        out[s_mod] = target
    return out


def quantized_modules(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _QuantizedLinear)]


def finish(model: nn.Module, names=None, revalidate: bool = False, checkpoint_files=None) -> None:
    """End of loading: each qtorch module (of `names`, default all) leaves its canonical-only
    state and packs for its backend. With `revalidate`, its buffers (assigned by transformers)
    first go through the module's own `load_state_dict`, as copies the module owns (a view of
    the checkpoint's memory map is shared with it), and the checkpoint pages are released."""
    paths = set(checkpoint_files or [])
    mods = dict(quantized_modules(model))
    for name in names if names is not None else list(mods):
        mod = mods[name]
        if revalidate:
            persistent = [
                k
                for k, v in mod._buffers.items()
                if v is not None and k not in mod._non_persistent_buffers_set
            ]
            loaded = [mod._buffers[k] for k in persistent]
            state = {k: _own(t) for k, t in zip(persistent, loaded)}
            if mod.bias is not None:
                state["bias"] = mod.bias
            mod.load_state_dict(state, strict=True, assign=True)
            replaced = [t for k, t in zip(persistent, loaded) if state[k] is not t]
            del state, loaded
            _memory.release(replaced, paths)  # the module holds copies of these now
            del replaced
        mod._pack_deferred = False
        mod._pack()


class QtorchQuantize(ConversionOps):
    """Quantize one layer while it loads: its float weight arrives, its qtorch module replaces
    it in the model, and nothing is left for transformers to assign."""

    def __init__(self, hf_quantizer: QtorchHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        q = self.hf_quantizer
        ((_, value),) = input_dict.items()
        value = value[0] if isinstance(value, list) else value
        name = full_layer_name.rpartition(".")[0]
        module = model.get_submodule(name)
        new = _layers.quantize_layer(module, value, q.qcfg)
        if isinstance(new, str):  # the config cannot take it: load the float weight as usual
            q.skipped[name] = new
            return {full_layer_name: value}
        new._pack_deferred = True
        new._is_hf_initialized = True
        _layers.replace(model, name, new)
        _layers.mark_parent_initialized(model, name)
        q.converted.append(name)
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        _memory.release([value], q.checkpoint_paths)
        return {}


class QtorchHfQuantizer(HfQuantizer):
    """transformers' quantizer for qtorch (quant_method "qtorch"); see the module docstring."""

    requires_calibration = False
    quantization_config: QtorchConfig

    def __init__(self, quantization_config: QtorchConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.qcfg = quantization_config.qtorch_config()
        self.skip: list[str] = []
        self.tied: dict[str, str] = {}
        self.skipped: dict[str, str] = {}  # module -> why it stays float
        self.converted: list[str] = []
        self.checkpoint_paths: set[str] = set()

    @property
    def calibrating(self) -> bool:
        return not self.pre_quantized and self.quantization_config.needs_calibration()

    @property
    def quantized_element_size(self) -> float:
        return 0.5 if self.quantization_config.bits() == 4 else 1

    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict):
            devices = {str(d) for d in device_map.values()}
            if "disk" in devices or ("cpu" in devices and len(devices) > 1):
                raise ValueError(
                    "qtorch: a device_map that offloads layers to the CPU or disk is not "
                    f"supported (got {sorted(devices)}); place the whole model on devices"
                )
        cfg = self.quantization_config
        if self.calibrating and cfg.calibration_data is None:
            raise ValueError(
                f"QtorchConfig(algorithm={cfg.algorithm!r}, smoothquant_alpha="
                f"{cfg.smoothquant_alpha!r}, awq={cfg.awq!r}) needs calibration_data (model inputs) "
                "to quantize on "
                "load; or load the float model and call qtorch.hf.quantize_model(model, config, "
                "calibration_data=...)"
            )
        if (
            self.calibrating
            and "calibration_data" not in inspect.signature(qtorch.quantize_).parameters
        ):
            raise ValueError(
                "calibration_data: this qtorch's quantize_ has no calibrated algorithms"
            )

    def skip_list(self, model) -> list[str]:
        """Module-name substrings kept in float: modules_to_not_convert (None: transformers'
        defaults, the output embedding, tied weights and the last module) and the model's
        keep-in-fp32 modules."""
        return self.get_modules_to_not_convert(
            model,
            self.quantization_config.modules_to_not_convert,
            getattr(model, "_keep_in_fp32_modules", None),
        )

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        self.checkpoint_paths = {os.path.realpath(f) for f in checkpoint_files or []}
        self.tied = tied_module_names(model)
        if self.pre_quantized:
            self._build_skeleton(model, checkpoint_entries(checkpoint_files))
        else:
            self.skip = self.skip_list(model)
        return model

    def _build_skeleton(self, model, entries) -> None:
        """Replace each layer the checkpoint holds quantized by an empty qtorch module on the
        meta device, whose buffers have the checkpoint's shapes and dtypes."""
        per_module: dict[str, dict] = {}
        for key in entries:
            if key.endswith(".qweight"):
                per_module[key[: -len(".qweight")]] = {}
        for key, (dtype, shape) in entries.items():
            mod_name, _, buf = key.rpartition(".")
            if mod_name in per_module and buf != "bias":
                per_module[mod_name][buf] = (dtype, shape)
        cls = _layers.module_class(self.qcfg)
        canonical = _packed.FAMILIES[cls._FAMILY][2]
        for ckpt_name, bufs in per_module.items():
            name = _resolve(model, ckpt_name)
            module = model.get_submodule(name) if name is not None else None
            dims = _layers.linear_dims(module) if module is not None else None
            if dims is None:
                raise ValueError(
                    f"qtorch checkpoint holds {ckpt_name}.qweight, but the model's {ckpt_name} is "
                    f"{type(module).__name__ if module is not None else 'missing'}, not a linear "
                    "layer"
                )
            k, n, conv1d = dims
            kw = {}
            if cls is qtorch.nn.Int4WeightOnlyLinear:
                kw = {"group_size": self.qcfg.group_size, "symmetric": self.qcfg.symmetric}
            new = cls(k, n, bias=module.bias, device="meta", **kw)
            missing = [b for b in canonical if b not in bufs]
            if missing:
                raise ValueError(
                    f"qtorch checkpoint lacks {', '.join(f'{ckpt_name}.{b}' for b in missing)}"
                )
            for buf, (dtype, shape) in bufs.items():
                have = new._buffers.get(buf) if buf in new._buffers else None
                if have is None:
                    raise ValueError(
                        f"qtorch checkpoint holds {ckpt_name}.{buf}, which this qtorch's "
                        f"{cls.__name__} does not have (saved by a newer qtorch, or with another "
                        "config than config.json names)"
                    )
                if tuple(have.shape) != shape:
                    raise ValueError(
                        f"qtorch checkpoint: {ckpt_name}.{buf} has shape {list(shape)}, but "
                        f"{cls.__name__}({k}, {n}, {kw or ''}) expects {list(have.shape)}"
                    )
                if dtype is not None and have.dtype != dtype:
                    # the module's own load_state_dict decides after loading whether it takes it
                    new._buffers[buf] = torch.empty(shape, dtype=dtype, device="meta")
            new._weight_dtype = module.weight.dtype
            new._hf_conv1d = conv1d
            new._pack_deferred = True
            _layers.replace(model, name, new)
            _layers.mark_parent_initialized(model, name)
            self.converted.append(name)
            # the checkpoint holds this layer on its own: whatever the config says, it is untied
            tied = getattr(model, "all_tied_weights_keys", None)
            if tied:
                for target in [t for t in tied if t.rpartition(".")[0] == name]:
                    tied.pop(target)

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized or self.calibrating:
            return False
        name, _, tensor = param_name.rpartition(".")
        if tensor != "weight":
            return False
        try:
            module = model.get_submodule(name)
        except AttributeError:
            return False
        dims = _layers.linear_dims(module)
        if dims is None:
            return False
        pattern = _layers.skipped_by(name, self.skip)
        if pattern is not None:
            return False
        if name in self.tied:
            self.skipped[name] = (
                f"tied to {self.tied[name]}; kept in float so the tie holds "
                "(tie_word_embeddings=False unties it)"
            )
            return False
        gs = getattr(self.qcfg, "group_size", None)
        if gs is not None and dims[0] % gs:
            self.skipped[name] = f"in_features={dims[0]} is not divisible by group_size={gs}"
            return False
        return True

    def get_quantize_ops(self):
        return QtorchQuantize(self)

    def get_new_dtype(self, converter, param, dtype):
        # A qtorch buffer keeps the checkpoint's dtype (its module checks it after loading);
        # a float scale must not be cast to the model's dtype.
        targets = getattr(converter, "target_patterns", None) or ()
        if self.pre_quantized and targets:
            mod_name, _, buf = targets[0].rpartition(".")
            if mod_name in self.converted and buf != "bias":
                return None
        return super().get_new_dtype(converter, param, dtype)

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.calibrating:
            from qtorch.hf.api import _quantize_loaded

            _quantize_loaded(model, self, self.quantization_config.calibration_data)
        else:
            finish(
                model,
                self.converted,
                revalidate=self.pre_quantized,
                checkpoint_files=self.checkpoint_paths,
            )
        if not self.pre_quantized and self.quantization_config.modules_to_not_convert is not None:
            self._note_tied_kept(model)
        self.warn_skipped()
        return model

    def _note_tied_kept(self, model) -> None:
        """A tied layer that modules_to_not_convert did not name stayed float (so that the tie
        holds, or because the checkpoint does not hold its weight at all): say so."""
        for name, other in self.tied.items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                continue
            if (
                _layers.linear_dims(module) is not None
                and name not in self.skipped
                and _layers.skipped_by(name, self.skip) is None
            ):
                self.skipped[name] = (
                    f"tied to {other}; kept in float so the tie holds "
                    "(tie_word_embeddings=False unties it)"
                )

    def warn_skipped(self) -> None:
        """One UserWarning naming every layer kept in float, grouped by reason."""
        if not self.skipped:
            return
        by_reason: dict[str, list[str]] = {}
        for name, why in self.skipped.items():
            by_reason.setdefault(why, []).append(name)
        warnings.warn(
            f"qtorch: {len(self.skipped)} linear layer(s) kept in float by "
            f"{self.quantization_config.config}: "
            + "; ".join(f"{', '.join(names)} ({why})" for why, names in by_reason.items()),
            UserWarning,
            stacklevel=2,
        )

    def _dequantize(self, model, dtype=None):
        for name, mod in quantized_modules(model):
            _layers.replace(model, name, _layers.to_float(mod, dtype))
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True
