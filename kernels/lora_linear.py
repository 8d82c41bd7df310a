"""Fused LoRA linear: one forward launch, one backward launch, dropout drawn inside the kernels.

    y = x W^T + b + s (x~ A^T) B^T,    x~ = x * keep / (1 - p),   keep = Philox(seed, element) >= p

Shapes: x (M, K) (any leading shape is flattened by lora_linear_triton), W (N, K), b (N,), A (r, K),
B (N, r), y (M, N), u = x~ A^T (M, r). r is padded to R_PAD = max(16, next power of two) inside the
kernels, the smallest width tl.dot takes; the padding is masked, never read from memory.

This module is the front door: it re-exports the names of the modules below and registers the
kernels with lorakern.dispatch (lorakern.kernels.BACKENDS names it). The code, by role:

    tiles.py      shared @triton.jit helpers: masked loads and stores, the dot, atomic adds, the W tile
                  (dense or NF4-decoded), the dropout mask, the grouped program order
    loops.py      inner loops the kernels share: the decoding kernel's K loop, the backward kernels' N loops
    forward.py    the forward kernel and its epilogue
    backward.py   the backward kernel and its epilogue
    small_m.py    the decoding kernel (M <= SMALL_M, split-K)
    configs.py    INTERPRETED, rank_pad, the autotune tables, get_autotune_config, the autotuners, _meta
    launchers.py  check -> allocate -> launch: lora_forward, lora_backward, dropout_mask, unsupported
    ops.py        the torch.library custom ops lorakern::lora_linear_fwd / _bwd (fake implementations,
                  autograd) and lora_linear_triton
    dora_tiles.py, dora_ops.py
                  DoRA on the same kernels (HAS_MAGNITUDE): the epilogue helpers, and the ops
                  lorakern::dora_linear_fwd / _bwd with dora_linear_triton, run_dora, unsupported_dora
    mixed_forward.py, mixed_backward.py, mixed_launchers.py, mixed_ops.py
                  the same four roles for mixed-adapter batches (each row its own adapter, one launch per
                  pass): segmented kernels, launchers, the ops lorakern::mixed_lora_fwd / _bwd, run_mixed
    mixed_dora_tiles.py, mixed_dora_ops.py
                  DoRA slots in those kernels (HAS_MAGNITUDE): the epilogue helpers, and the ops
                  lorakern::mixed_dora_fwd / _bwd with mixed_dora_triton, run_mixed_dora
"""
from __future__ import annotations

from lorakern import dispatch
from lorakern.dora import further_term
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
from lorakern.kernels.dora_ops import dora_linear_triton, run_dora, unsupported_dora
from lorakern.kernels.mixed_ops import mixed_lora_triton, run_mixed, unsupported_mixed
from lorakern.kernels.mixed_dora_ops import mixed_dora_triton, run_mixed_dora
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


def _run(call: dispatch.Call):
    seed = 0 if call.seed is None else call.seed
    return lora_linear_triton(call.x, call.weight, call.bias, call.lora_A, call.lora_B, call.scaling, call.dropout_p,
                              seed)


def _unsupported(call: dispatch.Call):
    if call.magnitude is not None:
        return unsupported_dora(call.x, call.weight, call.lora_A, call.dropout_p)
    return unsupported(call.x, call.weight, call.lora_A)


# one implementation for dense and NF4 weights alike (the kernels decode NF4 tiles where they load them); mixed-
# adapter batches run the segmented kernels (kernels/mixed_*.py) for both bases too
for _base in dispatch.BASE_KINDS:
    dispatch.register(dispatch.Implementation("triton", _base, _run, dropout_mask, _unsupported, needs_seed=True,
                                              run_mixed=run_mixed, unsupported_mixed=unsupported_mixed))
# DoRA: the same kernels with the magnitude scale in their epilogues (dora_ops.py), dense and NF4 bases; a further
# active DoRA adapter composes in torch (lorakern.dora.further_term), as on every implementation; mixed batches
# with DoRA slots run the segmented kernels with the magnitude (mixed_dora_ops.py)
dispatch.attach_dora({("triton", _base): run_dora for _base in dispatch.BASE_KINDS}, further_term,
                     {("triton", _base): run_mixed_dora for _base in dispatch.BASE_KINDS})

__all__ = [  # re-exported: every name the single-file module had, so lora_linear.X keeps working
    "_atomic_add", "_AUTOTUNED", "_autotuned", "_backward", "_bwd_epilogue", "_check", "_CONFIGS", "_CONFIGS_NF4",
    "_CONFIGS_SMALL", "_dot", "_dropout_keep", "_dropout_mask_kernel", "_forward_small_m", "_fwd_epilogue", "_is_nf4",
    "_keep_scale", "_load", "_load_weight", "_lora_bwd_kernel", "_lora_fwd_kernel", "_lora_linear_bwd",
    "_lora_linear_bwd_fake", "_lora_linear_bwd_impl", "_lora_linear_fwd", "_lora_linear_fwd_fake",
    "_lora_linear_fwd_impl", "_lora_small_m_kernel", "_meta", "_MIXED_MODE", "_NF4Weight", "_seed_tensor",
    "_setup_context", "_small_m_configs", "_store", "_tile_ids", "_TL_DTYPES", "_weight_args", "_weight_from_parts",
    "_weight_parts", "dropout_mask", "get_autotune_config", "INTERPRETED", "lora_backward", "lora_forward",
    "lora_linear_triton", "MAX_RANK", "rank_pad", "RANK_PADS", "SMALL_M", "unsupported",
    # DoRA on the same kernels
    "dora_linear_triton", "run_dora", "unsupported_dora",
    # the segmented kernels of mixed-adapter batches
    "mixed_lora_triton", "run_mixed", "unsupported_mixed",
    # ... with DoRA slots
    "mixed_dora_triton", "run_mixed_dora",
]
