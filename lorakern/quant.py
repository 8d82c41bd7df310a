"""QLoRA's 4-bit pieces under their historical import path. The code lives in lorakern.nf4 (codec,
storage, modules); a LoRA layer on a 4-bit base is ``lorakern.LoraLinear`` built with
``from_linear(..., quantize="nf4")`` or injected with ``LoraConfig(quantize="nf4")``."""
from lorakern.nf4.codec import quantize_nf4
from lorakern.nf4.modules import LinearNF4, NF4LinearFunction, nf4_linear, quantized_bytes_per_weight, requantize
from lorakern.nf4.storage import CHUNK_ELEMENTS, QUANT_STORAGES, STATE_KEY, NF4Storage, quant_storage_name

QUANT_TYPES = ("nf4",)

__all__ = ["CHUNK_ELEMENTS", "LinearNF4", "NF4LinearFunction", "NF4Storage", "QUANT_STORAGES", "QUANT_TYPES",
           "STATE_KEY", "nf4_linear", "quant_storage_name", "quantize_nf4", "quantized_bytes_per_weight",
           "requantize"]
