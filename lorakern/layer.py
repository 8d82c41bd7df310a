"""LoraLinear: a drop-in nn.Linear with a trainable low-rank update on a frozen weight."""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn

from lorakern import core
from lorakern.functional import check_operands, lora_linear


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 Conv1D: a Linear whose weight is stored transposed, (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _check_hyperparameters(r, alpha, dropout, init) -> None:
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int, got {r!r} ({type(r).__name__})")
    if r <= 0:
        raise ValueError(f"r must be a positive integer, got r={r}; use r=8 (PEFT's default) or another rank >= 1")
    if alpha is not None and not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a positive number, got alpha={alpha!r}; leave it None to use alpha = r")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be in [0, 1), got dropout={dropout!r}; use 0.0 to disable it")
    if init not in core.INITS:
        raise ValueError(f"init must be one of {core.INITS}, got init={init!r}")


class LoraLinear(nn.Module):
    """y = x W^T + b + s * lora_B(lora_A(dropout(x))), with s = alpha / r (alpha / sqrt(r) for rsLoRA).

    ``weight`` and ``bias`` keep nn.Linear's names, so a model's base state dict is unchanged by
    injection; ``lora_A`` (r x in) and ``lora_B`` (out x r) are the trainable parameters.
    With ``fan_in_fan_out`` the weight is stored (in, out) as in GPT-2's Conv1D.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int = 8,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        fan_in_fan_out: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_hyperparameters(r, alpha, dropout, init)
        if r > min(in_features, out_features):
            warnings.warn(
                f"r={r} exceeds min(in_features, out_features)={min(in_features, out_features)}: "
                f"the update B A cannot reach rank {r}",
                stacklevel=2,
            )
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.r = r
        self.alpha = float(r if alpha is None else alpha)
        self.use_rslora = use_rslora
        self.scaling = core.scaling(r, self.alpha, use_rslora)
        self.init = init
        self.fan_in_fan_out = fan_in_fan_out
        weight_shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(weight_shape, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        self.dropout = float(dropout)
        self.dropout_seed: Optional[int] = None  # fix the LoRA dropout mask (None: a fresh draw per call)
        self.merged = False
        self.disabled = False  # set by lorakern.disable_adapters: the layer computes its base alone
        # None follows $LORAKERN_BACKEND / auto; "torch" or "triton" pins this layer to one path.
        self.backend: Optional[str] = None
        self._base_type: type = nn.Linear
        self.reset_base_parameters()
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Module, quantize: Optional[str] = None, **lora_kwargs) -> "LoraLinear":
        """Wrap an nn.Linear (or GPT-2 Conv1D), sharing its weight and bias tensors, frozen.

        ``quantize="nf4"`` stores the frozen weight in NF4 instead (QLoRA; takes ``blocksize``,
        ``double_quant``, ``compute_dtype``, ``lora_dtype`` and ``quant_storage`` too) and returns a LoraLinearNF4.
        """
        if quantize is not None:
            if quantize != "nf4":
                raise ValueError(f"quantize={quantize!r} is not a known quant type; use quantize='nf4' or None")
            from lorakern.quant import LoraLinearNF4

            return LoraLinearNF4.from_linear(linear, **lora_kwargs)
        for name in ("blocksize", "double_quant", "compute_dtype", "lora_dtype", "quant_storage"):
            if name in lora_kwargs:
                raise ValueError(f"{name}= applies to a quantized base only; pass quantize='nf4' with it")
        if not is_linear_like(linear):
            raise TypeError(
                f"from_linear takes an nn.Linear or transformers Conv1D, got {type(linear).__name__}; "
                f"LoRA here applies to linear layers only"
            )
        conv = is_conv1d(linear)
        in_features, out_features = (linear.nx, linear.nf) if conv else (linear.in_features, linear.out_features)
        weight = linear.weight
        with torch.device("meta"):
            layer = cls(in_features, out_features, bias=linear.bias is not None, fan_in_fan_out=conv,
                        dtype=weight.dtype, **lora_kwargs)
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        layer.lora_A = nn.Parameter(torch.empty_like(layer.lora_A, device=weight.device))
        layer.lora_B = nn.Parameter(torch.empty_like(layer.lora_B, device=weight.device))
        layer.reset_lora_parameters()
        layer._base_type = type(linear)
        return layer

    def reset_base_parameters(self) -> None:
        """nn.Linear's own init, so a LoraLinear built from scratch behaves like a fresh nn.Linear."""
        if self.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def reset_lora_parameters(self, init: Optional[str] = None) -> None:
        """A by the init rule (kaiming-uniform a=sqrt(5), N(0, 1/r^2), or N(0, 1)); B zeros."""
        init = self.init if init is None else init
        if self.lora_A.is_meta:
            return
        with torch.no_grad():
            if init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A, std=core.init_std(init, self.r, self.in_features))
            nn.init.zeros_(self.lora_B)

    @property
    def weight_out_in(self) -> torch.Tensor:
        """The base weight as (out, in), a view for Conv1D's transposed storage."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            check_operands(x, self.weight_out_in, self.bias, self.lora_A, self.lora_B)
            return nn.functional.linear(x, self.weight_out_in, self.bias)
        return lora_linear(x, self.weight_out_in, self.bias, self.lora_A, self.lora_B, self.scaling,
                           dropout_p=self.dropout if self.training else 0.0, seed=self.dropout_seed,
                           backend=self.backend)

    def dropout_mask(self, seed: int, x: torch.Tensor) -> torch.Tensor:
        """The float32 mask (kept / (1 - p), else 0) this layer's dropout draws for ``seed`` on input ``x``."""
        from lorakern.functional import resolve_backend

        backend = resolve_backend(x, self.weight_out_in, self.lora_A, self.backend)
        return backend.dropout_mask(seed, x.shape, self.dropout, x.device)

    def delta_weight(self) -> torch.Tensor:
        """s B A in the stored weight's layout and dtype (computed in fp32 at least)."""
        compute = torch.promote_types(self.weight.dtype, torch.float32)
        delta = (self.lora_B.to(compute) @ self.lora_A.to(compute)) * self.scaling
        return (delta.t() if self.fan_in_fan_out else delta).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self, safe: bool = True) -> None:
        """Fold s B A into the weight. With ``safe`` a non-finite result raises and W is left untouched."""
        if self.merged:
            warnings.warn("merge() called on a layer that is already merged; nothing to do", stacklevel=2)
            return
        delta = self.delta_weight()
        if safe:
            merged = self.weight + delta
            if not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaNs or infs detected in the merged weight of a LoraLinear({self.in_features}, "
                    f"{self.out_features}, r={self.r}); the weight was left unchanged. Check lora_A and lora_B "
                    f"for non-finite values (or an fp16 overflow: merge in a wider dtype)"
                )
            self.weight.copy_(merged)
        else:
            self.weight.add_(delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract s B A from the weight again."""
        if not self.merged:
            warnings.warn("unmerge() called on a layer that is not merged; nothing to do", stacklevel=2)
            return
        self.weight.sub_(self.delta_weight())
        self.merged = False

    def _empty_base(self) -> nn.Module:
        """A base-layer module of the wrapped type, on the meta device (no memory)."""
        with torch.device("meta"):
            if self._base_type is not nn.Linear and self.fan_in_fan_out:
                return self._base_type(self.out_features, self.in_features)
            return nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)

    def unload(self) -> nn.Module:
        """The base layer (nn.Linear, or the wrapped Conv1D) sharing this layer's weight and bias,
        merged or not as this layer is."""
        base = self._empty_base()
        base.weight = self.weight
        base.bias = self.bias
        return base

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A new plain nn.Linear holding W + s B A (this layer is left as it is)."""
        weight = self.weight_out_in if self.merged else self.weight_out_in + self.delta_weight_out_in()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta")
        linear.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return linear

    def delta_weight_out_in(self) -> torch.Tensor:
        delta = self.delta_weight()
        return delta.t() if self.fan_in_fan_out else delta

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, merged={self.merged}"
            + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
        )
