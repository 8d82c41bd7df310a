"""Fused LoRA linear: one forward launch, one backward launch, dropout drawn inside the kernels.

    y = x W^T + b + s (x~ A^T) B^T,    x~ = x * keep / (1 - p),   keep = Philox(seed, element) >= p

Shapes: x (M, K) (any leading shape is flattened by lora_linear_triton), W (N, K), b (N,), A (r, K),
B (N, r), y (M, N), u = x~ A^T (M, r). r is padded to R_PAD = max(16, next power of two) inside the
kernels, the smallest width tl.dot takes; the padding is masked, never read from memory.

This module is the front door: it re-exports the names of the modules below and registers the
kernels with lorakern's backend switch (lorakern.kernels.BACKENDS names it). The code, by role:

    tiles.py      shared @triton.jit helpers: masked loads and stores, the dot, atomic adds, the W tile
                  (dense or NF4-decoded), the dropout mask, the grouped program order
    forward.py    the forward kernel and its epilogue
    backward.py   the backward kernel and its epilogue
    small_m.py    the decoding kernel (M <= SMALL_M, split-K)
    configs.py    INTERPRETED, rank_pad, the autotune tables, get_autotune_config, the autotuners, _meta
    launchers.py  check -> allocate -> launch: lora_forward, lora_backward, dropout_mask, unsupported
    ops.py        the torch.library custom ops lorakern::lora_linear_fwd / _bwd (fake implementations,
                  autograd) and lora_linear_triton
"""
from __future__ import annotations

from lorakern.functional import Backend, register_backend
from lorakern.kernels.backward import _bwd_epilogue, _lora_bwd_kernel
from lorakern.kernels.configs import (
    _AUTOTUNED,
    _CONFIGS,
    _CONFIGS_NF4,
    _CONFIGS_SMALL,
    _MIXED_MODE,
    _TL_DTYPES,
    INTERPRETED,
    MAX_RANK,
    RANK_PADS,
    SMALL_M,
    _autotuned,
    _meta,
    _small_m_configs,
    get_autotune_config,
    rank_pad,
)
from lorakern.kernels.forward import _fwd_epilogue, _lora_fwd_kernel
from lorakern.kernels.launchers import (
    _check,
    _forward_small_m,
    _is_nf4,
    _weight_args,
    dropout_mask,
    lora_backward,
    lora_forward,
    unsupported,
)
from lorakern.kernels.ops import (
    _backward,
    _lora_linear_bwd,
    _lora_linear_bwd_fake,
    _lora_linear_bwd_impl,
    _lora_linear_fwd,
    _lora_linear_fwd_fake,
    _lora_linear_fwd_impl,
    _NF4Weight,
    _seed_tensor,
    _setup_context,
    _weight_from_parts,
    _weight_parts,
    lora_linear_triton,
)
from lorakern.kernels.small_m import _lora_small_m_kernel
from lorakern.kernels.tiles import (
    _atomic_add,
    _dot,
    _dropout_keep,
    _dropout_mask_kernel,
    _keep_scale,
    _load,
    _load_weight,
    _store,
    _tile_ids,
)


def _apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return lora_linear_triton(x, weight, bias, lora_A, lora_B, scaling, dropout_p, 0 if seed is None else seed)


register_backend(Backend("triton", _apply, dropout_mask, unsupported))
