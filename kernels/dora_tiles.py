"""The @triton.jit helpers DoRA adds to the fused kernels (forward.py, small_m.py, backward.py).

DoRA (lorakern/dora.py, docs/dora.md), with c = m / n (N,) the magnitude over the detached row norms:
    y = c z + b,                           z = x W^T + s u B^T, u = x A^T          without dropout
    y = x W^T + b + (c - 1) x~ W^T + c s u B^T = x W^T - x~ W^T + c z~ + b,
                                           z~ = x~ W^T + s u B^T, u = x~ A^T        with dropout (PEFT's form)
The forward kernels call these with HAS_MAGNITUDE set: the tile of x W^T (and, with dropout, of x~ W^T: a
second accumulator in the same K loop) becomes y in the epilogue, and z is written only when the magnitude
trains (dm needs it). The backward kernel scales each g tile by c where it loads it (``_scaled``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from lorakern.kernels.tiles import _atomic_add, _dot, _load, _store


@triton.jit
def _load_scale(c_ptr, offs_n, N, ACC_DTYPE: tl.constexpr):
    """c (len(offs_n),) in the accumulation dtype, zero outside N."""
    return tl.load(c_ptr + offs_n, mask=offs_n < N, other=0.0).to(ACC_DTYPE)


@triton.jit
def _dora_tile(acc, acc_xl, u_scaled, b_ptr, c_ptr, offs_n, offs_r, N, R, stride_bn, stride_br,
               HAS_DROPOUT: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
               UPCAST: tl.constexpr):
    """(y - b, z) of one tile from acc = x W^T and, with dropout, acc_xl = x~ W^T. B is taken in u_scaled's dtype:
    x's in the tiled kernels, ACC_DTYPE in the split-K kernel (small_m.py says why)."""
    b_tile = _load(b_ptr, offs_r, offs_n, stride_br, stride_bn, R, N).to(u_scaled.dtype)
    c = _load_scale(c_ptr, offs_n, N, ACC_DTYPE)[None, :]
    if HAS_DROPOUT:
        # z~ = x~ W^T + (s u) B^T;  y - b = x W^T - x~ W^T + c z~
        z = _dot(u_scaled, b_tile, acc_xl, DOT_PRECISION, UPCAST)
        out = acc - acc_xl + c * z
    else:
        # z = x W^T + (s u) B^T;  y - b = c z
        z = _dot(u_scaled, b_tile, acc, DOT_PRECISION, UPCAST)
        out = c * z
    return out, z


@triton.jit
def _dora_fwd_epilogue(acc, acc_xl, u_scaled, b_ptr, bias_ptr, c_ptr, y_ptr, z_ptr, offs_m, offs_n, offs_r, M, N, R,
                       stride_bn, stride_br, stride_ym, stride_yn,
                       HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_Z: tl.constexpr,
                       ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The tiled forward's DoRA epilogue: y = c z + b (dropout: x W^T - x~ W^T + c z~ + b), z stored for dm."""
    out, z = _dora_tile(acc, acc_xl, u_scaled, b_ptr, c_ptr, offs_n, offs_r, N, R, stride_bn, stride_br,
                        HAS_DROPOUT, ACC_DTYPE, DOT_PRECISION, UPCAST)
    if STORE_Z:
        _store(z_ptr, z, offs_m, offs_n, N, 1, M, N)  # z: a contiguous (M, N) buffer
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(ACC_DTYPE)[None, :]
    _store(y_ptr, out, offs_m, offs_n, stride_ym, stride_yn, M, N)


@triton.jit
def _dora_small_m_epilogue(acc, acc_xl, u_scaled, b_ptr, bias_ptr, c_ptr, y_ptr, z_ptr, offs_m, offs_n, offs_r,
                           M, N, R, stride_bn, stride_br, first_split,
                           HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_Z: tl.constexpr,
                           ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The split-K kernel's DoRA share: y and z are linear in the K-partials (c is per column), so each split
    adds c z_k (dropout: x_k W_k^T - x~_k W_k^T + c z~_k) to the fp32 y and z_k to the fp32 z; the first
    split adds the bias."""
    out, z = _dora_tile(acc, acc_xl, u_scaled, b_ptr, c_ptr, offs_n, offs_r, N, R, stride_bn, stride_br,
                        HAS_DROPOUT, ACC_DTYPE, DOT_PRECISION, UPCAST)
    if HAS_BIAS:
        if first_split:
            out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(ACC_DTYPE)[None, :]
    _atomic_add(y_ptr, out, offs_m, offs_n, M, N)
    if STORE_Z:
        _atomic_add(z_ptr, z, offs_m, offs_n, M, N)


@triton.jit
def _scaled(g_tile, c, ACC_DTYPE: tl.constexpr):
    """g diag(c) for a (BLOCK_M, BLOCK_N) tile and its columns' c, rounded once to g's dtype."""
    return (g_tile.to(ACC_DTYPE) * c[None, :]).to(g_tile.dtype)
