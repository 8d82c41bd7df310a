"""Fused LoRA linear: one forward launch, one backward launch, dropout drawn inside the kernels.

    y = x W^T + b + s (x~ A^T) B^T,    x~ = x * keep / (1 - p),   keep = Philox(seed, element) >= p

Shapes: x (M, K) (any leading shape is flattened by the Function), W (N, K), b (N,), A (r, K),
B (N, r), y (M, N), u = x~ A^T (M, r). r is padded to R_PAD = max(16, next power of two) inside the
kernels, the smallest width tl.dot takes; the padding is masked, never read from memory.

Order of this file: the @triton.jit kernels, the launchers (check -> allocate -> launch), the
autograd Function, and the registration with lorakern's backend switch.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from lorakern.functional import Backend, register_backend

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
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
def _lora_fwd_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, u_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ym, stride_yn, stride_um, stride_ur,
    # scalars
    scaling, dropout_p, seed,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILES_N: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """y = x W^T + b + s u B^T and u = x~ A^T, for BLOCK_M rows and TILES_N tiles of BLOCK_N columns.

    u is accumulated in the K loop of the program's first N tile from the x tiles that loop already
    loads for the base GEMM, then reused for the program's other N tiles; the programs of the first
    column group write it out for the backward.
    """
    pid = tl.program_id(0)
    keep_scale = _keep_scale(dropout_p)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_g = _tile_ids(pid, num_pid_m, tl.cdiv(num_tiles_n, TILES_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_r = offs_r < R
    u = tl.zeros((BLOCK_M, R_PAD), dtype=ACC_DTYPE)
    u_scaled = tl.zeros((BLOCK_M, R_PAD), dtype=y_ptr.dtype.element_ty)
    for t in tl.static_range(TILES_N):
        tile_n = pid_g * TILES_N + t
        if tile_n < num_tiles_n:
            offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
                x_tile = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                                 mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                # W^T tile, (BLOCK_K, BLOCK_N)
                w_tile = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                                 mask=mask_n[None, :] & mask_k[:, None], other=0.0)
                # acc += x W^T
                acc = _dot(x_tile, w_tile, acc, DOT_PRECISION, UPCAST)
                if t == 0:
                    x_lora = x_tile
                    if HAS_DROPOUT:
                        keep = _dropout_keep(seed, offs_m, offs_k, K, dropout_p)
                        x_lora = tl.where(keep, x_tile.to(ACC_DTYPE) * keep_scale, 0.0).to(x_tile.dtype)
                    # A^T tile, (BLOCK_K, R_PAD)
                    a_tile = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                                     mask=mask_r[None, :] & mask_k[:, None], other=0.0)
                    # u += x~ A^T
                    u = _dot(x_lora, a_tile, u, DOT_PRECISION, UPCAST)
            if t == 0:
                u_scaled = (u * scaling).to(y_ptr.dtype.element_ty)
                if pid_g == 0:
                    tl.store(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur,
                             u.to(u_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])
            # B^T tile, (R_PAD, BLOCK_N)
            b_tile = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                             mask=mask_n[None, :] & mask_r[:, None], other=0.0)
            # acc += (s u) B^T
            acc = _dot(u_scaled, b_tile, acc, DOT_PRECISION, UPCAST)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                     acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _lora_bwd_kernel(
    # pointers
    g_ptr, w_ptr, a_ptr, b_ptr, x_ptr, u_ptr, dx_ptr, da_ptr, db_ptr, dbias_ptr,
    # sizes
    M, N, K, R,
    # strides (dA and dB are contiguous fp32 accumulators)
    stride_gm, stride_gn, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_xm, stride_xk, stride_um, stride_ur, stride_dxm, stride_dxk,
    # scalars
    scaling, dropout_p, seed,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, NEED_DX: tl.constexpr, NEED_DA: tl.constexpr, NEED_DB: tl.constexpr,
    NEED_DBIAS: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILES_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """For BLOCK_M rows and TILES_K tiles of BLOCK_K columns of x:

        gB  = g B                     (BLOCK_M, R_PAD), in the first tile's N loop, from the g tiles
                                      that loop already loads for g W
        dx  = g W + ((s gB) A) * keep / (1 - p)
        dA += (s gB)^T x~             atomically, fp32
    and in the programs of the first column group, from the same g tiles:
        dB += s g^T u,  dbias += sum_rows g      atomically, fp32
    """
    pid = tl.program_id(0)
    keep_scale = _keep_scale(dropout_p)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_tiles_k = tl.cdiv(K, BLOCK_K)
    pid_m, pid_g = _tile_ids(pid, num_pid_m, tl.cdiv(num_tiles_k, TILES_K), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_r = offs_r < R
    gb = tl.zeros((BLOCK_M, R_PAD), dtype=ACC_DTYPE)
    gb_scaled = tl.zeros((BLOCK_M, R_PAD), dtype=g_ptr.dtype.element_ty)
    first_group = pid_g == 0
    if NEED_DB:
        u_tile = tl.load(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    for t in tl.static_range(TILES_K):
        tile_k = pid_g * TILES_K + t
        if tile_k < num_tiles_k:
            offs_k = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE)
            if NEED_DX or t == 0:
                for n0 in range(0, N, BLOCK_N):
                    offs_n = n0 + tl.arange(0, BLOCK_N)
                    mask_n = offs_n < N
                    g_tile = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
                    if NEED_DX:
                        # W tile, (BLOCK_N, BLOCK_K); acc += g W
                        w_tile = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                                         mask=mask_n[:, None] & mask_k[None, :], other=0.0)
                        acc = _dot(g_tile, w_tile, acc, DOT_PRECISION, UPCAST)
                    if t == 0:
                        # B tile, (BLOCK_N, R_PAD); gB += g B
                        b_tile = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                                         mask=mask_n[:, None] & mask_r[None, :], other=0.0)
                        gb = _dot(g_tile, b_tile, gb, DOT_PRECISION, UPCAST)
                        if first_group:
                            if NEED_DB:
                                # dB += s g^T u
                                part = _dot(tl.trans(g_tile), u_tile, tl.zeros((BLOCK_N, R_PAD), dtype=ACC_DTYPE),
                                            DOT_PRECISION, UPCAST)
                                tl.atomic_add(db_ptr + offs_n[:, None] * R + offs_r[None, :], part * scaling,
                                              mask=mask_n[:, None] & mask_r[None, :])
                            if NEED_DBIAS:
                                # dbias += sum_rows g
                                tl.atomic_add(dbias_ptr + offs_n, tl.sum(g_tile.to(ACC_DTYPE), axis=0), mask=mask_n)
            if t == 0:
                gb_scaled = (gb * scaling).to(g_ptr.dtype.element_ty)
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, offs_m, offs_k, K, dropout_p)
            if NEED_DX:
                # A tile, (R_PAD, BLOCK_K); dx = g W + ((s gB) A) * keep / (1 - p)
                a_tile = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                                 mask=mask_r[:, None] & mask_k[None, :], other=0.0)
                if HAS_DROPOUT:
                    lora = _dot(gb_scaled, a_tile, tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE),
                                DOT_PRECISION, UPCAST)
                    acc += tl.where(keep, lora * keep_scale, 0.0)
                else:
                    acc = _dot(gb_scaled, a_tile, acc, DOT_PRECISION, UPCAST)
                tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
                         acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])
            if NEED_DA:
                x_tile = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                                 mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                if HAS_DROPOUT:
                    x_tile = tl.where(keep, x_tile.to(ACC_DTYPE) * keep_scale, 0.0).to(x_tile.dtype)
                # dA += (s gB)^T x~
                part = _dot(tl.trans(gb_scaled), x_tile, tl.zeros((R_PAD, BLOCK_K), dtype=ACC_DTYPE),
                            DOT_PRECISION, UPCAST)
                tl.atomic_add(da_ptr + offs_r[:, None] * K + offs_k[None, :], part,
                              mask=mask_r[:, None] & mask_k[None, :])


@triton.jit
def _dropout_mask_kernel(out_ptr, M, K, dropout_p, seed, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (M, K) fp32 = keep / (1 - p): the mask the fused kernels draw for ``seed``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _dropout_keep(seed, offs_m, offs_k, K, dropout_p)
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], tl.where(keep, _keep_scale(dropout_p), 0.0),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


# --------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------
def get_autotune_config(kind: str, dtype: torch.dtype) -> list[triton.Config]:
    """Configs for ``kind`` ("fwd": TILES_N, or "bwd": TILES_K) and input dtype.

    Every config here compiles for sm_80 and sm_90 without register spills and within shared memory
    (tests/test_kernels_compiled.py); a config that fails that check is removed from this list.
    """
    tiles = "TILES_N" if kind == "fwd" else "TILES_K"
    if INTERPRETED:  # one small config: the interpreter is slow, and autotuning it measures nothing
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, tiles: 2, "GROUP_M": 2})]
    if dtype == torch.float32:  # fp32 dots run as exact fp32 FMA (no TF32), so the tiles stay small
        shapes = [(64, 64, 32, 2, 4, 2), (32, 64, 32, 2, 4, 2)]
    else:
        shapes = [
            # BLOCK_M, BLOCK_N, BLOCK_K, tiles per program, warps, stages
            (128, 128, 64, 2, 8, 3),
            (128, 256, 64, 1, 8, 3),
            (128, 128, 64, 4, 8, 3),
            (64, 128, 64, 2, 4, 4),
            (64, 64, 64, 4, 4, 4),
        ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, tiles: t, "GROUP_M": 8},
                      num_warps=w, num_stages=s)
        for bm, bn, bk, t, w, s in shapes
    ]


def _autotuned(kernel, kind: str, dtype: torch.dtype):
    if INTERPRETED:
        return kernel, get_autotune_config(kind, dtype)[0].kwargs
    key = (kind, dtype)
    if key not in _AUTOTUNED:
        reset = ["da_ptr", "db_ptr", "dbias_ptr"] if kind == "bwd" else None
        _AUTOTUNED[key] = triton.autotune(get_autotune_config(kind, dtype), key=["M", "N", "K", "R"],
                                          reset_to_zero=reset)(kernel)
    return _AUTOTUNED[key], {}


_AUTOTUNED: dict = {}


def _meta(dtype: torch.dtype, r: int) -> dict:
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not INTERPRETED
    return {
        "R_PAD": max(16, triton.next_power_of_2(r)),
        "DOT_PRECISION": "tf32" if tf32 else "ieee",
        "UPCAST": INTERPRETED and dtype == torch.bfloat16,
        "ACC_DTYPE": tl.float64 if dtype == torch.float64 else tl.float32,
    }


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
def unsupported(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor) -> Optional[str]:
    """None when these kernels can run on the operands, else the reason."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32) + ((torch.float64,) if INTERPRETED else ())
    if x.dtype not in dtypes:
        return f"dtype {x.dtype} (the kernels take {', '.join(str(d) for d in dtypes)})"
    if lora_A.shape[0] > MAX_RANK:
        return f"r={lora_A.shape[0]} (the kernels take r <= {MAX_RANK})"
    if INTERPRETED and x.device.type != "cpu":
        return f"TRITON_INTERPRET=1 runs the kernels on CPU tensors, got a {x.device.type} tensor"
    if not INTERPRETED and x.device.type != "cuda":
        return f"tensors on {x.device.type}; compiled kernels need CUDA tensors (TRITON_INTERPRET=1 runs them on CPU)"
    return None


def _check(x2: torch.Tensor, weight: torch.Tensor, bias, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
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
    tensors = [t for t in (x2, weight, bias, lora_A, lora_B) if t is not None]
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
    kernel, fixed = _autotuned(_lora_fwd_kernel, "fwd", x2.dtype)

    def grid(meta):
        groups = triton.cdiv(triton.cdiv(N, meta["BLOCK_N"]), meta["TILES_N"])
        return (triton.cdiv(M, meta["BLOCK_M"]) * groups,)

    kernel[grid](
        x2, weight, bias if bias is not None else y, lora_A, lora_B, y, u,
        M, N, K, r,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1), u.stride(0), u.stride(1),
        float(scaling), float(dropout_p), int(seed),
        HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0, **_meta(x2.dtype, r), **fixed,
    )
    return y, u


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
        kernel, fixed = _autotuned(_lora_bwd_kernel, "bwd", g.dtype)
        dummy = g

        def grid(meta):
            groups = triton.cdiv(triton.cdiv(K, meta["BLOCK_K"]), meta["TILES_K"])
            return (triton.cdiv(M, meta["BLOCK_M"]) * groups,)

        kernel[grid](
            g, weight, lora_A, lora_B, x2, u,
            dx if dx is not None else dummy, dA if dA is not None else dummy,
            dB if dB is not None else dummy, dbias if dbias is not None else dummy,
            M, N, K, r,
            g.stride(0), g.stride(1), weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
            lora_B.stride(0), lora_B.stride(1), x2.stride(0), x2.stride(1), u.stride(0), u.stride(1),
            dx.stride(0) if dx is not None else 0, dx.stride(1) if dx is not None else 0,
            float(scaling), float(dropout_p), int(seed),
            HAS_DROPOUT=dropout_p > 0, NEED_DX=need_dx, NEED_DA=need_dA, NEED_DB=need_dB, NEED_DBIAS=need_dbias,
            **_meta(g.dtype, r), **fixed,
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
# autograd
# --------------------------------------------------------------------------------------------------
class LoraLinearTritonFunction(torch.autograd.Function):
    """y = x W^T + b + s u B^T, u = x~ A^T, in one launch forward and one launch backward.

    Derivation, with g = dL/dy flattened to (M, N), x~ = x * m (m the dropout mask / (1 - p), or 1):
        y   = x W^T + b + s (x~ A^T) B^T
        dx  = g W + s ((g B) A) * m         the LoRA path reaches x only through x~
        dA  = s (g B)^T x~                  (g B) is M x r: computed once per program, in the same pass
        dB  = s g^T u                        as g W, and never written to memory
        db  = sum over rows of g
        dW  = g^T x                          only when the base weight trains (then by torch)
    Saved for backward: x and u (M x r); the mask is redrawn from the seed, never stored.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed: int):
        in_features = x.shape[-1]
        x2 = x.reshape(-1, in_features)
        y, u = lora_forward(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
        ctx.save_for_backward(x2, u, weight, lora_A, lora_B)
        ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x2, u, weight, lora_A, lora_B = ctx.saved_tensors
        need_x, need_W, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        g = grad_y.reshape(-1, weight.shape[0])
        dx, dA, dB, db = lora_backward(
            g, x2, u, weight, lora_A, lora_B, ctx.scaling, ctx.dropout_p, ctx.seed,
            need_dx=need_x, need_dA=need_A, need_dB=need_B, need_dbias=need_b and ctx.has_bias,
        )
        # dW = g^T x
        dW = g.t().to(x2.dtype) @ x2 if need_W else None
        return (None if dx is None else dx.reshape(ctx.x_shape)), dW, db, dA, dB, None, None, None


lora_linear_triton = LoraLinearTritonFunction.apply


def _apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return LoraLinearTritonFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p,
                                          0 if seed is None else seed)


register_backend(Backend("triton", _apply, dropout_mask, unsupported))
