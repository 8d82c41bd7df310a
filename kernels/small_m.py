"""The decoding kernel (M <= SMALL_M rows): the fused LoRA forward split over K, accumulated atomically.

With HAS_MAGNITUDE (DoRA) each split adds its share of y = c z + b (and of z) instead (dora_tiles.py).
Launched by lora_forward and dora_forward (launchers.py, _forward_small_m) with the configs in configs.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

from lorakern.kernels.dora_tiles import _dora_small_m_epilogue
from lorakern.kernels.loops import _fwd_k_loop_u
from lorakern.kernels.tiles import _atomic_add, _dot, _keep_scale, _load


@triton.jit
def _lora_small_m_kernel(
    # pointers (y_ptr, u_ptr and DoRA's z_ptr: zeroed fp32 accumulators; c_ptr DoRA's (N,) scale m / n)
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, u_ptr, c_ptr, z_ptr,
    wq_absmax_ptr, wq_map_ptr, wq_nested_absmax_ptr, wq_nested_map_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    # scalars
    scaling, dropout_p, seed, wq_offset, wq_blocksize,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, W_NF4: tl.constexpr, W_NESTED: tl.constexpr,
    HAS_MAGNITUDE: tl.constexpr, STORE_Z: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Decoding (M <= BLOCK_M = 16): split-K, so a few rows still keep every SM busy.

    Program (n tile, k split) reads its slice of W exactly once (the whole weight is streamed once) and
    adds, atomically in fp32, its share of y = x W^T + s (x~ A^T) B^T: the LoRA term is linear in the
    K-partial u_k = x~[:, k] A^T[k], so each split adds s u_k B^T for its own k. The splits of the first
    n tile also add u_k to u; the first split adds the bias.
    """
    w = (w_ptr, wq_absmax_ptr, wq_map_ptr, wq_nested_absmax_ptr, wq_nested_map_ptr, wq_offset, wq_blocksize, stride_wn,
         stride_wk)  # the W operand of tiles._load_weight
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    keep_scale = _keep_scale(dropout_p)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    acc, acc_xl, u = _fwd_k_loop_u(x_ptr, offs_m, None, M, stride_xm, stride_xk, w, offs_n, N, a_ptr, offs_r, R,
                                   stride_ar, stride_ak, k_start, min(K, k_start + k_per_split), K, seed, dropout_p,
                                   keep_scale, HAS_DROPOUT, HAS_MAGNITUDE, W_NF4, W_NESTED, BLOCK_K, ACC_DTYPE,
                                   DOT_PRECISION, UPCAST)
    # s u_k stays in ACC_DTYPE (B is upcast to it): u_k is this split's K-partial of u, and rounding it to x's
    # dtype, as the tiled kernels round the whole u once, would err by s |u_k| |B| per split, which splits that
    # cancel (|u| << sum_k |u_k|) leave unbounded by u's own size (the thorough profile found an fp16 y 1.3x
    # over its bound at M = 2, K = 64, r = 1). The extra FMAs, M x R_PAD x BLOCK_N per split, are small beside
    # the split's BLOCK_N x K / SPLIT_K slice of W.
    u_scaled = u * scaling
    if HAS_MAGNITUDE:
        _dora_small_m_epilogue(acc, acc_xl, u_scaled, b_ptr, bias_ptr, c_ptr, y_ptr, z_ptr, offs_m, offs_n, offs_r, M,
                               N, R, stride_bn, stride_br, pid_k == 0, HAS_BIAS, HAS_DROPOUT, STORE_Z, ACC_DTYPE,
                               DOT_PRECISION, UPCAST)
    else:
        # acc += (s u_k) B^T
        acc = _dot(u_scaled, _load(b_ptr, offs_r, offs_n, stride_br, stride_bn, R, N).to(ACC_DTYPE), acc,
                   DOT_PRECISION, UPCAST)
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(ACC_DTYPE)[None, :]
        _atomic_add(y_ptr, acc, offs_m, offs_n, M, N)
    if pid_n == 0:
        _atomic_add(u_ptr, u, offs_m, offs_r, M, R)
