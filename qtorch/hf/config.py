"""`QtorchConfig`: the quantization config transformers stores in config.json.

    QtorchConfig(config="w4a16", group_size=128, symmetric=False, algorithm="rtn",
                 smoothquant_alpha=None, zero_point="int", awq=False,
                 modules_to_not_convert=None, calibration_data=None)

`config` names one of qtorch's configs; the other fields are that config's fields:

    "w8a8"   qtorch.Int8DynamicConfig      algorithm, smoothquant_alpha
    "w8a16"  qtorch.Int8WeightOnlyConfig   algorithm
    "w4a16"  qtorch.Int4WeightOnlyConfig   group_size, symmetric, algorithm, zero_point, awq

A field the chosen config does not have must keep its default (ValueError otherwise).
`algorithm`, `smoothquant_alpha` and `zero_point` are passed to the qtorch config only where its
class has those fields; a non-default value for a field this qtorch's config class lacks is a
ValueError that says so.

`awq=True` (w4a16): activation-aware channel scaling before `algorithm` (qtorch's
Int4WeightOnlyConfig(awq=True)); it needs calibration_data. It changes how the weights are
chosen, not how they are stored, so a saved checkpoint loads without it; the key is written to
config.json only when True (configs without AWQ serialize exactly as before).

`modules_to_not_convert`: module-name substrings kept in float (a layer is kept when any of
them occurs in its name). None means what transformers' other quantizers do by default: the
output embedding (LM head), anything tied to the input embedding, and the model's last module.

`calibration_data` (an iterable of model inputs, as `qtorch.quantize_` takes it) is used once,
while quantizing on load; it is never serialized.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

import qtorch

QUANT_METHOD = "qtorch"

# config name -> (qtorch config class, the QtorchConfig fields it takes)
CONFIGS = {
    "w8a8": (qtorch.Int8DynamicConfig, ("algorithm", "smoothquant_alpha")),
    "w8a16": (qtorch.Int8WeightOnlyConfig, ("algorithm",)),
    "w4a16": (
        qtorch.Int4WeightOnlyConfig,
        ("group_size", "symmetric", "algorithm", "zero_point", "awq"),
    ),
}
DEFAULTS = {
    "group_size": 128,
    "symmetric": False,
    "algorithm": "rtn",
    "smoothquant_alpha": None,
    "zero_point": "int",
    "awq": False,
}
# fields written by to_dict only when not at their default (added after checkpoints existed)
_OMIT_DEFAULT = ("awq",)


class QtorchConfig(QuantizationConfigMixin):
    """Quantize a transformers model with qtorch while `from_pretrained` loads it (module
    docstring). Registered with transformers as quant_method "qtorch" by `import qtorch.hf`."""

    def __init__(
        self,
        config: str = "w8a8",
        group_size: int = 128,
        symmetric: bool = False,
        algorithm: str = "rtn",
        smoothquant_alpha: float | None = None,
        zero_point: str = "int",
        awq: bool = False,
        modules_to_not_convert: list[str] | None = None,
        calibration_data=None,
        **kwargs,
    ) -> None:
        kwargs.pop("quant_method", None)  # from_dict passes what to_dict wrote
        if kwargs:
            raise TypeError(f"QtorchConfig got unexpected fields {sorted(kwargs)}")
        self.quant_method = QUANT_METHOD
        self.config = config
        self.group_size = group_size
        self.symmetric = symmetric
        self.algorithm = algorithm
        self.smoothquant_alpha = smoothquant_alpha
        self.zero_point = zero_point
        self.awq = awq
        self.modules_to_not_convert = (
            None if modules_to_not_convert is None else list(modules_to_not_convert)
        )
        self.calibration_data = calibration_data
        self.post_init()

    def post_init(self) -> None:
        """Check the fields (ValueError / TypeError naming the field): build the qtorch config."""
        if self.config not in CONFIGS:
            raise ValueError(f"config must be one of {sorted(CONFIGS)}, got {self.config!r}")
        taken = CONFIGS[self.config][1]
        for name, default in DEFAULTS.items():
            if name not in taken and getattr(self, name) != default:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} does not apply to config={self.config!r} "
                    f"(its fields: {', '.join(taken)})"
                )
        if self.modules_to_not_convert is not None and not all(
            isinstance(m, str) for m in self.modules_to_not_convert
        ):
            raise TypeError("modules_to_not_convert must be a list of module-name substrings")
        self.qtorch_config()

    def fields(self) -> dict[str, Any]:
        """The fields of the chosen config, as set here."""
        return {name: getattr(self, name) for name in CONFIGS[self.config][1]}

    def qtorch_config(self):
        """The qtorch config object: Int8DynamicConfig / Int8WeightOnlyConfig /
        Int4WeightOnlyConfig with this config's fields."""
        cls, _ = CONFIGS[self.config]
        have = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in self.fields().items():
            if name in have:
                kwargs[name] = value
            elif value != DEFAULTS[name]:
                raise ValueError(
                    f"{name}={value!r}: this qtorch's {cls.__name__} has no `{name}` field "
                    f"(calibrated algorithms need a qtorch that has them)"
                )
        return cls(**kwargs)

    def needs_calibration(self) -> bool:
        """GPTQ, AWQ and SmoothQuant read activations: they need calibration_data."""
        return self.algorithm == "gptq" or self.smoothquant_alpha is not None or self.awq is True

    def bits(self) -> int:
        return 4 if self.config == "w4a16" else 8

    def to_dict(self) -> dict[str, Any]:
        out = {
            "quant_method": QUANT_METHOD,
            "config": self.config,
            **{
                k: v
                for k, v in self.fields().items()
                if not (k in _OMIT_DEFAULT and v == DEFAULTS[k])
            },
            "modules_to_not_convert": self.modules_to_not_convert,
        }
        return out

    def __deepcopy__(self, memo):
        # transformers deep-copies the model config, this included: calibration data (possibly
        # a generator, which cannot be copied) is shared, not copied
        new = QtorchConfig(
            **{k: copy.deepcopy(v, memo) for k, v in self.to_dict().items()},
            calibration_data=self.calibration_data,
        )
        return new

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __iter__(self):  # dict(config): the serialized fields, never calibration_data
        yield from self.to_dict().items()

    def __eq__(self, other) -> bool:
        return isinstance(other, QtorchConfig) and self.to_dict() == other.to_dict()

    __hash__ = None
