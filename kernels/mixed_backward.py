"""The segmented backward kernel: dx, every adapter's dA and dB, and dbias of a mixed-adapter batch, one launch.

With g = dL/dy (M, N), row i in slot a, m_i its dropout mask / (1 - p_a):
    dx_i = g_i W + s_a ((g_i B_a) A_a) * m_i      (g_i W alone for base-only rows and absent adapters)
    dA_a = s_a sum over a's rows of (g_i B_a)^T x~_i,   dB_a = s_a sum over a's rows of g_i^T u_i
    db   = sum over all rows of g
(the derivation is in mixed_lora_triton's docstring, mixed_ops.py). The tiles are the forward's: one
adapter per tile (mixed_forward._segment_tile), so the segmented reduction is each tile's partial dA_a
and dB_a added atomically into slice a of the (n_slots, R, K) and (n_slots, N, R) fp32 accumulators.
Launched by mixed_backward (mixed_launchers.py).

With HAS_MAGNITUDE (DoRA slots; derivation in mixed_dora_ops.py) a tile's g is replaced by gc = g diag(c_a)
everywhere but dbias (c = 1 off DoRA tiles, where that is g exactly), with dropout the N loops accumulate
(gc - g) W beside g W, and a DoRA slot's tiles add dc_a = sum_rows(g z) into row a of an (n_slots, N) buffer.
"""
from __future__ import annotations

import triton
import triton.language as tl

from lorakern.kernels.dora_tiles import _load_scale, _scaled
from lorakern.kernels.loops import _bwd_n_loop, _bwd_n_loop_gb, _da_part, _dx_with_lora
from lorakern.kernels.mixed_dora_tiles import _mixed_dc_tile
from lorakern.kernels.mixed_forward import _segment_tile, _slot_constants, _tile_rows
from lorakern.kernels.tiles import _dot, _dropout_keep, _load, _load_rows, _store_rows, _tile_ids


@triton.jit
def _atomic_add_slice(ptr, value, rows, cols, n_rows, n_cols, stride_rows):
    """ptr[rows, cols] += value inside one adapter's slice of a contiguous accumulator, masked to (n_rows, n_cols)."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.atomic_add(ptr + rows[:, None] * stride_rows + cols[None, :], value, mask=mask)


@triton.jit
def _mixed_bwd_epilogue(acc, acc_xl, gb_scaled, a_tile_ptr, x_ptr, dx_ptr, da_tile_ptr, rows, row_ok, offs_k, offs_r,
                        K, rank, stride_ar, stride_ak, stride_xm, stride_xk, stride_dxm, stride_dxk,
                        dropout_p, seed, keep_scale, use_lora,
                        HAS_DROPOUT: tl.constexpr, HAS_XL: tl.constexpr, NEED_DX: tl.constexpr,
                        NEED_DA: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        UPCAST: tl.constexpr):
    if use_lora:
        keep = None
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rows, offs_k, K, dropout_p)
        if NEED_DX:
            # dx = g W + ((s_a gB) A_a) * keep / (1 - p_a)
            a_tile = _load(a_tile_ptr, offs_r, offs_k, stride_ar, stride_ak, rank, K)
            acc = _dx_with_lora(acc, acc_xl, gb_scaled, a_tile, keep, keep_scale, HAS_DROPOUT, HAS_XL, ACC_DTYPE,
                                DOT_PRECISION, UPCAST)
        if NEED_DA:
            # dA_a += (s_a gB)^T x~
            part = _da_part(gb_scaled, _load_rows(x_ptr, rows, row_ok, offs_k, stride_xm, stride_xk, K), keep,
                            keep_scale, HAS_DROPOUT, ACC_DTYPE, DOT_PRECISION, UPCAST)
            _atomic_add_slice(da_tile_ptr, part, offs_r, offs_k, rank, K, K)
    if NEED_DX:
        _store_rows(dx_ptr, acc, rows, row_ok, offs_k, stride_dxm, stride_dxk, K)


@triton.jit
def _mixed_bwd_kernel(
    # pointers (a_ptr, b_ptr: the stacked adapters; da_ptr (n_slots, R, K), db_ptr (n_slots, N, R), dbias_ptr (N,):
    # contiguous fp32 accumulators; w_ptr dense W, or NF4 packed bytes with the wq_* statistics)
    # (DoRA, HAS_MAGNITUDE: c_ptr, dora_ptr as in the forward; z_ptr its contiguous (M, N) z; dc_ptr the
    # (n_slots, N) fp32 accumulator of sum_rows(g z) per slot, written with NEED_DC)
    g_ptr, w_ptr, a_ptr, b_ptr, x_ptr, u_ptr, dx_ptr, da_ptr, db_ptr, dbias_ptr, c_ptr, dora_ptr, z_ptr, dc_ptr,
    order_ptr, offsets_ptr, ranks_ptr, scaling_ptr, dropout_ptr,
    wq_absmax_ptr, wq_map_ptr, wq_nested_absmax_ptr, wq_nested_map_ptr,
    # sizes
    M, N, K, R, n_slots,
    # strides
    stride_gm, stride_gn, stride_wn, stride_wk, stride_aa, stride_ar, stride_ak, stride_ba, stride_bn, stride_br,
    stride_xm, stride_xk, stride_um, stride_ur, stride_dxm, stride_dxk,
    # scalars
    seed, wq_offset, wq_blocksize,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, NEED_DX: tl.constexpr, NEED_DA: tl.constexpr, NEED_DB: tl.constexpr,
    NEED_DBIAS: tl.constexpr, W_NF4: tl.constexpr, W_NESTED: tl.constexpr, HAS_MAGNITUDE: tl.constexpr,
    NEED_DC: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILES_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """For one adapter's tile of up to BLOCK_M rows (gathered through order) and TILES_K tiles of BLOCK_K columns of x:

        gB    = g B_a                   (BLOCK_M, R_PAD), in the first tile's N loop, from the g tiles that
                                        loop already loads for g W; never written to memory
        dx    = g W + ((s_a gB) A_a) * keep / (1 - p_a)
        dA_a += (s_a gB)^T x~           atomically, into slot a's slice
    and, in the programs of the first column group, a second pass over the same g rows:
        dB_a += s_a g^T u,  dbias += sum_rows g      atomically
    Base-only rows and absent adapters (rank 0) get dx = g W and add to dbias only.
    HAS_MAGNITUDE: g is gc = g diag(c_seg) above except in dbias (c = 1 off DoRA tiles); with dropout
    dx = g W + ((gc - g) W + (s_a gcB) A_a) * keep / (1 - p_a); NEED_DC: a DoRA tile's second pass adds
    dc_a += sum_rows(g z).
    """
    w = (w_ptr, wq_absmax_ptr, wq_map_ptr, wq_nested_absmax_ptr, wq_nested_map_ptr, wq_offset, wq_blocksize, stride_wn,
         stride_wk)  # the W operand of tiles._load_weight
    pid = tl.program_id(0)
    num_tiles_k = tl.cdiv(K, BLOCK_K)
    pid_m, pid_g = _tile_ids(pid, tl.cdiv(M, BLOCK_M) + n_slots, tl.cdiv(num_tiles_k, TILES_K), GROUP_M)
    seg, start, end, rank = _segment_tile(offsets_ptr, ranks_ptr, n_slots, M, pid_m, BLOCK_M)
    if seg < 0:
        return
    use_lora = rank > 0
    slot, scaling, dropout_p, keep_scale = _slot_constants(seg, use_lora, n_slots, scaling_ptr, dropout_ptr)
    a_tile_ptr = a_ptr + slot.to(tl.int64) * stride_aa
    b_tile_ptr = b_ptr + slot.to(tl.int64) * stride_ba
    da_tile_ptr = da_ptr + slot.to(tl.int64) * R * K
    db_tile_ptr = db_ptr + slot.to(tl.int64) * N * R
    rows, row_ok = _tile_rows(order_ptr, start, end, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    c_tile_ptr = c_ptr + seg.to(tl.int64) * N  # HAS_MAGNITUDE: this segment's row of scales (ones unless DoRA)
    dc_tile_ptr = dc_ptr + slot.to(tl.int64) * N
    is_dora = False
    if HAS_MAGNITUDE:
        is_dora = tl.load(dora_ptr + slot, mask=use_lora, other=0) != 0

    # First K tile: g W and gB = g B_a in one N loop.
    offs_k = pid_g * TILES_K * BLOCK_K + tl.arange(0, BLOCK_K)
    acc, acc_xl, gb = _bwd_n_loop_gb(g_ptr, rows, row_ok, M, stride_gm, stride_gn, w, offs_k, K, b_tile_ptr, offs_r,
                                     rank, stride_bn, stride_br, c_tile_ptr, N, NEED_DX, HAS_DROPOUT, HAS_MAGNITUDE,
                                     W_NF4, W_NESTED, BLOCK_N, ACC_DTYPE, DOT_PRECISION, UPCAST)
    gb_scaled = (gb * scaling).to(g_ptr.dtype.element_ty)
    _mixed_bwd_epilogue(acc, acc_xl, gb_scaled, a_tile_ptr, x_ptr, dx_ptr, da_tile_ptr, rows, row_ok, offs_k, offs_r, K,
                        rank, stride_ar, stride_ak, stride_xm, stride_xk, stride_dxm, stride_dxk, dropout_p, seed,
                        keep_scale, use_lora, HAS_DROPOUT, HAS_MAGNITUDE, NEED_DX, NEED_DA, ACC_DTYPE, DOT_PRECISION,
                        UPCAST)

    if NEED_DB or NEED_DBIAS or NEED_DC:
        if pid_g == 0:
            u_tile = _load_rows(u_ptr, rows, row_ok, offs_r, stride_um, stride_ur, rank)
            for n0 in range(0, N, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                g_tile = _load_rows(g_ptr, rows, row_ok, offs_n, stride_gm, stride_gn, N)
                if NEED_DB:
                    if use_lora:
                        gc_tile = g_tile
                        if HAS_MAGNITUDE:
                            gc_tile = _scaled(g_tile, _load_scale(c_tile_ptr, offs_n, N, ACC_DTYPE), ACC_DTYPE)
                        # dB_a += s_a g^T u (gc for DoRA)
                        part = _dot(tl.trans(gc_tile), u_tile, tl.zeros((BLOCK_N, R_PAD), dtype=ACC_DTYPE),
                                    DOT_PRECISION, UPCAST)
                        _atomic_add_slice(db_tile_ptr, part * scaling, offs_n, offs_r, N, rank, R)
                if NEED_DBIAS:
                    # dbias += sum_rows g
                    tl.atomic_add(dbias_ptr + offs_n, tl.sum(g_tile.to(ACC_DTYPE), axis=0), mask=offs_n < N)
                if NEED_DC:
                    # dc_a += sum_rows(g z), DoRA tiles only
                    _mixed_dc_tile(dc_tile_ptr, z_ptr, g_tile, rows, row_ok, offs_n, N, is_dora, ACC_DTYPE)

    # The program's other K tiles: g W alone, then the same epilogue.
    if NEED_DX or NEED_DA:
        for t in tl.static_range(1, TILES_K):
            tile_k = pid_g * TILES_K + t
            if tile_k < num_tiles_k:
                offs_k = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
                acc, acc_xl = _bwd_n_loop(g_ptr, rows, row_ok, M, stride_gm, stride_gn, w, offs_k, K, c_tile_ptr, N,
                                          NEED_DX, HAS_DROPOUT, HAS_MAGNITUDE, W_NF4, W_NESTED, BLOCK_N, ACC_DTYPE,
                                          DOT_PRECISION, UPCAST)
                _mixed_bwd_epilogue(acc, acc_xl, gb_scaled, a_tile_ptr, x_ptr, dx_ptr, da_tile_ptr, rows, row_ok,
                                    offs_k, offs_r, K, rank, stride_ar, stride_ak, stride_xm, stride_xk, stride_dxm,
                                    stride_dxk, dropout_p, seed, keep_scale, use_lora, HAS_DROPOUT, HAS_MAGNITUDE,
                                    NEED_DX, NEED_DA, ACC_DTYPE, DOT_PRECISION, UPCAST)
