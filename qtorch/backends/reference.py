"""The `reference` backend: `qtorch.reference` serves every op on every device."""

from qtorch import reference as R
from qtorch._backend import register_kernel
from qtorch.quantizers.gptq import gptq_block_reference
from qtorch.quantizers.mse import search_reference
from qtorch.reference.weight_only import int4_linear_grad_input, int8_linear_grad_input

for _name, _fn in {
    "quantize_int8": R.quantize_int8,
    "int8_scaled_mm": R.int8_scaled_mm,
    "int8_linear": R.int8_linear,
    "int8_linear_smooth": R.int8_linear_smooth,
    "int8_weight_only_linear": R.int8_weight_only_linear,
    "int8_linear_grad_input": int8_linear_grad_input,
    "quantize_int4": R.quantize_int4,
    "dequantize_int4": R.dequantize_int4,
    "int4_weight_only_linear": R.int4_weight_only_linear,
    "int4_linear_grad_input": int4_linear_grad_input,
    "distillation_loss": R.distillation_loss,
    "fused_linear_distillation_loss": R.fused_linear_distillation_loss,
    "gptq_block": gptq_block_reference,
    "mse_search": search_reference,
}.items():
    register_kernel(_name, "reference")(_fn)


def status() -> tuple[bool, str]:
    return True, "pure PyTorch, any device"
