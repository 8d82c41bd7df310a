"""The launchers of the fused LoRA kernels: check -> allocate -> launch.

lora_forward (the forward kernel, or the split-K decoding kernel for M <= SMALL_M), lora_backward,
dora_forward and dora_backward (the same kernels with DoRA's magnitude scale, HAS_MAGNITUDE),
dropout_mask (the mask the kernels draw, for tests and the torch path), unsupported (why the kernels
cannot take some operands) with _check, and the helpers that turn a dense or NF4 base weight into
kernel arguments.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from lorakern.kernels.backward import _lora_bwd_kernel
from lorakern.kernels.configs import (
    _AUTOTUNED,
    _MIXED_MODE,
    INTERPRETED,
    MAX_RANK,
    SMALL_M,
    _autotuned,
    _meta,
    _small_m_configs,
    get_autotune_config,
    rank_pad,
)
from lorakern.kernels.forward import _lora_fwd_kernel
from lorakern.kernels.small_m import _lora_small_m_kernel
from lorakern.kernels.tiles import _dropout_mask_kernel


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
    y, u, _ = _forward(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, None, False)
    return y, u


def dora_forward(x2, weight, bias, lora_A, lora_B, scale, scaling: float, dropout_p: float = 0.0, seed: int = 0,
                 need_z: bool = True):
    """(y, u, z) of DoRA (docs/dora.md) with ``scale`` c = m / n (N,) in the accumulation dtype (fp32, fp64
    for fp64 operands): y = c z + b, z = x W^T + s u B^T, u = x A^T (with dropout y = x W^T - x~ W^T + c z~ + b,
    z~ = x~ W^T + s u B^T, u = x~ A^T), c applied in the GEMM's epilogue. z (M, N), in x's dtype, only
    with ``need_z`` (dm needs it), else None."""
    N = lora_B.shape[0]
    acc_dtype = torch.float64 if x2.dtype == torch.float64 else torch.float32
    if scale.shape != (N,) or scale.dtype != acc_dtype or not scale.is_contiguous():
        raise ValueError(f"scale must be a contiguous ({N},) {acc_dtype} tensor, got {tuple(scale.shape)} "
                         f"{scale.dtype}; compute it as (m / n).to({acc_dtype})")
    return _forward(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, scale, need_z)


def _forward(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, scale, need_z):
    """(y, u, z): the forward kernel, or the split-K kernel for M <= SMALL_M; DoRA when ``scale`` is given."""
    _check(x2, weight, bias, lora_A, lora_B)
    M, K = x2.shape
    N, r = lora_B.shape
    if 0 < M <= SMALL_M:
        return _forward_small_m(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, scale, need_z)
    y = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    u = torch.empty((M, r), device=x2.device, dtype=x2.dtype)
    z = torch.empty((M, N), device=x2.device, dtype=x2.dtype) if need_z else None
    if M == 0:
        return y, u, z
    kind = "fwd" if scale is None else "dora_drop_fwd" if dropout_p > 0 else "dora_fwd"
    kernel, fixed = _autotuned(_lora_fwd_kernel, kind, x2.dtype, rank_pad(r), "nf4" if _is_nf4(weight) else "dense")

    def grid(meta):
        groups = triton.cdiv(triton.cdiv(N, meta["BLOCK_N"]), meta["TILES_N"])
        return (triton.cdiv(M, meta["BLOCK_M"]) * groups,)

    (w, *wq), w_strides, wq_scalars = _weight_args(weight, y)
    kernel[grid](
        x2, w, bias if bias is not None else y, lora_A, lora_B, y, u, y if scale is None else scale,
        y if z is None else z, *wq,
        M, N, K, r,
        x2.stride(0), x2.stride(1), *w_strides, lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1), u.stride(0), u.stride(1),
        float(scaling), float(dropout_p), int(seed), wq_scalars.pop("wq_offset"), wq_scalars.pop("wq_blocksize"),
        HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0, **wq_scalars, HAS_MAGNITUDE=scale is not None,
        STORE_Z=z is not None, **_meta(x2.dtype, r), **fixed,
    )
    return y, u, z


def _forward_small_m(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, scale=None, need_z=False):
    """_forward for M <= SMALL_M: the split-K decoding kernel, accumulating y, u (and DoRA's z) in fp32."""
    M, K = x2.shape
    N, r = lora_B.shape
    acc_dtype = torch.float64 if x2.dtype == torch.float64 else torch.float32
    y = torch.zeros((M, N), device=x2.device, dtype=acc_dtype)
    u = torch.zeros((M, r), device=x2.device, dtype=acc_dtype)
    z = torch.zeros((M, N), device=x2.device, dtype=acc_dtype) if need_z else None
    if INTERPRETED:
        kernel, fixed = _lora_small_m_kernel, _small_m_configs(x2.dtype)[0].kwargs
    else:
        kind = "small" if scale is None else "dora_drop_small" if dropout_p > 0 else "dora_small"
        key = (kind, x2.dtype, rank_pad(r), "nf4" if _is_nf4(weight) else "dense")
        if key not in _AUTOTUNED:
            _AUTOTUNED[key] = triton.autotune(_small_m_configs(x2.dtype, key[3], key[0]), key=["N", "K", "R"],
                                              reset_to_zero=["y_ptr", "u_ptr", "z_ptr"])(_lora_small_m_kernel)
        kernel, fixed = _AUTOTUNED[key], {}

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    (w, *wq), w_strides, wq_scalars = _weight_args(weight, y)
    kernel[grid](
        x2, w, bias if bias is not None else y, lora_A, lora_B, y, u, y if scale is None else scale,
        y if z is None else z, *wq,
        M, N, K, r,
        x2.stride(0), x2.stride(1), *w_strides, lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        float(scaling), float(dropout_p), int(seed), wq_scalars.pop("wq_offset"), wq_scalars.pop("wq_blocksize"),
        HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0, **wq_scalars, HAS_MAGNITUDE=scale is not None,
        STORE_Z=z is not None, **_meta(x2.dtype, r), **fixed,
    )
    return y.to(x2.dtype), u.to(x2.dtype), None if z is None else z.to(x2.dtype)


def lora_backward(g, x2, u, weight, lora_A, lora_B, scaling: float, dropout_p: float, seed: int,
                  need_dx: bool = True, need_dA: bool = True, need_dB: bool = True, need_dbias: bool = False):
    """(dx, dA, dB, dbias) for g = dL/dy (M, N); entries not asked for are None.

    dA, dB and dbias accumulate atomically in fp32 and come back in the parameters' dtype.
    """
    return _backward(g, x2, u, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx, need_dA, need_dB,
                     need_dbias, None, None)[:4]


def dora_backward(g, x2, u, z, weight, lora_A, lora_B, scale, scaling: float, dropout_p: float, seed: int,
                  need_dx: bool = True, need_dA: bool = True, need_dB: bool = True, need_dbias: bool = False):
    """(dx, dA, dB, dbias, dscale) of dora_forward: lora_backward run on gc = g diag(c) (each g tile scaled
    where the kernel loads it; dx with dropout as in dora_ops.py), dbias from g, and dscale_j = sum_i g_ij z_ij
    (fp32, or fp64 for fp64; None when z is None) from the kernel's pass over g for dB. dm = dscale / n."""
    return _backward(g, x2, u, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx, need_dA, need_dB,
                     need_dbias, scale, z)


def _backward(g, x2, u, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx, need_dA, need_dB, need_dbias,
              scale, z):
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
    dscale = torch.zeros((N,), device=g.device, dtype=acc_dtype) if z is not None else None
    if M > 0 and (need_dx or need_dA or need_dB or need_dbias or z is not None):
        kind = "bwd" if scale is None else "dora_drop_bwd" if dropout_p > 0 else "dora_bwd"
        kernel, fixed = _autotuned(_lora_bwd_kernel, kind, g.dtype, rank_pad(r), "nf4" if _is_nf4(weight) else "dense")
        dummy = g  # pointers the kernel never reads
        # accumulators not asked for: the autotuner zeroes every accumulator pointer before each trial, so those
        # get a spare buffer rather than g
        spare = torch.zeros(1, device=g.device, dtype=acc_dtype)

        def grid(meta):
            groups = triton.cdiv(triton.cdiv(K, meta["BLOCK_K"]), meta["TILES_K"])
            return (triton.cdiv(M, meta["BLOCK_M"]) * groups,)

        (w, *wq), w_strides, wq_scalars = _weight_args(weight, dummy)
        kernel[grid](
            g, w, lora_A, lora_B, x2, u,
            dx if dx is not None else dummy, dA if dA is not None else spare,
            dB if dB is not None else spare, dbias if dbias is not None else spare,
            dummy if scale is None else scale, dummy if z is None else z, spare if dscale is None else dscale, *wq,
            M, N, K, r,
            g.stride(0), g.stride(1), *w_strides, lora_A.stride(0), lora_A.stride(1),
            lora_B.stride(0), lora_B.stride(1), x2.stride(0), x2.stride(1), u.stride(0), u.stride(1),
            dx.stride(0) if dx is not None else 0, dx.stride(1) if dx is not None else 0,
            float(scaling), float(dropout_p), int(seed), wq_scalars.pop("wq_offset"), wq_scalars.pop("wq_blocksize"),
            HAS_DROPOUT=dropout_p > 0, NEED_DX=need_dx, NEED_DA=need_dA, NEED_DB=need_dB, NEED_DBIAS=need_dbias,
            **wq_scalars, HAS_MAGNITUDE=scale is not None, NEED_DC=z is not None, **_meta(g.dtype, r), **fixed,
        )
    elif need_dx:
        dx.zero_()
    return (dx,
            None if dA is None else dA.to(lora_A.dtype),
            None if dB is None else dB.to(lora_B.dtype),
            None if dbias is None else dbias.to(g.dtype),
            dscale)


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
