"""The backward kernel: dx, dA, dB and dbias of the fused LoRA linear in one launch.

The gradients it computes, with g = dL/dy (M, N) and m the dropout mask / (1 - p):
    dx = g W + s ((g B) A) * m,   dA = s (g B)^T x~,   dB = s g^T u,   db = sum over rows of g
(the derivation is in lora_linear_triton's docstring, ops.py). Its epilogue finishes dx and dA for one
(BLOCK_M, BLOCK_K) tile. With HAS_MAGNITUDE (DoRA, derivation in dora_ops.py) it is the same backward run
on gc = g diag(c), each g tile scaled by c where it is loaded, plus dc = sum_rows(g z) (dm = dc / n).
Launched by lora_backward and dora_backward (launchers.py) with the configs in configs.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

from lorakern.kernels.dora_tiles import _load_scale, _scaled
from lorakern.kernels.loops import _bwd_n_loop, _bwd_n_loop_gb, _da_part, _dx_with_lora
from lorakern.kernels.tiles import (_atomic_add, _dot, _dropout_keep, _keep_scale, _load, _program_tiles,
                                    _store)


@triton.jit
def _bwd_epilogue(acc, acc_xl, gb_scaled, a_ptr, x_ptr, dx_ptr, da_ptr, offs_m, offs_k, offs_r, M, K, R,
                  stride_ar, stride_ak, stride_xm, stride_xk, stride_dxm, stride_dxk,
                  dropout_p, seed, keep_scale,
                  HAS_DROPOUT: tl.constexpr, HAS_XL: tl.constexpr, NEED_DX: tl.constexpr, NEED_DA: tl.constexpr,
                  ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    keep = None
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, offs_m, offs_k, K, dropout_p)
    if NEED_DX:
        # dx = g W + ((s gB) A) * keep / (1 - p)
        a_tile = _load(a_ptr, offs_r, offs_k, stride_ar, stride_ak, R, K)
        acc = _dx_with_lora(acc, acc_xl, gb_scaled, a_tile, keep, keep_scale, HAS_DROPOUT, HAS_XL, ACC_DTYPE,
                            DOT_PRECISION, UPCAST)
        _store(dx_ptr, acc, offs_m, offs_k, stride_dxm, stride_dxk, M, K)
    if NEED_DA:
        # dA += (s gB)^T x~
        part = _da_part(gb_scaled, _load(x_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K), keep, keep_scale,
                        HAS_DROPOUT, ACC_DTYPE, DOT_PRECISION, UPCAST)
        _atomic_add(da_ptr, part, offs_r, offs_k, R, K)


@triton.jit
def _lora_bwd_kernel(
    # pointers (w_ptr: dense W, or NF4 packed bytes with the wq_* statistics)
    # (DoRA: c_ptr the (N,) scale m / n, z_ptr the contiguous (M, N) z, dc_ptr the (N,) fp32 accumulator)
    g_ptr, w_ptr, a_ptr, b_ptr, x_ptr, u_ptr, dx_ptr, da_ptr, db_ptr, dbias_ptr, c_ptr, z_ptr, dc_ptr,
    wq_absmax_ptr, wq_map_ptr, wq_nested_absmax_ptr, wq_nested_map_ptr,
    # sizes
    M, N, K, R,
    # strides (dA, dB and dbias are contiguous accumulators)
    stride_gm, stride_gn, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_xm, stride_xk, stride_um, stride_ur, stride_dxm, stride_dxk,
    # scalars
    scaling, dropout_p, seed, wq_offset, wq_blocksize,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, NEED_DX: tl.constexpr, NEED_DA: tl.constexpr, NEED_DB: tl.constexpr,
    NEED_DBIAS: tl.constexpr, W_NF4: tl.constexpr, W_NESTED: tl.constexpr, HAS_MAGNITUDE: tl.constexpr,
    NEED_DC: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILES_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """For BLOCK_M rows and TILES_K tiles of BLOCK_K columns of x:

        gB  = g B                     (BLOCK_M, R_PAD), in the first tile's N loop, from the g tiles
                                      that loop already loads for g W; never written to memory
        dx  = g W + ((s gB) A) * keep / (1 - p)
        dA += (s gB)^T x~             atomically
    and, in the programs of the first column group, a second pass over the same g rows:
        dB += s g^T u,  dbias += sum_rows g      atomically
    DoRA (HAS_MAGNITUDE): g is replaced by gc = g diag(c) everywhere above except dbias, and the second
    pass adds dc += sum_rows(g z). With dropout dx = g W + ((gc - g) W + (s gcB) A) * keep / (1 - p): the
    N loops accumulate (gc - g) W beside g W (a second dot per tile).
    """
    w = (w_ptr, wq_absmax_ptr, wq_map_ptr, wq_nested_absmax_ptr, wq_nested_map_ptr, wq_offset, wq_blocksize, stride_wn,
         stride_wk)  # the W operand of tiles._load_weight
    pid_m, pid_g, num_tiles_k = _program_tiles(M, K, 0, BLOCK_M, BLOCK_K, TILES_K, GROUP_M)
    keep_scale = _keep_scale(dropout_p)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)

    # First K tile: g W and gB = g B in one N loop.
    offs_k = pid_g * TILES_K * BLOCK_K + tl.arange(0, BLOCK_K)
    acc, acc_xl, gb = _bwd_n_loop_gb(g_ptr, offs_m, None, M, stride_gm, stride_gn, w, offs_k, K, b_ptr, offs_r, R,
                                     stride_bn, stride_br, c_ptr, N, NEED_DX, HAS_DROPOUT, HAS_MAGNITUDE, W_NF4,
                                     W_NESTED, BLOCK_N, ACC_DTYPE, DOT_PRECISION, UPCAST)
    gb_scaled = (gb * scaling).to(g_ptr.dtype.element_ty)
    _bwd_epilogue(acc, acc_xl, gb_scaled, a_ptr, x_ptr, dx_ptr, da_ptr, offs_m, offs_k, offs_r, M, K, R,
                  stride_ar, stride_ak, stride_xm, stride_xk, stride_dxm, stride_dxk, dropout_p, seed, keep_scale,
                  HAS_DROPOUT, HAS_MAGNITUDE, NEED_DX, NEED_DA, ACC_DTYPE, DOT_PRECISION, UPCAST)

    if NEED_DB or NEED_DBIAS or NEED_DC:
        if pid_g == 0:
            u_tile = _load(u_ptr, offs_m, offs_r, stride_um, stride_ur, M, R)
            for n0 in range(0, N, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                g_tile = _load(g_ptr, offs_m, offs_n, stride_gm, stride_gn, M, N)
                if NEED_DBIAS:
                    # dbias += sum_rows g
                    tl.atomic_add(dbias_ptr + offs_n, tl.sum(g_tile.to(ACC_DTYPE), axis=0), mask=offs_n < N)
                if NEED_DC:
                    # dc += sum_rows(g z)
                    z_tile = _load(z_ptr, offs_m, offs_n, N, 1, M, N).to(ACC_DTYPE)
                    tl.atomic_add(dc_ptr + offs_n, tl.sum(g_tile.to(ACC_DTYPE) * z_tile, axis=0), mask=offs_n < N)
                if NEED_DB:
                    if HAS_MAGNITUDE:
                        g_tile = _scaled(g_tile, _load_scale(c_ptr, offs_n, N, ACC_DTYPE), ACC_DTYPE)
                    # dB += s g^T u (gc for DoRA)
                    part = _dot(tl.trans(g_tile), u_tile, tl.zeros((BLOCK_N, R_PAD), dtype=ACC_DTYPE),
                                DOT_PRECISION, UPCAST)
                    _atomic_add(db_ptr, part * scaling, offs_n, offs_r, N, R)

    # The program's other K tiles: g W alone, then the same epilogue.
    if NEED_DX or NEED_DA:
        for t in tl.static_range(1, TILES_K):
            tile_k = pid_g * TILES_K + t
            if tile_k < num_tiles_k:
                offs_k = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
                acc, acc_xl = _bwd_n_loop(g_ptr, offs_m, None, M, stride_gm, stride_gn, w, offs_k, K, c_ptr, N, NEED_DX,
                                          HAS_DROPOUT, HAS_MAGNITUDE, W_NF4, W_NESTED, BLOCK_N, ACC_DTYPE,
                                          DOT_PRECISION, UPCAST)
                _bwd_epilogue(acc, acc_xl, gb_scaled, a_ptr, x_ptr, dx_ptr, da_ptr, offs_m, offs_k, offs_r, M, K, R,
                              stride_ar, stride_ak, stride_xm, stride_xk, stride_dxm, stride_dxk, dropout_p, seed,
                              keep_scale, HAS_DROPOUT, HAS_MAGNITUDE, NEED_DX, NEED_DA, ACC_DTYPE, DOT_PRECISION,
                              UPCAST)
