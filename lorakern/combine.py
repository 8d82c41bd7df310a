"""add_weighted_adapter: a new adapter from a weighted combination of existing ones, as PEFT defines it.

For adapters a_i with weights w_i, per layer (PEFT's LoraModel.add_weighted_adapter):
    linear:  all adapters of one rank r and (lorakern's rule, PEFT does not check) the same targets;
             c_i = w_i s_i;  A = sum_i sign(c_i) sqrt|c_i| A_i,  B = sum_i sqrt|c_i| B_i   (new rank r)
             (B A is the weighted sum of the updates only for a single adapter: PEFT's definition)
    cat:     A = [w_1 s_1 A_1; w_2 s_2 A_2; ...],  B = [B_1, B_2, ...]          (rank sum r_i, zero rows
             where a layer lacks an adapter); B A = sum_i w_i s_i B_i A_i exactly; targets may differ
    svd:     Delta = sum_i w_i s_i B_i A_i;  U S V^T = svd(Delta);  B = U_k S_k, A = V_k^T  (rank k = svd_rank,
             default max r_i); the best rank-k approximation of the weighted sum; targets may differ
The new adapter's lora_alpha is its rank (scaling 1 without rsLoRA), its config the first adapter's with
the new rank and the union of the targets; it is added inactive, as any later adapter.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import torch
from torch import nn

from lorakern.errors import AdapterError
from lorakern.injection import _apply_active, _configs, lora_layers
from lorakern.layer import LoraLinear

COMBINATIONS = ("linear", "cat", "svd")


def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: Optional[int] = None) -> nn.Module:
    """Add ``adapter_name``, the ``combination_type`` combination of ``adapters`` weighted by ``weights``."""
    configs = _configs(model)
    unknown = [a for a in adapters if a not in configs]
    if unknown or not adapters:
        raise AdapterError(f"unknown adapter(s) {unknown or adapters}; this model has {list(configs)}")
    if len(weights) != len(adapters):
        raise AdapterError(f"{len(adapters)} adapters but {len(weights)} weights; give one weight per adapter")
    if adapter_name in configs:
        raise AdapterError(f"an adapter named {adapter_name!r} exists already (adapters: {list(configs)}); pick "
                           f"another adapter_name")
    if combination_type not in COMBINATIONS:
        raise AdapterError(f"combination_type={combination_type!r} is not supported; use one of {COMBINATIONS}")
    if svd_rank is not None and combination_type != "svd":
        raise AdapterError("svd_rank applies to combination_type='svd' only")
    layers = lora_layers(model)
    others = sorted(n for n, layer in layers.items() if not isinstance(layer, LoraLinear)
                    and any(a in layer.adapters for a in adapters))
    if others:
        raise AdapterError(f"add_weighted_adapter combines adapters on Linear layers only; {adapters} also adapt "
                           f"{others[:3]} ({type(layers[others[0]]).__name__}). Combine adapters that target Linear "
                           f"layers only")
    targets = {a: sorted(n for n, layer in layers.items() if a in layer.adapters) for a in adapters}
    ranks = {a: {layer.adapters[a].r for layer in layers.values() if a in layer.adapters} for a in adapters}
    if combination_type == "linear":
        if len({tuple(t) for t in targets.values()}) > 1:
            raise AdapterError(f"combination_type='linear' needs adapters with the same target modules, and {adapters} "
                               f"target different ones; 'cat' or 'svd' combine adapters with different targets")
        all_ranks = set().union(*ranks.values())
        if len(all_ranks) > 1:
            raise AdapterError(f"combination_type='linear' needs adapters of one rank, got ranks {sorted(all_ranks)}; "
                               f"'cat' or 'svd' combine adapters of different ranks")
        new_rank = all_ranks.pop()
    elif combination_type == "cat":
        new_rank = sum(max([configs[a].r, *configs[a].rank_pattern.values()]) for a in adapters)
    else:
        new_rank = svd_rank or max(max(r) for r in ranks.values())
    names = sorted(set().union(*targets.values()))
    first = configs[adapters[0]]
    config = replace(first, r=new_rank, lora_alpha=new_rank, rank_pattern={}, alpha_pattern={}, target_modules=names,
                     init_lora_weights=True)
    for name in names:
        layer = layers[name]
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapters]
        rank = new_rank
        A, B = _combined(layer, present, combination_type, rank)
        new = layer.add_adapter(adapter_name, r=rank, alpha=rank, dropout=first.lora_dropout,
                                use_rslora=first.use_rslora, dtype=layer.adapters[present[0][0]].lora_A.dtype)
        with torch.no_grad():
            new.lora_A.copy_(A)
            new.lora_B.copy_(B)
    model.lorakern_configs = {**configs, adapter_name: config}
    _apply_active(model)
    return model


def _combined(layer, present: list[tuple[str, float]], combination_type: str, rank: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the combination on one layer, in fp32 at least."""
    adapter = lambda a: layer.adapters[a]
    dtype = torch.promote_types(adapter(present[0][0]).lora_A.dtype, torch.float32)
    if combination_type == "linear":
        coefficients = [(a, w * adapter(a).scaling) for a, w in present]
        A = sum(math.copysign(math.sqrt(abs(c)), c) * adapter(a).lora_A.to(dtype) for a, c in coefficients)
        B = sum(math.sqrt(abs(c)) * adapter(a).lora_B.to(dtype) for a, c in coefficients)
        return A, B
    if combination_type == "cat":
        A_parts = torch.cat([w * adapter(a).scaling * adapter(a).lora_A.to(dtype) for a, w in present], dim=0)
        B_parts = torch.cat([adapter(a).lora_B.to(dtype) for a, w in present], dim=1)
        A = A_parts.new_zeros(rank, A_parts.shape[1])
        B = B_parts.new_zeros(B_parts.shape[0], rank)
        A[: A_parts.shape[0]] = A_parts
        B[:, : B_parts.shape[1]] = B_parts
        return A, B
    delta = sum(w * adapter(a).delta(dtype) for a, w in present)  # (out, in)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, S.numel())
    B = torch.zeros(delta.shape[0], rank, dtype=dtype, device=delta.device)
    A = torch.zeros(rank, delta.shape[1], dtype=dtype, device=delta.device)
    B[:, :k] = U[:, :k] * S[:k]
    A[:k] = Vh[:k]
    return A, B


__all__ = ["COMBINATIONS", "add_weighted_adapter"]
