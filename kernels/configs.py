"""How the fused LoRA kernels run: the mode, the rank padding and the launch configurations.

INTERPRETED (TRITON_INTERPRET=1: the kernels run on CPU tensors under triton's interpreter), MAX_RANK,
rank_pad (r padded to R_PAD), the autotune tables of the forward and backward kernels per input width and
padded rank (dense and NF4 bases) with get_autotune_config and the autotuners built from them
(_autotuned), the decoding kernel's table (_small_m_configs), and the meta-parameters every launch passes
(_meta).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# triton's own jit library functions (tl.cdiv, tl.rand) follow TRITON_INTERPRET as it was when triton
# was first imported; kernels interpreted now cannot call library functions compiled then.
_MIXED_MODE = INTERPRETED and type(tl.cdiv).__name__ != "InterpretedFunction"
MAX_RANK = 64
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


# (BLOCK_M, BLOCK_N, BLOCK_K, tiles per program, warps, stages) per kernel, input width and padded rank.
# Each entry compiles for sm_80 and sm_90 with its R_PAD without register spills and within the card's
# shared memory, with dropout and every gradient on (tests/test_kernels_compiled.py checks it; a config
# that fails there is removed here). fp32 dots run as exact fp32 FMA (no TF32), hence smaller tiles.
_CONFIGS = {
    ("fwd", 16, 16): [(128, 128, 32, 2, 8, 4), (128, 128, 64, 1, 8, 3), (128, 64, 64, 2, 8, 3), (64, 64, 64, 4, 4, 4)],
    ("fwd", 16, 32): [(128, 128, 32, 2, 8, 4), (128, 128, 64, 1, 8, 3), (128, 64, 64, 2, 8, 3), (64, 64, 64, 4, 4, 4)],
    ("fwd", 16, 64): [(128, 128, 32, 2, 8, 4)],
    ("bwd", 16, 16): [(128, 64, 32, 1, 8, 4), (128, 128, 32, 1, 8, 3), (128, 64, 64, 1, 8, 4), (64, 64, 64, 1, 4, 3)],
    ("bwd", 16, 32): [(128, 64, 32, 1, 8, 4), (128, 128, 32, 1, 8, 3), (128, 64, 64, 1, 8, 4), (64, 64, 64, 1, 4, 3)],
    ("bwd", 16, 64): [(128, 64, 32, 1, 8, 4), (128, 128, 32, 1, 8, 3), (128, 64, 64, 1, 8, 4), (64, 64, 64, 1, 4, 3)],
    ("fwd", 32, 16): [(32, 32, 32, 2, 4, 2), (32, 64, 32, 1, 4, 2), (16, 64, 32, 2, 4, 2)],
    ("fwd", 32, 32): [(16, 32, 32, 2, 4, 2), (32, 32, 16, 1, 4, 2)],
    ("fwd", 32, 64): [(16, 32, 32, 2, 4, 2), (32, 32, 16, 1, 4, 2)],
    ("bwd", 32, 16): [(32, 32, 32, 1, 4, 2), (16, 64, 32, 1, 4, 2), (32, 64, 32, 1, 4, 2)],
    ("bwd", 32, 32): [(16, 64, 32, 1, 4, 2)],
    ("bwd", 32, 64): [(16, 64, 32, 1, 4, 2)],
}
# The NF4 base decodes W where it loads it: more registers, and gathers the pipeliner stages through
# shared memory, hence tiles of their own (same checks as above).
_CONFIGS_NF4 = {
    ("fwd", 16, 16): [(128, 128, 32, 1, 8, 2), (128, 64, 32, 1, 8, 2), (64, 128, 32, 1, 4, 2), (64, 64, 32, 1, 4, 2)],
    ("fwd", 16, 32): [(128, 128, 32, 1, 8, 2), (128, 64, 32, 1, 8, 2), (64, 128, 32, 1, 4, 2), (64, 64, 32, 1, 4, 2)],
    ("fwd", 16, 64): [(128, 128, 32, 1, 8, 2), (128, 64, 32, 1, 8, 2), (64, 128, 32, 1, 4, 2), (64, 64, 32, 1, 4, 2)],
    ("bwd", 16, 16): [(128, 128, 32, 1, 8, 2), (128, 64, 32, 1, 8, 2), (64, 64, 64, 1, 4, 2), (64, 64, 32, 1, 4, 2)],
    ("bwd", 16, 32): [(128, 128, 32, 1, 8, 2), (128, 64, 32, 1, 8, 2), (64, 64, 64, 1, 4, 2), (64, 64, 32, 1, 4, 2)],
    ("bwd", 16, 64): [(128, 64, 32, 1, 8, 2), (64, 64, 32, 1, 4, 2)],
    ("fwd", 32, 16): [(16, 32, 32, 1, 4, 1), (16, 32, 16, 1, 4, 2)],
    ("fwd", 32, 32): [(16, 32, 32, 1, 4, 1), (16, 32, 16, 1, 4, 2)],
    ("fwd", 32, 64): [(16, 32, 32, 1, 4, 1), (16, 32, 16, 1, 4, 2)],
    ("bwd", 32, 16): [(16, 32, 32, 1, 4, 1), (32, 32, 16, 1, 4, 1)],
    ("bwd", 32, 32): [(16, 32, 32, 1, 4, 1), (32, 32, 16, 1, 4, 1)],
    ("bwd", 32, 64): [(16, 32, 32, 1, 4, 1), (32, 32, 16, 1, 4, 1)],
}
RANK_PADS = (16, 32, 64)
# The segmented kernels of mixed-adapter batches (mixed_forward.py, mixed_backward.py) use the tables above,
# except the (weight, family, width, R_PAD, config) entries of _MIXED_FAILED, which spill on sm_80 or sm_90
# with the registers of the gathered rows, plus the _MIXED_EXTRA configs where that left none or few (both
# found by the same compile checks, 2026-11-30).
_MIXED_FAILED = frozenset({
    ("dense", "fwd", 16, 32, (128, 128, 64, 1, 8, 3)), ("dense", "fwd", 16, 64, (128, 128, 32, 2, 8, 4)),
    ("nf4", "fwd", 16, 16, (128, 128, 32, 1, 8, 2)), ("nf4", "fwd", 16, 16, (64, 64, 32, 1, 4, 2)),
    ("nf4", "fwd", 16, 64, (64, 128, 32, 1, 4, 2)),
    ("dense", "bwd", 16, 64, (128, 64, 64, 1, 8, 4)), ("dense", "bwd", 16, 64, (64, 64, 64, 1, 4, 3)),
    ("dense", "bwd", 32, 16, (32, 32, 32, 1, 4, 2)), ("dense", "bwd", 32, 16, (32, 64, 32, 1, 4, 2)),
    ("dense", "bwd", 32, 32, (16, 64, 32, 1, 4, 2)), ("dense", "bwd", 32, 64, (16, 64, 32, 1, 4, 2)),
    ("nf4", "bwd", 16, 64, (64, 64, 32, 1, 4, 2)), ("nf4", "bwd", 32, 64, (32, 32, 16, 1, 4, 1)),
    ("nf4", "fwd", 16, 32, (64, 64, 32, 1, 4, 2)), ("dense", "bwd", 16, 32, (128, 64, 64, 1, 8, 4)),
    ("dense", "bwd", 16, 64, (128, 128, 32, 1, 8, 3)), ("nf4", "bwd", 32, 16, (16, 32, 32, 1, 4, 1)),
})
_MIXED_EXTRA = {
    ("dense", "fwd", 16, 64): [(64, 64, 64, 4, 4, 4), (128, 128, 32, 1, 8, 3)],
    ("dense", "bwd", 32, 32): [(16, 32, 32, 1, 4, 2)],
    ("dense", "bwd", 32, 64): [(16, 32, 32, 1, 4, 2)],
}
# DoRA (HAS_MAGNITUDE: the c scale in the epilogue, and with dropout a second accumulator in the forward's K
# loop and the backward's N loop) runs the same kernels with the tables above, except the (weight, kind,
# width, R_PAD, config) entries of _DORA_FAILED, which spill on sm_80 or sm_90 (found by the compile checks);
# kinds dora_fwd / dora_bwd / dora_small without dropout, dora_drop_* with it (R_PAD 0 for the small kernel).
_DORA_FAILED = frozenset({
    ("dense", "dora_bwd", 16, 32, (128, 128, 32, 1, 8, 3)), ("dense", "dora_bwd", 16, 64, (128, 64, 64, 1, 8, 4)),
    ("dense", "dora_bwd", 16, 64, (128, 128, 32, 1, 8, 3)), ("dense", "dora_bwd", 32, 16, (32, 32, 32, 1, 4, 2)),
    ("dense", "dora_bwd", 32, 16, (32, 64, 32, 1, 4, 2)), ("dense", "dora_drop_bwd", 16, 16, (64, 64, 64, 1, 4, 3)),
    ("dense", "dora_drop_bwd", 16, 16, (128, 64, 64, 1, 8, 4)),
    ("dense", "dora_drop_bwd", 16, 16, (128, 128, 32, 1, 8, 3)),
    ("dense", "dora_drop_bwd", 16, 32, (64, 64, 64, 1, 4, 3)),
    ("dense", "dora_drop_bwd", 16, 32, (128, 64, 64, 1, 8, 4)),
    ("dense", "dora_drop_bwd", 16, 32, (128, 128, 32, 1, 8, 3)),
    ("dense", "dora_drop_bwd", 16, 64, (64, 64, 64, 1, 4, 3)),
    ("dense", "dora_drop_bwd", 16, 64, (128, 64, 64, 1, 8, 4)),
    ("dense", "dora_drop_bwd", 16, 64, (128, 128, 32, 1, 8, 3)),
    ("dense", "dora_drop_bwd", 32, 16, (16, 64, 32, 1, 4, 2)),
    ("dense", "dora_drop_bwd", 32, 16, (32, 64, 32, 1, 4, 2)),
    ("dense", "dora_drop_bwd", 32, 32, (16, 64, 32, 1, 4, 2)),
    ("dense", "dora_drop_bwd", 32, 64, (16, 64, 32, 1, 4, 2)),
    ("dense", "dora_drop_fwd", 16, 16, (64, 64, 64, 4, 4, 4)),
    ("dense", "dora_drop_fwd", 16, 16, (128, 128, 32, 2, 8, 4)),
    ("dense", "dora_drop_fwd", 16, 16, (128, 128, 64, 1, 8, 3)),
    ("dense", "dora_drop_fwd", 16, 32, (64, 64, 64, 4, 4, 4)),
    ("dense", "dora_drop_fwd", 16, 32, (128, 64, 64, 2, 8, 3)),
    ("dense", "dora_drop_fwd", 16, 32, (128, 128, 32, 2, 8, 4)),
    ("dense", "dora_drop_fwd", 16, 32, (128, 128, 64, 1, 8, 3)),
    ("dense", "dora_drop_fwd", 16, 64, (128, 128, 32, 2, 8, 4)),
    ("dense", "dora_drop_fwd", 32, 16, (16, 64, 32, 2, 4, 2)),
    ("dense", "dora_drop_fwd", 32, 16, (32, 32, 32, 2, 4, 2)),
    ("dense", "dora_drop_fwd", 32, 16, (32, 64, 32, 1, 4, 2)),
    ("dense", "dora_drop_fwd", 32, 64, (16, 32, 32, 2, 4, 2)),
    ("dense", "dora_drop_small", 16, 0, (128, 64, 2, 4, 3)), ("nf4", "dora_drop_bwd", 16, 16, (64, 64, 64, 1, 4, 2)),
    ("nf4", "dora_drop_bwd", 16, 16, (128, 128, 32, 1, 8, 2)),
    ("nf4", "dora_drop_bwd", 16, 32, (64, 64, 64, 1, 4, 2)),
    ("nf4", "dora_drop_bwd", 16, 32, (128, 128, 32, 1, 8, 2)),
    ("nf4", "dora_drop_fwd", 16, 16, (64, 128, 32, 1, 4, 2)),
    ("nf4", "dora_drop_fwd", 16, 16, (128, 128, 32, 1, 8, 2)),
    ("nf4", "dora_drop_fwd", 16, 32, (64, 128, 32, 1, 4, 2)),
    ("nf4", "dora_drop_fwd", 16, 32, (128, 128, 32, 1, 8, 2)),
    ("nf4", "dora_drop_fwd", 16, 64, (64, 128, 32, 1, 4, 2)),
    ("nf4", "dora_drop_fwd", 16, 64, (128, 128, 32, 1, 8, 2)),
    ("nf4", "dora_drop_fwd", 32, 64, (16, 32, 16, 1, 4, 2)), ("nf4", "dora_drop_small", 16, 0, (64, 64, 2, 4, 2)),
    ("nf4", "dora_fwd", 16, 16, (128, 64, 32, 1, 8, 2)), ("nf4", "dora_fwd", 16, 64, (64, 128, 32, 1, 4, 2)),
    ("nf4", "dora_small", 16, 0, (32, 64, 4, 4, 2)), ("nf4", "dora_small", 16, 0, (64, 64, 2, 4, 2)),
})
# DoRA configs beyond the tables, where _DORA_FAILED left none (smaller tiles for the second accumulator)
_DORA_EXTRA = {
    ("dense", "dora_drop_fwd", 16, 32): [(128, 64, 32, 2, 8, 3), (64, 64, 32, 2, 4, 3)],
    ("dense", "dora_drop_fwd", 16, 64): [(128, 64, 32, 2, 8, 3), (64, 64, 32, 2, 4, 3)],
    ("dense", "dora_drop_fwd", 32, 16): [(16, 32, 32, 2, 4, 2), (32, 32, 16, 1, 4, 2)],
    ("dense", "dora_drop_bwd", 32, 32): [(32, 32, 16, 1, 4, 1), (16, 32, 32, 1, 4, 1)],
    ("dense", "dora_drop_bwd", 32, 64): [(16, 32, 32, 1, 4, 2)],
}
# The segmented kernels with DoRA slots (HAS_MAGNITUDE; kinds mixed_dora_fwd / mixed_dora_bwd, mixed_dora_drop_*
# with dropout's second accumulator) use the segmented kernels' configs above, except the (weight, kind, width,
# R_PAD, config) entries of _MIXED_DORA_FAILED, which spill on sm_80 or sm_90 (or, sm_90 16-bit, run without wgmma),
# plus _MIXED_DORA_EXTRA where that left none (both found by the compile checks, 2026-12-01).
_MIXED_DORA_FAILED = frozenset({
    ("dense", "mixed_dora_bwd", 16, 32, (128, 128, 32, 1, 8, 3)),
    ("dense", "mixed_dora_bwd", 32, 32, (16, 32, 32, 1, 4, 2)),
    ("dense", "mixed_dora_drop_bwd", 16, 32, (128, 128, 32, 1, 8, 3)),
    ("dense", "mixed_dora_drop_bwd", 16, 64, (128, 64, 32, 1, 8, 4)),
    ("dense", "mixed_dora_drop_bwd", 32, 16, (16, 64, 32, 1, 4, 2)),
    ("dense", "mixed_dora_drop_fwd", 16, 16, (64, 64, 64, 4, 4, 4)),
    ("dense", "mixed_dora_drop_fwd", 16, 16, (128, 128, 32, 2, 8, 4)),
    ("dense", "mixed_dora_drop_fwd", 16, 16, (128, 128, 64, 1, 8, 3)),
    ("dense", "mixed_dora_drop_fwd", 16, 32, (64, 64, 64, 4, 4, 4)),
    ("dense", "mixed_dora_drop_fwd", 16, 32, (128, 64, 64, 2, 8, 3)),
    ("dense", "mixed_dora_drop_fwd", 16, 32, (128, 128, 32, 2, 8, 4)),
    ("dense", "mixed_dora_drop_fwd", 16, 64, (64, 64, 64, 4, 4, 4)),
    ("dense", "mixed_dora_drop_fwd", 16, 64, (128, 128, 32, 1, 8, 3)),
    ("dense", "mixed_dora_drop_fwd", 32, 16, (32, 64, 32, 1, 4, 2)),
    ("nf4", "mixed_dora_drop_bwd", 16, 16, (64, 64, 64, 1, 4, 2)),
    ("nf4", "mixed_dora_drop_bwd", 16, 16, (128, 128, 32, 1, 8, 2)),
    ("nf4", "mixed_dora_drop_bwd", 16, 32, (64, 64, 64, 1, 4, 2)),
    ("nf4", "mixed_dora_drop_bwd", 16, 32, (128, 128, 32, 1, 8, 2)),
    ("nf4", "mixed_dora_drop_fwd", 16, 16, (64, 128, 32, 1, 4, 2)),
    ("nf4", "mixed_dora_drop_fwd", 16, 32, (64, 128, 32, 1, 4, 2)),
    ("nf4", "mixed_dora_drop_fwd", 16, 32, (128, 128, 32, 1, 8, 2)),
    ("nf4", "mixed_dora_drop_fwd", 16, 64, (128, 128, 32, 1, 8, 2)),
    ("nf4", "mixed_dora_drop_fwd", 32, 16, (16, 32, 16, 1, 4, 2)),
    ("nf4", "mixed_dora_drop_fwd", 32, 16, (16, 32, 32, 1, 4, 1)),
    ("nf4", "mixed_dora_drop_fwd", 32, 64, (16, 32, 16, 1, 4, 2)),
    ("nf4", "mixed_dora_fwd", 16, 16, (64, 128, 32, 1, 4, 2)),
    ("nf4", "mixed_dora_fwd", 16, 16, (128, 64, 32, 1, 8, 2)),
    ("nf4", "mixed_dora_fwd", 16, 32, (64, 128, 32, 1, 4, 2)),
    ("nf4", "mixed_dora_fwd", 16, 32, (128, 128, 32, 1, 8, 2)),
    ("nf4", "mixed_dora_fwd", 16, 64, (128, 128, 32, 1, 8, 2)),
})
_MIXED_DORA_EXTRA = {
    ("dense", "mixed_dora_bwd", 32, 32): [(16, 32, 32, 1, 4, 1), (32, 32, 16, 1, 4, 1)],
    ("dense", "mixed_dora_drop_bwd", 32, 16): [(16, 32, 32, 1, 4, 1), (32, 32, 16, 1, 4, 1)],
    ("dense", "mixed_dora_drop_bwd", 16, 64): [(64, 64, 32, 1, 8, 2), (64, 32, 32, 1, 4, 2)],
    ("dense", "mixed_dora_drop_fwd", 16, 32): [(128, 64, 32, 2, 8, 3), (64, 64, 32, 2, 4, 3)],
    ("dense", "mixed_dora_drop_fwd", 16, 64): [(128, 64, 32, 2, 8, 3), (64, 64, 32, 2, 4, 3)],
    ("nf4", "mixed_dora_drop_fwd", 32, 16): [(16, 32, 16, 1, 4, 1), (16, 16, 32, 1, 4, 1)],
    ("nf4", "mixed_dora_fwd", 16, 16): [(128, 64, 32, 1, 8, 1), (64, 64, 32, 1, 4, 1)],
}
# The decoding kernel (M <= SMALL_M): (BLOCK_N, BLOCK_K, SPLIT_K, warps, stages) per weight format and input
# width, under the same compile checks.
SMALL_M = 16
_CONFIGS_SMALL = {
    ("dense", 16): [(128, 64, 2, 4, 3), (32, 128, 8, 4, 3)],
    ("dense", 32): [(32, 32, 4, 4, 2), (64, 32, 2, 4, 2)],
    ("nf4", 16): [(32, 64, 4, 4, 2), (64, 64, 2, 4, 2), (64, 32, 4, 4, 2)],
    ("nf4", 32): [(32, 32, 4, 4, 2)],
}


def rank_pad(r: int) -> int:
    """r padded to the smallest width tl.dot takes (16) or the next power of two."""
    return max(16, triton.next_power_of_2(r))


def get_autotune_config(kind: str, dtype: torch.dtype, r_pad: int, weight: str = "dense") -> list[triton.Config]:
    """Configs for ``kind`` ("fwd": TILES_N, or "bwd": TILES_K; "mixed_fwd" / "mixed_bwd" the segmented kernels
    of a mixed-adapter batch: the same tables minus _MIXED_FAILED plus _MIXED_EXTRA; "dora_fwd" / "dora_bwd"
    the kernels with DoRA's magnitude, "dora_drop_fwd" / "dora_drop_bwd" with dropout too: the same tables minus
    _DORA_FAILED plus _DORA_EXTRA; "mixed_dora_fwd" / "mixed_dora_bwd" / "mixed_dora_drop_*" the segmented kernels
    with DoRA slots: the mixed configs minus _MIXED_DORA_FAILED plus _MIXED_DORA_EXTRA), input dtype, padded rank
    and weight format."""
    if INTERPRETED:  # one small config: the interpreter is slow, and autotuning it measures nothing
        tiles = "TILES_N" if kind.endswith("fwd") else "TILES_K"
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, tiles: 2, "GROUP_M": 2})]
    return _autotuning(compiled_configs(kind, dtype, r_pad, weight))


AUTOTUNE_ENV = "LORAKERN_AUTOTUNE"


def _autotuning(configs: list) -> list:
    """``configs``, or only the first where $LORAKERN_AUTOTUNE=0 (read when a kernel's autotuner is first built):
    a compiled test run then compiles one config per kernel and times none (an autotuner with several configs
    compiles and times each for every new (M, N, K, R), minutes of a GPU test run); every config is checked on
    CPU under the interpreter (tests/test_kernels_gpu_configs.py). Speed wants autotuning: benchmarks leave it on."""
    value = os.environ.get(AUTOTUNE_ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{AUTOTUNE_ENV}={value!r}: set it to 1 (autotune over every config) or 0 (the first only)")
    return configs[:1] if value == "0" else configs


def compiled_configs(kind: str, dtype: torch.dtype, r_pad: int, weight: str = "dense") -> list[triton.Config]:
    """The configs a GPU autotunes ``kind`` over (get_autotune_config's when compiled), in either mode: the
    interpreted tests run each of them on CPU too (tests/test_kernels_gpu_configs.py)."""
    tiles = "TILES_N" if kind.endswith("fwd") else "TILES_K"
    width = 32 if dtype == torch.float32 else 16
    table = _CONFIGS if weight == "dense" else _CONFIGS_NF4
    family = kind.removeprefix("mixed_").removeprefix("dora_").removeprefix("drop_")
    entries = table.get((family, width, r_pad), [])
    if kind.startswith("dora_"):
        entries = [c for c in entries if (weight, kind, width, r_pad, c) not in _DORA_FAILED]
        entries += _DORA_EXTRA.get((weight, kind, width, r_pad), [])
    if kind.startswith("mixed_"):
        entries = [c for c in entries if (weight, family, width, r_pad, c) not in _MIXED_FAILED]
        entries += _MIXED_EXTRA.get((weight, family, width, r_pad), [])
    if kind.startswith("mixed_dora_"):
        entries = [c for c in entries if (weight, kind, width, r_pad, c) not in _MIXED_DORA_FAILED]
        entries += _MIXED_DORA_EXTRA.get((weight, kind, width, r_pad), [])
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, tiles: t, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, t, w, s in entries
    ]


def _autotuned(kernel, kind: str, dtype: torch.dtype, r_pad: int, weight: str):
    """(kernel to launch, meta-parameters to pass): an autotuner per (kind, dtype, R_PAD, weight) when compiled."""
    if INTERPRETED:
        return kernel, get_autotune_config(kind, dtype, r_pad, weight)[0].kwargs
    key = (kind, dtype, r_pad, weight)
    if key not in _AUTOTUNED:
        configs = get_autotune_config(kind, dtype, r_pad, weight)
        if not configs:
            raise ValueError(f"no {kind} config of the {weight} kernels has passed the compile checks for {dtype} at "
                             f"R_PAD={r_pad}; set LORAKERN_BACKEND=torch")
        reset = ["da_ptr", "db_ptr", "dbias_ptr", "dc_ptr"] if kind.endswith("bwd") else None
        _AUTOTUNED[key] = triton.autotune(configs, key=["M", "N", "K", "R"], reset_to_zero=reset)(kernel)
    return _AUTOTUNED[key], {}


_AUTOTUNED: dict = {}


def _small_m_configs(dtype: torch.dtype, weight: str = "dense", kind: str = "small") -> list[triton.Config]:
    """The decoding kernel's configs; ``kind`` "dora_small" / "dora_drop_small" drops the _DORA_FAILED entries."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": SMALL_M, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2})]
    return _autotuning(compiled_small_m_configs(dtype, weight, kind))


def compiled_small_m_configs(dtype: torch.dtype, weight: str = "dense", kind: str = "small") -> list[triton.Config]:
    """The decoding kernel's configs a GPU autotunes over, in either mode (as compiled_configs)."""
    width = 32 if dtype == torch.float32 else 16
    return [triton.Config({"BLOCK_M": SMALL_M, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w, num_stages=s)
            for bn, bk, sk, w, s in _CONFIGS_SMALL[(weight, width)]
            if kind == "small" or (weight, kind, width, 0, (bn, bk, sk, w, s)) not in _DORA_FAILED]


def _meta(dtype: torch.dtype, r: int) -> dict:
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not INTERPRETED
    return {
        "R_PAD": rank_pad(r),
        "DOT_PRECISION": "tf32" if tf32 else "ieee",
        "UPCAST": INTERPRETED and dtype == torch.bfloat16,
        "ACC_DTYPE": tl.float64 if dtype == torch.float64 else tl.float32,
    }
