"""`quantize_(model, config, filter_fn)`: swap `nn.Linear` layers for the `qtorch.nn`
quantized modules, in place. Weights are quantized once, here; the modules only run them.

    qtorch.quantize_(model, qtorch.Int8DynamicConfig())            # W8A8 dynamic
    qtorch.quantize_(model, qtorch.Int8WeightOnlyConfig())         # W8A16
    qtorch.quantize_(model, qtorch.Int4WeightOnlyConfig(group_size=64))   # W4A16
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable

from torch import nn

from qtorch import _checks, quantizers, smoothquant
from qtorch.nn.linear import Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear

__all__ = ["Int8DynamicConfig", "Int8WeightOnlyConfig", "Int4WeightOnlyConfig", "quantize_"]


@dataclasses.dataclass(frozen=True)
class Int8DynamicConfig:
    """W8A8: int8 weights per output channel, activations quantized to int8 per token at run
    time, int8 GEMM with exact int32 accumulation. Takes any nn.Linear. `algorithm` maps the
    weights onto the grid: "rtn", "mse" or "gptq" (needs calibration_data; API.md).

    smoothquant_alpha=α in [0, 1] (needs quantize_'s calibration_data): SmoothQuant, per input
    channel s_k = max|x_k|^α / max|w_k|^(1−α) from the calibration inputs; the module stores
    quantize(W · diag(s)) and divides x by s inside its per-token quantization (qtorch/smoothquant.py).
    It combines with algorithm "rtn" or "mse" (not yet with "gptq": ValueError).
    """

    algorithm: str = "rtn"
    smoothquant_alpha: float | None = None

    def __post_init__(self) -> None:
        quantizers.check_algorithm(self.algorithm)
        a = self.smoothquant_alpha
        if a is None:
            return
        if isinstance(a, bool) or not isinstance(a, (int, float)):
            raise TypeError(
                f"smoothquant_alpha must be a float in [0, 1] or None, got {type(a).__name__}"
            )
        if not 0.0 <= a <= 1.0:  # (NaN fails too)
            raise ValueError(f"smoothquant_alpha must be in [0, 1], got {a}")
        if self.algorithm == "gptq":
            raise ValueError(
                "smoothquant_alpha with algorithm='gptq' is not supported yet: use "
                "algorithm='rtn' or 'mse' with SmoothQuant"
            )


@dataclasses.dataclass(frozen=True)
class Int8WeightOnlyConfig:
    """W8A16: int8 weights per output channel, activations stay in their float dtype.
    Takes any nn.Linear. `algorithm`: "rtn", "mse" or "gptq" (as Int8DynamicConfig)."""

    algorithm: str = "rtn"

    def __post_init__(self) -> None:
        quantizers.check_algorithm(self.algorithm)


@dataclasses.dataclass(frozen=True)
class Int4WeightOnlyConfig:
    """W4A16: int4 weights in groups of `group_size` (32, 64, 128 or 256) along K, per output
    channel; asymmetric (a zero point per group) unless `symmetric`. Takes an nn.Linear whose
    in_features is divisible by group_size. `algorithm`: "rtn", "mse" or "gptq" (as
    Int8DynamicConfig).

    zero_point="float" (asymmetric only): float32 zero points and each group's own range, not
    widened to contain 0 (GGUF Q4_1's grid; API.md "Calibrated quantization").

    awq=True (needs quantize_'s calibration_data; an addition to API.md): before `algorithm`
    maps each layer group (the layers reading one input: q/k/v, gate/up, ...) onto the grid,
    its input channels are scaled by s = mean|x|^a (a searched per group, after AWQ) and 1/s
    is folded into the input's producer (a norm's weight, or the rows of the layer before),
    where that is checked to leave the model's function unchanged (qtorch/calibrate.py).
    The grid and storage are unchanged; the model's norm weights change."""

    group_size: int = 128
    symmetric: bool = False
    algorithm: str = "rtn"
    zero_point: str = "int"
    awq: bool = False

    def __post_init__(self) -> None:
        _checks.group_size(self.group_size)
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {type(self.symmetric).__name__}")
        quantizers.check_algorithm(self.algorithm)
        _checks.zero_point(self.zero_point, self.symmetric)
        if not isinstance(self.awq, bool):
            raise TypeError(f"awq must be a bool, got {type(self.awq).__name__}")


_MODULE_FOR = {
    Int8DynamicConfig: Int8DynamicLinear,
    Int8WeightOnlyConfig: Int8WeightOnlyLinear,
    Int4WeightOnlyConfig: Int4WeightOnlyLinear,
}


def _why_not(linear: nn.Linear, config) -> str | None:
    """Why `config` cannot take this layer, or None if it can."""
    if isinstance(linear, nn.modules.linear.NonDynamicallyQuantizableLinear):
        # nn.MultiheadAttention reads out_proj.weight directly instead of calling it.
        return "nn.MultiheadAttention.out_proj is used through its .weight, not called"
    if linear.weight.dtype not in _checks.FLOAT_DTYPES:
        return f"weight dtype {linear.weight.dtype} is not float32/float16/bfloat16"
    if linear.weight.is_meta:
        return "weight is on the meta device (no values to quantize)"
    if linear.in_features < 1 or linear.out_features < 1:
        return f"empty layer ({linear.in_features} -> {linear.out_features})"
    if isinstance(config, Int4WeightOnlyConfig) and linear.in_features % config.group_size:
        return (
            f"in_features={linear.in_features} is not divisible by group_size={config.group_size}"
        )
    return None


def quantize_(
    model: nn.Module,
    config: Int8DynamicConfig | Int8WeightOnlyConfig | Int4WeightOnlyConfig,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    *,
    calibration_data: Iterable | None = None,
) -> nn.Module:
    """Replace, in place, every `nn.Linear` in `model` for which `filter_fn(module, fqn)` is
    true (default: all) by the quantized module of `config`, and return `model`.

    Layers the config cannot take (e.g. in_features not divisible by the int4 group size) stay
    `nn.Linear` and are named in one UserWarning. Each weight is quantized once, on its own
    device; the float weight is released when nothing else refers to it. A tied weight (e.g.
    an embedding shared with an LM head) stays alive through its other user, and the quantized
    layer no longer shares it: a second UserWarning names each such pair (keep the layer in
    float with filter_fn to keep the tie). If `model` is itself an `nn.Linear` it cannot be
    replaced in place: the quantized module is returned.

    `calibration_data` (an iterable of model inputs: a Tensor is called as model(t), a tuple
    as model(*t), a dict as model(**t)) is what algorithm="gptq" and awq=True run the model on
    (qtorch/calibrate.py) and what SmoothQuant measures max|x_k| on; a config that needs it and
    gets none is a ValueError naming it; data-free configs ignore it. The model is left in its
    training / eval mode, with no hooks.
    """
    if type(config) not in _MODULE_FOR:
        raise TypeError(
            f"config must be one of {[c.__name__ for c in _MODULE_FOR]}, got {type(config).__name__}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    cls = _MODULE_FOR[type(config)]
    fields = dataclasses.asdict(config)
    awq = fields.pop("awq", False)
    alpha = fields.get("smoothquant_alpha")
    skipped: list[str] = []
    calibrated = None
    if config.algorithm == "gptq" or awq:
        if calibration_data is None:
            raise ValueError(f"{config} needs calibration_data (an iterable of model inputs)")
        calibrated = _calibrate(model, config, cls, fields, filter_fn, calibration_data)
    unsmoothed: list[str] = []
    act_absmax: dict[int, object] = {}
    if alpha is not None:
        if calibration_data is None:
            raise ValueError(
                "Int8DynamicConfig(smoothquant_alpha=...) needs calibration_data (an iterable of "
                "model inputs) to measure max|x_k| of each layer's inputs; got calibration_data=None"
            )
        act_absmax = smoothquant.input_absmax(
            model,
            calibration_data,
            lambda fqn, m: (filter_fn is None or filter_fn(m, fqn)) and _why_not(m, config) is None,
        )

    def convert(fqn: str, linear: nn.Linear):
        if filter_fn is not None and not filter_fn(linear, fqn):
            return None
        why = _why_not(linear, config)
        if why is not None:
            skipped.append(f"{fqn or '<root>'} ({why})")
            return None
        if calibrated is not None:
            new = calibrated[id(linear)]
        elif alpha is not None:
            amax = act_absmax.get(id(linear))
            if amax is None:  # never called during calibration: no statistics to smooth by
                unsmoothed.append(fqn or "<root>")
                new = cls.from_float(linear, **{**fields, "smoothquant_alpha": None})
            else:
                new = cls.from_float(linear, act_absmax=amax, **fields)
        else:
            new = cls.from_float(linear, **fields)
        return new.train(linear.training)

    if isinstance(model, nn.Linear):
        new = convert("", model)
        result = model if new is None else new
    else:
        # Collect first: swapping while iterating named_modules would visit the new modules.
        # A Linear reachable under several names is quantized once and shared, as before.
        targets = [
            (fqn, m)
            for fqn, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, nn.Linear)
        ]
        owners = _parameter_owners(model)
        done: dict[int, nn.Module | None] = {}
        untied: list[str] = []
        for fqn, linear in targets:
            if id(linear) not in done:
                done[id(linear)] = convert(fqn, linear)
                if done[id(linear)] is not None:
                    untied += _ties_broken(fqn, linear, owners)
            new = done[id(linear)]
            if new is None:
                continue
            parent_name, _, child = fqn.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
        result = model
    if skipped:
        warnings.warn(
            f"quantize_: {len(skipped)} nn.Linear layer(s) left unquantized, {config} cannot "
            f"take them: " + "; ".join(skipped),
            UserWarning,
            stacklevel=2,
        )
    if unsmoothed:
        warnings.warn(
            f"quantize_: {len(unsmoothed)} layer(s) were never called by calibration_data, so "
            f"they are W8A8 without SmoothQuant: " + ", ".join(unsmoothed),
            UserWarning,
            stacklevel=2,
        )
    if not isinstance(model, nn.Linear) and untied:
        warnings.warn(
            "quantize_: tied weights untied: " + "; ".join(untied) + ". The quantized layer "
            "holds its own quantized copy and the other user keeps the float weight, so they no "
            "longer share one (code that ties or resizes them, e.g. transformers' tie_weights, "
            "now raises). To keep a tie, leave that layer in float with filter_fn.",
            UserWarning,
            stacklevel=2,
        )
    return result


def _calibrate(model, config, cls, fields, filter_fn, calibration_data) -> dict[int, nn.Module]:
    """GPTQ: id(linear) -> quantized module for every layer quantize_ converts."""
    from qtorch import calibrate

    targets, seen = [], set()
    named = (
        [("", model)]
        if isinstance(model, nn.Linear)
        else model.named_modules(remove_duplicate=False)
    )
    for fqn, m in named:
        if not isinstance(m, nn.Linear) or id(m) in seen:
            continue
        seen.add(id(m))
        if (filter_fn is None or filter_fn(m, fqn)) and _why_not(m, config) is None:
            targets.append(m)
    init_kw = {k: v for k, v in fields.items() if k in ("group_size", "symmetric")}
    if cls is Int4WeightOnlyLinear:
        zero_point = fields.get("zero_point", "int")
        if zero_point != "int":
            init_kw["zero_point"] = zero_point
        grid = quantizers.grid_for("int4", config.group_size, config.symmetric, zero_point)
    else:
        grid = quantizers.grid_for("int8")
    return calibrate.gptq(
        model,
        targets,
        grid,
        cls,
        init_kw,
        calibration_data,
        algorithm=config.algorithm,
        awq=getattr(config, "awq", False),
    )


def _parameter_owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """id(parameter) -> every (name, owning module) under which the model reaches it."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for fqn, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((f"{fqn}.{pname}" if fqn else pname, mod))
    return owners


def _ties_broken(fqn: str, linear: nn.Linear, owners) -> list[str]:
    """'<fqn>.weight was tied to <name>' for each other module that shares linear's weight
    (the same Linear under another name is replaced by the same quantized module: no break)."""
    others = [name for name, mod in owners.get(id(linear.weight), []) if mod is not linear]
    return [f"{fqn}.weight was tied to {name}" for name in others]
