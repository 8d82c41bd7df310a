"""NF4 (bitsandbytes' 4-bit NormalFloat) for torch, split by role:

- ``codec``: quantize a weight to NF4 in torch, bit-identical to lorakern.core.nf4 and bitsandbytes;
- ``storage``: NF4Storage, the packed bytes and block statistics of one weight, their decoding, and
  bitsandbytes' state-dict keys;
- ``modules``: the chunked-decode autograd Function and LinearNF4 (a frozen 4-bit nn.Linear);
- ``lora``: the torch implementation of a LoRA layer on an NF4 base, registered with lorakern.dispatch.

A LoRA layer on an NF4 base is a ``lorakern.LoraLinear`` whose base is ``lorakern.bases.NF4Base``.
"""
from lorakern.nf4.codec import quantize_nf4
from lorakern.nf4.modules import LinearNF4, NF4LinearFunction, nf4_linear, quantized_bytes_per_weight, requantize
from lorakern.nf4.storage import QUANT_STORAGES, NF4Storage, quant_storage_name

__all__ = ["LinearNF4", "NF4LinearFunction", "NF4Storage", "QUANT_STORAGES", "nf4_linear", "quant_storage_name",
           "quantize_nf4", "quantized_bytes_per_weight", "requantize"]
