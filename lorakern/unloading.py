"""Leaving LoRA: merge_and_unload folds the active adapters into their layers' weights, unload drops every
adapter; both put the plain base layers (and modules_to_save's originals or trained copies) back and
forget the model's adapters."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from lorakern.errors import LorakernError
from lorakern.injection import _wrappers, lora_layers, set_submodule


def merge_and_unload(model: nn.Module, safe: bool = True, requantize: bool = False) -> nn.Module:
    """Fold the active adapters into their weights and put plain layers back (Linear, Conv1D; a 4-bit
    base becomes a full-precision nn.Linear holding its decoded weight plus the update, or with
    ``requantize=True`` NF4 again, the error that adds reported in a warning and
    ``model.requantize_errors``). modules_to_save keep the active adapter's trained copy.

    With ``safe`` every merge is checked for non-finite values before any weight changes."""
    from lorakern.nf4.modules import requantize as requantize_linear

    layers = lora_layers(model)
    for layer in layers.values():
        if hasattr(layer, "check_mergeable") and layer._unmerged_active():
            layer.check_mergeable()  # a layer whose update has no place in its weight refuses before any change
    # a 4-bit layer's full-precision merge, made once: checked below, then put in its place
    full = {name: layer.to_linear() for name, layer in layers.items() if layer.is_quantized}
    if safe:
        for name, layer in layers.items():
            merged = (full[name] if name in full else layer.merged_base()).weight
            if not torch.isfinite(merged).all():
                raise LorakernError(f"NaNs or infs detected in the merged weight of {name!r}; no layer was changed. "
                                    f"Check that layer's lora_A and lora_B for non-finite values")
    errors = {}
    for name, layer in layers.items():
        if name in full:
            replacement = full[name]
            if requantize:
                storage = layer.nf4
                replacement, errors[name] = requantize_linear(replacement, storage.blocksize, storage.double_quant,
                                                              layer.compute_dtype, storage.quant_storage)
        else:
            if layer._unmerged_active():
                layer.merge(safe=False)
            replacement = layer.unload()
        set_submodule(model, name, replacement)
    _unwrap_modules_to_save(model, keep_trained=True)
    if errors:
        worst = max(errors, key=lambda n: errors[n]["max_rel"])
        model.requantize_errors = errors
        warnings.warn(
            f"requantizing {len(errors)} merged layers to NF4 changed their weights: worst {worst!r} max abs error "
            f"{errors[worst]['max_abs']:.3g} ({100 * errors[worst]['max_rel']:.2f}% of its max |w|), RMS "
            f"{errors[worst]['rms']:.3g}; see model.requantize_errors",
            stacklevel=2,
        )
    _forget_adapters(model)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Drop every adapter and give the base layers back unmerged (PEFT's unload): LoRA layers become
    their base layer (sharing its tensors), modules_to_save their originals."""
    for name, layer in lora_layers(model).items():
        if layer.merged and not layer.is_quantized:
            layer.unmerge()
        set_submodule(model, name, layer.unload())
    _unwrap_modules_to_save(model, keep_trained=False)
    _forget_adapters(model)
    return model


def _unwrap_modules_to_save(model: nn.Module, keep_trained: bool) -> None:
    for name, wrapper in _wrappers(model).items():
        module = wrapper.active_module if keep_trained else wrapper.original_module
        set_submodule(model, name, module)


def _forget_adapters(model: nn.Module) -> None:
    for attribute in ("lorakern_configs", "lorakern_active"):
        if hasattr(model, attribute):
            delattr(model, attribute)
