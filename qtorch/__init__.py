"""qtorch: int8/int4 quantized matmul and fused distillation-loss kernels for PyTorch.

    qtorch.ops.*                         the custom ops (torch.ops.qtorch.*)
    qtorch.reference.*                   their pure-PyTorch definitions
    qtorch.quantize_(model, config)      swap nn.Linear for quantized modules (qtorch.nn)
    qtorch.set_backend / use_backend     choose reference | cpu | triton | cuda | auto
"""

from qtorch import ops, reference
from qtorch._backend import available_backends, get_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = [
    "ops",
    "reference",
    "available_backends",
    "get_backend",
    "set_backend",
    "use_backend",
    "__version__",
]

try:  # the module layer (qtorch.nn, quantize_, configs) lands on top of the ops
    from qtorch import nn  # noqa: F401
    from qtorch.quant_api import (  # noqa: F401
        Int4WeightOnlyConfig,
        Int8DynamicConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    __all__ += ["nn", "quantize_", "Int8DynamicConfig", "Int8WeightOnlyConfig",
                "Int4WeightOnlyConfig"]
except ImportError:
    pass
