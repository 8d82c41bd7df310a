"""The segmented forward kernel: a mixed-adapter batch, y = x W^T + b + s_a (x~ A_a^T) B_a^T per row, one launch.

Rows are grouped by adapter: ``order`` lists the row indices sorted by slot (base-only rows last) and
``offsets`` (n_slots + 1) where each slot's rows start, so slot a's rows are order[offsets[a]:offsets[a+1]]
and the base-only rows order[offsets[n_slots]:M]. The M tiles are laid over each segment separately
(segment s has cdiv(count_s, BLOCK_M) tiles, its last one partial), so no tile mixes adapters: a program
loads one adapter's A and B, and its K loop and epilogue are those of the single-adapter kernel
(forward.py) with the rows gathered through ``order`` and the results scattered back to them. Also the
per-tile helpers the backward (mixed_backward.py) shares. Launched by mixed_forward (mixed_launchers.py).

With HAS_MAGNITUDE (a batch with DoRA slots) a DoRA slot's tiles take DoRA's epilogue (mixed_dora_tiles.py):
c_a = m_a / n_a from row a of a stacked (n_slots + 1, N) scale, and with dropout x~ W^T accumulated beside
x W^T in the same K loops; plain slots and base-only rows keep the plain epilogue's numbers.
"""
from __future__ import annotations

import triton
import triton.language as tl

from lorakern.kernels.mixed_dora_tiles import _mixed_dora_fwd_epilogue
from lorakern.kernels.tiles import (_dot, _dropout_keep, _keep_scale, _load, _load_rows, _load_weight, _store_rows,
                                    _tile_ids)


@triton.jit
def _segment_tile(offsets_ptr, ranks_ptr, n_slots, M, pid_m, BLOCK_M: tl.constexpr):
    """(segment, first sorted position, end of the segment, adapter rank) of M tile ``pid_m``.

    Segments 0..n_slots-1 are the slots, segment n_slots the base-only rows (rank 0, as is a slot whose
    adapter is absent); segment -1 when pid_m is past the last tile (the grid is the bound
    cdiv(M, BLOCK_M) + n_slots, since the counts live on the device).
    """
    seg = -1
    start = 0
    end = 0
    first_tile = 0
    for s in range(0, n_slots + 1):
        s_start = tl.load(offsets_ptr + s).to(tl.int32)
        s_end = tl.load(offsets_ptr + s + 1, mask=s < n_slots, other=M).to(tl.int32)
        n_tiles = tl.cdiv(s_end - s_start, BLOCK_M)
        hit = (pid_m >= first_tile) & (pid_m < first_tile + n_tiles)
        seg = tl.where(hit, s, seg)
        start = tl.where(hit, s_start + (pid_m - first_tile) * BLOCK_M, start)
        end = tl.where(hit, s_end, end)
        first_tile += n_tiles
    rank = tl.load(ranks_ptr + seg, mask=(seg >= 0) & (seg < n_slots), other=0)
    return seg, start, end, rank


@triton.jit
def _slot_constants(seg, use_lora, n_slots, scaling_ptr, dropout_ptr):
    """(slot, s, dropout p, 1 / (1 - p)) of a tile's segment; slot is clamped to a valid index for the
    per-slot pointers (base-only tiles, use_lora False, read nothing through it)."""
    slot = tl.minimum(seg, tl.maximum(n_slots - 1, 0))
    scaling = tl.load(scaling_ptr + slot, mask=use_lora, other=0.0)
    dropout_p = tl.load(dropout_ptr + slot, mask=use_lora, other=0.0)
    return slot, scaling, dropout_p, _keep_scale(dropout_p)


@triton.jit
def _tile_rows(order_ptr, start, end, BLOCK_M: tl.constexpr):
    """(row indices, in-segment flags) of the tile at sorted positions start .. start + BLOCK_M.

    The indices are narrowed to int32 (M * max(K, N) < 2**31 is a launch condition, as for the
    single-adapter kernels): int64 row offsets cost the registers that made 22 configs spill."""
    pos = start + tl.arange(0, BLOCK_M)
    row_ok = pos < end
    rows = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int32)
    return rows, row_ok


@triton.jit
def _mixed_fwd_epilogue(acc, u_scaled, b_tile_ptr, bias_ptr, y_ptr, rows, row_ok, offs_n, offs_r, N, rank,
                        stride_bn, stride_br, stride_ym, stride_yn, use_lora,
                        HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        UPCAST: tl.constexpr):
    if use_lora:
        # y = acc + (s_a u) B_a^T, with the B_a^T tile (R_PAD, BLOCK_N)
        acc = _dot(u_scaled, _load(b_tile_ptr, offs_r, offs_n, stride_br, stride_bn, rank, N), acc,
                   DOT_PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(ACC_DTYPE)[None, :]
    _store_rows(y_ptr, acc, rows, row_ok, offs_n, stride_ym, stride_yn, N)


@triton.jit
def _mixed_fwd_kernel(
    # pointers: operands (a_ptr (n_slots, R, K) and b_ptr (n_slots, N, R) the stacked, zero-padded adapters;
    # w_ptr dense W or NF4 packed bytes with the wq_* statistics), the row grouping, per-slot scalars
    # (DoRA, HAS_MAGNITUDE: c_ptr the (n_slots + 1, N) fp32 scales, row n_slots and plain slots' rows ones;
    # dora_ptr (n_slots,) int32, 1 for a DoRA slot; z_ptr the contiguous (M, N) z, DoRA rows written with STORE_Z)
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, u_ptr, c_ptr, dora_ptr, z_ptr,
    order_ptr, offsets_ptr, ranks_ptr, scaling_ptr, dropout_ptr,
    wq_absmax_ptr, wq_map_ptr, wq_nested_absmax_ptr, wq_nested_map_ptr,
    # sizes
    M, N, K, R, n_slots,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_aa, stride_ar, stride_ak, stride_ba, stride_bn, stride_br,
    stride_ym, stride_yn, stride_um, stride_ur,
    # scalars
    seed, wq_offset, wq_blocksize,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, W_NF4: tl.constexpr, W_NESTED: tl.constexpr,
    HAS_MAGNITUDE: tl.constexpr, STORE_Z: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILES_N: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """For one adapter's tile of up to BLOCK_M rows (gathered through order) and TILES_N tiles of BLOCK_N columns:

        y[rows] = x[rows] W^T + b + s_a u B_a^T,   u[rows] = x~[rows] A_a^T   (a: the tile's slot)

    u is accumulated in the K loop of the first N tile from the x tiles the base GEMM loads, reused for
    the other N tiles, and written out by the first column group. Base-only rows and slots without an
    adapter (rank 0) get x W^T + b alone: their programs skip the rank-r products.
    HAS_MAGNITUDE: a DoRA slot's rows get y = c_a z + b (with dropout x W^T - x~ W^T + c_a z~ + b, x~ W^T a
    second accumulator in the K loops, the mask redrawn for the other N tiles), z stored with STORE_Z.
    """
    w = (w_ptr, wq_absmax_ptr, wq_map_ptr, wq_nested_absmax_ptr, wq_nested_map_ptr, wq_offset, wq_blocksize, stride_wn,
         stride_wk)  # the W operand of tiles._load_weight
    pid = tl.program_id(0)
    num_tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_g = _tile_ids(pid, tl.cdiv(M, BLOCK_M) + n_slots, tl.cdiv(num_tiles_n, TILES_N), GROUP_M)
    seg, start, end, rank = _segment_tile(offsets_ptr, ranks_ptr, n_slots, M, pid_m, BLOCK_M)
    if seg < 0:
        return
    use_lora = rank > 0
    slot, scaling, dropout_p, keep_scale = _slot_constants(seg, use_lora, n_slots, scaling_ptr, dropout_ptr)
    a_tile_ptr = a_ptr + slot.to(tl.int64) * stride_aa
    b_tile_ptr = b_ptr + slot.to(tl.int64) * stride_ba
    rows, row_ok = _tile_rows(order_ptr, start, end, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    c_tile_ptr = c_ptr + seg.to(tl.int64) * N  # HAS_MAGNITUDE: this segment's row of scales (ones unless DoRA)
    is_dora = False
    if HAS_MAGNITUDE:
        is_dora = tl.load(dora_ptr + slot, mask=use_lora, other=0) != 0

    # First N tile: the base GEMM and u in one K loop.
    offs_n = pid_g * TILES_N * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc_xl = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)  # x~ W^T: DoRA with dropout only (else dead)
    u = tl.zeros((BLOCK_M, R_PAD), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_tile = _load_rows(x_ptr, rows, row_ok, offs_k, stride_xm, stride_xk, K)
        # acc += x W^T, with the W^T tile (BLOCK_K, BLOCK_N)
        w_tile = _load_weight(w, offs_n, offs_k, N, K, True, W_NF4, W_NESTED, y_ptr.dtype.element_ty)
        acc = _dot(x_tile, w_tile, acc, DOT_PRECISION, UPCAST)
        if HAS_DROPOUT:
            # the mask of the row's own index, as the single-adapter kernels draw it with this slot's p
            keep = _dropout_keep(seed, rows, offs_k, K, dropout_p)
            x_tile = tl.where(keep, x_tile.to(ACC_DTYPE) * keep_scale, 0.0).to(x_tile.dtype)
            if HAS_MAGNITUDE:
                # acc_xl += x~ W^T (no branch on is_dora, as on use_lora below; plain tiles never read it)
                acc_xl = _dot(x_tile, w_tile, acc_xl, DOT_PRECISION, UPCAST)
        # u += x~ A_a^T, with the A_a^T tile (BLOCK_K, R_PAD). No branch on use_lora in the K loop (it kept
        # the A loads out of the software pipeline): without an adapter the tile is masked to rank 0, reads
        # nothing, and u is never used.
        u = _dot(x_tile, _load(a_tile_ptr, offs_k, offs_r, stride_ak, stride_ar, K, rank), u, DOT_PRECISION, UPCAST)
    if use_lora:
        if pid_g == 0:
            _store_rows(u_ptr, u, rows, row_ok, offs_r, stride_um, stride_ur, rank)
    u_scaled = (u * scaling).to(y_ptr.dtype.element_ty)
    if HAS_MAGNITUDE:
        _mixed_dora_fwd_epilogue(acc, acc_xl, u_scaled, b_tile_ptr, bias_ptr, c_tile_ptr, y_ptr, z_ptr, rows, row_ok,
                                 offs_n, offs_r, N, rank, stride_bn, stride_br, stride_ym, stride_yn, use_lora, is_dora,
                                 HAS_BIAS, HAS_DROPOUT, STORE_Z, ACC_DTYPE, DOT_PRECISION, UPCAST)
    else:
        _mixed_fwd_epilogue(acc, u_scaled, b_tile_ptr, bias_ptr, y_ptr, rows, row_ok, offs_n, offs_r, N, rank,
                            stride_bn, stride_br, stride_ym, stride_yn, use_lora, HAS_BIAS, ACC_DTYPE, DOT_PRECISION,
                            UPCAST)

    # The program's other N tiles: the base GEMM alone, then the same epilogue.
    for t in tl.static_range(1, TILES_N):
        tile_n = pid_g * TILES_N + t
        if tile_n < num_tiles_n:
            offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
            acc_xl = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                w_tile = _load_weight(w, offs_n, offs_k, N, K, True, W_NF4, W_NESTED, y_ptr.dtype.element_ty)
                x_tile = _load_rows(x_ptr, rows, row_ok, offs_k, stride_xm, stride_xk, K)
                acc = _dot(x_tile, w_tile, acc, DOT_PRECISION, UPCAST)
                if HAS_MAGNITUDE:
                    if HAS_DROPOUT:
                        # acc_xl += x~ W^T, the mask redrawn from the seed
                        keep = _dropout_keep(seed, rows, offs_k, K, dropout_p)
                        x_tile = tl.where(keep, x_tile.to(ACC_DTYPE) * keep_scale, 0.0).to(x_tile.dtype)
                        acc_xl = _dot(x_tile, w_tile, acc_xl, DOT_PRECISION, UPCAST)
            if HAS_MAGNITUDE:
                _mixed_dora_fwd_epilogue(acc, acc_xl, u_scaled, b_tile_ptr, bias_ptr, c_tile_ptr, y_ptr, z_ptr, rows,
                                         row_ok, offs_n, offs_r, N, rank, stride_bn, stride_br, stride_ym, stride_yn,
                                         use_lora, is_dora, HAS_BIAS, HAS_DROPOUT, STORE_Z, ACC_DTYPE, DOT_PRECISION,
                                         UPCAST)
            else:
                _mixed_fwd_epilogue(acc, u_scaled, b_tile_ptr, bias_ptr, y_ptr, rows, row_ok, offs_n, offs_r, N, rank,
                                    stride_bn, stride_br, stride_ym, stride_yn, use_lora, HAS_BIAS, ACC_DTYPE,
                                    DOT_PRECISION, UPCAST)
