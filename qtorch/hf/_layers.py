"""Which layers of a transformers model qtorch converts, and how.

A layer is "linear-like" when it is an `nn.Linear` (y = x W^T + b, W [out, in]) or a
transformers `Conv1D` (GPT-2 style: y = x W + b, W [in, out]); both become the qtorch module of
the config, made from an `nn.Linear` holding W [out, in]. A module made from a Conv1D remembers
it (`_hf_conv1d`), so that dequantizing gives a Conv1D back, whose state dict the model's own
checkpoints match.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from qtorch import quant_api
from qtorch.nn.linear import _QuantizedLinear, canonical_layout

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is required by qtorch.hf; keep this module importable
    Conv1D = ()

QUANTIZED = (_QuantizedLinear,)


def linear_dims(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in_features, out_features, is_conv1d) of a linear-like layer, else None."""
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return None  # nn.MultiheadAttention reads its .weight instead of calling it
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if Conv1D and isinstance(module, Conv1D):
        nx, nf = module.weight.shape
        return nx, nf, True
    return None


def as_linear(module: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """An nn.Linear computing what `module` computes with `weight` (as the module stores it),
    sharing `module.bias`. Only a Conv1D's weight is copied (transposed)."""
    k, n, conv1d = linear_dims(module)
    with torch.device("meta"):
        lin = nn.Linear(k, n, bias=False)
    w = weight.detach().t().contiguous() if conv1d else weight.detach()
    lin.weight = nn.Parameter(w, requires_grad=False)
    lin.bias = module.bias
    return lin


def module_class(qcfg):
    return quant_api._MODULE_FOR[type(qcfg)]


def why_not(lin: nn.Linear, qcfg) -> str | None:
    return quant_api._why_not(lin, qcfg)


def quantize_layer(module: nn.Module, weight: torch.Tensor, qcfg) -> _QuantizedLinear | str:
    """The qtorch module of `qcfg` for a linear-like `module` whose weight is `weight`, kept in
    its canonical layout (the caller packs it), or the reason it cannot be converted."""
    lin = as_linear(module, weight)
    why = why_not(lin, qcfg)
    if why is not None:
        return why
    with canonical_layout():
        new = module_class(qcfg).from_float(lin, **dataclasses.asdict(qcfg))
    new._hf_conv1d = bool(linear_dims(module)[2])
    return new


def to_float(module: _QuantizedLinear, dtype: torch.dtype | None = None) -> nn.Module:
    """The float layer a qtorch module stands for: nn.Linear, or Conv1D where it came from one,
    holding the dequantized weight (in `dtype`, default that of the bias or float32)."""
    w = module.dequantize()
    bias = module.bias
    dtype = dtype or (bias.dtype if bias is not None else torch.float32)
    if module.__dict__.get("_hf_conv1d"):
        with torch.device("meta"):
            out = Conv1D(module.out_features, module.in_features)
        out.weight = nn.Parameter(w.t().contiguous().to(dtype))
        out.bias = (
            bias
            if bias is not None
            else nn.Parameter(torch.zeros(module.out_features, dtype=dtype, device=w.device))
        )
    else:
        with torch.device("meta"):
            out = nn.Linear(module.in_features, module.out_features, bias=False)
        out.weight = nn.Parameter(w.to(dtype))
        out.bias = bias
    return out


def replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def mark_parent_initialized(model: nn.Module, name: str) -> None:
    """transformers initializes, after loading, every module not marked as initialized; some
    models' init of a block writes into its child layers' `.weight` (GPT-2: c_proj.weight),
    which a qtorch module does not have. A parent with no tensors of its own has nothing of its
    own to initialize (its children are initialized, or loaded, one by one): mark it."""
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    if parent is model:
        return
    if (
        next(parent.parameters(recurse=False), None) is None
        and next(parent.buffers(recurse=False), None) is None
    ):
        parent._is_hf_initialized = True


def skipped_by(name: str, patterns: list[str]) -> str | None:
    """The first of `patterns` (module-name substrings) that occurs in `name`."""
    return next((p for p in patterns if p and p in name), None)
