"""The row grouping of a mixed-adapter batch (lorakern.row_adapters.adapter_rows builds it), and the
per-row forward of a modules_to_save wrapper.

A row is the first dimension of the model's input; inside a layer every token of a row uses the row's
adapter. The rows are grouped once per batch (``RowGroups``: one stable sort by adapter, on the host) and
every layer derives its token-level grouping (``TokenGroups``) from it, cached per tokens-per-row and device.
The layers read the groups from their ``row_groups`` attribute, set for the duration of the block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from lorakern.errors import LorakernError


@dataclass
class TokenGroups:
    """The grouping of a layer's flattened input rows (tokens): the fields of dispatch.MixedCall."""

    slot: torch.Tensor       # (M,) int64: each row's slot, -1 = base only
    order: torch.Tensor      # (M,) int64: rows sorted by slot (stable), base-only rows last
    offsets: torch.Tensor    # (n_slots + 1,) int64: slot a's rows are order[offsets[a]:offsets[a + 1]]
    counts: tuple[int, ...]  # host copy of the segment sizes; empty while torch.compile traces


def group_rows(slot: torch.Tensor, n_slots: int) -> TokenGroups:
    """Group rows by ``slot`` ((M,) int64 in [-1, n_slots)): shape-static ops only, so torch.compile traces
    it without a graph break (the host ``counts`` are read only in eager)."""
    slot = slot.to(torch.int64)
    key = torch.where(slot < 0, torch.full_like(slot, n_slots), slot)  # base-only rows sort last
    order = torch.sort(key, stable=True).indices
    per_slot = (key[None, :] == torch.arange(n_slots, device=slot.device)[:, None]).sum(dim=1)
    offsets = torch.cat([per_slot.new_zeros(1), torch.cumsum(per_slot, 0)])
    counts = () if torch.compiler.is_compiling() else tuple(int(c) for c in per_slot.tolist())
    return TokenGroups(slot, order, offsets, counts)


class RowGroups:
    """One batch's rows grouped by adapter: ``names`` are the slots (adapters) in order, ``slot`` the slot
    of each row (-1: base only), ``order`` / ``offsets`` / ``counts`` the stable grouping, built once."""

    def __init__(self, rows: Sequence[Optional[str]], names: Sequence[str]) -> None:
        self.rows = tuple(rows)
        self.names = tuple(names)
        self.batch_size = len(self.rows)
        index = {name: i for i, name in enumerate(self.names)}
        self.slot = torch.tensor([-1 if r is None else index[r] for r in self.rows], dtype=torch.int64)
        grouped = group_rows(self.slot, len(self.names))
        self.order, self.offsets, self.counts = grouped.order, grouped.offsets, grouped.counts
        self._tokens: dict[tuple[int, str], TokenGroups] = {}
        # A forward recorded a graph whose backward has not run yet: autograd accumulates a gradient only
        # into a tensor that still requires one, so the block's requires_grad flags outlive the block
        # until then (``finish``).
        self.graph_pending = False
        self._restore: Optional[Callable[[], None]] = None
        self._queued = False

    def recorded(self, output: torch.Tensor) -> None:
        """A layer's forward in this batch built a graph ending in ``output``: when its backward reaches
        ``output``, queue ``finish`` for the end of that backward (eager only: traced code skips the hook,
        and the flags are then restored by the next plain forward or adapter_rows block)."""
        self.graph_pending = True
        if output.requires_grad and not torch.compiler.is_compiling():
            output.register_hook(self._backward_reached)

    def _backward_reached(self, grad: torch.Tensor) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)

    def _backward_done(self) -> None:
        self._queued = False
        self.graph_pending = False
        self.finish()

    def finish(self) -> None:
        """Restore what the ended block deferred (the requires_grad flags; the rows kept for a
        checkpointed recomputation). A no-op while the block runs and once done."""
        restore, self._restore = self._restore, None
        if restore is not None:
            restore()

    def tokens(self, tokens_per_row: int, device: torch.device) -> TokenGroups:
        """The grouping of a layer input with ``tokens_per_row`` rows per batch row (flattened row-major, so
        batch row b owns rows b T .. b T + T - 1): each token inherits its row's slot, and the token order
        is the row order with each row expanded in place, so no second sort. Cached in eager."""
        key = (tokens_per_row, str(device))
        cached = None if torch.compiler.is_compiling() else self._tokens.get(key)
        if cached is not None:
            return cached
        T = tokens_per_row
        steps = torch.arange(T, dtype=torch.int64)
        slot = self.slot[:, None].expand(self.batch_size, T).reshape(-1)
        order = (self.order[:, None] * T + steps[None, :]).reshape(-1)
        if torch.compiler.is_compiling():
            # the host counts would be guarded on (a recompile per assignment): traced paths read slot only
            return TokenGroups(slot.to(device), order.to(device), (self.offsets * T).to(device), ())
        groups = TokenGroups(slot.to(device), order.to(device), (self.offsets * T).to(device),
                             tuple(c * T for c in self.counts))
        self._tokens[key] = groups
        return groups

    def rows_of(self, slots: Sequence[int]) -> torch.Tensor:
        """The batch rows (sorted) whose slot is in ``slots`` (len(names): the base-only rows), on the host."""
        n = len(self.names)  # slot n: the base-only rows, last in the order
        parts = [self.order[int(self.offsets[a]):(int(self.offsets[a + 1]) if a < n else None)] for a in slots]
        if not parts:
            return self.order.new_zeros(0)
        return torch.sort(torch.cat(parts)).values

    def __repr__(self) -> str:
        return f"RowGroups(names={list(self.names)}, counts={list(self.counts)}, batch_size={self.batch_size})"


def pending(module: nn.Module) -> Optional[RowGroups]:
    """The rows of a block that has ended but whose backward has not: returned while that backward
    recomputes a checkpointed forward; a forward outside any backward ends the block's state instead."""
    groups = module.pending_rows
    if groups is None or torch.compiler.is_compiling():
        return None
    # -1 outside a backward pass (torch has no public way to ask whether autograd is running one)
    if torch._C._current_graph_task_id() >= 0:
        return groups
    groups.finish()
    return None


def check_batch(groups: RowGroups, x: torch.Tensor, where: str) -> int:
    """Tokens per row of ``x`` (its first dimension must be the batch); a clear error otherwise."""
    if x.dim() < 2 or x.shape[0] != groups.batch_size:
        raise LorakernError(f"adapter_rows gave {groups.batch_size} row names but {where} got an input of shape "
                            f"{tuple(x.shape)}, whose first dimension is not that batch size; give one adapter name "
                            f"(or None) per row of the batch")
    return x[0].numel() // x.shape[-1]


def _row_slice(value: Any, rows: torch.Tensor, batch: int) -> Any:
    if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == batch:
        return value.index_select(0, rows.to(value.device))
    return value


def wrapper_forward(wrapper: nn.Module, groups: RowGroups, args: tuple, kwargs: dict) -> torch.Tensor:
    """A modules_to_save wrapper in a mixed batch: each adapter's copy on its rows, the original module on
    the rest (base-only rows, and adapters without a copy here). Eager: each copy runs on its rows' slice
    and its outputs are scattered into the original's; traced: every module runs on the whole batch and
    each row takes its own module's output (no data-dependent shapes). A copy with no rows still runs
    (on an empty slice), so its parameters get a zero gradient, as an adapter's LoRA factors do then."""
    batch = groups.batch_size
    first = next((a for a in (*args, *kwargs.values()) if torch.is_tensor(a)), None)
    if first is not None:
        check_batch(groups, first if first.dim() >= 2 else first[:, None], "a modules_to_save module")
    copies = [(a, wrapper.modules_to_save[n]) for a, n in enumerate(groups.names) if n in wrapper.modules_to_save]
    if torch.compiler.is_compiling():
        out = wrapper.original_module(*args, **kwargs)
        for a, module in copies:
            mine = module(*args, **kwargs)
            keep = (groups.slot.to(mine.device) == a).reshape(batch, *([1] * (mine.dim() - 1)))
            out = torch.where(keep, mine, out)
        if torch.is_grad_enabled():
            groups.recorded(out)
        return out
    # the original runs on the whole batch (when any row needs it), so that base-only rows get exactly
    # the base model's output (a GEMM over a different number of rows may round differently)
    others = groups.rows_of([a for a in range(len(groups.names)) if a not in dict(copies)] + [len(groups.names)])
    out = wrapper.original_module(*args, **kwargs) if others.numel() else None
    parts = []
    for a, module in copies:
        rows = groups.rows_of([a])
        sliced_args = tuple(_row_slice(v, rows, batch) for v in args)
        sliced_kwargs = {k: _row_slice(v, rows, batch) for k, v in kwargs.items()}
        parts.append((rows, module(*sliced_args, **sliced_kwargs)))
    if not all(torch.is_tensor(o) and o.dim() >= 1 and o.shape[0] == rows.numel() for rows, o in parts) or not (
            out is None or torch.is_tensor(out) and out.dim() >= 1 and out.shape[0] == batch):
        raise LorakernError(f"a modules_to_save module in a mixed batch must return one tensor with a row per batch "
                            f"row; {type(wrapper.original_module).__name__} returned something else")
    if not parts:
        return out
    rows = torch.cat([r for r, _ in parts]).to(parts[0][1].device)
    outs = torch.cat([o for _, o in parts])
    if out is None:
        out = outs.new_zeros(batch, *outs.shape[1:])
    out = out.index_copy(0, rows, outs.to(out.dtype))
    if torch.is_grad_enabled():
        groups.recorded(out)
    return out


__all__ = ["RowGroups", "TokenGroups", "check_batch", "group_rows", "pending", "wrapper_forward"]
