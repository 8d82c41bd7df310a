"""``adapter_rows``: a mixed-adapter batch on a model, each row running (and training) its own adapter.

    with lorakern.adapter_rows(model, ["sst2", "mrpc", None, "sst2"]):   # one name per batch row
        loss = model(**batch).loss
    loss.backward()

The grouping itself is lorakern.rows; the layers' mixed forward lorakern.mixed. See docs/mixed.md.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

from torch import nn

from lorakern.errors import AdapterError
from lorakern.injection import _train_biases, _wrappers, adapter_names_or_raise, lora_layers
from lorakern.rows import RowGroups


@contextmanager
def adapter_rows(model: nn.Module, rows: Sequence[Optional[str]], active: Optional[Sequence[str]] = None
                 ) -> Iterator[RowGroups]:
    """Within the block each row of the batch runs the adapter named for it (None: the base model alone).

    The adapters named in ``rows`` (and those in ``active``, which may add adapters that have no rows in
    this batch: they get zero gradients, as DDP needs every rank to train the same set) are active and
    trainable for the block, each from its own rows only; on exit the previous active set and every
    ``requires_grad`` are restored. The batch size is checked at the first layer the batch reaches.

    ``loss.backward()`` may run inside the block or after it: autograd accumulates a gradient only into a
    tensor that still requires one, so when the block ends with a graph whose backward has not run, the
    requires_grad flags stay as the block set them (and the rows stay with the layers, for an activation
    checkpointing recomputation) until that backward ends; under torch.compile, until the next forward
    outside a block or the next adapter_rows block."""
    known = adapter_names_or_raise(model)
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
        raise TypeError(f"rows must be a list with one adapter name (or None) per batch row, got {rows!r}")
    rows = list(rows)
    if not rows:
        raise AdapterError("rows is empty; give one adapter name (or None for the base model) per batch row")
    bad = [r for r in rows if r is not None and not isinstance(r, str)]
    if bad:
        raise TypeError(f"rows holds {bad[0]!r} ({type(bad[0]).__name__}); each row is an adapter name or None")
    active = [] if active is None else list(active)
    unknown = sorted({r for r in (*rows, *active) if r is not None and r not in known})
    if unknown:
        raise AdapterError(f"unknown adapter(s) {unknown} in adapter_rows; this model has {known} "
                           f"(None marks a base-only row)")
    # slots in the model's adapter order: the same set of adapters gives the same slots (no recompile under
    # torch.compile, whose trace depends on the slots' adapters but not on which rows use them)
    named = {*active, *(r for r in rows if r is not None)}
    names = [n for n in known if n in named]
    layers, wrappers = lora_layers(model), _wrappers(model)
    merged = [n for n, layer in layers.items() if layer.merged_adapters]
    if merged:
        raise AdapterError(f"layers {merged[:3]} have merged adapters, which every row would get; call unmerge() "
                           f"on them before a mixed batch")
    if any(m.row_groups is not None for m in (*layers.values(), *wrappers.values())):
        raise AdapterError("adapter_rows blocks do not nest; leave the outer block first")
    for module in (*layers.values(), *wrappers.values()):
        if module.pending_rows is not None:  # an earlier block whose backward never ran
            module.pending_rows.finish()
    groups = RowGroups(rows, names)
    saved_active = model.lorakern_active
    saved_layers = {layer: list(layer.active_adapters) for layer in layers.values()}
    saved_wrappers = {wrapper: wrapper.active_adapter for wrapper in wrappers.values()}
    saved_grad = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for param, _ in saved_grad:
            param.requires_grad_(False)
        for layer in layers.values():
            layer.set_adapter(names)
            layer.row_groups = groups
        for wrapper in wrappers.values():
            for name, module in wrapper.modules_to_save.items():
                module.requires_grad_(name in names)
            wrapper.row_groups = groups
        _train_biases(model, names, layers)
        model.lorakern_active = names
        yield groups
    finally:
        modules = (*layers.values(), *wrappers.values())
        for module in modules:
            module.row_groups = None
        for layer, previous in saved_layers.items():
            layer.active_adapters = previous
        for wrapper, previous in saved_wrappers.items():
            wrapper.active_adapter = previous
        model.lorakern_active = saved_active

        def restore() -> None:
            for param, flag in saved_grad:
                param.requires_grad_(flag)
            for module in modules:
                module.pending_rows = None

        if groups.graph_pending:
            # backward() after the block: keep the flags (and the rows, for a checkpointed recomputation)
            # until that backward ends
            for module in modules:
                module.pending_rows = groups
            groups._restore = restore
        else:
            restore()


__all__ = ["adapter_rows"]
