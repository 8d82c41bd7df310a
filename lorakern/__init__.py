"""lorakern: LoRA layers that cost next to nothing over their frozen base layer.

``import lorakern.core`` (the float64 NumPy reference) never imports torch; the torch-facing names
below load on first use.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "LoraLinear": "lorakern.layer",
    "LoraEmbedding": "lorakern.embedding",
    "LoraConv": "lorakern.conv",
    "LoraConfig": "lorakern.config",
    "inject": "lorakern.injection",
    "add_adapter": "lorakern.injection",
    "set_adapter": "lorakern.injection",
    "active_adapters": "lorakern.injection",
    "delete_adapter": "lorakern.injection",
    "disable_adapters": "lorakern.injection",
    "count_parameters": "lorakern.injection",
    "parameter_table": "lorakern.injection",
    "lora_layers": "lorakern.injection",
    "adapter_rows": "lorakern.row_adapters",
    "add_weighted_adapter": "lorakern.combine",
    "save_adapter": "lorakern.adapters",
    "load_adapter": "lorakern.adapters",
    "merge_and_unload": "lorakern.unloading",
    "loraplus_optimizer": "lorakern.loraplus",
    "unload": "lorakern.unloading",
    "lora_linear": "lorakern.functional",
    "LoraLinearFunction": "lorakern.functional",
    "LinearNF4": "lorakern.nf4",
    "LorakernError": "lorakern.errors",
    "SaveAdapterCallback": "lorakern.integrations",  # needs transformers
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lorakern' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
