"""Mixed-adapter batches in a layer: the plain-torch implementation of a MixedCall (registered with
lorakern.dispatch by lorakern.functional for a dense base and lorakern.nf4.lora for an NF4 one) and the
layer's mixed forward (the C implementation is lorakern.mixed_c).

    y = x W^T + b;   y[rows of a] += s_a (dropout_a(x[rows of a]) A_a^T) B_a^T   for each adapter a

Eager: each adapter's rows are gathered (index_select over ``order``), its two thin products run on them,
and all the terms land in y with one index_add (a loop over adapters, none over rows). Traced by
torch.compile: the gather's size depends on the data, which breaks the graph, so each adapter's term runs
on every row and a 0/1 row mask zeroes u = x A^T outside its rows (shape-static; the products cost M r
per adapter instead of M_a r). Autograd differentiates both: every adapter passed in gets a gradient,
zero when it has no rows (the empty products are still part of the graph; DDP needs that).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from lorakern import dispatch
from lorakern.dispatch import MixedCall
from lorakern.errors import AdapterError, LorakernError
from lorakern.rows import RowGroups, TokenGroups, check_batch, group_rows


def _dropped(x_rows: torch.Tensor, p: float, seed, rows: Optional[torch.Tensor], shape, device,
             dropout_mask: Callable) -> torch.Tensor:
    """The LoRA branch's input for these rows: x itself (p = 0); torch's dropout (global generator); or,
    with a fixed seed, the rows ``rows`` of the mask a single-adapter call would draw for all of x."""
    if p == 0:
        return x_rows
    if seed is None:
        return nn.functional.dropout(x_rows, p, training=True)
    mask = dropout_mask(seed, shape, p, device).to(x_rows.dtype)
    return x_rows * (mask if rows is None else mask.index_select(0, rows))


def run_torch(call: MixedCall, base_output: Callable[[MixedCall], torch.Tensor],
              dropout_mask: Callable) -> torch.Tensor:
    """y for a MixedCall in plain torch; ``base_output(call)`` is x W^T + b for the call's base."""
    y = base_output(call)
    x = call.x
    if torch.compiler.is_compiling() or len(call.counts) != len(call.adapters):
        for a, adapter in enumerate(call.adapters):
            if adapter is None:
                continue
            A, B, s, p = adapter
            keep = (call.slot == a).to(x.dtype)[:, None]
            # u = (x~ A^T) masked to this adapter's rows; y += s u B^T
            u = (_dropped(x, p, call.seed, None, x.shape, x.device, dropout_mask) @ A.t()) * keep
            y = y + u @ (B.t() * s)
        return y
    rows_parts, terms = [], []
    start = 0
    for adapter, count in zip(call.adapters, call.counts):
        rows = call.order[start:start + count]
        start += count
        if adapter is None:
            continue  # this layer lacks the adapter: its rows keep the base output
        A, B, s, p = adapter
        x_a = _dropped(x.index_select(0, rows), p, call.seed, rows, x.shape, x.device, dropout_mask)
        # s (x~_a A^T) B^T, s folded into the r x N factor
        terms.append((x_a @ A.t()) @ (B.t() * s))
        rows_parts.append(rows)
    if not terms:
        return y
    return y.index_add(0, torch.cat(rows_parts), torch.cat(terms))


def _adapters_for(layer: nn.Module, names: Sequence[str]) -> list:
    modules = layer.adapters  # each module lookup goes through nn.Module.__getattr__: once per call, not per name
    found = [modules[n] if n in modules else None for n in names]
    dora = [n for n, a in zip(names, found) if a is not None and getattr(a, "use_dora", False)]
    if dora:
        raise LorakernError(f"DoRA adapters {dora} cannot run in a mixed-adapter batch yet (their magnitude scale "
                            f"is per adapter, the mixed paths apply none); run their rows in a batch of their own "
                            f"(set_adapter) or use plain LoRA adapters for mixed batches")
    training = layer.training
    return [None if a is None else (a.lora_A, a.lora_B, a.scaling, a.dropout if training else 0.0) for a in found]


def forward_grouped(layer: nn.Module, x: torch.Tensor, names: Sequence[str], groups: TokenGroups) -> torch.Tensor:
    """The layer's output with the rows of x (flattened to (M, K)) grouped by ``groups`` over ``names``."""
    if layer.merged_adapters:
        raise AdapterError(f"this layer has merged adapters {layer.merged_adapters}, which every row would get; "
                           f"unmerge() it before a mixed batch")
    return dispatch.lora_forward_mixed(x, layer.base.kind, layer.base.operand(layer), layer.bias,
                                       _adapters_for(layer, names), groups, seed=layer.dropout_seed,
                                       compute_dtype=layer.compute_dtype, requested=layer.backend)


def layer_forward(layer: nn.Module, x: torch.Tensor, groups: RowGroups) -> torch.Tensor:
    """A LoraLinear inside lorakern.adapter_rows: the first dimension of x is the batch; every token of a
    row uses the row's adapter (the base alone where this layer lacks it, or the row has none)."""
    tokens_per_row = check_batch(groups, x, f"LoraLinear({layer.in_features}, {layer.out_features})")
    y = forward_grouped(layer, x, groups.names, groups.tokens(tokens_per_row, x.device))
    if torch.is_grad_enabled():
        groups.recorded(y)
    return y


def forward_rows(layer: nn.Module, x: torch.Tensor, row_adapter: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """The layer-level form: ``row_adapter`` ((M,) integers) gives, for each row of x flattened to (M, K),
    the index in ``names`` of its adapter, or -1 for the base alone. Groups once per call."""
    unknown = [n for n in names if n not in layer.adapters]
    if unknown:
        raise AdapterError(f"unknown adapter(s) {unknown}; this layer has {list(layer.adapters)}")
    rows = x.numel() // x.shape[-1] if x.dim() >= 1 else 0
    if row_adapter.dim() != 1 or row_adapter.shape[0] != rows or row_adapter.is_floating_point():
        raise LorakernError(f"row_adapter must be a 1-D integer tensor with one entry per row of the flattened "
                            f"input ({rows} rows), got shape {tuple(row_adapter.shape)} ({row_adapter.dtype})")
    if rows and not torch.compiler.is_compiling():
        low, high = int(row_adapter.min()), int(row_adapter.max())
        if low < -1 or high >= len(names):
            raise LorakernError(f"row_adapter holds {low if low < -1 else high}; entries index names "
                                f"(0..{len(names) - 1}) or are -1 for the base alone")
    return forward_grouped(layer, x, names, group_rows(row_adapter.to(x.device), len(names)))


__all__ = ["forward_grouped", "forward_rows", "layer_forward", "run_torch"]
