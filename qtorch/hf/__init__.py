"""qtorch for Hugging Face transformers and PEFT.

    import qtorch.hf        # registers quant_method "qtorch" with transformers

    cfg = qtorch.hf.QtorchConfig(config="w4a16", group_size=128)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg)  # quantized on load
    model.save_pretrained(out)          # safetensors with the canonical buffers + quantization_config
    model = AutoModelForCausalLM.from_pretrained(out)                            # quantized again

    qtorch.hf.quantize_model(model, cfg, calibration_data=None)   # an already loaded model
    peft_model = qtorch.hf.get_peft_model(model, peft.LoraConfig(...))   # LoRA on qtorch layers
    peft_model = qtorch.hf.peft_from_pretrained(model, adapter_dir)

Without `import qtorch.hf`, transformers does not know quant_method "qtorch": it logs
"Unknown quantization type, got qtorch ... we will skip the quantization" and loads the
quantized layers as float ones with random weights. Needs transformers >= 5.0 (and peft >= 0.19
for the PEFT part, imported on first use).
"""

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from qtorch.hf.api import quantize_model
from qtorch.hf.config import QUANT_METHOD, QtorchConfig
from qtorch.hf.quantizer import QtorchHfQuantizer

__all__ = [
    "QtorchConfig",
    "QtorchHfQuantizer",
    "quantize_model",
    "get_peft_model",
    "peft_from_pretrained",
    "register_lora_layers",
    "QtorchLoraLinear",
]

# Registered once per process (a second registration under the name is an error there).
if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not QtorchConfig:
    AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
    register_quantization_config(QUANT_METHOD)(QtorchConfig)
if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not QtorchHfQuantizer:
    AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
    register_quantizer(QUANT_METHOD)(QtorchHfQuantizer)

_LORA = {"get_peft_model", "peft_from_pretrained", "register_lora_layers", "QtorchLoraLinear"}


def __getattr__(name):
    # peft is imported on first use: transformers users without peft can still load models
    if name in _LORA:
        from qtorch.hf import lora

        return getattr(lora, name)
    raise AttributeError(f"module 'qtorch.hf' has no attribute {name!r}")
