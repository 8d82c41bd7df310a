"""One dispatch for every LoRA forward (and so its backward): which implementation runs, and why the
others were declined, in one place.

A call is a frozen base (a dense weight, or NF4 storage) plus one or more adapters. Implementations
register here per base kind; nothing here imports them (they import this module):

    name     base          module                          what it is
    triton   dense, nf4    lorakern.kernels (lazily)       fused Triton kernels (compiled on CUDA, interpreted on CPU)
    c        dense         lorakern.functional             torch GEMMs + C kernels for the rank-r products (fp32 CPU)
    torch    dense         lorakern.functional             plain torch (the hand-written autograd Function)
    torch    nf4           lorakern.nf4.lora               plain torch, W decoded in chunks of rows

A DoRA call carries the adapter's magnitude vector (``Call.magnitude``). lorakern.dora, when imported (the
layer imports it), attaches its runs to the torch and c implementations (``attach_dora``), and
lorakern.kernels its fused run to triton (dense and NF4); an implementation without one declines a DoRA
call with the reason.

``auto`` (the default; $LORAKERN_BACKEND or a layer's ``backend`` pins one) tries them in the order of
``PREFERENCE`` and takes the first whose ``unsupported`` returns None; triton only for CUDA tensors.
``explain`` gives every implementation's verdict for a call. LoRA on nn.Embedding and nn.Conv*d
(lorakern.embedding, lorakern.conv) never comes here: those layers run plain torch (docs/layer.md says why).
Several active adapters: the first runs fused with the base, each further one adds its own term in torch.

A mixed-adapter call (``MixedCall``: each row of x uses its own adapter, or none) goes through the same
``choose``/``explain``: an implementation takes it when it has ``run_mixed`` and its ``unsupported_mixed``
returns None; one without ``run_mixed`` declines it, saying so. ``lora_forward_mixed`` is its entry point.
Mixed paths: triton (the segmented kernels, dense and NF4), c (dense fp32 CPU eager: lorakern.mixed_c, one
pass over the rows grouped by adapter), torch (dense and NF4: lorakern.mixed.run_torch). A mixed call with DoRA
slots (``MixedCall.magnitudes``) runs only where a ``run_mixed_dora`` is attached: torch (dense and NF4, by
lorakern.dora), c (dense fp32: lorakern.mixed_dora_c, by lorakern.dora) and triton (dense and NF4, by
lorakern.kernels); an implementation without one declines it, saying so.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch

from lorakern import _env
from lorakern.errors import LorakernError

BACKEND_ENV = "LORAKERN_BACKEND"
BACKEND_CHOICES = ("auto", "triton", "c", "torch")
PREFERENCE = ("triton", "c", "torch")
BASE_KINDS = ("dense", "nf4")
# Modules that register implementations when imported, loaded on first need (the Triton kernels import
# triton, which must not happen on every import of lorakern).
_LAZY_MODULES = {"triton": "lorakern.kernels"}


@dataclass
class Call:
    """One forward: operands already in the compute dtype. ``weight`` is the dense (out, in) weight or the
    NF4Storage; ``seed`` None (torch's generator), an int, or a 0-d int64 tensor (drawn for a kernel)."""

    x: torch.Tensor
    base: str
    weight: Any
    bias: Optional[torch.Tensor]
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    dropout_p: float = 0.0
    seed: Optional[Any] = None
    # DoRA (lorakern.dora): the adapter's magnitude vector (N,), None for plain LoRA; base_norm_sq the frozen
    # base's row norms ||W_i||^2 when the caller holds them cached (None: computed in the call)
    magnitude: Optional[torch.Tensor] = None
    base_norm_sq: Optional[torch.Tensor] = None

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]


@dataclass
class MixedCall:
    """One mixed-adapter forward: each row of x uses the adapter of its slot (or none).

    A row here is a row of the flattened input (a token); lorakern.rows expands a batch's row grouping to
    them. Every operand is in the compute dtype. Dropout: with a fixed ``seed`` the rows of slot a use
    rows of ``Implementation.dropout_mask(seed, x.shape, p_a, device)`` (the mask a single-adapter call
    with that seed and p would draw for the whole x), so a mixed call whose rows all use one adapter
    matches the single-adapter call. ``counts`` is empty while torch.compile traces (host values would be
    guarded on and recompile per batch): traced paths use ``slot`` (shape-static) only."""

    x: torch.Tensor          # (M, K), 2-D, compute dtype
    base: str                # "dense" | "nf4"
    weight: Any              # dense (N, K) in the compute dtype, or the NF4Storage
    bias: Optional[torch.Tensor]
    # per slot: (A (r_a, K), B (N, r_a), scaling, dropout_p), compute dtype; None: this layer lacks that
    # adapter (its rows get the base output)
    adapters: list[Optional[tuple[torch.Tensor, torch.Tensor, float, float]]]
    slot: torch.Tensor       # (M,) int64 on x.device: the slot of each row, -1 = base only
    order: torch.Tensor      # (M,) int64: row indices sorted by slot (stable), base-only rows last
    offsets: torch.Tensor    # (n_slots + 1,) int64 on x.device: slot a's rows are order[offsets[a]:offsets[a+1]]
    counts: tuple[int, ...]  # host copy of the n_slots segment sizes (eager paths may use it)
    seed: Optional[Any] = None
    # DoRA: per slot the adapter's magnitude vector (N,), None for a plain-LoRA slot; None altogether when no
    # slot is DoRA. base_norm_sq: the frozen base's cached ||W_i||^2 (None: computed per DoRA slot)
    magnitudes: Optional[list[Optional[torch.Tensor]]] = None
    base_norm_sq: Optional[torch.Tensor] = None

    @property
    def ranks(self) -> tuple[int, ...]:
        """Each slot's rank (0 where this layer lacks the adapter)."""
        return tuple(0 if a is None else a[0].shape[0] for a in self.adapters)


@dataclass(frozen=True)
class Implementation:
    """run(call) -> y. dropout_mask(seed, shape, p, device) -> the float32 mask (kept / (1 - p), else 0)
    ``run`` uses for that seed. unsupported(call) -> None, or why it cannot take this call.
    ``needs_seed``: draws its own dropout mask from a seed (one is drawn per call when none is fixed).
    ``run_mixed(mixed_call) -> y`` and ``unsupported_mixed(mixed_call)``: the mixed-adapter path (an
    implementation without ``run_mixed`` declines mixed calls). ``run_dora``: run(call) for a call with a
    magnitude vector (DoRA; set by ``attach_dora``), None where the implementation declines DoRA;
    ``run_mixed_dora`` the same for a mixed call with DoRA slots."""

    name: str
    base: str
    run: Callable[[Call], torch.Tensor]
    dropout_mask: Callable[..., torch.Tensor]
    unsupported: Callable[[Call], Optional[str]]
    needs_seed: bool = False
    run_mixed: Optional[Callable[[MixedCall], torch.Tensor]] = None
    unsupported_mixed: Optional[Callable[[MixedCall], Optional[str]]] = None
    run_dora: Optional[Callable[[Call], torch.Tensor]] = None
    run_mixed_dora: Optional[Callable[[MixedCall], torch.Tensor]] = None


_REGISTRY: dict[tuple[str, str], Implementation] = {}
# A further active DoRA adapter's composition (lorakern.dora.further_term), set by attach_dora.
_DORA_FURTHER: list[Callable[..., torch.Tensor]] = []


def register(implementation: Implementation) -> None:
    """Make ``implementation`` the one used for its (name, base) (implementation modules call this)."""
    if implementation.name not in PREFERENCE or implementation.base not in BASE_KINDS:
        raise LorakernError(f"an implementation is named one of {PREFERENCE} for a base in {BASE_KINDS}, got "
                            f"{implementation.name!r} for {implementation.base!r}")
    _REGISTRY[(implementation.name, implementation.base)] = implementation


def attach_dora(runs: dict[tuple[str, str], Callable[[Call], torch.Tensor]], further: Callable[..., torch.Tensor],
                mixed_runs: Optional[dict[tuple[str, str], Callable[[MixedCall], torch.Tensor]]] = None) -> None:
    """Give the registered implementations {(name, base): run} a DoRA run (and those in ``mixed_runs`` a
    mixed run for calls with DoRA slots), and set how a further active DoRA adapter composes (lorakern.dora
    calls this when imported; dispatch itself holds no DoRA math)."""
    for key, run in runs.items():
        _REGISTRY[key] = dataclasses.replace(_REGISTRY[key], run_dora=run)
    for key, run in (mixed_runs or {}).items():
        _REGISTRY[key] = dataclasses.replace(_REGISTRY[key], run_mixed_dora=run)
    _DORA_FURTHER[:] = [further]


@torch.compiler.assume_constant_result
def _load(name: str) -> bool:
    """Import the module that registers ``name`` (once). torch.compile runs this at trace time, outside
    the graph (an import traced there would break it). True when it could be imported."""
    module = _LAZY_MODULES.get(name)
    if module is None:
        return True
    try:
        package = importlib.import_module(module)
    except ImportError:
        return False
    if not package.triton_available():
        return False
    for backend in package.BACKENDS:
        importlib.import_module(f"{module}.{backend}")
    return True


def requested_backend(requested: Optional[str] = None) -> str:
    choice = (requested or _env.get(BACKEND_ENV) or "auto").strip().lower()
    if choice not in BACKEND_CHOICES:
        raise LorakernError(f"{BACKEND_ENV}={choice!r} is not a backend; set it to one of {', '.join(BACKEND_CHOICES)} "
                            f"(or unset it for auto)")
    return choice


def verdict(name: str, call: Union[Call, MixedCall]) -> Optional[str]:
    """None when implementation ``name`` takes ``call`` (a single- or mixed-adapter call), else why not."""
    # loaded before the registry is read: under torch.compile a registry read before the import would stay
    # stale in the trace (_load itself runs at trace time, outside the graph)
    if name in _LAZY_MODULES and not _load(name):
        return "triton is not installed (pip install 'lorakern[triton]')"
    implementation = _REGISTRY.get((name, call.base))
    if implementation is None:
        return f"no {name} implementation for a {call.base} base"
    if isinstance(call, MixedCall):
        if implementation.run_mixed is None:
            return f"no mixed-adapter path in the {name} implementation for a {call.base} base yet"
        if call.magnitudes is not None and implementation.run_mixed_dora is None:
            return (f"no DoRA in the {name} mixed-adapter path yet (it applies no magnitude scale); the torch "
                    f"and triton implementations run mixed batches with DoRA adapters")
        return None if implementation.unsupported_mixed is None else implementation.unsupported_mixed(call)
    if call.magnitude is not None and implementation.run_dora is None:
        return (f"no DoRA in the {name} implementation yet (its epilogue does not apply the magnitude scale); "
                f"the torch implementation runs DoRA")
    return implementation.unsupported(call)


def choose(call: Union[Call, MixedCall], requested: Optional[str] = None) -> tuple[Implementation, dict[str, str]]:
    """(the implementation for ``call``, {name: why declined} of those tried before it).

    auto tries PREFERENCE in order (triton only for CUDA tensors); an explicit choice that cannot take the
    call raises LorakernError with the reason."""
    choice = requested_backend(requested)
    declined: dict[str, str] = {}
    if choice != "auto":
        reason = verdict(choice, call)
        if reason is not None:
            raise LorakernError(f"the {choice} backend cannot run this layer: {reason}; set {BACKEND_ENV}=auto "
                                f"(or layer.backend = None) to let lorakern choose")
        return _REGISTRY[(choice, call.base)], declined
    for name in PREFERENCE:
        if name == "triton" and call.x.device.type != "cuda":
            declined[name] = "auto takes triton for CUDA tensors only (interpreted on CPU it is a test path)"
            continue
        reason = verdict(name, call)
        if reason is None:
            return _REGISTRY[(name, call.base)], declined
        declined[name] = reason
    raise LorakernError(f"no implementation takes this call: {declined}")


def explain(call: Union[Call, MixedCall], requested: Optional[str] = None) -> str:
    """A line per implementation: which one runs ``call`` and why each other one does not."""
    try:
        chosen, declined = choose(call, requested)
        lines = [f"runs: {chosen.name}"]
    except LorakernError as exc:
        chosen, declined, lines = None, {}, [f"runs: nothing ({exc})"]
    for name in PREFERENCE:
        if chosen is not None and name == chosen.name:
            continue
        reason = declined.get(name) or verdict(name, call) or "takes it too, but comes later in auto's order"
        lines.append(f"{name}: {reason}")
    return "\n".join(lines)


def _seed_for(implementation: Implementation, dropout_p: float, seed: Optional[Any]) -> Optional[Any]:
    """A kernel that draws its own mask needs a seed: one from torch's generator when none was fixed, kept
    as a 0-d tensor so torch.compile traces the draw (.item() would break the graph)."""
    if dropout_p > 0 and seed is None and implementation.needs_seed:
        return torch.randint(0, 2**31 - 1, ())
    return seed


def lora_term(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dropout_p: float
              ) -> torch.Tensor:
    """s (dropout(x) A^T) B^T in plain torch (autograd differentiates it): a further active adapter's term."""
    x_lora = torch.nn.functional.dropout(x, dropout_p, training=True) if dropout_p > 0 else x
    return (x_lora @ lora_A.t()) @ (lora_B.t() * scaling)


def compute_dtype_of(x: torch.Tensor, base: str, compute_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype a call computes in: a 4-bit base's compute_dtype, else autocast's, else the input's."""
    if base == "nf4" and compute_dtype is not None:
        return compute_dtype
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def _autocast_off(device_type: str):
    """A block with autocast off for ``device_type`` (the call has cast its operands itself): autocast's own
    context where it is on, else nothing to enter (the context cost ~8 us a call)."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) \
        else contextlib.nullcontext()


def lora_forward(x: torch.Tensor, base: str, weight: Any, bias: Optional[torch.Tensor],
                 adapters: Sequence[tuple], *, seed: Optional[Any] = None,
                 compute_dtype: Optional[torch.dtype] = None, requested: Optional[str] = None,
                 base_norm_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x W^T + b + sum over ``adapters`` (A, B, s, dropout_p) of s (dropout(x) A^T) B^T.

    An adapter given as (A, B, s, dropout_p, magnitude) is DoRA (lorakern.dora): the first runs through the
    chosen implementation, a further one composes as PEFT does (``lorakern.dora.further_term``);
    ``base_norm_sq`` is the frozen base's cached ||W_i||^2 they use.
    Every operand is cast to the compute dtype (``compute_dtype_of``); a 4-bit base with a compute_dtype
    returns y in x's dtype, as bitsandbytes' Linear4bit. LoRA parameters of another dtype are cast on the
    fly; their gradients come back in their own dtype. ``seed`` fixes the first adapter's dropout mask
    (``Implementation.dropout_mask`` rebuilds it)."""
    if not adapters:
        raise LorakernError("lora_forward needs at least one adapter (the base alone runs through the base layer)")
    lora_A, lora_B, scaling, dropout_p, *dora = adapters[0]
    call = prepare(x, base, weight, bias, lora_A, lora_B, scaling, dropout_p, compute_dtype)
    call.magnitude = dora[0] if dora else None
    call.base_norm_sq = base_norm_sq
    with _autocast_off(x.device.type):
        implementation, _ = choose(call, requested)
        call.seed = _seed_for(implementation, dropout_p, seed)
        y = implementation.run(call) if call.magnitude is None else implementation.run_dora(call)
        for lora_A, lora_B, scaling, dropout_p, *dora in adapters[1:]:
            lora_A, lora_B = lora_A.to(call.x.dtype), lora_B.to(call.x.dtype)
            if dora:
                y = _DORA_FURTHER[0](y, call.x, call.weight, call.bias, lora_A, lora_B, scaling, dropout_p, dora[0],
                                     base_norm_sq)
            else:
                y = y + lora_term(call.x, lora_A, lora_B, scaling, dropout_p)
    return y.to(x.dtype) if base == "nf4" and compute_dtype is not None else y


def lora_forward_mixed(x: torch.Tensor, base: str, weight: Any, bias: Optional[torch.Tensor],
                       adapters: Sequence[Optional[tuple]], groups: Any, *,
                       seed: Optional[Any] = None, compute_dtype: Optional[torch.dtype] = None,
                       requested: Optional[str] = None, base_norm_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y where row i of the flattened x gets x_i W^T + b + (its slot's adapter term, if any).

    ``adapters`` has one entry per slot of ``groups`` (lorakern.rows.TokenGroups: slot, order, offsets,
    counts over the rows of x flattened to (M, K)); None where this layer lacks that adapter. An entry
    (A, B, s, dropout_p, magnitude) is DoRA: its rows get y_i = x_i W^T + b + (c - 1) (x~_i W^T) + c s (x~_i
    A^T) B^T (lorakern.dora; ``base_norm_sq`` the cached ||W_i||^2 its norm uses). Casts as ``lora_forward``
    does; y has x's leading shape. When every row uses one adapter (the host counts say so, in eager) this
    is that adapter's single-adapter call, so a one-adapter batch costs what it did."""
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    whole = [a for a, count in enumerate(groups.counts) if count == rows and rows]
    others = [a for a in range(len(adapters)) if not whole or a != whole[0]]
    if whole and adapters[whole[0]] is not None and all(adapters[a] is None for a in others):
        # every row uses one adapter (known in eager only) and no other adapter is there to get its zero
        # gradient: the single-adapter call, at its cost
        return lora_forward(x, base, weight, bias, [adapters[whole[0]]], seed=seed, compute_dtype=compute_dtype,
                            requested=requested, base_norm_sq=base_norm_sq)
    call = prepare_mixed(x, base, weight, bias, adapters, groups, compute_dtype)
    call.base_norm_sq = base_norm_sq
    with _autocast_off(x.device.type):
        implementation, _ = choose(call, requested)
        p = max([0.0] + [a[3] for a in call.adapters if a is not None])
        call.seed = _seed_for(implementation, p, seed)
        y = implementation.run_mixed(call) if call.magnitudes is None else implementation.run_mixed_dora(call)
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y.to(x.dtype) if base == "nf4" and compute_dtype is not None else y


def _caster(dtype: torch.dtype) -> Callable[[Optional[torch.Tensor]], Optional[torch.Tensor]]:
    """t cast to ``dtype`` (None stays None). A tensor already in it is returned without a call to .to(), which
    costs ~1 us even when it has nothing to do, the check ~0.1 us (a mixed call of 8 adapters makes ~20)."""
    return lambda t: t if t is None or t.dtype == dtype else t.to(dtype)


def function_output(y: torch.Tensor, lead: Sequence[int]) -> torch.Tensor:
    """y (M, N) returned by an autograd Function as the layer's output (*lead, N): storage shared, not a view.
    Autograd forbids an in-place write into a view a custom Function returns (an inplace ReLU after the
    layer would raise), and y.reshape returns a view even for an unchanged shape; aten::linear hands its
    folded GEMM back the same way."""
    return torch.ops.aten._unsafe_view(y, (*lead, y.shape[-1]))


def prepare_mixed(x: torch.Tensor, base: str, weight: Any, bias: Optional[torch.Tensor],
                  adapters: Sequence[Optional[tuple]], groups: Any,
                  compute_dtype: Optional[torch.dtype] = None) -> MixedCall:
    """The MixedCall for these operands: x flattened to (M, K), everything cast to the compute dtype (a
    DoRA slot's magnitude, the fifth entry of its tuple, stays in its own dtype, as in a single-adapter call)."""
    dtype = compute_dtype_of(x, base, compute_dtype)
    cast = _caster(dtype)
    if len(adapters) != len(groups.counts) and not torch.compiler.is_compiling():
        raise LorakernError(f"{len(adapters)} adapters given for {len(groups.counts)} slots; give one entry per slot "
                            f"(None where the layer lacks that adapter)")
    cast_adapters = [None if a is None else (cast(a[0]), cast(a[1]), float(a[2]), float(a[3])) for a in adapters]
    magnitudes = [a[4] if a is not None and len(a) > 4 else None for a in adapters]
    return MixedCall(cast(x.reshape(-1, x.shape[-1])), base, cast(weight) if base == "dense" else weight, cast(bias),
                     cast_adapters, groups.slot, groups.order, groups.offsets, groups.counts,
                     magnitudes=magnitudes if any(m is not None for m in magnitudes) else None)


def prepare(x: torch.Tensor, base: str, weight: Any, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
            lora_B: torch.Tensor, scaling: float, dropout_p: float = 0.0,
            compute_dtype: Optional[torch.dtype] = None, magnitude: Optional[torch.Tensor] = None) -> Call:
    """The call for these operands, each cast to the compute dtype (``compute_dtype_of``; a 4-bit base's
    storage is passed as it is). Casts are not autocast ops, so this reads autocast's state and casts alike."""
    dtype = compute_dtype_of(x, base, compute_dtype)
    cast = _caster(dtype)
    return Call(cast(x), base, cast(weight) if base == "dense" else weight, cast(bias), cast(lora_A), cast(lora_B),
                scaling, dropout_p, magnitude=magnitude)

__all__ = ["BACKEND_CHOICES", "BACKEND_ENV", "Call", "Implementation", "MixedCall", "attach_dora", "choose", "explain",
           "function_output", "lora_forward", "lora_forward_mixed", "lora_term", "prepare", "prepare_mixed", "register",
           "requested_backend", "verdict"]
