"""Fused LoRA linear: one forward launch, one backward launch, dropout drawn inside the kernels.

    y = x W^T + b + s (x~ A^T) B^T,    x~ = x * keep / (1 - p),   keep = Philox(seed, element) >= p

Shapes: x (M, K) (any leading shape is flattened by lora_linear_triton), W (N, K), b (N,), A (r, K),
B (N, r), y (M, N), u = x~ A^T (M, r). r is padded to R_PAD = max(16, next power of two) inside the
kernels, the smallest width tl.dot takes; the padding is masked, never read from memory.

Order of this file: the @triton.jit kernels, the launchers (check -> allocate -> launch), the
custom ops (torch.library) with their fake implementations and autograd, and the registration with
lorakern's backend switch.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from lorakern.functional import Backend, register_backend

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# triton's own jit library functions (tl.cdiv, tl.rand) follow TRITON_INTERPRET as it was when triton
# was first imported; kernels interpreted now cannot call library functions compiled then.
_MIXED_MODE = INTERPRETED and type(tl.cdiv).__name__ != "InterpretedFunction"
MAX_RANK = 64
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in acc's dtype (fp32; fp64 for fp64 inputs).

    UPCAST: the interpreter computes bf16 dots wrongly, so it gets fp32 tiles there.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _load(ptr, rows, cols, stride_rows, stride_cols, n_rows, n_cols):
    """The (len(rows), len(cols)) tile at ptr[rows, cols], zero outside (n_rows, n_cols)."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * stride_rows + cols[None, :] * stride_cols, mask=mask, other=0.0)


@triton.jit
def _store(ptr, value, rows, cols, stride_rows, stride_cols, n_rows, n_cols):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + rows[:, None] * stride_rows + cols[None, :] * stride_cols, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _atomic_add(ptr, value, rows, cols, n_rows, n_cols):
    """ptr[rows, cols] += value for a contiguous (n_rows, n_cols) accumulator."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.atomic_add(ptr + rows[:, None] * n_cols + cols[None, :], value, mask=mask)


@triton.jit
def _load_weight(w_ptr, absmax_ptr, map_ptr, nested_absmax_ptr, nested_map_ptr, offset, blocksize,
                 offs_n, offs_k, stride_wn, stride_wk, N, K,
                 TRANSPOSED: tl.constexpr, W_NF4: tl.constexpr, W_NESTED: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """The W tile (len(offs_n), len(offs_k)), or W^T's (len(offs_k), len(offs_n)) when TRANSPOSED; zero
    outside (N, K). With W_NF4 the tile is decoded from bitsandbytes' layout where it is loaded: element
    f = n K + k sits in byte f // 2 (high nibble first), its absmax is block f // blocksize's (decoded from
    the 8-bit double quantization with W_NESTED), and w = NF4[code] * absmax in fp32, rounded once."""
    if TRANSPOSED:
        n = offs_n[None, :]
        k = offs_k[:, None]
    else:
        n = offs_n[:, None]
        k = offs_k[None, :]
    mask = (n < N) & (k < K)
    if W_NF4:
        f = n.to(tl.int64) * K + k
        byte = tl.load(w_ptr + f // 2, mask=mask, other=0).to(tl.int32)
        code = (byte >> (((f + 1) % 2) * 4).to(tl.int32)) & 15
        block = f // blocksize
        if W_NESTED:
            q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            absmax = (tl.load(nested_map_ptr + q) * tl.load(nested_absmax_ptr + block // 256, mask=mask, other=0.0)
                      + offset)
        else:
            absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        tile = tl.where(mask, tl.load(map_ptr + code) * absmax, 0.0).to(OUT_DTYPE)
    else:
        tile = tl.load(w_ptr + n * stride_wn + k * stride_wk, mask=mask, other=0.0)
    return tile


@triton.jit
def _dropout_keep(seed, rows, cols, K, dropout_p):
    """keep[i, j] for x's logical element (rows[i], cols[j]) of an (M, K) input: the same bits in every kernel."""
    offsets = rows[:, None].to(tl.int64) * K + cols[None, :]
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _keep_scale(dropout_p):
    """1 / (1 - p), rounded to fp32 once: the factor on every kept element, in every kernel."""
    one = tl.full((), 1.0, tl.float32)
    return one / (one - dropout_p)


@triton.jit
def _tile_ids(pid, num_pid_m, num_pid_inner, GROUP_M: tl.constexpr):
    """Program id -> (m tile, inner group), in groups of GROUP_M m tiles so neighbours share W in L2."""
    num_pid_in_group = GROUP_M * num_pid_inner
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_inner = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_inner


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
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, u_ptr,
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
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILES_N: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """y = x W^T + b + s u B^T and u = x~ A^T, for BLOCK_M rows and TILES_N tiles of BLOCK_N columns.

    u is accumulated in the K loop of the program's first N tile, from the x tiles that loop already
    loads for the base GEMM, then reused for the program's other N tiles; the programs of the first
    column group write it out for the backward.
    """
    pid = tl.program_id(0)
    num_tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_g = _tile_ids(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(num_tiles_n, TILES_N), GROUP_M)
    keep_scale = _keep_scale(dropout_p)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)

    # First N tile: the base GEMM and u in one K loop.
    offs_n = pid_g * TILES_N * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    u = tl.zeros((BLOCK_M, R_PAD), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_tile = _load(x_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K)
        # acc += x W^T, with the W^T tile (BLOCK_K, BLOCK_N)
        w_tile = _load_weight(w_ptr, wq_absmax_ptr, wq_map_ptr, wq_nested_absmax_ptr, wq_nested_map_ptr, wq_offset,
                              wq_blocksize, offs_n, offs_k, stride_wn, stride_wk, N, K, True, W_NF4, W_NESTED,
                              y_ptr.dtype.element_ty)
        acc = _dot(x_tile, w_tile, acc, DOT_PRECISION, UPCAST)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, offs_m, offs_k, K, dropout_p)
            x_tile = tl.where(keep, x_tile.to(ACC_DTYPE) * keep_scale, 0.0).to(x_tile.dtype)
        # u += x~ A^T, with the A^T tile (BLOCK_K, R_PAD)
        u = _dot(x_tile, _load(a_ptr, offs_k, offs_r, stride_ak, stride_ar, K, R), u, DOT_PRECISION, UPCAST)
    if pid_g == 0:
        _store(u_ptr, u, offs_m, offs_r, stride_um, stride_ur, M, R)
    u_scaled = (u * scaling).to(y_ptr.dtype.element_ty)
    _fwd_epilogue(acc, u_scaled, b_ptr, bias_ptr, y_ptr, offs_m, offs_n, offs_r, M, N, R,
                  stride_bn, stride_br, stride_ym, stride_yn, HAS_BIAS, ACC_DTYPE, DOT_PRECISION, UPCAST)

    # The program's other N tiles: the base GEMM alone, then the same epilogue.
    for t in tl.static_range(1, TILES_N):
        tile_n = pid_g * TILES_N + t
        if tile_n < num_tiles_n:
            offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                w_tile = _load_weight(w_ptr, wq_absmax_ptr, wq_map_ptr, wq_nested_absmax_ptr, wq_nested_map_ptr,
                                      wq_offset, wq_blocksize, offs_n, offs_k, stride_wn, stride_wk, N, K, True,
                                      W_NF4, W_NESTED, y_ptr.dtype.element_ty)
                acc = _dot(_load(x_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K), w_tile, acc, DOT_PRECISION, UPCAST)
            _fwd_epilogue(acc, u_scaled, b_ptr, bias_ptr, y_ptr, offs_m, offs_n, offs_r, M, N, R,
                          stride_bn, stride_br, stride_ym, stride_yn, HAS_BIAS, ACC_DTYPE, DOT_PRECISION, UPCAST)


@triton.jit
def _bwd_epilogue(acc, gb_scaled, a_ptr, x_ptr, dx_ptr, da_ptr, offs_m, offs_k, offs_r, M, K, R,
                  stride_ar, stride_ak, stride_xm, stride_xk, stride_dxm, stride_dxk,
                  dropout_p, seed, keep_scale,
                  HAS_DROPOUT: tl.constexpr, NEED_DX: tl.constexpr, NEED_DA: tl.constexpr,
                  ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, offs_m, offs_k, K, dropout_p)
    if NEED_DX:
        # dx = g W + ((s gB) A) * keep / (1 - p), with the A tile (R_PAD, BLOCK_K)
        a_tile = _load(a_ptr, offs_r, offs_k, stride_ar, stride_ak, R, K)
        if HAS_DROPOUT:
            lora = _dot(gb_scaled, a_tile, tl.zeros(acc.shape, dtype=ACC_DTYPE), DOT_PRECISION, UPCAST)
            acc += tl.where(keep, lora * keep_scale, 0.0)
        else:
            acc = _dot(gb_scaled, a_tile, acc, DOT_PRECISION, UPCAST)
        _store(dx_ptr, acc, offs_m, offs_k, stride_dxm, stride_dxk, M, K)
    if NEED_DA:
        x_tile = _load(x_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K)
        if HAS_DROPOUT:
            x_tile = tl.where(keep, x_tile.to(ACC_DTYPE) * keep_scale, 0.0).to(x_tile.dtype)
        # dA += (s gB)^T x~
        part = _dot(tl.trans(gb_scaled), x_tile, tl.zeros((gb_scaled.shape[1], x_tile.shape[1]), dtype=ACC_DTYPE),
                    DOT_PRECISION, UPCAST)
        _atomic_add(da_ptr, part, offs_r, offs_k, R, K)


@triton.jit
def _lora_bwd_kernel(
    # pointers (w_ptr: dense W, or NF4 packed bytes with the wq_* statistics)
    g_ptr, w_ptr, a_ptr, b_ptr, x_ptr, u_ptr, dx_ptr, da_ptr, db_ptr, dbias_ptr,
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
    NEED_DBIAS: tl.constexpr, W_NF4: tl.constexpr, W_NESTED: tl.constexpr, R_PAD: tl.constexpr,
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
    """
    pid = tl.program_id(0)
    num_tiles_k = tl.cdiv(K, BLOCK_K)
    pid_m, pid_g = _tile_ids(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(num_tiles_k, TILES_K), GROUP_M)
    keep_scale = _keep_scale(dropout_p)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)

    # First K tile: g W and gB = g B in one N loop.
    offs_k = pid_g * TILES_K * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE)
    gb = tl.zeros((BLOCK_M, R_PAD), dtype=ACC_DTYPE)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        g_tile = _load(g_ptr, offs_m, offs_n, stride_gm, stride_gn, M, N)
        if NEED_DX:
            # acc += g W, with the W tile (BLOCK_N, BLOCK_K)
            w_tile = _load_weight(w_ptr, wq_absmax_ptr, wq_map_ptr, wq_nested_absmax_ptr, wq_nested_map_ptr, wq_offset,
                                  wq_blocksize, offs_n, offs_k, stride_wn, stride_wk, N, K, False, W_NF4, W_NESTED,
                                  g_ptr.dtype.element_ty)
            acc = _dot(g_tile, w_tile, acc, DOT_PRECISION, UPCAST)
        # gB += g B, with the B tile (BLOCK_N, R_PAD)
        gb = _dot(g_tile, _load(b_ptr, offs_n, offs_r, stride_bn, stride_br, N, R), gb, DOT_PRECISION, UPCAST)
    gb_scaled = (gb * scaling).to(g_ptr.dtype.element_ty)
    _bwd_epilogue(acc, gb_scaled, a_ptr, x_ptr, dx_ptr, da_ptr, offs_m, offs_k, offs_r, M, K, R,
                  stride_ar, stride_ak, stride_xm, stride_xk, stride_dxm, stride_dxk, dropout_p, seed, keep_scale,
                  HAS_DROPOUT, NEED_DX, NEED_DA, ACC_DTYPE, DOT_PRECISION, UPCAST)

    if NEED_DB or NEED_DBIAS:
        if pid_g == 0:
            u_tile = _load(u_ptr, offs_m, offs_r, stride_um, stride_ur, M, R)
            for n0 in range(0, N, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                g_tile = _load(g_ptr, offs_m, offs_n, stride_gm, stride_gn, M, N)
                if NEED_DB:
                    # dB += s g^T u
                    part = _dot(tl.trans(g_tile), u_tile, tl.zeros((BLOCK_N, R_PAD), dtype=ACC_DTYPE),
                                DOT_PRECISION, UPCAST)
                    _atomic_add(db_ptr, part * scaling, offs_n, offs_r, N, R)
                if NEED_DBIAS:
                    # dbias += sum_rows g
                    tl.atomic_add(dbias_ptr + offs_n, tl.sum(g_tile.to(ACC_DTYPE), axis=0), mask=offs_n < N)

    # The program's other K tiles: g W alone, then the same epilogue.
    if NEED_DX or NEED_DA:
        for t in tl.static_range(1, TILES_K):
            tile_k = pid_g * TILES_K + t
            if tile_k < num_tiles_k:
                offs_k = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
                acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE)
                if NEED_DX:
                    for n0 in range(0, N, BLOCK_N):
                        offs_n = n0 + tl.arange(0, BLOCK_N)
                        w_tile = _load_weight(w_ptr, wq_absmax_ptr, wq_map_ptr, wq_nested_absmax_ptr, wq_nested_map_ptr,
                                              wq_offset, wq_blocksize, offs_n, offs_k, stride_wn, stride_wk, N, K,
                                              False, W_NF4, W_NESTED, g_ptr.dtype.element_ty)
                        acc = _dot(_load(g_ptr, offs_m, offs_n, stride_gm, stride_gn, M, N), w_tile, acc,
                                   DOT_PRECISION, UPCAST)
                _bwd_epilogue(acc, gb_scaled, a_ptr, x_ptr, dx_ptr, da_ptr, offs_m, offs_k, offs_r, M, K, R,
                              stride_ar, stride_ak, stride_xm, stride_xk, stride_dxm, stride_dxk, dropout_p, seed,
                              keep_scale, HAS_DROPOUT, NEED_DX, NEED_DA, ACC_DTYPE, DOT_PRECISION, UPCAST)


@triton.jit
def _lora_small_m_kernel(
    # pointers (y_ptr and u_ptr: zeroed fp32 accumulators)
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, u_ptr,
    wq_absmax_ptr, wq_map_ptr, wq_nested_absmax_ptr, wq_nested_map_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    # scalars
    scaling, dropout_p, seed, wq_offset, wq_blocksize,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, W_NF4: tl.constexpr, W_NESTED: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Decoding (M <= BLOCK_M = 16): split-K, so a few rows still keep every SM busy.

    Program (n tile, k split) reads its slice of W exactly once (the whole weight is streamed once) and
    adds, atomically in fp32, its share of y = x W^T + s (x~ A^T) B^T: the LoRA term is linear in the
    K-partial u_k = x~[:, k] A^T[k], so each split adds s u_k B^T for its own k. The splits of the first
    n tile also add u_k to u; the first split adds the bias.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    keep_scale = _keep_scale(dropout_p)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    u = tl.zeros((BLOCK_M, R_PAD), dtype=ACC_DTYPE)
    for k0 in range(k_start, min(K, k_start + k_per_split), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_tile = _load(x_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K)
        w_tile = _load_weight(w_ptr, wq_absmax_ptr, wq_map_ptr, wq_nested_absmax_ptr, wq_nested_map_ptr, wq_offset,
                              wq_blocksize, offs_n, offs_k, stride_wn, stride_wk, N, K, True, W_NF4, W_NESTED,
                              x_ptr.dtype.element_ty)
        # acc += x W^T
        acc = _dot(x_tile, w_tile, acc, DOT_PRECISION, UPCAST)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, offs_m, offs_k, K, dropout_p)
            x_tile = tl.where(keep, x_tile.to(ACC_DTYPE) * keep_scale, 0.0).to(x_tile.dtype)
        # u_k += x~ A^T
        u = _dot(x_tile, _load(a_ptr, offs_k, offs_r, stride_ak, stride_ar, K, R), u, DOT_PRECISION, UPCAST)
    # acc += (s u_k) B^T
    acc = _dot((u * scaling).to(x_ptr.dtype.element_ty), _load(b_ptr, offs_r, offs_n, stride_br, stride_bn, R, N), acc,
               DOT_PRECISION, UPCAST)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(ACC_DTYPE)[None, :]
    _atomic_add(y_ptr, acc, offs_m, offs_n, M, N)
    if pid_n == 0:
        _atomic_add(u_ptr, u, offs_m, offs_r, M, R)


@triton.jit
def _dropout_mask_kernel(out_ptr, M, K, dropout_p, seed, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (M, K) fp32 = keep / (1 - p): the mask the fused kernels draw for ``seed``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _dropout_keep(seed, offs_m, offs_k, K, dropout_p)
    _store(out_ptr, tl.where(keep, _keep_scale(dropout_p), 0.0), offs_m, offs_k, K, 1, M, K)


# --------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------
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
    """Configs for ``kind`` ("fwd": TILES_N, or "bwd": TILES_K), input dtype, padded rank and weight format."""
    tiles = "TILES_N" if kind == "fwd" else "TILES_K"
    if INTERPRETED:  # one small config: the interpreter is slow, and autotuning it measures nothing
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, tiles: 2, "GROUP_M": 2})]
    width = 32 if dtype == torch.float32 else 16
    table = _CONFIGS if weight == "dense" else _CONFIGS_NF4
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, tiles: t, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, t, w, s in table.get((kind, width, r_pad), [])
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
        reset = ["da_ptr", "db_ptr", "dbias_ptr"] if kind == "bwd" else None
        _AUTOTUNED[key] = triton.autotune(configs, key=["M", "N", "K", "R"], reset_to_zero=reset)(kernel)
    return _AUTOTUNED[key], {}


_AUTOTUNED: dict = {}


def _small_m_configs(dtype: torch.dtype, weight: str = "dense") -> list[triton.Config]:
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": SMALL_M, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2})]
    return [triton.Config({"BLOCK_M": SMALL_M, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w, num_stages=s)
            for bn, bk, sk, w, s in _CONFIGS_SMALL[(weight, 32 if dtype == torch.float32 else 16)]]


def _meta(dtype: torch.dtype, r: int) -> dict:
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not INTERPRETED
    return {
        "R_PAD": rank_pad(r),
        "DOT_PRECISION": "tf32" if tf32 else "ieee",
        "UPCAST": INTERPRETED and dtype == torch.bfloat16,
        "ACC_DTYPE": tl.float64 if dtype == torch.float64 else tl.float32,
    }


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
def unsupported(x: torch.Tensor, weight, lora_A: torch.Tensor) -> Optional[str]:
    """None when these kernels can run on the operands, else the reason."""
    if _MIXED_MODE:
        return ("triton was imported before TRITON_INTERPRET=1 was set (by another package), so its library "
                "functions are compiled while these kernels are interpreted; set TRITON_INTERPRET=1 before the "
                "first import of triton")
    dtypes = (torch.float16, torch.bfloat16, torch.float32) + ((torch.float64,) if INTERPRETED else ())
    if x.dtype not in dtypes:
        return f"dtype {x.dtype} (the kernels take {', '.join(str(d) for d in dtypes)})"
    if lora_A.shape[0] > MAX_RANK:
        return f"r={lora_A.shape[0]} (the kernels take r <= {MAX_RANK})"
    rows = x.numel() // max(x.shape[-1], 1)
    if rows * max(x.shape[-1], weight.shape[0]) >= 2**31:
        return f"{rows} rows of width {max(x.shape[-1], weight.shape[0])} (the kernels index with 32-bit offsets)"
    if INTERPRETED and x.device.type != "cpu":
        return f"TRITON_INTERPRET=1 runs the kernels on CPU tensors, got a {x.device.type} tensor"
    if not INTERPRETED and x.device.type != "cuda":
        return f"tensors on {x.device.type}; compiled kernels need CUDA tensors (TRITON_INTERPRET=1 runs them on CPU)"
    if not get_autotune_config("fwd", x.dtype, rank_pad(lora_A.shape[0]), "nf4" if _is_nf4(weight) else "dense"):
        return (f"{'an NF4' if _is_nf4(weight) else 'a dense'} base in {x.dtype} at r={lora_A.shape[0]} (no kernel "
                f"config for it has passed the sm_80/sm_90 compile checks yet)")
    return None


def _is_nf4(weight) -> bool:
    """An NF4 base weight (lorakern.quant.NF4Storage) rather than a dense tensor."""
    return hasattr(weight, "packed") and hasattr(weight, "quant_map")


def _weight_args(weight, dummy: torch.Tensor) -> tuple[list, list, dict]:
    """(pointers, [stride_wn, stride_wk], scalars and constexprs) for a dense or NF4 weight."""
    if not _is_nf4(weight):
        return ([weight, dummy, dummy, dummy, dummy], [weight.stride(0), weight.stride(1)],
                {"wq_offset": 0.0, "wq_blocksize": 1, "W_NF4": False, "W_NESTED": False})
    nested = weight.double_quant
    pointers = [weight.packed, weight.absmax, weight.quant_map, weight.nested_absmax if nested else dummy,
                weight.nested_map if nested else dummy]
    return (pointers, [0, 0], {"wq_offset": float(weight.offset) if nested else 0.0,
                               "wq_blocksize": weight.blocksize, "W_NF4": True, "W_NESTED": nested})


def _check(x2: torch.Tensor, weight, bias, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    if x2.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K) here, got shape {tuple(x2.shape)}; the Function flattens it")
    N, K = weight.shape
    r = lora_A.shape[0]
    if x2.shape[1] != K or lora_A.shape != (r, K) or lora_B.shape != (N, r) or (bias is not None and bias.shape != (N,)):
        raise ValueError(
            f"shapes do not fit: x {tuple(x2.shape)}, W {tuple(weight.shape)}, A {tuple(lora_A.shape)}, "
            f"B {tuple(lora_B.shape)}, bias {None if bias is None else tuple(bias.shape)}; expected x (M, {K}), "
            f"A ({r}, {K}), B ({N}, {r}), bias ({N},)"
        )
    tensors = [t for t in (x2, None if _is_nf4(weight) else weight, bias, lora_A, lora_B) if t is not None]
    if len({t.dtype for t in tensors}) != 1:
        raise ValueError(f"x, W, bias, A and B must share one dtype, got {[str(t.dtype) for t in tensors]}; "
                         f"cast them (lorakern.lora_linear does this for you)")
    reason = unsupported(x2, weight, lora_A)
    if reason is not None:
        raise ValueError(f"the triton kernels cannot take {reason}")


def lora_forward(x2, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0, seed: int = 0):
    """(y, u): y = x W^T + b + s (x~ A^T) B^T and u = x~ A^T, for x2 of shape (M, K), any strides."""
    _check(x2, weight, bias, lora_A, lora_B)
    M, K = x2.shape
    N, r = lora_B.shape
    y = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    u = torch.empty((M, r), device=x2.device, dtype=x2.dtype)
    if M == 0:
        return y, u
    if M <= SMALL_M:
        return _forward_small_m(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    kernel, fixed = _autotuned(_lora_fwd_kernel, "fwd", x2.dtype, rank_pad(r), "nf4" if _is_nf4(weight) else "dense")

    def grid(meta):
        groups = triton.cdiv(triton.cdiv(N, meta["BLOCK_N"]), meta["TILES_N"])
        return (triton.cdiv(M, meta["BLOCK_M"]) * groups,)

    (w, *wq), w_strides, wq_scalars = _weight_args(weight, y)
    kernel[grid](
        x2, w, bias if bias is not None else y, lora_A, lora_B, y, u, *wq,
        M, N, K, r,
        x2.stride(0), x2.stride(1), *w_strides, lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1), u.stride(0), u.stride(1),
        float(scaling), float(dropout_p), int(seed), wq_scalars.pop("wq_offset"), wq_scalars.pop("wq_blocksize"),
        HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0, **wq_scalars, **_meta(x2.dtype, r), **fixed,
    )
    return y, u


def _forward_small_m(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """lora_forward for M <= SMALL_M: the split-K decoding kernel, accumulating in fp32."""
    M, K = x2.shape
    N, r = lora_B.shape
    acc_dtype = torch.float64 if x2.dtype == torch.float64 else torch.float32
    y = torch.zeros((M, N), device=x2.device, dtype=acc_dtype)
    u = torch.zeros((M, r), device=x2.device, dtype=acc_dtype)
    if INTERPRETED:
        kernel, fixed = _lora_small_m_kernel, _small_m_configs(x2.dtype)[0].kwargs
    else:
        key = ("small", x2.dtype, rank_pad(r), "nf4" if _is_nf4(weight) else "dense")
        if key not in _AUTOTUNED:
            _AUTOTUNED[key] = triton.autotune(_small_m_configs(x2.dtype, key[3]), key=["N", "K", "R"],
                                              reset_to_zero=["y_ptr", "u_ptr"])(_lora_small_m_kernel)
        kernel, fixed = _AUTOTUNED[key], {}

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    (w, *wq), w_strides, wq_scalars = _weight_args(weight, y)
    kernel[grid](
        x2, w, bias if bias is not None else y, lora_A, lora_B, y, u, *wq,
        M, N, K, r,
        x2.stride(0), x2.stride(1), *w_strides, lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        float(scaling), float(dropout_p), int(seed), wq_scalars.pop("wq_offset"), wq_scalars.pop("wq_blocksize"),
        HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0, **wq_scalars, **_meta(x2.dtype, r), **fixed,
    )
    return y.to(x2.dtype), u.to(x2.dtype)


def lora_backward(g, x2, u, weight, lora_A, lora_B, scaling: float, dropout_p: float, seed: int,
                  need_dx: bool = True, need_dA: bool = True, need_dB: bool = True, need_dbias: bool = False):
    """(dx, dA, dB, dbias) for g = dL/dy (M, N); entries not asked for are None.

    dA, dB and dbias accumulate atomically in fp32 and come back in the parameters' dtype.
    """
    M, N = g.shape
    K = x2.shape[1]
    r = lora_A.shape[0]
    if g.dtype != x2.dtype:
        g = g.to(x2.dtype)
    dx = torch.empty((M, K), device=g.device, dtype=g.dtype) if need_dx else None
    acc_dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    dA = torch.zeros((r, K), device=g.device, dtype=acc_dtype) if need_dA else None
    dB = torch.zeros((N, r), device=g.device, dtype=acc_dtype) if need_dB else None
    dbias = torch.zeros((N,), device=g.device, dtype=acc_dtype) if need_dbias else None
    if M > 0 and (need_dx or need_dA or need_dB or need_dbias):
        kernel, fixed = _autotuned(_lora_bwd_kernel, "bwd", g.dtype, rank_pad(r), "nf4" if _is_nf4(weight) else "dense")
        dummy = g

        def grid(meta):
            groups = triton.cdiv(triton.cdiv(K, meta["BLOCK_K"]), meta["TILES_K"])
            return (triton.cdiv(M, meta["BLOCK_M"]) * groups,)

        (w, *wq), w_strides, wq_scalars = _weight_args(weight, dummy)
        kernel[grid](
            g, w, lora_A, lora_B, x2, u,
            dx if dx is not None else dummy, dA if dA is not None else dummy,
            dB if dB is not None else dummy, dbias if dbias is not None else dummy, *wq,
            M, N, K, r,
            g.stride(0), g.stride(1), *w_strides, lora_A.stride(0), lora_A.stride(1),
            lora_B.stride(0), lora_B.stride(1), x2.stride(0), x2.stride(1), u.stride(0), u.stride(1),
            dx.stride(0) if dx is not None else 0, dx.stride(1) if dx is not None else 0,
            float(scaling), float(dropout_p), int(seed), wq_scalars.pop("wq_offset"), wq_scalars.pop("wq_blocksize"),
            HAS_DROPOUT=dropout_p > 0, NEED_DX=need_dx, NEED_DA=need_dA, NEED_DB=need_dB, NEED_DBIAS=need_dbias,
            **wq_scalars, **_meta(g.dtype, r), **fixed,
        )
    elif need_dx:
        dx.zero_()
    return (dx,
            None if dA is None else dA.to(lora_A.dtype),
            None if dB is None else dB.to(lora_B.dtype),
            None if dbias is None else dbias.to(g.dtype))


def dropout_mask(seed: int, shape, p: float, device) -> torch.Tensor:
    """The fp32 mask (keep / (1 - p), else 0) that the fused kernels draw for ``seed``, shaped like x."""
    shape = tuple(shape)
    K = shape[-1] if shape else 1
    M = 1
    for size in shape[:-1]:
        M *= size
    out = torch.empty((M, K), device=device, dtype=torch.float32)
    if out.numel():
        grid = (triton.cdiv(M, 32), triton.cdiv(K, 32))
        _dropout_mask_kernel[grid](out, M, K, float(p), int(seed), BLOCK_M=32, BLOCK_K=32)
    return out.reshape(shape)


# --------------------------------------------------------------------------------------------------
# Custom ops and autograd
# --------------------------------------------------------------------------------------------------
# The launchers run as two opaque custom ops registered with torch.library, lorakern::lora_linear_fwd
# and lorakern::lora_linear_bwd, each with a fake (meta) implementation, and the forward's gradient is
# registered with register_autograd: torch.compile (dynamo, AOTAutograd) traces around the kernels
# with no graph break and calls them as they are. Not torch.library.triton_op: under the interpreter
# wrap_triton sees no JITFunction and tracing runs the kernel on fake tensors (tried with torch 2.13,
# triton 3.8), and inductor has nothing to gain from looking inside these kernels anyway.
#
# Ops take tensors, ints and floats, not modules: an NF4 base travels as its packed bytes (``weight``),
# its statistics (``nf4_state``) and its blocksize (``nf4_blocksize``, 0 for a dense W), and the
# dropout seed as a 0-d int64 tensor, so a fresh one drawn by torch.randint stays in the graph (a
# Python int would need .item(), a graph break).
class _NF4Weight(NamedTuple):
    """An NF4 base weight rebuilt from an op's arguments: the attributes the launchers read."""

    packed: torch.Tensor
    absmax: torch.Tensor
    quant_map: torch.Tensor
    nested_absmax: Optional[torch.Tensor]
    nested_map: Optional[torch.Tensor]
    offset: Optional[torch.Tensor]
    blocksize: int
    shape: tuple[int, int]
    double_quant: bool


def _weight_parts(weight) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """(weight tensor, NF4 statistics, NF4 blocksize): the dense W as (W, [], 0), an NF4 storage as
    (packed, [absmax, quant_map (, nested_absmax, nested_map, offset)], blocksize)."""
    if not _is_nf4(weight):
        return weight, [], 0
    state = [weight.absmax, weight.quant_map]
    if weight.double_quant:
        state += [weight.nested_absmax, weight.nested_map, weight.offset]
    return weight.packed, state, weight.blocksize


def _weight_from_parts(weight: torch.Tensor, nf4_state: list[torch.Tensor], nf4_blocksize: int, N: int, K: int
                       ) -> torch.Tensor | _NF4Weight:
    """The inverse of _weight_parts: the dense W, or an _NF4Weight of shape (N, K)."""
    if nf4_blocksize == 0:
        return weight
    absmax, quant_map, *nested = nf4_state
    nested_absmax, nested_map, offset = nested if nested else (None, None, None)
    return _NF4Weight(weight, absmax, quant_map, nested_absmax, nested_map, offset, nf4_blocksize, (N, K), bool(nested))


def _seed_tensor(seed: int | torch.Tensor) -> torch.Tensor:
    """``seed`` (an int, or a 0-d integer tensor) as the 0-d int64 tensor the ops take."""
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.is_floating_point() or seed.is_complex():
            raise ValueError(f"seed must be an int or a 0-d integer tensor, got a {seed.dtype} tensor of shape "
                             f"{tuple(seed.shape)}; draw one with torch.randint(0, 2**31 - 1, ())")
        return seed.to(torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int or a 0-d integer tensor, got {seed!r} ({type(seed).__name__})")
    return torch.tensor(seed, dtype=torch.int64)


def _lora_linear_fwd_impl(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dropout_p: float,
                          seed: torch.Tensor, nf4_state: list[torch.Tensor], nf4_blocksize: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_forward as an op: (y, u) for x2 (M, K)."""
    W = _weight_from_parts(weight, nf4_state, nf4_blocksize, lora_B.shape[0], lora_A.shape[1])
    return lora_forward(x2, W, bias, lora_A, lora_B, scaling, dropout_p, int(seed))


# Registered by call, not as a decorator: the implementation stays reachable as a plain function, which
# tests run under a dispatch mode to see the allocations inside the op.
_lora_linear_fwd = torch.library.custom_op("lorakern::lora_linear_fwd", _lora_linear_fwd_impl, mutates_args=())


@_lora_linear_fwd.register_fake
def _lora_linear_fwd_fake(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, nf4_state, nf4_blocksize):
    # The launcher's checks, at trace time: a bad operand fails while compiling, with the same message.
    _check(x2, _weight_from_parts(weight, nf4_state, nf4_blocksize, lora_B.shape[0], lora_A.shape[1]), bias,
           lora_A, lora_B)
    M = x2.shape[0]
    N, r = lora_B.shape
    return x2.new_empty((M, N)), x2.new_empty((M, r))


def _lora_linear_bwd_impl(g: torch.Tensor, x2: torch.Tensor, u: torch.Tensor, weight: torch.Tensor,
                          lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dropout_p: float,
                          seed: torch.Tensor, nf4_state: list[torch.Tensor], nf4_blocksize: int, needs: list[bool]
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """lora_backward as an op: (dx, dA, dB, dbias) for ``needs`` = [dx, dA, dB, dbias]; an op returns
    tensors, not None, so a gradient not asked for comes back as an empty (0,) tensor."""
    W = _weight_from_parts(weight, nf4_state, nf4_blocksize, lora_B.shape[0], lora_A.shape[1])
    grads = lora_backward(g, x2, u, W, lora_A, lora_B, scaling, dropout_p, int(seed), *needs)
    return tuple(x2.new_empty(0) if grad is None else grad for grad in grads)


_lora_linear_bwd = torch.library.custom_op("lorakern::lora_linear_bwd", _lora_linear_bwd_impl, mutates_args=())


@_lora_linear_bwd.register_fake
def _lora_linear_bwd_fake(g, x2, u, weight, lora_A, lora_B, scaling, dropout_p, seed, nf4_state, nf4_blocksize,
                          needs):
    M, N = g.shape
    r, K = lora_A.shape
    need_dx, need_dA, need_dB, need_dbias = needs
    # lora_backward computes in x's dtype and hands dA and dB back in the parameters' dtypes
    return (x2.new_empty((M, K) if need_dx else 0), lora_A.new_empty((r, K) if need_dA else 0),
            lora_B.new_empty((N, r) if need_dB else 0), x2.new_empty((N,) if need_dbias else 0))


def _setup_context(ctx, inputs, output) -> None:
    x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, nf4_state, nf4_blocksize = inputs
    _, u = output
    # u is saved for the backward (dB = s g^T u), not an output of the layer: no gradient flows into it
    ctx.mark_non_differentiable(u)
    ctx.save_for_backward(x2, u, weight, lora_A, lora_B, seed, *nf4_state)
    ctx.scaling, ctx.dropout_p, ctx.nf4_blocksize = scaling, dropout_p, nf4_blocksize
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y: torch.Tensor, grad_u: Optional[torch.Tensor]) -> tuple:
    """The gradients of lora_linear_fwd; the derivation is in lora_linear_triton's docstring."""
    x2, u, weight, lora_A, lora_B, seed, *nf4_state = ctx.saved_tensors
    need_x, need_W, need_b, need_A, need_B = ctx.needs_input_grad[:5]
    needs = [need_x, need_A, need_B, need_b and ctx.has_bias]
    dx, dA, dB, db = torch.ops.lorakern.lora_linear_bwd(grad_y, x2, u, weight, lora_A, lora_B, ctx.scaling,
                                                        ctx.dropout_p, seed, nf4_state, ctx.nf4_blocksize, needs)
    # dW = g^T x, only when the base weight trains (then by torch; an NF4 base never does)
    dW = grad_y.t().to(x2.dtype) @ x2 if need_W else None
    return (dx if need_x else None, dW, db if needs[3] else None, dA if need_A else None, dB if need_B else None,
            None, None, None, [None] * len(nf4_state), None)


_lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def lora_linear_triton(x: torch.Tensor, weight, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                       lora_B: torch.Tensor, scaling: float, dropout_p: float = 0.0, seed: int | torch.Tensor = 0
                       ) -> torch.Tensor:
    """y = x W^T + b + s u B^T, u = x~ A^T, in one launch forward and one launch backward.

    ``x`` (..., K); ``weight`` the dense (N, K) W, or an NF4 storage (lorakern.quant.NF4Storage) decoded
    in-kernel; ``seed`` an int or a 0-d integer tensor (torch.compile traces a tensor drawn in the graph).

    Derivation, with g = dL/dy flattened to (M, N), x~ = x * m (m the dropout mask / (1 - p), or 1):
        y   = x W^T + b + s (x~ A^T) B^T
        dx  = g W + s ((g B) A) * m         the LoRA path reaches x only through x~
        dA  = s (g B)^T x~                  (g B) is M x r: computed once per program, in the same pass
        dB  = s g^T u                        as g W, and never written to memory
        db  = sum over rows of g
        dW  = g^T x                          only when the base weight trains (then by torch)
    Saved for backward: x and u (M x r); the mask is redrawn from the seed, never stored.
    """
    if x.dim() < 1:
        raise ValueError(f"x must have shape (..., {lora_A.shape[1]}), got a 0-d tensor; reshape it to (1, K)")
    x2 = x.reshape(-1, x.shape[-1])
    w, nf4_state, nf4_blocksize = _weight_parts(weight)
    y, _ = torch.ops.lorakern.lora_linear_fwd(x2, w, bias, lora_A, lora_B, float(scaling), float(dropout_p),
                                              _seed_tensor(seed), nf4_state, nf4_blocksize)
    return y.reshape(*x.shape[:-1], lora_B.shape[0])


def _apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return lora_linear_triton(x, weight, bias, lora_A, lora_B, scaling, dropout_p, 0 if seed is None else seed)


register_backend(Backend("triton", _apply, dropout_mask, unsupported))
