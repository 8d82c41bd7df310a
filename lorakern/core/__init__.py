"""lorakern.core: the float64 NumPy reference and the NF4 codec. Importing it never imports torch."""
from . import dora
from .nf4 import BLOCKSIZES, NF4_CODE, NF4State, nf4_dequantize, nf4_quantize
from .layers import (
    conv_backward,
    conv_delta,
    conv_forward,
    embedding_backward,
    embedding_delta,
    embedding_forward,
)
from .lora import (
    INITS,
    backward,
    delta_weight,
    forward,
    init_lora,
    init_std,
    kaiming_uniform_bound,
    merge,
    mixed_backward,
    mixed_forward,
    scaling,
    unmerge,
)

__all__ = [
    "dora",
    "BLOCKSIZES",
    "NF4State",
    "NF4_CODE",
    "nf4_dequantize",
    "nf4_quantize",
    "INITS",
    "backward",
    "conv_backward",
    "conv_delta",
    "conv_forward",
    "delta_weight",
    "embedding_backward",
    "embedding_delta",
    "embedding_forward",
    "forward",
    "init_lora",
    "init_std",
    "kaiming_uniform_bound",
    "merge",
    "mixed_backward",
    "mixed_forward",
    "scaling",
    "unmerge",
]
