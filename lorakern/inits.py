"""Initialisations computed from the base weight (PEFT's ``init_lora_weights`` "pissa", "pissa_niter_K",
"olora", "loftq"), each rewriting the frozen base so that the layer's output at init is the base layer's:

    PiSSA   W = U S V^T;  A = sqrt(S_r / s) V_r^T,  B = U_r sqrt(S_r / s);  base <- W - s B A
            ("pissa_niter_K": U_r, S_r, V_r from torch.svd_lowrank with K subspace iterations)
    OLoRA   W = Q R;      A = R[:r],  B = Q[:, :r];                          base <- W - s B A
    LoftQ   T rounds of  Q = NF4(W - s B A);  B, A = split of SVD_r(W - deq(Q)) / s   (B A = 0 first);
            base <- Q (the last round's), so deq(Q) + s B A is closer to W than NF4(W)

PiSSA and OLoRA are PEFT 0.21's definitions (pissa_init / olora_init in peft/tuners/lora/layer.py), in
float32 (float64 for a float64 weight), with PEFT's handling of the scaling s: PiSSA divides S by s,
OLoRA does not. PEFT's LoftQ (peft/utils/loftq_utils.py) never divides by s, so its base + s B A is off
by the factor s unless s = 1; lorakern divides S by s as PiSSA does (equal to PEFT's when s = 1), and
quantizes with the layer's own blocksize and double quantization so the last round's Q is the base it
keeps. With an NF4 base PiSSA and OLoRA decompose the full-precision weight and quantize the residual
(what PEFT's PiSSA error message asks its users to do by hand).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional

import torch
from torch import nn

from lorakern.errors import AdapterError, ConfigError

PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
BASE_INITS = ("pissa", "olora", "loftq")  # and "pissa_niter_K"


def rewrites_base(init) -> bool:
    """True for the inits computed from (and rewriting) the base weight."""
    return isinstance(init, str) and (init in BASE_INITS or PISSA_NITER.fullmatch(init) is not None)


def _check_rank(weight: torch.Tensor, r: int, init: str) -> None:
    rank = min(weight.shape)
    if r > rank:
        raise ConfigError(f"init_lora_weights={init!r} takes r={r} directions of a {tuple(weight.shape)} weight, which "
                          f"has at most {rank}; use r <= {rank} for this layer (rank_pattern sets it per layer)")


def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with s B A = U diag(S) Vh, the singular values shared as sqrt(S / s) by both factors."""
    root = torch.sqrt(S / scaling)
    return root[:, None] * Vh, U * root[None, :]


def pissa(weight: torch.Tensor, r: int, scaling: float, niter: Optional[int] = None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, residual W - s B A) of PiSSA for an (out, in) weight, full SVD or ``niter`` randomized iterations."""
    _check_rank(weight, r, "pissa" if niter is None else f"pissa_niter_{niter}")
    if niter is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(weight, q=r, niter=niter)
        Vh = V.t()
    A, B = _split(U, S, Vh, scaling)
    return A, B, weight - scaling * (B @ A)


def olora(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, residual W - s B A) of OLoRA: the first r columns of Q and rows of R of W = Q R."""
    _check_rank(weight, r, "olora")
    Q, R = torch.linalg.qr(weight)
    A, B = R[:r].contiguous(), Q[:, :r].contiguous()
    return A, B, weight - scaling * (B @ A)


def loftq(weight: torch.Tensor, r: int, scaling: float, num_iter: int, quantize: Callable[[torch.Tensor], Any],
          decode: Callable[[Any], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(A, B, quantized base) of LoftQ: ``quantize(w)`` gives the base, ``decode(base)`` its fp32 values."""
    _check_rank(weight, r, "loftq")
    if num_iter < 1:
        raise ConfigError(f"loftq_iter must be >= 1, got {num_iter}; use loftq_config={{'loftq_bits': 4, 'loftq_iter': 1}}")
    target = weight
    for round_ in range(num_iter):
        base = quantize(target)
        U, S, Vh = torch.linalg.svd(weight - decode(base), full_matrices=False)
        A, B = _split(U[:, :r], S[:r], Vh[:r], scaling)
        if round_ + 1 < num_iter:
            target = weight - scaling * (B @ A)
    return A, B, base


def check_layer(layer: nn.Module, name: str, init) -> None:
    """Refuse an init that rewrites the base on a layer that already holds adapters (their outputs would
    change). (LoftQ on a base that is not NF4 is refused by ``initialize``.)"""
    if not rewrites_base(init):
        return
    others = [n for n in layer.adapters if n != name]
    if others:
        raise AdapterError(
            f"init_lora_weights={init!r} rewrites this layer's base weight to its residual, which would change what "
            f"adapters {others} already on it compute. Add it to a model without adapters on these layers, or "
            f"convert the other adapter to a plain LoRA (save_adapter(..., path_initial_model_for_weight_conversion="
            f"...)) and load that instead")


def initialize(layer: nn.Module, name: str, source: Optional[torch.Tensor] = None, loftq_iter: int = 1) -> None:
    """Compute adapter ``name`` of ``layer`` from its base and rewrite the base (a new tensor: the module the
    layer wraps keeps its weight, so an injection that fails can put it back unchanged).

    ``source``: the full-precision (out, in) weight to decompose; default the layer's own dense weight. A
    4-bit layer needs it (from_linear passes the weight it quantizes)."""
    from lorakern.nf4.codec import quantize_nf4
    from lorakern.nf4.storage import NF4Storage

    adapter = layer.adapters[name]
    init = adapter.init
    quantized = layer.base.kind == "nf4"
    if init == "loftq" and not quantized:
        raise ConfigError("init_lora_weights='loftq' fits the adapter to the quantization error of an NF4 base, but "
                          "this layer's base is full precision; inject with quantize='nf4' (and not in quantize_skip)")
    if source is None:
        if quantized:
            raise ConfigError(f"init_lora_weights={init!r} on a 4-bit layer needs its full-precision weight: inject "
                              f"it with quantize='nf4' into the plain model (LoraLinear.from_linear(linear, "
                              f"quantize='nf4', init=...)), which decomposes W and quantizes the residual")
        source = layer.weight_out_in
    if source.is_meta:
        return
    dtype = source.dtype
    if not dtype.is_floating_point:
        raise ConfigError(f"init_lora_weights={init!r} decomposes a floating-point weight, got {dtype}")
    weight = source.detach().to(torch.float64 if dtype == torch.float64 else torch.float32)
    with torch.no_grad():
        if init == "loftq":
            storage = layer.nf4

            def quantize(w: torch.Tensor) -> NF4Storage:
                return NF4Storage(quantize_nf4(w.to(dtype), storage.blocksize, storage.double_quant),
                                  storage.quant_storage)

            A, B, layer.nf4 = loftq(weight, adapter.r, adapter.scaling, loftq_iter, quantize,
                                    lambda base: base.dequantize(weight.dtype))
        else:
            match = PISSA_NITER.fullmatch(init)
            if init == "olora":
                A, B, residual = olora(weight, adapter.r, adapter.scaling)
            else:
                A, B, residual = pissa(weight, adapter.r, adapter.scaling, int(match.group(1)) if match else None)
            if quantized:
                storage = layer.nf4
                layer.nf4 = NF4Storage(quantize_nf4(residual.to(dtype), storage.blocksize, storage.double_quant),
                                       storage.quant_storage)
            else:
                stored = layer.base.stored_layout(residual).to(dtype).contiguous()
                layer.weight = nn.Parameter(stored, requires_grad=False)
        adapter.lora_A.copy_(A)
        adapter.lora_B.copy_(B)


__all__ = ["BASE_INITS", "PISSA_NITER", "check_layer", "initialize", "loftq", "olora", "pissa", "rewrites_base"]
