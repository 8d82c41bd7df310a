"""The inner loops the fused kernels share: a forward K loop and the backward's N loops.

small_m.py runs _fwd_k_loop_u (x W^T and u = x~ A^T, with x~ W^T beside x W^T for DoRA with dropout);
backward.py and mixed_backward.py the same N loops (g W and gB = g B, with DoRA's g diag(c) in the
single-adapter kernel). The segmented kernel passes the gathered rows and their row_ok flags, the
single-adapter kernels a block of rows and row_ok None (see tiles._load_either). Each loop is here once
per form the kernels need: with the rank-r product (a program's first tile: g loaded before W) and
without it (its other tiles: W first), the load order the configs were compile-checked with.

Triton inlines these calls, and the kernels that use them compile to the same PTX instructions, registers
and spills as when each wrote its loops out (compile_check --ptx-dir / --compare-ptx, 2026-11). forward.py
and mixed_forward.py keep their K loops written out: with these helpers the PTX instructions stayed the
same, but the debug labels that mark an inlined helper's code (ptxas reads them; Triton compiles with line
info) moved ptxas's register allocation by 1-3 registers in 4 of 690 sm_90 configs checked.
"""
from __future__ import annotations

import triton
import triton.language as tl

from lorakern.kernels.dora_tiles import _load_scale, _scaled
from lorakern.kernels.tiles import _dot, _dropout_keep, _dropped, _load, _load_either, _load_weight


@triton.jit
def _fwd_k_loop_u(
    # x: the tile's rows (row_ok None: rows < M) | W (dense, or NF4 with its statistics): columns offs_n
    x_ptr, rows, row_ok, M, stride_xm, stride_xk,
    w, offs_n, N,
    # A (its rows masked to R), the K range, dropout
    a_ptr, offs_r, R, stride_ar, stride_ak, k_start, k_end, K, seed, dropout_p, keep_scale,
    HAS_DROPOUT: tl.constexpr, HAS_MAGNITUDE: tl.constexpr, W_NF4: tl.constexpr, W_NESTED: tl.constexpr,
    BLOCK_K: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """(x W^T, x~ W^T, u = x~ A^T) over k_start <= k < k_end, fp32 tiles; x~ W^T with HAS_MAGNITUDE and
    HAS_DROPOUT only (else zero, and dead in the caller)."""
    acc = tl.zeros((rows.shape[0], offs_n.shape[0]), dtype=ACC_DTYPE)
    acc_xl = tl.zeros((rows.shape[0], offs_n.shape[0]), dtype=ACC_DTYPE)
    u = tl.zeros((rows.shape[0], offs_r.shape[0]), dtype=ACC_DTYPE)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_tile = _load_either(x_ptr, rows, row_ok, offs_k, stride_xm, stride_xk, M, K)
        # acc += x W^T, with the W^T tile (BLOCK_K, BLOCK_N)
        w_tile = _load_weight(w, offs_n, offs_k, N, K, True, W_NF4, W_NESTED, x_ptr.dtype.element_ty)
        acc = _dot(x_tile, w_tile, acc, DOT_PRECISION, UPCAST)
        if HAS_DROPOUT:
            # the mask of the row's own index (gathered rows: as the single-adapter kernels draw it)
            x_tile = _dropped(x_tile, _dropout_keep(seed, rows, offs_k, K, dropout_p), keep_scale, ACC_DTYPE)
            if HAS_MAGNITUDE:
                # acc_xl += x~ W^T
                acc_xl = _dot(x_tile, w_tile, acc_xl, DOT_PRECISION, UPCAST)
        # u += x~ A^T, with the A^T tile (BLOCK_K, R_PAD)
        u = _dot(x_tile, _load(a_ptr, offs_k, offs_r, stride_ak, stride_ar, K, R), u, DOT_PRECISION, UPCAST)
    return acc, acc_xl, u


@triton.jit
def _bwd_n_loop_gb(
    # g: the tile's rows (row_ok None: rows < M) | W: columns offs_k | B (its columns masked to R) | DoRA's c
    g_ptr, rows, row_ok, M, stride_gm, stride_gn,
    w, offs_k, K, b_ptr, offs_r, R, stride_bn, stride_br, c_ptr, N,
    NEED_DX: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_MAGNITUDE: tl.constexpr, W_NF4: tl.constexpr,
    W_NESTED: tl.constexpr, BLOCK_N: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """(g W, (gc - g) W, gB = gc B) over N, fp32 tiles, gc = g diag(c) with HAS_MAGNITUDE (else g).

    g W with NEED_DX only; with HAS_MAGNITUDE it is gc W, or, with HAS_DROPOUT, g W beside (gc - g) W
    (else zero, and dead in the caller)."""
    acc = tl.zeros((rows.shape[0], offs_k.shape[0]), dtype=ACC_DTYPE)
    acc_xl = tl.zeros((rows.shape[0], offs_k.shape[0]), dtype=ACC_DTYPE)
    gb = tl.zeros((rows.shape[0], offs_r.shape[0]), dtype=ACC_DTYPE)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        g_tile = _load_either(g_ptr, rows, row_ok, offs_n, stride_gm, stride_gn, M, N)
        gc_tile = g_tile
        if HAS_MAGNITUDE:
            # gc = g diag(c)
            c = _load_scale(c_ptr, offs_n, N, ACC_DTYPE)
            gc_tile = _scaled(g_tile, c, ACC_DTYPE)
        if NEED_DX:
            w_tile = _load_weight(w, offs_n, offs_k, N, K, False, W_NF4, W_NESTED, g_ptr.dtype.element_ty)
            if HAS_MAGNITUDE and HAS_DROPOUT:
                # acc += g W;  acc_xl += (gc - g) W = (g diag(c - 1)) W
                acc = _dot(g_tile, w_tile, acc, DOT_PRECISION, UPCAST)
                acc_xl = _dot(_scaled(g_tile, c - 1.0, ACC_DTYPE), w_tile, acc_xl, DOT_PRECISION, UPCAST)
            else:
                # acc += gc W, with the W tile (BLOCK_N, BLOCK_K)
                acc = _dot(gc_tile, w_tile, acc, DOT_PRECISION, UPCAST)
        # gB += gc B, with the B tile (BLOCK_N, R_PAD); no branch on the segmented kernel's use_lora (it kept
        # the B loads out of the software pipeline): without an adapter R is 0 and gB is never used
        gb = _dot(gc_tile, _load(b_ptr, offs_n, offs_r, stride_bn, stride_br, N, R), gb, DOT_PRECISION, UPCAST)
    return acc, acc_xl, gb


@triton.jit
def _bwd_n_loop(g_ptr, rows, row_ok, M, stride_gm, stride_gn, w, offs_k, K, c_ptr, N,
                NEED_DX: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_MAGNITUDE: tl.constexpr, W_NF4: tl.constexpr,
                W_NESTED: tl.constexpr, BLOCK_N: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                UPCAST: tl.constexpr):
    """(g W, (gc - g) W) of a program's other K tiles (gB is the first tile's), as in _bwd_n_loop_gb."""
    acc = tl.zeros((rows.shape[0], offs_k.shape[0]), dtype=ACC_DTYPE)
    acc_xl = tl.zeros((rows.shape[0], offs_k.shape[0]), dtype=ACC_DTYPE)
    if NEED_DX:
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            w_tile = _load_weight(w, offs_n, offs_k, N, K, False, W_NF4, W_NESTED, g_ptr.dtype.element_ty)
            g_tile = _load_either(g_ptr, rows, row_ok, offs_n, stride_gm, stride_gn, M, N)
            if HAS_MAGNITUDE:
                c = _load_scale(c_ptr, offs_n, N, ACC_DTYPE)
                if HAS_DROPOUT:
                    # acc_xl += (gc - g) W; acc below: g W
                    acc_xl = _dot(_scaled(g_tile, c - 1.0, ACC_DTYPE), w_tile, acc_xl, DOT_PRECISION, UPCAST)
                else:
                    # acc below: gc W
                    g_tile = _scaled(g_tile, c, ACC_DTYPE)
            acc = _dot(g_tile, w_tile, acc, DOT_PRECISION, UPCAST)
    return acc, acc_xl


@triton.jit
def _dx_with_lora(acc, acc_xl, gb_scaled, a_tile, keep, keep_scale,
                  HAS_DROPOUT: tl.constexpr, HAS_XL: tl.constexpr, ACC_DTYPE: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dx's tile from acc = g W: g W + ((s gB) A) * keep / (1 - p), A's tile (R_PAD, BLOCK_K); DoRA with dropout
    (HAS_XL) g W + ((gc - g) W + (s gcB) A) * keep / (1 - p), acc_xl = (gc - g) W. ``keep`` is read with dropout
    only."""
    if HAS_DROPOUT:
        if HAS_XL:
            lora = _dot(gb_scaled, a_tile, acc_xl, DOT_PRECISION, UPCAST)
        else:
            lora = _dot(gb_scaled, a_tile, tl.zeros(acc.shape, dtype=ACC_DTYPE), DOT_PRECISION, UPCAST)
        acc += tl.where(keep, lora * keep_scale, 0.0)
    else:
        acc = _dot(gb_scaled, a_tile, acc, DOT_PRECISION, UPCAST)
    return acc


@triton.jit
def _da_part(gb_scaled, x_tile, keep, keep_scale, HAS_DROPOUT: tl.constexpr, ACC_DTYPE: tl.constexpr,
             DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One tile's share of dA: (s gB)^T x~, x~ = x * keep / (1 - p) with dropout."""
    if HAS_DROPOUT:
        x_tile = _dropped(x_tile, keep, keep_scale, ACC_DTYPE)
    return _dot(tl.trans(gb_scaled), x_tile, tl.zeros((gb_scaled.shape[1], x_tile.shape[1]), dtype=ACC_DTYPE),
                DOT_PRECISION, UPCAST)
