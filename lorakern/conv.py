"""LoraConv: an nn.Conv1d / nn.Conv2d with named low-rank adapters (PEFT's Conv LoRA, its keys and shapes).

    y = conv_g(x, W) + b + sum over the active adapters a of s_a conv1x1_g(conv(dropout_a(x), A_a), B_a)

A (r, C, *k) is a convolution with r output channels and the base's kernel size, stride, padding and
dilation (ungrouped, zero-padded: PEFT's lora_A); B (O, r / g, *1) a 1 x 1 convolution with the base's
groups g (PEFT's lora_B). Saved as PEFT's ``lora_A.weight`` / ``lora_B.weight`` with these 4-D (2-D conv)
or 3-D (1-D conv) shapes. It runs in plain torch: the base convolution dominates (the LoRA branch is a
conv with r << O output channels and a 1 x 1 conv), and neither is the GEMM our kernels fuse (docs/layer.md).

Where lorakern differs from PEFT 0.21, PEFT fails: it builds lora_A without the base's dilation, so a
dilated kernel > 1 gives a shape mismatch in its forward; here A takes the dilation, which is also what
makes the merged kernel compute the same function.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lorakern.adapter import check_hyperparameters, init_factors
from lorakern.errors import ConfigError, LorakernError
from lorakern.layer import DEFAULT_ADAPTER
from lorakern.named_adapters import (InPlaceMerge, NamedAdapters, WrapsModule, adapter_hyperparameters,
                                     check_plain_adapter)

CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d}
CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d}


class ConvAdapter(nn.Module):
    """lora_A (r, C, *k) and lora_B (O, r / groups, *1): the kernels of PEFT's lora_A / lora_B convs, with
    s = alpha / r (alpha / sqrt(r) with rsLoRA). Init as PEFT: A kaiming-uniform (a = sqrt(5), fan-in
    C prod(k)), B zeros; "gaussian" A ~ N(0, 1/r^2); lorakern's "normal" A ~ N(0, 1); False: both
    kaiming-uniform (nn.Conv's own init, which PEFT leaves in place)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, ...], groups: int, r: int = 8,
                 alpha: Optional[float] = None, dropout: float = 0.0, use_rslora: bool = False, init=True,
                 device=None, dtype=None) -> None:
        super().__init__()
        check_plain_adapter("nn.Conv", init, False)
        check_hyperparameters(r, alpha, dropout, init)
        adapter_hyperparameters(self, r, alpha, dropout, use_rslora, init)
        factory = {"device": device, "dtype": dtype}
        self.groups = groups
        self.lora_A = nn.Parameter(torch.empty(r, in_channels, *kernel_size, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_channels, r // groups, *(1,) * len(kernel_size), **factory))
        self.reset_parameters()

    def reset_parameters(self, init=None) -> None:
        init_factors(self.lora_A, self.lora_B, self.init if init is None else ("kaiming" if init is True else init),
                     self.r)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """s B ∘ A as one (O, C, *k) kernel: delta[o, c, t] = s sum_j B[o, j] A[j, c, t] (groups 1 only),
        computed in ``dtype`` (fp32 at least). PEFT forms the same sums as a convolution of A^T with B."""
        compute = torch.promote_types(dtype, torch.float32)
        A, B = self.lora_A.to(compute), self.lora_B.to(compute)
        return (B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)).reshape(B.shape[0], *A.shape[1:]) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}"


class LoraConv(WrapsModule, InPlaceMerge, NamedAdapters, nn.Module):
    """A drop-in nn.Conv1d / nn.Conv2d with named adapters on its frozen ``weight`` and ``bias`` (the conv's
    keys, so a model's base state dict is unchanged by injection). ``lora_A``, ``lora_B``, ``scaling``,
    ``r``, ``alpha`` and ``dropout`` are the active adapter's."""

    is_quantized = False
    fan_in_fan_out = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, dims: int = 2, r: int = 8,
                 alpha: Optional[float] = None, dropout: float = 0.0, use_rslora: bool = False, init="kaiming",
                 use_dora: bool = False, device=None, dtype=None, adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        if dims not in CONV_TYPES:
            raise ValueError(f"dims={dims!r}: LoraConv covers 1-D and 2-D convolutions (dims=1 or 2)")
        base = CONV_TYPES[dims](in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                                padding_mode, device=device, dtype=dtype)
        self._adopt(base, adapter_name, dict(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init,
                                             use_dora=use_dora))

    @classmethod
    def from_conv(cls, conv: nn.Module, adapter_name: str = DEFAULT_ADAPTER, **kwargs) -> "LoraConv":
        """Wrap an nn.Conv1d or nn.Conv2d: its weight and bias are shared, not copied, and frozen. Keyword
        arguments configure the adapter (r, alpha, dropout, use_rslora, init)."""
        if type(conv) not in CONV_TYPES.values():
            raise TypeError(f"from_conv takes an nn.Conv1d or nn.Conv2d, got {type(conv).__name__}")
        return cls._wrapping(conv, adapter_name, kwargs)

    def _take_base(self, base: nn.Module) -> None:
        self.dims = base.weight.dim() - 2
        self.in_channels, self.out_channels, self.groups = base.in_channels, base.out_channels, base.groups
        self.kernel_size, self.stride, self.padding = base.kernel_size, base.stride, base.padding
        self.dilation, self.padding_mode = base.dilation, base.padding_mode
        self._reversed_padding_repeated_twice = base._reversed_padding_repeated_twice  # for padding_mode's F.pad
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    # ---- named adapters -----------------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int = 8, alpha: Optional[float] = None, dropout: float = 0.0,
                    use_rslora: bool = False, init="kaiming", use_dora: bool = False,
                    dtype: Optional[torch.dtype] = None) -> ConvAdapter:
        """A new adapter ``name``; the first one becomes active, later ones are added inactive (as in PEFT)."""
        check_plain_adapter(f"nn.Conv{self.dims}d", init, use_dora)
        if isinstance(r, int) and r > 0 and r % self.groups:
            raise ConfigError(f"r={r} on a convolution with groups={self.groups}: B is a grouped 1 x 1 conv, so r "
                              f"must be divisible by {self.groups} (PEFT's rule); use r="
                              f"{max(self.groups, r // self.groups * self.groups)} (rank_pattern sets it per layer)")
        self._check_new_name(name)
        existing = next(iter(self.adapters.values()), None)
        reference = existing.lora_A if existing is not None else self.weight
        adapter = ConvAdapter(self.in_channels, self.out_channels, self.kernel_size, self.groups, r, alpha, dropout,
                              use_rslora, init, device=reference.device, dtype=dtype or reference.dtype)
        self._register(name, adapter)
        return adapter

    lora_A = property(lambda self: self._active().lora_A, doc="the active adapter's A (r, C, *k)")
    lora_B = property(lambda self: self._active().lora_B, doc="the active adapter's B (O, r / groups, *1)")

    # ---- compute -------------------------------------------------------------------------------------------
    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = CONV_FUNCTIONS[self.dims]
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self._base_forward(x)
        adapters = [] if self.disabled else self._unmerged_active()
        out_dtype = result.dtype
        conv = CONV_FUNCTIONS[self.dims]
        for adapter in adapters:
            x_lora = x.to(adapter.lora_A.dtype)
            if self.training and adapter.dropout > 0:
                x_lora = F.dropout(x_lora, adapter.dropout, training=True)
            # A: r output channels, the base's taps (zero padding, as PEFT's lora_A); B: a grouped 1 x 1 conv
            u = conv(x_lora, adapter.lora_A, None, self.stride, self.padding, self.dilation, 1)
            result = result + conv(u, adapter.lora_B, None, 1, 0, 1, self.groups) * adapter.scaling
        return result.to(out_dtype)

    # ---- merging -------------------------------------------------------------------------------------------
    def check_mergeable(self) -> None:
        if self.groups > 1:
            raise LorakernError(f"cannot merge LoRA into a convolution with groups={self.groups}: A mixes all "
                                f"{self.in_channels} input channels, which a grouped kernel cannot hold (PEFT refuses "
                                f"too). Keep the layer unmerged; lorakern.unload(model) drops the adapters")
        if self.padding_mode != "zeros":
            raise LorakernError(f"cannot merge LoRA into a convolution with padding_mode={self.padding_mode!r}: the "
                                f"LoRA branch pads with zeros (PEFT's lora_A), the merged kernel would pad with "
                                f"{self.padding_mode!r} and compute something else at the borders. Keep it unmerged")

    def delta_weight(self, adapter_name: Optional[str] = None) -> torch.Tensor:
        """s B ∘ A of one adapter (default: the active one) as a kernel of the weight's shape and dtype."""
        if self.groups > 1:
            self.check_mergeable()
        return super().delta_weight(adapter_name)

    def _plain(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Module:
        with torch.device("meta"):
            base = CONV_TYPES[self.dims](self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                         self.padding, self.dilation, self.groups, self.bias is not None,
                                         self.padding_mode)
        base.weight, base.bias = weight, bias
        return base

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """A new conv holding W + the unmerged active adapters' kernel; this layer is left as it is."""
        bias = None if self.bias is None else nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return self._plain(self._merged_weight(), bias)

    def unload(self) -> nn.Module:
        """The conv alone, sharing this layer's weight and bias, merged or not as this layer is."""
        return self._plain(self.weight, self.bias)

    def peft_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Adapter ``adapter_name``'s live tensors under PEFT's key suffixes (the kernels of its lora_A / lora_B)."""
        adapter = self.adapters[adapter_name]
        return {"lora_A.weight": adapter.lora_A, "lora_B.weight": adapter.lora_B}

    def extra_repr(self) -> str:
        return (f"Conv{self.dims}d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}), "
                f"active={self.active_adapters}, merged={self.merged_adapters}")


__all__ = ["CONV_TYPES", "ConvAdapter", "LoraConv"]
