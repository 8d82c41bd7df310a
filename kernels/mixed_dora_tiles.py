"""The @triton.jit helpers DoRA slots add to the segmented kernels (mixed_forward.py, mixed_backward.py).

A mixed batch with DoRA slots launches the segmented kernels with HAS_MAGNITUDE. Each M tile lies in one
segment (mixed_forward._segment_tile), so a tile reads one row of the stacked (n_slots + 1, N) scale: c_a =
m_a / n_a for a DoRA slot a, ones for a plain slot, an absent adapter and the base-only rows (row n_slots);
``is_dora`` (from the per-slot flags) picks DoRA's epilogue. Per row i of DoRA slot a (dora_tiles.py):
    y_i = c_a z_i + b,                  z_i = x_i W^T + s_a u_i B_a^T,  u_i = x_i A_a^T       without dropout
    y_i = x_i W^T - x~_i W^T + c_a z~_i + b,   z~_i = x~_i W^T + s_a u_i B_a^T,  u_i = x~_i A_a^T   with it
Plain tiles in such a launch take the plain epilogue's exact numbers (y = x W^T + s_a u B_a^T + b); their
backward runs with c = 1, where g diag(c) = g and (gc - g) W = 0 exactly.
"""
from __future__ import annotations

import triton
import triton.language as tl

from lorakern.kernels.dora_tiles import _load_scale
from lorakern.kernels.tiles import _dot, _load, _load_rows, _store_rows


@triton.jit
def _mixed_dora_fwd_epilogue(acc, acc_xl, u_scaled, b_tile_ptr, bias_ptr, c_tile_ptr, y_ptr, z_ptr, rows, row_ok,
                             offs_n, offs_r, N, rank, stride_bn, stride_br, stride_ym, stride_yn, use_lora, is_dora,
                             HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_Z: tl.constexpr,
                             ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One tile of a HAS_MAGNITUDE launch from acc = x W^T and, with dropout, acc_xl = x~ W^T: DoRA's y (and z,
    with STORE_Z) on a DoRA slot's tile, the plain epilogue's y on any other."""
    z = acc
    if HAS_DROPOUT:
        z = tl.where(is_dora, acc_xl, acc)  # z~ starts from x~ W^T on DoRA tiles
    if use_lora:
        # z = (x W^T or x~ W^T) + (s_a u) B_a^T, with the B_a^T tile (R_PAD, BLOCK_N)
        z = _dot(u_scaled, _load(b_tile_ptr, offs_r, offs_n, stride_br, stride_bn, rank, N), z, DOT_PRECISION, UPCAST)
    c = _load_scale(c_tile_ptr, offs_n, N, ACC_DTYPE)[None, :]
    if HAS_DROPOUT:
        # y - b = x W^T - x~ W^T + c z~ (DoRA), z (plain)
        out = tl.where(is_dora, acc - acc_xl + c * z, z)
    else:
        # y - b = c z (c = 1 exactly off DoRA tiles)
        out = c * z
    if STORE_Z:
        if is_dora:
            _store_rows(z_ptr, z, rows, row_ok, offs_n, N, 1, N)  # z: a contiguous (M, N) buffer
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(ACC_DTYPE)[None, :]
    _store_rows(y_ptr, out, rows, row_ok, offs_n, stride_ym, stride_yn, N)


@triton.jit
def _mixed_dc_tile(dc_tile_ptr, z_ptr, g_tile, rows, row_ok, offs_n, N, is_dora, ACC_DTYPE: tl.constexpr):
    """dc_a += sum_rows(g z) over this tile's rows of DoRA slot a (dm_a = dc_a / n_a), atomically."""
    if is_dora:
        z_tile = _load_rows(z_ptr, rows, row_ok, offs_n, N, 1, N).to(ACC_DTYPE)
        tl.atomic_add(dc_tile_ptr + offs_n, tl.sum(g_tile.to(ACC_DTYPE) * z_tile, axis=0), mask=offs_n < N)
