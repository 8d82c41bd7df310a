"""LoraEmbedding: an nn.Embedding with named low-rank adapters (PEFT's Embedding LoRA, its keys and shapes).

    y = E[x] + sum over the active adapters a of s_a A_a^T[x] B_a^T

A (r, num_embeddings) and B (embedding_dim, r) are saved as PEFT's ``lora_embedding_A`` /
``lora_embedding_B``. The LoRA term gathers rows of A^T (F.embedding, with the base's padding_idx,
max_norm, norm_type and scale_grad_by_freq, as PEFT does), never a one-hot product, then multiplies the
(..., r) rows by B^T. It runs in plain torch: the term costs a few passes over the (M, D) output, the order
of the lookup itself, and a lookup is one gather per token in a model whose step is its GEMMs; a fused kernel
would save one of those passes (docs/layer.md; benchmarks/bench_embedding_conv.py measures it).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lorakern.adapter import check_hyperparameters
from lorakern.layer import DEFAULT_ADAPTER
from lorakern.named_adapters import (InPlaceMerge, NamedAdapters, WrapsModule, adapter_hyperparameters,
                                     check_plain_adapter)

KIND = "nn.Embedding"


class EmbeddingAdapter(nn.Module):
    """lora_embedding_A (r x num_embeddings) and lora_embedding_B (embedding_dim x r) with s = alpha / r
    (alpha / sqrt(r) with rsLoRA). PEFT's init for embeddings: A zeros, B ~ N(0, 1) (loralib's rule; the
    update starts at zero through A); init False: both ~ N(0, 1). Dropout is kept for the config's sake
    but never applied: PEFT's Embedding LoRA has none (there is no input vector to drop)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 8, alpha: Optional[float] = None,
                 dropout: float = 0.0, use_rslora: bool = False, init=True, device=None, dtype=None) -> None:
        super().__init__()
        check_plain_adapter(KIND, init, False)
        check_hyperparameters(r, alpha, dropout, init)
        adapter_hyperparameters(self, r, alpha, dropout, use_rslora, init)
        factory = {"device": device, "dtype": dtype}
        self.lora_embedding_A = nn.Parameter(torch.empty(r, num_embeddings, **factory))
        self.lora_embedding_B = nn.Parameter(torch.empty(embedding_dim, r, **factory))
        self.reset_parameters()

    def reset_parameters(self, init=None) -> None:
        init = self.init if init is None else ("kaiming" if init is True else init)
        if self.lora_embedding_A.is_meta:
            return
        with torch.no_grad():
            if init is False:
                nn.init.normal_(self.lora_embedding_A)
            else:
                nn.init.zeros_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """s (B A)^T as (num_embeddings, embedding_dim), the table's layout, computed in ``dtype`` (fp32 at least)."""
        compute = torch.promote_types(dtype, torch.float32)
        return (self.lora_embedding_B.to(compute) @ self.lora_embedding_A.to(compute)).t() * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}"


class LoraEmbedding(WrapsModule, InPlaceMerge, NamedAdapters, nn.Module):
    """A drop-in nn.Embedding with named adapters on its frozen table ``weight`` (nn.Embedding's key, so a
    model's base state dict is unchanged by injection). ``lora_embedding_A`` / ``lora_embedding_B`` and
    ``scaling``, ``r``, ``alpha`` are the active adapter's."""

    is_quantized = False
    fan_in_fan_out = False
    bias = None  # what lorakern's bias rules read of a LoRA layer; an embedding has none

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None,
                 max_norm: Optional[float] = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, *, r: int = 8, alpha: Optional[float] = None, dropout: float = 0.0,
                 use_rslora: bool = False, init="kaiming", use_dora: bool = False, device=None, dtype=None,
                 adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        base = nn.Embedding(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq,
                            sparse, device=device, dtype=dtype)
        self._adopt(base, adapter_name, dict(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init,
                                             use_dora=use_dora))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, adapter_name: str = DEFAULT_ADAPTER, **kwargs) -> "LoraEmbedding":
        """Wrap an nn.Embedding: its table is shared, not copied, and frozen. Keyword arguments configure
        the adapter (r, alpha, dropout, use_rslora, init)."""
        if type(embedding) is not nn.Embedding:
            raise TypeError(f"from_embedding takes an nn.Embedding, got {type(embedding).__name__} (a subclass with "
                            f"its own forward would compute something this layer does not)")
        return cls._wrapping(embedding, adapter_name, kwargs)

    def _take_base(self, base: nn.Embedding) -> None:
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = base.padding_idx, base.max_norm, base.norm_type
        self.scale_grad_by_freq, self.sparse = base.scale_grad_by_freq, base.sparse
        self.weight = base.weight
        self.weight.requires_grad_(False)

    # ---- named adapters -----------------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int = 8, alpha: Optional[float] = None, dropout: float = 0.0,
                    use_rslora: bool = False, init="kaiming", use_dora: bool = False,
                    dtype: Optional[torch.dtype] = None) -> EmbeddingAdapter:
        """A new adapter ``name``; the first one becomes active, later ones are added inactive (as in PEFT)."""
        check_plain_adapter(KIND, init, use_dora)
        self._check_new_name(name)
        existing = next(iter(self.adapters.values()), None)
        reference = existing.lora_embedding_A if existing is not None else self.weight
        adapter = EmbeddingAdapter(self.num_embeddings, self.embedding_dim, r, alpha, dropout, use_rslora, init,
                                   device=reference.device, dtype=dtype or reference.dtype)
        self._register(name, adapter)
        return adapter

    lora_embedding_A = property(lambda self: self._active().lora_embedding_A, doc="the active adapter's A (r x V)")
    lora_embedding_B = property(lambda self: self._active().lora_embedding_B, doc="the active adapter's B (D x r)")

    # ---- compute -------------------------------------------------------------------------------------------
    def _lookup(self, x: torch.Tensor, table: torch.Tensor, sparse: bool) -> torch.Tensor:
        return F.embedding(x, table, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, sparse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self._lookup(x, self.weight, self.sparse)
        adapters = [] if self.disabled else self._unmerged_active()
        out_dtype = result.dtype
        for adapter in adapters:
            # rows of A^T gathered with the base's rules (the padding row gets no gradient, max_norm renormalises
            # the rows read, as PEFT does); a dense gradient for A: PEFT's sparse one fails in backward
            rows = self._lookup(x, adapter.lora_embedding_A.t(), False)
            result = result + (rows @ adapter.lora_embedding_B.t()) * adapter.scaling
        return result.to(out_dtype)

    # ---- merging (delta_weight: InPlaceMerge's, s (B A)^T as (num_embeddings, embedding_dim)) ---------------
    def _plain(self, weight: torch.Tensor) -> nn.Embedding:
        with torch.device("meta"):
            base = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, self.max_norm,
                                self.norm_type, self.scale_grad_by_freq, self.sparse)
        base.weight = weight
        return base

    @torch.no_grad()
    def merged_base(self) -> nn.Embedding:
        """A new nn.Embedding holding E + the unmerged active adapters' update; this layer is left as it is."""
        return self._plain(self._merged_weight())

    def unload(self) -> nn.Embedding:
        """The nn.Embedding alone, sharing this layer's table, merged or not as this layer is."""
        return self._plain(self.weight)

    def peft_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Adapter ``adapter_name``'s live tensors under PEFT's key suffixes (no ".weight" for embeddings)."""
        adapter = self.adapters[adapter_name]
        return {"lora_embedding_A": adapter.lora_embedding_A, "lora_embedding_B": adapter.lora_embedding_B}

    def extra_repr(self) -> str:
        padding = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return (f"{self.num_embeddings}, {self.embedding_dim}{padding}, active={self.active_adapters}, "
                f"merged={self.merged_adapters}")


__all__ = ["EmbeddingAdapter", "LoraEmbedding"]
