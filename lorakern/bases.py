"""The frozen base of a LoRA layer, pluggable: a dense weight (nn.Linear's, or GPT-2 Conv1D's transposed
one) or NF4 storage. A base says what it can do; LoraLinear writes forward, merge, delta weight,
to_linear and unload once on top of it.

A base holds no tensors itself: the layer does (``weight`` for a dense base, under nn.Linear's key; the
``nf4`` NF4Storage for a 4-bit base, under bitsandbytes' keys), so a model's base state dict is the one
its plain layers had. The base object is the strategy that reads them.
"""
from __future__ import annotations

import warnings
from typing import Optional, Union

import torch
from torch import nn

from lorakern.errors import LorakernError
from lorakern.nf4.codec import _DTYPES, quantize_nf4
from lorakern.nf4.modules import LinearNF4, load_nf4_entries, nf4_linear, quantization_error, save_nf4_entries
from lorakern.nf4.storage import NF4Storage


class DenseBase:
    """A full-precision weight, stored (out, in) like nn.Linear's or (in, out) like GPT-2's Conv1D.
    Merging adds the update to it in place; unmerging subtracts it."""

    kind = "dense"
    merges_in_place = True

    def __init__(self, fan_in_fan_out: bool = False, module_type: type = nn.Linear) -> None:
        self.fan_in_fan_out = fan_in_fan_out
        self.module_type = module_type

    def operand(self, layer: nn.Module) -> torch.Tensor:
        """The weight as (out, in): a view for Conv1D's transposed storage."""
        return layer.weight.t() if self.fan_in_fan_out else layer.weight

    def dtype(self, layer: nn.Module) -> torch.dtype:
        return layer.weight.dtype

    def decoded(self, layer: nn.Module, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        weight = self.operand(layer)
        return weight if dtype is None else weight.to(dtype)

    def stored_layout(self, out_in: torch.Tensor) -> torch.Tensor:
        return out_in.t() if self.fan_in_fan_out else out_in

    def add_(self, layer: nn.Module, delta_out_in: torch.Tensor, safe: bool, what: str) -> None:
        delta = self.stored_layout(delta_out_in).to(layer.weight.dtype)
        with torch.no_grad():
            if safe:
                merged = layer.weight + delta
                if not torch.isfinite(merged).all():
                    raise LorakernError(f"NaNs or infs detected in the merged weight of {what}; the weight was left "
                                        f"unchanged. Check lora_A and lora_B for non-finite values (or an fp16 "
                                        f"overflow: merge in a wider dtype)")
                layer.weight.copy_(merged)
            else:
                layer.weight.add_(delta)

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.operand(layer), layer.bias)

    def module(self, layer: nn.Module) -> nn.Module:
        """The base layer alone (nn.Linear, or the wrapped Conv1D), sharing the layer's weight and bias."""
        with torch.device("meta"):
            if self.module_type is not nn.Linear and self.fan_in_fan_out:
                base = self.module_type(layer.out_features, layer.in_features)
            else:
                base = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        base.weight = layer.weight
        base.bias = layer.bias
        return base

    def describe(self, layer: nn.Module) -> str:
        return ", fan_in_fan_out=True" if self.fan_in_fan_out else ""


class NF4Base:
    """A weight in bitsandbytes' NF4 (``layer.nf4``), computed in ``compute_dtype``. It cannot absorb an
    update exactly: merging requantizes only when asked (and reports the error it adds); to_linear gives
    the full-precision merge."""

    kind = "nf4"
    merges_in_place = False

    def __init__(self, compute_dtype: Optional[torch.dtype] = None, module_type: type = nn.Linear) -> None:
        self.compute_dtype = compute_dtype
        self.module_type = module_type
        self.fan_in_fan_out = False  # the storage is always (out, in): Conv1D weights are transposed first

    def operand(self, layer: nn.Module) -> NF4Storage:
        return layer.nf4

    def dtype(self, layer: nn.Module) -> torch.dtype:
        """The dtype of the weight that was quantized (what a full-precision merge returns)."""
        return _DTYPES[layer.nf4.dtype_name]

    def decoded(self, layer: nn.Module, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return layer.nf4.dequantize(dtype or self.compute_dtype or self.dtype(layer))

    def stored_layout(self, out_in: torch.Tensor) -> torch.Tensor:
        return out_in

    def requantize_(self, layer: nn.Module, delta_out_in: torch.Tensor, safe: bool, what: str) -> dict:
        """W := NF4(decode(W) + delta), in place; returns the error that requantizing added (and warns)."""
        merged = layer.nf4.dequantize(torch.float32) + delta_out_in.float()
        if safe and not torch.isfinite(merged).all():
            raise LorakernError(f"NaNs or infs detected in the merged weight of {what}; the 4-bit weight was left "
                                f"unchanged. Check lora_A and lora_B for non-finite values")
        storage = layer.nf4
        fresh = NF4Storage(quantize_nf4(merged.to(self.dtype(layer)), storage.blocksize, storage.double_quant),
                           storage.quant_storage)
        report = quantization_error(fresh, merged)
        layer.nf4 = fresh
        warnings.warn(f"requantizing {what} to NF4 changed its weight: max abs error {report['max_abs']:.3g} "
                      f"({100 * report['max_rel']:.2f}% of its max |w|), RMS {report['rms']:.3g}", stacklevel=3)
        return report

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, layer.nf4, layer.bias, self.compute_dtype)

    def module(self, layer: nn.Module) -> nn.Module:
        """The frozen 4-bit base layer alone, sharing the layer's storage and bias."""
        return LinearNF4(layer.nf4, layer.bias, self.compute_dtype)

    def save(self, layer: nn.Module, destination: dict, prefix: str, keep_vars: bool) -> None:
        save_nf4_entries(layer.nf4, destination, prefix, keep_vars)

    def load(self, layer: nn.Module, state_dict: dict, prefix: str, missing_keys: list, error_msgs: list) -> None:
        load_nf4_entries(layer, state_dict, prefix, missing_keys, error_msgs)

    def describe(self, layer: nn.Module) -> str:
        return f", nf4 blocksize={layer.nf4.blocksize}, double_quant={layer.nf4.double_quant}"


Base = Union[DenseBase, NF4Base]

__all__ = ["Base", "DenseBase", "NF4Base"]
