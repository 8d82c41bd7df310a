"""lorakern.core: the float64 NumPy reference. Importing it never imports torch."""
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
