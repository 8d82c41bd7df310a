"""LoraLinear: one LoRA layer over any frozen base (dense, GPT-2 Conv1D, NF4), with named adapters.

    y = x W^T + b + sum over the active adapters a of s_a (dropout_a(x) A_a^T) B_a^T

The base (lorakern.bases) is pluggable; forward, merge/unmerge, delta_weight, to_linear and unload are
written once here. Every forward goes through lorakern.dispatch, which picks the implementation.
"""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Optional

import torch
from torch import nn

from lorakern import dispatch, dora, dora_merge, inits, mixed
from lorakern import functional  # noqa: F401  registers the dense torch and C implementations
from lorakern.nf4 import lora as _nf4_lora  # noqa: F401  registers the NF4 torch implementation
from lorakern.adapter import LoraAdapter, check_hyperparameters
from lorakern.bases import DenseBase, NF4Base
from lorakern.errors import AdapterError, LorakernError
from lorakern.functional import check_operands
from lorakern.linear_like import is_conv1d, is_linear_like
from lorakern.named_adapters import NamedAdapters
from lorakern.nf4.codec import quantize_nf4
from lorakern.nf4.modules import check_nf4_input
from lorakern.nf4.storage import NF4Storage
from lorakern.rows import pending

DEFAULT_ADAPTER = "default"
_QUANT_KWARGS = ("blocksize", "double_quant", "compute_dtype", "lora_dtype", "quant_storage")


class LoraLinear(NamedAdapters, nn.Module):
    """A drop-in nn.Linear with named low-rank adapters on a frozen base.

    ``weight`` and ``bias`` keep nn.Linear's names (a 4-bit base writes bitsandbytes' keys under
    ``weight``), so a model's base state dict is unchanged by injection. Adapters live in ``adapters``
    (``adapters.<name>.lora_A`` / ``.lora_B``); ``lora_A``, ``lora_B``, ``scaling``, ``r``, ``alpha`` and
    ``dropout`` are the active adapter's (the first, when several are active).
    """

    row_groups = None  # a mixed batch's lorakern.rows.RowGroups, set by lorakern.adapter_rows for its block
    pending_rows = None  # an ended block's rows until its backward ends (lorakern.rows.pending)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, r: int = 8,
                 alpha: Optional[float] = None, dropout: float = 0.0, use_rslora: bool = False, init="kaiming",
                 fan_in_fan_out: bool = False, device=None, dtype=None, adapter_name: str = DEFAULT_ADAPTER,
                 use_dora: bool = False) -> None:
        super().__init__()
        check_hyperparameters(r, alpha, dropout, init)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.base = DenseBase(fan_in_fan_out)
        shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.reset_base_parameters()
        self._init_adapters()
        self.dropout_seed: Optional[int] = None  # fixes the LoRA dropout mask (None: a fresh draw per call)
        self.backend: Optional[str] = None  # None follows $LORAKERN_BACKEND / auto; a name pins this layer
        self._dora_cache: dict = {}  # DoRA: the base's ||W_i||^2 (keyed by the base's identity and version)
        self._merged_norms: dict[str, torch.Tensor] = {}  # DoRA: the norm each merged adapter was merged with
        self.add_adapter(adapter_name, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init,
                         use_dora=use_dora)

    # ---- building -------------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Module, quantize: Optional[str] = None, adapter_name: str = DEFAULT_ADAPTER,
                    **kwargs) -> "LoraLinear":
        """Wrap an nn.Linear (or GPT-2 Conv1D): its weight and bias are shared, not copied, and frozen.

        ``quantize="nf4"`` stores the frozen weight in NF4 instead (QLoRA; takes ``blocksize``,
        ``double_quant``, ``compute_dtype``, ``lora_dtype`` and ``quant_storage`` too). Other keyword
        arguments configure the adapter (r, alpha, dropout, use_rslora, init, use_dora)."""
        if quantize not in (None, "nf4"):
            raise LorakernError(f"quantize={quantize!r} is not a known quant type; use quantize='nf4' or None")
        quant = {k: kwargs.pop(k) for k in _QUANT_KWARGS if k in kwargs}
        init, loftq_iter = kwargs.pop("init", "kaiming"), kwargs.pop("loftq_iter", 1)
        if init == "loftq" and quantize is None:
            raise LorakernError("init='loftq' fits the adapter to the quantization error of an NF4 base; pass "
                                "quantize='nf4' with it (with inject: keep the layer out of quantize_skip)")
        if quant and quantize is None:
            raise LorakernError(f"{', '.join(quant)}= applies to a quantized base only; pass quantize='nf4' with it")
        if not is_linear_like(linear):
            raise TypeError(f"from_linear takes an nn.Linear or transformers Conv1D, got {type(linear).__name__}; "
                            f"LoRA here applies to linear layers only")
        conv = is_conv1d(linear)
        weight = linear.weight
        out_in = weight.t() if conv else weight
        with torch.device("meta"):
            # an init from the base weight runs below, once the real base is in place
            layer = cls(out_in.shape[1], out_in.shape[0], bias=linear.bias is not None, fan_in_fan_out=conv,
                        dtype=weight.dtype, adapter_name=adapter_name,
                        init="kaiming" if inits.rewrites_base(init) else init, **kwargs)
        if quantize is None:
            layer.weight = linear.weight
            layer.weight.requires_grad_(False)
            layer.base = DenseBase(conv, type(linear))
            lora_dtype = weight.dtype
        else:
            del layer.weight
            storage = NF4Storage(quantize_nf4(out_in, quant.get("blocksize", 64), quant.get("double_quant", True)),
                                 quant.get("quant_storage", "uint8"))
            layer.nf4 = storage
            layer.base = NF4Base(quant.get("compute_dtype"), type(linear))
            lora_dtype = quant.get("lora_dtype", torch.float32)
        if linear.bias is not None:
            layer.bias = linear.bias if quantize is None else nn.Parameter(linear.bias.detach().clone())
            layer.bias.requires_grad_(False)
        adapter = layer.adapters[adapter_name]
        layer.adapters[adapter_name] = LoraAdapter(adapter.in_features, adapter.out_features, adapter.r, adapter.alpha,
                                                   adapter.dropout, adapter.use_rslora, init,
                                                   device=weight.device, dtype=lora_dtype, use_dora=adapter.use_dora)
        if inits.rewrites_base(init):
            inits.initialize(layer, adapter_name, source=out_in, loftq_iter=loftq_iter)
        if adapter.use_dora:  # from the base as the init left it, as PEFT
            layer.reset_magnitude(adapter_name)
        return layer

    def reset_base_parameters(self) -> None:
        """nn.Linear's own init, so a LoraLinear built from scratch behaves like a fresh nn.Linear."""
        if self.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def reset_lora_parameters(self, init=None) -> None:
        super().reset_lora_parameters(init)
        for name in self.active_adapters:
            if self.adapters[name].use_dora:
                self.reset_magnitude(name)

    @torch.no_grad()
    def reset_magnitude(self, name: Optional[str] = None) -> None:
        """DoRA: set adapter ``name``'s magnitude to the row norms of W + s B A, as PEFT initialises it."""
        adapter = self.adapters[name] if name is not None else self._active()
        if not adapter.use_dora:
            raise AdapterError(f"adapter {name!r} is plain LoRA (no magnitude vector); add it with use_dora=True")
        if adapter.lora_magnitude_vector.is_meta:
            return
        norm = dora.weight_norm(self.base.operand(self), adapter.lora_A, adapter.lora_B, adapter.scaling,
                                self._base_norm_sq())
        adapter.lora_magnitude_vector.copy_(norm)

    def _base_norm_sq(self) -> torch.Tensor:
        """||W_i||^2 of the frozen base, computed once and kept until the base changes: merge, unmerge and a
        state-dict load clear it, and it is recomputed when the weight tensor is another one or was written
        in place (its version counter; a write through ``weight.data`` bypasses that counter: call
        ``layer._dora_cache.clear()`` after one).

        Under torch.compile it is computed inline, one pass over W per call, and never cached: the cache's
        key (a data pointer, the version counter, a weakref) cannot be traced without a graph break, and a
        norm captured at trace time would go stale when the base changes while the compiled graph guards
        nothing on W's values. Inline, the graph reads the W it is given, so merge/unmerge, a state-dict load
        or an in-place write cannot leave it with an old norm (N K multiply-adds, below the norm's own N K r)."""
        if torch.compiler.is_compiling():
            return dora.row_norms_sq(self.base.operand(self))
        tensor = self.weight if self.base.kind == "dense" else self.nf4.packed_storage
        key = (tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device)
        cached = self._dora_cache.get("base_norm_sq")
        if cached is None or cached[0]() is not tensor or cached[1] != key:
            cached = (weakref.ref(tensor), key, dora.row_norms_sq(self.base.operand(self)))
            self._dora_cache["base_norm_sq"] = cached
        return cached[2]

    # ---- named adapters ---------------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int = 8, alpha: Optional[float] = None, dropout: float = 0.0,
                    use_rslora: bool = False, init="kaiming", dtype: Optional[torch.dtype] = None,
                    loftq_iter: int = 1, use_dora: bool = False) -> LoraAdapter:
        """A new adapter ``name`` on this base. The first one becomes active; later ones are added inactive
        (``set_adapter`` switches), as in PEFT. An init from the base weight ("pissa", "olora": see
        lorakern.inits) rewrites a dense base to its residual and is refused beside other adapters.
        ``use_dora``: DoRA, its magnitude set to the row norms of W + s B A (lorakern.dora)."""
        self._check_new_name(name)
        if r > min(self.in_features, self.out_features):
            warnings.warn(f"r={r} exceeds min(in_features, out_features)={min(self.in_features, self.out_features)}: "
                          f"the update B A cannot reach rank {r}; use r <= {min(self.in_features, self.out_features)} "
                          f"for the same update with fewer parameters", stacklevel=3)
        existing = next(iter(self.adapters.values()), None)
        reference = existing.lora_A if existing is not None else None
        device = reference.device if reference is not None else self._base_device()
        dtype = dtype or (reference.dtype if reference is not None else self._base_float_dtype())
        inits.check_layer(self, name, init)
        adapter = LoraAdapter(self.in_features, self.out_features, r, alpha, dropout, use_rslora, init, device=device,
                              dtype=dtype, use_dora=use_dora)
        self._register(name, adapter)
        if inits.rewrites_base(adapter.init):
            try:
                inits.initialize(self, name, loftq_iter=loftq_iter)
            except BaseException:  # the layer as it was: no adapter, the base untouched
                del self.adapters[name]
                self.active_adapters = [n for n in self.active_adapters if n != name]
                raise
        if use_dora:
            self.reset_magnitude(name)
        return adapter

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self._merged_norms.pop(name, None)

    # the active adapter's factors, as PEFT users read them on a single-adapter layer
    lora_A = property(lambda self: self._active().lora_A, doc="the active adapter's A (r x in)")
    lora_B = property(lambda self: self._active().lora_B, doc="the active adapter's B (out x r)")
    lora_magnitude_vector = property(lambda self: self._active().lora_magnitude_vector,
                                     doc="the active adapter's DoRA magnitude (out,), None for plain LoRA")
    use_dora = property(lambda self: self._active().use_dora, doc="whether the active adapter is DoRA")

    # ---- the base -------------------------------------------------------------------------------------
    @property
    def is_quantized(self) -> bool:
        return self.base.kind == "nf4"

    @property
    def fan_in_fan_out(self) -> bool:
        return self.base.fan_in_fan_out

    @property
    def compute_dtype(self) -> Optional[torch.dtype]:
        return getattr(self.base, "compute_dtype", None)

    @property
    def weight_out_in(self) -> torch.Tensor:
        """The base weight as (out, in): a view of a dense weight, or a 4-bit weight decoded to its compute dtype."""
        return self.base.operand(self) if self.base.kind == "dense" else self.base.decoded(self)

    def _base_device(self) -> torch.device:
        return self.weight.device if self.base.kind == "dense" else self.nf4.packed_storage.device

    def _base_float_dtype(self) -> torch.dtype:
        return self.weight.dtype if self.base.kind == "dense" else torch.float32

    # ---- compute --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapters = [] if self.disabled else self._unmerged_active()
        weight = self.base.operand(self)
        if self.base.kind == "dense":
            active = self._active()
            check_operands(x, weight, self.bias, active.lora_A, active.lora_B)
        else:
            check_nf4_input(x, self.nf4)
        groups = self.row_groups if self.pending_rows is None else (self.row_groups or pending(self))
        if groups is not None and not self.disabled:
            return mixed.layer_forward(self, x, groups)
        if not adapters:
            return self.base.forward(self, x)
        training = self.training
        norm_sq = None
        if any(a.use_dora for a in adapters):
            if self.merged_adapters:
                raise LorakernError(f"DoRA adapters {[n for n in self.active_adapters if self.adapters[n].use_dora]} "
                                    f"would run on a weight holding merged adapters {self.merged_adapters}, but their "
                                    f"norm is the unmerged weight's; unmerge() first, or merge every active adapter")
            norm_sq = self._base_norm_sq()
        return dispatch.lora_forward(
            x, self.base.kind, weight, self.bias,
            [(a.lora_A, a.lora_B, a.scaling, a.dropout if training else 0.0)
             + ((a.lora_magnitude_vector,) if a.use_dora else ()) for a in adapters],
            seed=self.dropout_seed, compute_dtype=self.compute_dtype, requested=self.backend, base_norm_sq=norm_sq)

    def forward_rows(self, x: torch.Tensor, row_adapter: torch.Tensor, names: list[str]) -> torch.Tensor:
        """A mixed batch without a model: row i of x flattened to (M, K) uses adapter ``names[row_adapter[i]]``
        (-1: the base alone). See lorakern.adapter_rows for whole models."""
        if self.base.kind == "dense":
            check_operands(x, self.base.operand(self), self.bias, self._active().lora_A, self._active().lora_B)
        else:
            check_nf4_input(x, self.nf4)
        return mixed.forward_rows(self, x, row_adapter, names)

    def _call_for(self, x: torch.Tensor) -> dispatch.Call:
        adapter = self._active()
        return dispatch.prepare(x, self.base.kind, self.base.operand(self), self.bias, adapter.lora_A, adapter.lora_B,
                                adapter.scaling, adapter.dropout if self.training else 0.0, self.compute_dtype,
                                magnitude=adapter.lora_magnitude_vector)

    def dispatch_report(self, x: torch.Tensor) -> str:
        """Which implementation runs this layer on ``x``, and why each other one does not."""
        return dispatch.explain(self._call_for(x), self.backend)

    def dropout_mask(self, seed: int, x: torch.Tensor) -> torch.Tensor:
        """The float32 mask (kept / (1 - p), else 0) the active adapter's dropout draws for ``seed`` on ``x``."""
        implementation, _ = dispatch.choose(self._call_for(x), self.backend)
        return implementation.dropout_mask(seed, x.shape, self.dropout, x.device)

    # ---- merging --------------------------------------------------------------------------------------
    def delta_weight(self, adapter_name: Optional[str] = None) -> torch.Tensor:
        """s B A of one adapter (default: the active one), in the base weight's layout and dtype
        (Conv1D's (in, out), a 4-bit base's original dtype), computed in fp32 at least."""
        adapter = self.adapters[adapter_name] if adapter_name is not None else self._active()
        dtype = self.base.dtype(self)
        return self.base.stored_layout(adapter.delta(dtype)).to(dtype)

    def _delta_out_in(self, names: list[str]) -> torch.Tensor:
        total = None
        for name in names:
            delta = self.adapters[name].delta(self.base.dtype(self))
            total = delta if total is None else total + delta
        return total

    def merge(self, safe: bool = True, adapter_names: Optional[list[str]] = None, requantize: bool = False) -> None:
        """Fold the active adapters' s B A (or ``adapter_names``') into the base weight (a DoRA adapter as
        PEFT does: W' = (m / n) (W + s B A) row-wise, n from the unmerged weight and kept for unmerge).

        A dense weight absorbs them in place (``safe``: a non-finite result raises and W is untouched). A
        4-bit weight cannot absorb them exactly: ``requantize=True`` decodes, adds and requantizes (a
        warning reports the error that adds); without it merge raises and says what to do instead."""
        names = self._names_to_merge(adapter_names)
        if not names:
            return
        what = f"LoraLinear({self.in_features}, {self.out_features}) adapters {names}"
        if any(self.adapters[n].use_dora for n in names):
            if not (self.base.merges_in_place or requantize):
                raise LorakernError("a 4-bit base cannot absorb the update exactly: merge(requantize=True) "
                                    "requantizes (and reports the error that adds), lorakern.merge_and_unload(model) "
                                    "gives full-precision layers, layer.to_linear() one full-precision nn.Linear")
            dora_merge.merge(self, names, safe, what)
        elif self.base.merges_in_place:
            self.base.add_(self, self._delta_out_in(names), safe, what)
        elif requantize:
            self.base.requantize_(self, self._delta_out_in(names), safe, what)
        else:
            raise LorakernError("a 4-bit base cannot absorb the update exactly: merge(requantize=True) requantizes "
                                "(and reports the error that adds), lorakern.merge_and_unload(model) gives "
                                "full-precision layers, layer.to_linear() one full-precision nn.Linear")
        self.merged_adapters += names
        self._dora_cache.clear()

    def unmerge(self, requantize: bool = False) -> None:
        """Subtract the merged adapters' s B A again (a 4-bit base requantizes, only when asked)."""
        if not self.merged_adapters:
            warnings.warn("unmerge() called on a layer that is not merged; nothing to do", stacklevel=2)
            return
        what = f"LoraLinear({self.in_features}, {self.out_features}) adapters {self.merged_adapters}"
        if any(self.adapters[n].use_dora for n in self.merged_adapters):
            if not (self.base.merges_in_place or requantize):
                raise LorakernError("this 4-bit layer's merge was requantized; unmerge(requantize=True) requantizes "
                                    "back (with its own rounding error)")
            dora_merge.unmerge(self, what)
            self.merged_adapters = []
            self._dora_cache.clear()
            return
        delta = -self._delta_out_in(self.merged_adapters)
        if self.base.merges_in_place:
            self.base.add_(self, delta, False, what)
        elif requantize:
            self.base.requantize_(self, delta, True, what)
        else:
            raise LorakernError("this 4-bit layer's merge was requantized; unmerge(requantize=True) requantizes back "
                                "(with its own rounding error)")
        self.merged_adapters = []
        self._dora_cache.clear()

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A new plain nn.Linear holding W + the unmerged active adapters' s B A, in the base weight's dtype
        (a 4-bit base decoded to full precision). This layer is left as it is."""
        dtype = self.base.dtype(self)
        weight = self.base.decoded(self, torch.promote_types(dtype, torch.float32))
        names = [n for n in self.active_adapters if n not in self.merged_adapters]
        if any(self.adapters[n].use_dora for n in names):
            weight, _ = dora_merge.compose(self, weight, dora_merge.unmerged(self, weight), names)
        elif names:
            weight = weight + self._delta_out_in(names)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.to(dtype).contiguous(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return linear

    def unload(self) -> nn.Module:
        """The base layer alone (nn.Linear, Conv1D or LinearNF4) sharing this layer's tensors, merged or
        not as this layer is."""
        return self.base.module(self)

    merged_base = to_linear  # the name every LoRA layer type answers to (lorakern.merge_and_unload)

    def peft_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Adapter ``adapter_name``'s live tensors under PEFT's key suffixes (after ``<module>.``)."""
        adapter = self.adapters[adapter_name]
        tensors = {"lora_A.weight": adapter.lora_A, "lora_B.weight": adapter.lora_B}
        if adapter.use_dora:  # PEFT's key: no ".weight"
            tensors["lora_magnitude_vector"] = adapter.lora_magnitude_vector
        return tensors

    # ---- state dict: a 4-bit base writes bitsandbytes' keys under "weight" ------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.base.kind == "nf4":
            self.base.save(self, destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._dora_cache.clear()
        if self.base.kind == "nf4":
            self.base.load(self, state_dict, prefix, missing_keys, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"base={self.base.kind}, active={self.active_adapters}, merged={self.merged_adapters}"
                + self.base.describe(self))


__all__ = ["DEFAULT_ADAPTER", "LoraLinear", "is_conv1d", "is_linear_like"]
