"""modules_to_save: a module trained in full per adapter, kept beside its frozen original as PEFT's
ModulesToSaveWrapper does (same attribute names, so the same state-dict keys)."""
from __future__ import annotations

import copy
from typing import Optional

from torch import nn

from lorakern.errors import AdapterError
from lorakern.rows import pending, wrapper_forward


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full per adapter (PEFT's wrapper of the same name and keys): the original stays
    as it was (``original_module``, frozen) and each adapter trains its own copy
    (``modules_to_save.<adapter>``). The forward runs the active adapter's copy, or the original when no
    active adapter has one or adapters are disabled. In a mixed batch (lorakern.adapter_rows) each row
    runs its own adapter's copy."""

    row_groups = None  # set by lorakern.adapter_rows for the duration of a mixed batch
    pending_rows = None  # an ended block's rows until its backward ends (lorakern.rows.pending)

    def __init__(self, original: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.disabled = False
        self.add(adapter_name)

    def add(self, adapter_name: str) -> None:
        copy_ = copy.deepcopy(self.original_module)
        copy_.requires_grad_(True)
        self.modules_to_save[adapter_name] = copy_
        if self.active_adapter is None:
            self.active_adapter = adapter_name
        self.original_module.requires_grad_(False)

    def set_adapter(self, names: list[str]) -> None:
        having = [n for n in names if n in self.modules_to_save]
        if len(having) > 1:
            raise AdapterError(f"adapters {having} each train their own copy of this module (modules_to_save); only "
                               f"one of them can be active at a time: set_adapter one of them")
        self.active_adapter = having[0] if having else None
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == self.active_adapter)

    @property
    def active_module(self) -> nn.Module:
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        groups = self.row_groups if self.pending_rows is None else (self.row_groups or pending(self))
        if groups is not None and not self.disabled:
            return wrapper_forward(self, groups, args, kwargs)
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.active_module, name)  # head.out_proj, head.weight, ... as on the module itself
