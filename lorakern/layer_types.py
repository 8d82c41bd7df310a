"""Which LoRA layer wraps which module: an ordered list of dispatchers, the first that says "mine" builds the
layer (PEFT's _create_new_module / dispatch_default). Injection asks here; nothing else needs to know the
layer types.

    module                               LoRA layer            runs
    nn.Linear, transformers' Conv1D      lorakern.LoraLinear   lorakern.dispatch: triton / c / torch
    nn.Embedding                         lorakern.LoraEmbedding  plain torch (a gather and a rank-r product)
    nn.Conv1d, nn.Conv2d                 lorakern.LoraConv     plain torch (two convolutions)
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from lorakern.conv import CONV_TYPES, LoraConv
from lorakern.embedding import LoraEmbedding
from lorakern.errors import LorakernError
from lorakern.layer import LoraLinear
from lorakern.linear_like import is_linear_like

LORA_LAYERS = (LoraLinear, LoraEmbedding, LoraConv)
SUPPORTED = "nn.Linear, transformers' Conv1D, nn.Embedding, nn.Conv1d and nn.Conv2d"


def _linear(module: nn.Module, adapter_name: str, quant: dict, kwargs: dict) -> nn.Module:
    return LoraLinear.from_linear(module, adapter_name=adapter_name, **kwargs, **quant)


def _embedding(module: nn.Module, adapter_name: str, quant: dict, kwargs: dict) -> nn.Module:
    return LoraEmbedding.from_embedding(module, adapter_name, **kwargs)  # stays full precision under quantize


def _conv(module: nn.Module, adapter_name: str, quant: dict, kwargs: dict) -> nn.Module:
    return LoraConv.from_conv(module, adapter_name, **kwargs)  # stays full precision under quantize


# (does this module take it, build the LoRA layer); exact types for Embedding and Conv: a subclass with its own
# forward would compute something the LoRA layer does not reproduce
DISPATCHERS: tuple[tuple[Callable[[nn.Module], bool], Callable[..., nn.Module]], ...] = (
    (is_linear_like, _linear),
    (lambda m: type(m) is nn.Embedding, _embedding),
    (lambda m: type(m) in CONV_TYPES.values(), _conv),
)


def can_take_lora(module: nn.Module) -> bool:
    return any(accepts(module) for accepts, _ in DISPATCHERS)


def is_lora_layer(module: nn.Module) -> bool:
    return isinstance(module, LORA_LAYERS)


def new_lora_layer(module: nn.Module, name: str, adapter_name: str, quant: dict, **kwargs) -> nn.Module:
    """The LoRA layer for ``module`` (named ``name`` in its model) with adapter ``adapter_name``; ``quant``
    (NF4 options) applies to linear layers, ``kwargs`` configure the adapter."""
    for accepts, build in DISPATCHERS:
        if accepts(module):
            return build(module, adapter_name, quant, kwargs)
    raise LorakernError(f"target module {name!r} is a {type(module).__name__}; LoRA applies to {SUPPORTED}. Narrow "
                        f"target_modules so that it names only layers of those types")


__all__ = ["DISPATCHERS", "LORA_LAYERS", "SUPPORTED", "can_take_lora", "is_lora_layer", "new_lora_layer"]
