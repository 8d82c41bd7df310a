"""Merging DoRA adapters into a LoraLinear's base weight, by PEFT's rule.

Adapters fold in one after another: a plain one adds s B A; a DoRA one makes W' = c (W + s B A) row-wise,
c = m / n, with n the norm of (the unmerged base + its own s B A), the n its forward uses. That n is kept
(``layer._merged_norms``) because unmerge cannot recompute it from the merged weight:
W = W' / c - s B A. Everything runs in fp32 at least (a 4-bit base decoded).
"""
from __future__ import annotations

import torch

from lorakern.errors import LorakernError


def merge_dtype(layer) -> torch.dtype:
    return torch.promote_types(layer.base.dtype(layer), torch.float32)


@torch.no_grad()
def compose(layer, weight: torch.Tensor, unmerged_weight: torch.Tensor, names: list[str]
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(``weight`` with adapters ``names`` folded in, in order; {DoRA adapter: the norm it was folded with})."""
    norms = {}
    for name in names:
        adapter = layer.adapters[name]
        delta = adapter.delta(weight.dtype).to(weight.dtype)
        if adapter.use_dora:
            norms[name] = torch.linalg.vector_norm(unmerged_weight + delta, dim=1)
            scale = adapter.lora_magnitude_vector.detach().to(weight.dtype) / norms[name]
            weight = scale[:, None] * (weight + delta)
        else:
            weight = weight + delta
    return weight, norms


@torch.no_grad()
def unmerged(layer, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with the layer's merged adapters taken out again, the last merged first."""
    for name in reversed(layer.merged_adapters):
        adapter = layer.adapters[name]
        delta = adapter.delta(weight.dtype).to(weight.dtype)
        if adapter.use_dora:
            norm = layer._merged_norms[name].to(weight.dtype)
            weight = weight / (adapter.lora_magnitude_vector.detach().to(weight.dtype) / norm)[:, None]
        weight = weight - delta
    return weight


def write_weight(layer, out_in: torch.Tensor, safe: bool, what: str) -> None:
    """Replace the base weight by ``out_in`` (out, in); a 4-bit base requantizes (its caller asked for that)."""
    if layer.base.merges_in_place:
        if safe and not torch.isfinite(out_in).all():
            raise LorakernError(f"NaNs or infs detected in the merged weight of {what}; the weight was left "
                                f"unchanged. Check lora_A, lora_B and lora_magnitude_vector for non-finite values")
        with torch.no_grad():
            layer.weight.copy_(layer.base.stored_layout(out_in).to(layer.weight.dtype))
    else:
        layer.base.requantize_(layer, out_in - layer.base.decoded(layer, out_in.dtype), safe, what)


def merge(layer, names: list[str], safe: bool, what: str) -> None:
    """Fold adapters ``names`` into the layer's weight (after those already merged), keeping DoRA's norms."""
    weight = layer.base.decoded(layer, merge_dtype(layer))
    merged, norms = compose(layer, weight, unmerged(layer, weight), names)
    write_weight(layer, merged, safe, what)
    layer._merged_norms.update(norms)


def unmerge(layer, what: str) -> None:
    """Take every merged adapter out of the layer's weight again (the caller resets merged_adapters)."""
    write_weight(layer, unmerged(layer, layer.base.decoded(layer, merge_dtype(layer))), False, what)
    layer._merged_norms.clear()


__all__ = ["compose", "merge", "merge_dtype", "unmerge", "unmerged", "write_weight"]
