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

DoRA slots (``MixedCall.magnitudes``; lorakern.dora attaches this path with its norm as ``run_mixed_dora``)
give their rows PEFT's DoRA output, with c_a = m_a / ||W + s_a B_a A_a|| (row norms, detached):

    y[rows of a] += (c_a - 1) (x~ W^T) + c_a s_a (x~ A_a^T) B_a^T      x~ W^T = (y - b)[rows of a] without dropout

The norm costs one pass over W per DoRA adapter (W A_a^T, N K r_a; ||W_i||^2 is the layer's cached one),
and with dropout the base product of the adapter's dropped rows runs again (M_a N K; traced, on all M
rows). Autograd through these torch ops gives m_a its gradient from its own rows only.
"""
from __future__ import annotations

import dataclasses
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


def _dora_scales(call: MixedCall, norm: Optional[Callable]) -> list:
    """Per slot: c = m / ||W + s B A|| (rows; the norm detached) in x's dtype for a DoRA slot, else None."""
    if call.magnitudes is None:
        return [None] * len(call.adapters)
    if norm is None:
        raise LorakernError("this mixed call has DoRA slots but no norm was given (lorakern.dora attaches the "
                            "torch path's); run it through lorakern.dispatch.lora_forward_mixed")
    scales = []
    for adapter, magnitude in zip(call.adapters, call.magnitudes):
        if adapter is None or magnitude is None:
            scales.append(None)
            continue
        n = norm(call.weight, adapter[0], adapter[1], adapter[2], call.base_norm_sq)
        scales.append((magnitude.to(n.dtype) / n).to(call.x.dtype))
    return scales


def _dora_term(call: MixedCall, base_output: Callable, y_rows: torch.Tensor, x_lora: torch.Tensor, dropped: bool,
               A: torch.Tensor, B: torch.Tensor, s: float, c: torch.Tensor) -> torch.Tensor:
    """(c - 1) (x~ W^T) + c s (x~ A^T) B^T for these rows (``y_rows``: their x W^T + b)."""
    if dropped:  # x~ W^T of the dropped rows: the base product again
        base_part = base_output(dataclasses.replace(call, x=x_lora, bias=None))
    else:
        base_part = y_rows - call.bias if call.bias is not None else y_rows
    return (c - 1) * base_part + c * ((x_lora @ A.t()) @ (B.t() * s))


def run_torch(call: MixedCall, base_output: Callable[[MixedCall], torch.Tensor],
              dropout_mask: Callable, norm: Optional[Callable] = None) -> torch.Tensor:
    """y for a MixedCall in plain torch; ``base_output(call)`` is x W^T + b for the call's base. ``norm``
    (lorakern.dora.weight_norm: weight, A, B, s, base_norm_sq -> detached row norms of W + s B A) for a call
    with DoRA slots."""
    y = base_output(call)
    x = call.x
    scales = _dora_scales(call, norm)
    if torch.compiler.is_compiling() or len(call.counts) != len(call.adapters):
        base = y
        for a, adapter in enumerate(call.adapters):
            if adapter is None:
                continue
            A, B, s, p = adapter
            keep = (call.slot == a).to(x.dtype)[:, None]
            x_lora = _dropped(x, p, call.seed, None, x.shape, x.device, dropout_mask)
            if scales[a] is not None:
                # this adapter's DoRA term on every row, zeroed outside its rows
                y = y + _dora_term(call, base_output, base, x_lora, p > 0, A, B, s, scales[a]) * keep
                continue
            # u = (x~ A^T) masked to this adapter's rows; y += s u B^T
            u = (x_lora @ A.t()) * keep
            y = y + u @ (B.t() * s)
        return y
    rows_parts, terms = [], []
    start = 0
    for adapter, count, c in zip(call.adapters, call.counts, scales):
        rows = call.order[start:start + count]
        start += count
        if adapter is None:
            continue  # this layer lacks the adapter: its rows keep the base output
        A, B, s, p = adapter
        x_a = _dropped(x.index_select(0, rows), p, call.seed, rows, x.shape, x.device, dropout_mask)
        if c is not None:
            terms.append(_dora_term(call, base_output, y.index_select(0, rows), x_a, p > 0, A, B, s, c))
        else:
            # s (x~_a A^T) B^T, s folded into the r x N factor
            terms.append((x_a @ A.t()) @ (B.t() * s))
        rows_parts.append(rows)
    if not terms:
        return y
    return y.index_add(0, torch.cat(rows_parts), torch.cat(terms))


def _adapters_for(layer: nn.Module, names: Sequence[str]) -> list:
    modules = layer.adapters  # each module lookup goes through nn.Module.__getattr__: once per call, not per name
    found = [modules[n] if n in modules else None for n in names]
    training = layer.training
    # a DoRA adapter's entry carries its magnitude (dispatch.lora_forward_mixed)
    return [None if a is None else (a.lora_A, a.lora_B, a.scaling, a.dropout if training else 0.0)
            + ((a.lora_magnitude_vector,) if a.use_dora else ()) for a in found]


def forward_grouped(layer: nn.Module, x: torch.Tensor, names: Sequence[str], groups: TokenGroups) -> torch.Tensor:
    """The layer's output with the rows of x (flattened to (M, K)) grouped by ``groups`` over ``names``."""
    if layer.merged_adapters:
        raise AdapterError(f"this layer has merged adapters {layer.merged_adapters}, which every row would get; "
                           f"unmerge() it before a mixed batch")
    adapters = _adapters_for(layer, names)
    if all(a is None for a in adapters):
        # none of the batch's adapters is on this layer: every row gets the base output, as the plain layer
        # computes it (no grouping, no mixed call: a batch costs here what the base layer costs)
        return layer.base.forward(layer, x)
    # DoRA slots' norms use the layer's cached ||W_i||^2 (a merged layer was refused above)
    norm_sq = layer._base_norm_sq() if any(a is not None and len(a) > 4 for a in adapters) else None
    return dispatch.lora_forward_mixed(x, layer.base.kind, layer.base.operand(layer), layer.bias, adapters, groups,
                                       seed=layer.dropout_seed, compute_dtype=layer.compute_dtype,
                                       requested=layer.backend, base_norm_sq=norm_sq)


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
