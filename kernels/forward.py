"""The forward kernel: y = x W^T + b + s (x~ A^T) B^T and u = x~ A^T in one launch (M > SMALL_M).

Its epilogue adds the LoRA term and the bias to one (BLOCK_M, BLOCK_N) tile of the base GEMM and stores
it; with HAS_MAGNITUDE (DoRA) it scales the tile by c = m / n first (dora_tiles.py). Launched by
lora_forward and dora_forward (launchers.py) with the configs in configs.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

from lorakern.kernels.dora_tiles import _dora_fwd_epilogue
from lorakern.kernels.tiles import _dot, _dropout_keep, _keep_scale, _load, _load_weight, _store, _tile_ids


@triton.jit
def _fwd_epilogue(acc, u_scaled, b_ptr, bias_ptr, y_ptr, offs_m, offs_n, offs_r, M, N, R,
                  stride_bn, stride_br, stride_ym, stride_yn,
                  HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  UPCAST: tl.constexpr):
    # y = acc + (s u) B^T + b, with the B^T tile (R_PAD, BLOCK_N)
    acc = _dot(u_scaled, _load(b_ptr, offs_r, offs_n, stride_br, stride_bn, R, N), acc, DOT_PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(ACC_DTYPE)[None, :]
    _store(y_ptr, acc, offs_m, offs_n, stride_ym, stride_yn, M, N)


@triton.jit
def _lora_fwd_kernel(
    # pointers (w_ptr: dense W, or NF4 packed bytes with the wq_* statistics)
    # (DoRA: c_ptr the (N,) scale c = m / n, z_ptr the contiguous (M, N) z written with STORE_Z)
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, u_ptr, c_ptr, z_ptr,
    wq_absmax_ptr, wq_map_ptr, wq_nested_absmax_ptr, wq_nested_map_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ym, stride_yn, stride_um, stride_ur,
    # scalars
    scaling, dropout_p, seed, wq_offset, wq_blocksize,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, W_NF4: tl.constexpr, W_NESTED: tl.constexpr,
    HAS_MAGNITUDE: tl.constexpr, STORE_Z: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILES_N: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """y = x W^T + b + s u B^T and u = x~ A^T, for BLOCK_M rows and TILES_N tiles of BLOCK_N columns.

    u is accumulated in the K loop of the program's first N tile, from the x tiles that loop already
    loads for the base GEMM, then reused for the program's other N tiles; the programs of the first
    column group write it out for the backward. DoRA with dropout accumulates x~ W^T beside x W^T in the
    same K loops (a second dot per tile; the mask is redrawn for the other N tiles).
    """
    w = (w_ptr, wq_absmax_ptr, wq_map_ptr, wq_nested_absmax_ptr, wq_nested_map_ptr, wq_offset, wq_blocksize, stride_wn,
         stride_wk)  # the W operand of tiles._load_weight
    pid = tl.program_id(0)
    num_tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_g = _tile_ids(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(num_tiles_n, TILES_N), GROUP_M)
    keep_scale = _keep_scale(dropout_p)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)

    # First N tile: the base GEMM and u in one K loop.
    offs_n = pid_g * TILES_N * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc_xl = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)  # x~ W^T: DoRA with dropout only (else dead)
    u = tl.zeros((BLOCK_M, R_PAD), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_tile = _load(x_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K)
        # acc += x W^T, with the W^T tile (BLOCK_K, BLOCK_N)
        w_tile = _load_weight(w, offs_n, offs_k, N, K, True, W_NF4, W_NESTED, y_ptr.dtype.element_ty)
        acc = _dot(x_tile, w_tile, acc, DOT_PRECISION, UPCAST)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, offs_m, offs_k, K, dropout_p)
            x_tile = tl.where(keep, x_tile.to(ACC_DTYPE) * keep_scale, 0.0).to(x_tile.dtype)
            if HAS_MAGNITUDE:
                # acc_xl += x~ W^T
                acc_xl = _dot(x_tile, w_tile, acc_xl, DOT_PRECISION, UPCAST)
        # u += x~ A^T, with the A^T tile (BLOCK_K, R_PAD)
        u = _dot(x_tile, _load(a_ptr, offs_k, offs_r, stride_ak, stride_ar, K, R), u, DOT_PRECISION, UPCAST)
    if pid_g == 0:
        _store(u_ptr, u, offs_m, offs_r, stride_um, stride_ur, M, R)
    u_scaled = (u * scaling).to(y_ptr.dtype.element_ty)
    if HAS_MAGNITUDE:
        _dora_fwd_epilogue(acc, acc_xl, u_scaled, b_ptr, bias_ptr, c_ptr, y_ptr, z_ptr, offs_m, offs_n, offs_r, M, N,
                           R, stride_bn, stride_br, stride_ym, stride_yn, HAS_BIAS, HAS_DROPOUT, STORE_Z, ACC_DTYPE,
                           DOT_PRECISION, UPCAST)
    else:
        _fwd_epilogue(acc, u_scaled, b_ptr, bias_ptr, y_ptr, offs_m, offs_n, offs_r, M, N, R,
                      stride_bn, stride_br, stride_ym, stride_yn, HAS_BIAS, ACC_DTYPE, DOT_PRECISION, UPCAST)

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
                x_tile = _load(x_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K)
                acc = _dot(x_tile, w_tile, acc, DOT_PRECISION, UPCAST)
                if HAS_MAGNITUDE:
                    if HAS_DROPOUT:
                        # acc_xl += x~ W^T, the mask redrawn from the seed
                        keep = _dropout_keep(seed, offs_m, offs_k, K, dropout_p)
                        x_tile = tl.where(keep, x_tile.to(ACC_DTYPE) * keep_scale, 0.0).to(x_tile.dtype)
                        acc_xl = _dot(x_tile, w_tile, acc_xl, DOT_PRECISION, UPCAST)
            if HAS_MAGNITUDE:
                _dora_fwd_epilogue(acc, acc_xl, u_scaled, b_ptr, bias_ptr, c_ptr, y_ptr, z_ptr, offs_m, offs_n, offs_r,
                                   M, N, R, stride_bn, stride_br, stride_ym, stride_yn, HAS_BIAS, HAS_DROPOUT, STORE_Z,
                                   ACC_DTYPE, DOT_PRECISION, UPCAST)
            else:
                _fwd_epilogue(acc, u_scaled, b_ptr, bias_ptr, y_ptr, offs_m, offs_n, offs_r, M, N, R,
                              stride_bn, stride_br, stride_ym, stride_yn, HAS_BIAS, ACC_DTYPE, DOT_PRECISION, UPCAST)
