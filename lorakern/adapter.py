"""LoraAdapter: one named adapter of a layer, its two factors and the hyper-parameters that scale them."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from lorakern import core
from lorakern.errors import ConfigError
from lorakern.inits import rewrites_base
from lorakern.named_adapters import adapter_hyperparameters

# init_lora_weights values a layer takes (PEFT's names; "normal" is the seed's rule, lorakern's own):
# True / "kaiming": A kaiming-uniform (a = sqrt(5)), B zeros (PEFT's default); "gaussian": A ~ N(0, 1/r^2),
# B zeros; "normal": A ~ N(0, 1), B zeros; False: A and B both kaiming-uniform (not an identity at start).
# Computed from the base weight by the layer (lorakern.inits): "pissa", "pissa_niter_K", "olora", "loftq".
INITS = (True, False, "kaiming", "gaussian", "normal", "pissa", "pissa_niter_[K]", "olora", "loftq")


def check_hyperparameters(r, alpha, dropout, init) -> None:
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int, got {r!r} ({type(r).__name__})")
    if r <= 0:
        raise ConfigError(f"r must be a positive integer, got r={r}; use r=8 (PEFT's default) or another rank >= 1")
    if alpha is not None and not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0
                                  and math.isfinite(alpha)):
        raise ConfigError(f"lora_alpha must be a positive number, got alpha={alpha!r}; leave it None to use alpha = r")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ConfigError(f"lora_dropout must be in [0, 1), got dropout={dropout!r}; use 0.0 to disable it")
    if rewrites_base(init):
        return
    if init not in INITS or init == "pissa_niter_[K]" or isinstance(init, int) and not isinstance(init, bool):
        raise ConfigError(f"init_lora_weights={init!r} is not supported: init must be one of {INITS} with K the number "
                          f"of subspace iterations, e.g. 'pissa_niter_4' (EVA and CorDA are not implemented yet)")


def init_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, init, r: int) -> None:
    """A by the init rule, B zeros (both kaiming-uniform for init False), in place; any factor layout (a Linear's
    (r, in), a convolution's (r, C, *k)): kaiming-uniform reads the fan-in from the tensor, as nn.init does."""
    if lora_A.is_meta:
        return
    with torch.no_grad():
        if init in ("kaiming", False):
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(lora_A, std=core.init_std(init, r, lora_A[0].numel()))
        if init is False:
            nn.init.kaiming_uniform_(lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(lora_B)


class LoraAdapter(nn.Module):
    """lora_A (r x in) and lora_B (out x r) with s = alpha / r (alpha / sqrt(r) with rsLoRA) and the LoRA
    dropout probability. The update it adds is s B A, applied as s (dropout(x) A^T) B^T.

    ``use_dora``: also a magnitude vector ``lora_magnitude_vector`` (out,) (lorakern.dora); the layer sets
    it to the row norms of W + s B A, which it alone knows (``LoraLinear.reset_magnitude``)."""

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: Optional[float] = None,
                 dropout: float = 0.0, use_rslora: bool = False, init=True, device=None, dtype=None,
                 use_dora: bool = False) -> None:
        super().__init__()
        check_hyperparameters(r, alpha, dropout, init)
        self.in_features, self.out_features = in_features, out_features
        adapter_hyperparameters(self, r, alpha, dropout, use_rslora, init)
        factory = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        if not isinstance(use_dora, bool):
            raise ConfigError(f"use_dora must be True or False, got {use_dora!r}")
        self.use_dora = use_dora
        self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features, **factory)) if use_dora else None
        # an init from the base weight is computed by the layer (lorakern.inits.initialize); until then the
        # adapter holds PEFT's default, B = 0, so it changes nothing
        self.reset_parameters("kaiming" if rewrites_base(self.init) else None)

    def reset_parameters(self, init=None) -> None:
        """A by the init rule, B zeros (both kaiming-uniform for init False)."""
        init = self.init if init is None else ("kaiming" if init is True else init)
        if rewrites_base(init):
            raise ConfigError(f"init {init!r} is computed from the base weight once, when the layer adds the adapter "
                              f"(the base then holds the residual): it cannot be reset; reset with init=True or "
                              f"'gaussian', or add a fresh adapter")
        init_factors(self.lora_A, self.lora_B, init, self.r)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """s B A as (out, in), computed in ``dtype`` (fp32 at least)."""
        compute = torch.promote_types(dtype, torch.float32)
        return (self.lora_B.to(compute) @ self.lora_A.to(compute)) * self.scaling

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}"
                + (", use_dora=True" if self.use_dora else ""))
