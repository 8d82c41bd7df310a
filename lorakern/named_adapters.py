"""Named adapters on one frozen base: the bookkeeping every LoRA layer shares (LoraLinear, LoraEmbedding,
LoraConv). A layer keeps its adapters in ``adapters`` (an nn.ModuleDict of adapter modules, each with
``r``, ``alpha``, ``scaling``, ``dropout``, ``use_rslora``, ``init`` and ``reset_parameters``), the names
that compute in ``active_adapters`` and those folded into the weight in ``merged_adapters``; ``disabled``
(set by lorakern.disable_adapters) makes it compute its base alone. The layer itself builds adapters and
computes; NamedAdapters names, activates, freezes and deletes them, as PEFT does. InPlaceMerge is the
merge / unmerge of a layer whose dense weight absorbs its update exactly (LoraEmbedding, LoraConv;
LoraLinear has its own, for a 4-bit base), WrapsModule their construction around a torch module;
check_plain_adapter refuses what those layers cannot do.
"""
from __future__ import annotations

import warnings
from typing import Iterable, Optional, Union

import torch
from torch import nn

from lorakern.errors import AdapterError, ConfigError, LorakernError


class NamedAdapters:
    """Mixed into an nn.Module that calls ``_init_adapters()`` in its __init__."""

    adapters: nn.ModuleDict

    def _init_adapters(self) -> None:
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False  # set by lorakern.disable_adapters: the layer computes its base alone

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise AdapterError(f"an adapter name is a non-empty string without '.', got {name!r}")
        if name in self.adapters:
            raise AdapterError(f"this layer already has an adapter named {name!r} (adapters: {list(self.adapters)}); "
                               f"pick another name or delete_adapter({name!r}) first")

    def _register(self, name: str, adapter: nn.Module) -> None:
        """The first adapter becomes active; later ones are added inactive and frozen, as in PEFT."""
        self.adapters[name] = adapter
        if not self.active_adapters:
            self.active_adapters = [name]
        else:
            adapter.requires_grad_(False)

    def set_adapter(self, names: Union[str, Iterable[str]]) -> None:
        """Make ``names`` (those this layer has) the active adapters: they compute and train; others freeze."""
        names = [names] if isinstance(names, str) else list(names)
        self.active_adapters = [n for n in names if n in self.adapters]
        for name, adapter in self.adapters.items():
            adapter.requires_grad_(name in self.active_adapters)

    def delete_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise AdapterError(f"no adapter named {name!r} in this layer; it has {list(self.adapters)}")
        if name in self.merged_adapters:
            raise AdapterError(f"adapter {name!r} is merged into the weight; unmerge() before deleting it")
        del self.adapters[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def _active(self) -> nn.Module:
        name = self.active_adapters[0] if self.active_adapters else next(iter(self.adapters), None)
        if name is None:
            raise AdapterError(f"this {type(self).__name__} has no adapter; add one with layer.add_adapter(name, r=...)")
        return self.adapters[name]

    def _unmerged_active(self) -> list[nn.Module]:
        return [self.adapters[n] for n in self.active_adapters if n not in self.merged_adapters]

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def reset_lora_parameters(self, init=None) -> None:
        for name in self.active_adapters:
            self.adapters[name].reset_parameters(init)

    def _names_to_merge(self, adapter_names: Optional[list[str]]) -> list[str]:
        """The adapters a merge folds in (default: the active ones), those merged already left out; unknown
        names raise, nothing to do warns."""
        names = [n for n in (adapter_names or self.active_adapters) if n not in self.merged_adapters]
        for name in names:
            if name not in self.adapters:
                raise AdapterError(f"no adapter named {name!r} in this layer; it has {list(self.adapters)}")
        if not names:
            warnings.warn("merge() called on a layer whose active adapters are already merged; nothing to do",
                          stacklevel=3)
        return names

    # the active adapter's, as PEFT users read them on a single-adapter layer
    def _adapter_attribute(name: str, doc: str):  # noqa: N805  (a property factory used in the class body)
        def get(self):
            return getattr(self._active(), name)

        def set_(self, value):
            setattr(self._active(), name, value)

        return property(get, set_, doc=doc)

    scaling = _adapter_attribute("scaling", "the active adapter's s (alpha / r, or alpha / sqrt(r) with rsLoRA)")
    dropout = _adapter_attribute("dropout", "the active adapter's LoRA dropout probability")
    use_rslora = _adapter_attribute("use_rslora", "whether the active adapter was built with rsLoRA's scaling")
    r = property(lambda self: self._active().r, doc="the active adapter's rank")
    alpha = property(lambda self: self._active().alpha, doc="the active adapter's alpha")
    init = property(lambda self: self._active().init, doc="the active adapter's init rule")
    del _adapter_attribute


class InPlaceMerge:
    """merge / unmerge for a layer whose dense ``weight`` absorbs its adapters' ``delta(dtype)`` (the weight's
    shape) in place."""

    def check_mergeable(self) -> None:
        """Raise where this layer's update has no exact place in its weight (nothing to refuse by default)."""

    def merge(self, safe: bool = True, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the active adapters' update (or ``adapter_names'``) into the weight (``safe``: a non-finite
        result raises and the weight is untouched)."""
        self.check_mergeable()
        names = self._names_to_merge(adapter_names)
        if not names:
            return
        add_in_place_(self.weight, self._delta_sum(names), safe, f"{type(self).__name__} adapters {names}")
        self.merged_adapters += names

    def unmerge(self) -> None:
        """Subtract the merged adapters' update again."""
        if not self.merged_adapters:
            warnings.warn("unmerge() called on a layer that is not merged; nothing to do", stacklevel=2)
            return
        add_in_place_(self.weight, -self._delta_sum(self.merged_adapters), False,
                      f"{type(self).__name__} adapters {self.merged_adapters}")
        self.merged_adapters = []

    def delta_weight(self, adapter_name: Optional[str] = None) -> torch.Tensor:
        """One adapter's update (default: the active one's) in the weight's shape and dtype, computed in fp32
        at least (its ``delta``)."""
        adapter = self.adapters[adapter_name] if adapter_name is not None else self._active()
        return adapter.delta(self.weight.dtype).to(self.weight.dtype)

    def _delta_sum(self, names: list[str]) -> torch.Tensor:
        return sum(self.adapters[n].delta(self.weight.dtype) for n in names)

    @torch.no_grad()
    def _merged_weight(self) -> nn.Parameter:
        """A new frozen weight: W + the unmerged active adapters' update (summed in fp32 at least), in W's dtype."""
        names = [n for n in self.active_adapters if n not in self.merged_adapters]
        weight = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        if names:
            self.check_mergeable()
            weight = weight + self._delta_sum(names)
        return nn.Parameter(weight.to(self.weight.dtype).contiguous(), requires_grad=False)


class WrapsModule:
    """The construction LoraEmbedding and LoraConv share: the layer adopts a torch module's weights (its
    ``_take_base``: shared, not copied, and frozen), then adds its first adapter."""

    def _adopt(self, base: nn.Module, adapter_name: str, adapter_kwargs: dict) -> None:
        self._take_base(base)
        self._init_adapters()
        self.add_adapter(adapter_name, **adapter_kwargs)

    @classmethod
    def _wrapping(cls, base: nn.Module, adapter_name: str, adapter_kwargs: dict):
        """A layer around ``base`` itself (__init__ builds a new base, so it is bypassed)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._adopt(base, adapter_name, adapter_kwargs)
        return layer


def adapter_hyperparameters(adapter: nn.Module, r: int, alpha: Optional[float], dropout: float, use_rslora: bool,
                            init) -> None:
    """Set the hyper-parameters every adapter module carries (checked by the caller)."""
    from lorakern import core

    adapter.r = r
    adapter.alpha = float(r if alpha is None else alpha)
    adapter.use_rslora = use_rslora
    adapter.scaling = core.scaling(r, adapter.alpha, use_rslora)
    adapter.dropout = float(dropout)
    adapter.init = "kaiming" if init is True else init


# init_lora_weights values LoRA on nn.Embedding and nn.Conv takes: PEFT's plain inits, and lorakern's "normal".
# The inits that rewrite the base weight (PiSSA, OLoRA, LoftQ) and DoRA apply to Linear layers only here.
PLAIN_INITS = (True, False, "kaiming", "gaussian", "normal")


def check_plain_adapter(kind: str, init, use_dora: bool) -> None:
    """Refuse what a LoRA layer on ``kind`` (an Embedding or Conv) cannot do: DoRA, or an init beyond
    PEFT's plain ones. Raised where the adapter is built, so an injection refuses before changing the model."""
    if use_dora:
        raise ConfigError(f"use_dora=True on {kind}: lorakern's DoRA applies to Linear layers only. Leave {kind} "
                          f"layers out of this adapter's target_modules (or exclude_modules them), or use_dora=False")
    if init not in PLAIN_INITS or isinstance(init, int) and not isinstance(init, bool):
        raise ConfigError(f"init_lora_weights={init!r} is not available for LoRA on {kind}: it takes one of "
                          f"{PLAIN_INITS}. Use one of those, or leave {kind} layers out of target_modules")


def add_in_place_(weight: torch.Tensor, delta: torch.Tensor, safe: bool, what: str) -> None:
    """weight += delta (in weight's dtype); ``safe``: a non-finite result raises and leaves weight untouched."""
    delta = delta.to(weight.dtype)
    with torch.no_grad():
        if safe:
            merged = weight + delta
            if not torch.isfinite(merged).all():
                raise LorakernError(f"NaNs or infs detected in the merged weight of {what}; the weight was left "
                                    f"unchanged. Check the adapter's A and B for non-finite values")
            weight.copy_(merged)
        else:
            weight.add_(delta)


__all__ = ["PLAIN_INITS", "InPlaceMerge", "NamedAdapters", "WrapsModule", "adapter_hyperparameters", "add_in_place_",
           "check_plain_adapter"]
