"""lorakern.core: the float64 NumPy reference and the NF4 codec. Importing it never imports torch."""
from . import dora
from .nf4 import BLOCKSIZES, NF4_CODE, NF4State, nf4_dequantize, nf4_quantize
from .lora import (
    INITS,
    backward,
    delta_weight,
    forward,
    init_lora,
    init_std,
    kaiming_uniform_bound,
    merge,
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
    "delta_weight",
    "forward",
    "init_lora",
    "init_std",
    "kaiming_uniform_bound",
    "merge",
    "scaling",
    "unmerge",
]
