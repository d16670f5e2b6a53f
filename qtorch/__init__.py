"""qtorch: int8/int4 quantized matmul and fused distillation-loss kernels for PyTorch.

qtorch.ops.*                         the custom ops (torch.ops.qtorch.*)
qtorch.reference.*                   their pure-PyTorch definitions
qtorch.quantize_(model, config)      swap nn.Linear for quantized modules (qtorch.nn)
qtorch.set_backend / use_backend     choose reference | cpu | triton | cuda | auto
qtorch.inductor_options()            for AOTInductor / Inductor's C++ wrapper
qtorch.distributed.*                 the vocabulary-parallel loss; DDP with quantized modules
"""

from qtorch import distributed, nn, ops, reference
from qtorch._backend import available_backends, get_backend, set_backend, use_backend
from qtorch._packed import inductor_options
from qtorch.quant_api import (
    Int4WeightOnlyConfig,
    Int8DynamicConfig,
    Int8WeightOnlyConfig,
    quantize_,
)

__version__ = "0.1.0"

__all__ = [
    "ops",
    "reference",
    "nn",
    "distributed",
    "quantize_",
    "Int8DynamicConfig",
    "Int8WeightOnlyConfig",
    "Int4WeightOnlyConfig",
    "available_backends",
    "get_backend",
    "set_backend",
    "use_backend",
    "inductor_options",
    "__version__",
]
