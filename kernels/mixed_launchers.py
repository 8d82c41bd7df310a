"""The launchers of the segmented (mixed-adapter) kernels: check -> allocate -> launch.

mixed_forward and mixed_backward take the adapters already stacked: A (n_slots, R, K) and B
(n_slots, N, R), zero-padded to the largest rank R, with per-slot ``ranks`` (int32, 0 where the layer
lacks the slot's adapter), ``scalings`` and ``dropouts`` (float32), all on x's device, and the row
grouping ``order`` (M,) / ``offsets`` (n_slots + 1,) of lorakern.dispatch.MixedCall. unsupported_mixed
says why the kernels cannot take a MixedCall. mixed_dora_forward / mixed_dora_backward launch the same kernels
with DoRA slots (HAS_MAGNITUDE): a stacked (n_slots + 1, N) scale and per-slot DoRA flags (mixed_dora_tiles.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from lorakern.kernels.configs import (
    _MIXED_MODE,
    INTERPRETED,
    MAX_RANK,
    _autotuned,
    _meta,
    get_autotune_config,
    rank_pad,
)
from lorakern.kernels.launchers import _is_nf4, _weight_args
from lorakern.kernels.mixed_backward import _mixed_bwd_kernel
from lorakern.kernels.mixed_forward import _mixed_fwd_kernel


def unsupported_mixed(call) -> Optional[str]:
    """None when the segmented kernels can run ``call`` (a lorakern.dispatch.MixedCall), else the reason."""
    if _MIXED_MODE:
        return ("triton was imported before TRITON_INTERPRET=1 was set (by another package), so its library "
                "functions are compiled while these kernels are interpreted; set TRITON_INTERPRET=1 before the "
                "first import of triton")
    x = call.x
    dtypes = (torch.float16, torch.bfloat16, torch.float32) + ((torch.float64,) if INTERPRETED else ())
    if x.dtype not in dtypes:
        return f"dtype {x.dtype} (the kernels take {', '.join(str(d) for d in dtypes)})"
    if call.base not in ("dense", "nf4") or (call.base == "nf4") != _is_nf4(call.weight):
        return f"a base of kind {call.base!r} with a {type(call.weight).__name__} weight (dense or nf4)"
    ranks = [adapter[0].shape[0] for adapter in call.adapters if adapter is not None]
    r_max = max([1] + ranks)
    if r_max > MAX_RANK:
        return f"r={r_max} (the kernels take r <= {MAX_RANK})"
    rows = x.shape[0] if x.dim() == 2 else x.numel()
    width = max(x.shape[-1] if x.dim() else 1, call.weight.shape[0])
    if rows * width >= 2**31:
        return f"{rows} rows of width {width} (the kernels index with 32-bit offsets)"
    if INTERPRETED and x.device.type != "cpu":
        return f"TRITON_INTERPRET=1 runs the kernels on CPU tensors, got a {x.device.type} tensor"
    if not INTERPRETED and x.device.type != "cuda":
        return f"tensors on {x.device.type}; compiled kernels need CUDA tensors (TRITON_INTERPRET=1 runs them on CPU)"
    if not get_autotune_config("mixed_fwd", x.dtype, rank_pad(r_max), call.base):
        return (f"a mixed batch on {'an NF4' if call.base == 'nf4' else 'a dense'} base in {x.dtype} at r={r_max} (no "
                f"segmented kernel config for it has passed the sm_80/sm_90 compile checks yet)")
    if call.magnitudes is not None:
        drops = any(a is not None and a[3] > 0 for a in call.adapters)
        kinds = [f"mixed_dora_{'drop_' if drops else ''}{pass_}" for pass_ in ("fwd", "bwd")]
        if not all(get_autotune_config(kind, x.dtype, rank_pad(r_max), call.base) for kind in kinds):
            return (f"a mixed batch with DoRA adapters{' and dropout' if drops else ''} on "
                    f"{'an NF4' if call.base == 'nf4' else 'a dense'} base in {x.dtype} at r={r_max} (no segmented "
                    f"DoRA kernel config for it has passed the sm_80/sm_90 compile checks yet)")
    return None


def _check_mixed(x2, weight, bias, a_stack, b_stack, ranks, scalings, dropouts, order, offsets) -> None:
    if x2.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K) here, got shape {tuple(x2.shape)}")
    if offsets.dim() != 1 or offsets.shape[0] < 1:
        raise ValueError(f"offsets must have shape (n_slots + 1,), got {tuple(offsets.shape)}")
    M, K = x2.shape
    N = weight.shape[0]
    # one entry per slot (a single zero adapter stands in for the pointers when there is no slot)
    stacked = max(offsets.shape[0] - 1, 1)
    R = a_stack.shape[1] if a_stack.dim() == 3 else -1
    if (weight.shape[1] != K or a_stack.shape != (stacked, R, K) or b_stack.shape != (stacked, N, R)
            or (bias is not None and bias.shape != (N,))):
        raise ValueError(f"shapes do not fit: x {tuple(x2.shape)}, W {tuple(weight.shape)}, stacked A "
                         f"{tuple(a_stack.shape)}, stacked B {tuple(b_stack.shape)}, bias "
                         f"{None if bias is None else tuple(bias.shape)}, {offsets.shape[0] - 1} slots; expected x "
                         f"(M, {K}), A ({stacked}, R, {K}), B ({stacked}, {N}, R), bias ({N},): offsets needs one entry "
                         f"per adapter slot plus one (lorakern.rows.group_rows builds it)")
    expected = {"ranks": (ranks, (stacked,), torch.int32), "scalings": (scalings, (stacked,), torch.float32),
                "dropouts": (dropouts, (stacked,), torch.float32), "order": (order, (M,), torch.int64),
                "offsets": (offsets, tuple(offsets.shape), torch.int64)}
    for name, (tensor, shape, dtype) in expected.items():
        if tuple(tensor.shape) != shape or tensor.dtype != dtype or tensor.device != x2.device:
            raise ValueError(f"{name} must be {dtype} of shape {shape} on {x2.device}, got {tensor.dtype} of shape "
                             f"{tuple(tensor.shape)} on {tensor.device}")
    tensors = [t for t in (x2, None if _is_nf4(weight) else weight, bias, a_stack, b_stack) if t is not None]
    if len({t.dtype for t in tensors}) != 1:
        raise ValueError(f"x, W, bias and the stacked A and B must share one dtype, got "
                         f"{[str(t.dtype) for t in tensors]}; cast them (run_mixed does this for you)")
    if R > MAX_RANK:
        raise ValueError(f"the triton kernels cannot take r={R} (they take r <= {MAX_RANK})")


def _weight_kind(weight) -> str:
    return "nf4" if _is_nf4(weight) else "dense"


def mixed_forward(x2, weight, bias, a_stack, b_stack, ranks, scalings, dropouts, order, offsets, seed: int = 0,
                  has_dropout: bool = False):
    """(y, u): y[i] = x[i] W^T + b + s_a (x~[i] A_a^T) B_a^T for row i of slot a (x W^T + b for base-only rows
    and absent adapters), u[i] = x~[i] A_a^T (M, R; columns past the row's rank and rows without an adapter
    are not written). ``has_dropout``: some slot has p > 0 (known on the host; reading ``dropouts`` would sync)."""
    y, u, _ = _forward(x2, weight, bias, a_stack, b_stack, ranks, scalings, dropouts, order, offsets, seed,
                       has_dropout, None, None, False)
    return y, u


def mixed_dora_forward(x2, weight, bias, a_stack, b_stack, ranks, scalings, dropouts, order, offsets, scales,
                       dora_flags, seed: int = 0, has_dropout: bool = False, need_z: bool = True):
    """(y, u, z) of a mixed batch with DoRA slots: ``scales`` (n_slots + 1, N) contiguous, fp32 (fp64 for fp64
    operands), row a c_a = m_a / n_a for a DoRA slot a and ones for any other slot and for the base-only rows
    (row n_slots); ``dora_flags`` (n_slots,) int32, 1 for a DoRA slot. A DoRA slot's row i gets y_i = c_a z_i + b,
    z_i = x_i W^T + s_a u_i B_a^T (with dropout y_i = x_i W^T - x~_i W^T + c_a z~_i + b, z~_i = x~_i W^T +
    s_a u_i B_a^T); other rows as mixed_forward. z (M, N) in x's dtype, written on DoRA rows only, with
    ``need_z`` (dm needs it), else None."""
    return _forward(x2, weight, bias, a_stack, b_stack, ranks, scalings, dropouts, order, offsets, seed,
                    has_dropout, scales, dora_flags, need_z)


def _check_dora(x2, N, n_slots, scales, dora_flags) -> None:
    acc_dtype = torch.float64 if x2.dtype == torch.float64 else torch.float32
    if (scales.shape != (n_slots + 1, N) or scales.dtype != acc_dtype or not scales.is_contiguous()
            or scales.device != x2.device):
        raise ValueError(f"scales must be a contiguous ({n_slots + 1}, {N}) {acc_dtype} tensor on {x2.device} (one row "
                         f"per slot, then ones for the base-only rows), got {tuple(scales.shape)} {scales.dtype}")
    if dora_flags.shape != (max(n_slots, 1),) or dora_flags.dtype != torch.int32 or dora_flags.device != x2.device:
        raise ValueError(f"dora_flags must be int32 of shape ({max(n_slots, 1)},) on {x2.device}, got "
                         f"{dora_flags.dtype} of shape {tuple(dora_flags.shape)}")


def _forward(x2, weight, bias, a_stack, b_stack, ranks, scalings, dropouts, order, offsets, seed, has_dropout, scales,
             dora_flags, need_z):
    """(y, u, z): the segmented forward kernel; DoRA slots when ``scales`` is given."""
    _check_mixed(x2, weight, bias, a_stack, b_stack, ranks, scalings, dropouts, order, offsets)
    M, K = x2.shape
    N = weight.shape[0]
    R = a_stack.shape[1]
    n_slots = offsets.shape[0] - 1
    dora = scales is not None
    if dora:
        _check_dora(x2, N, n_slots, scales, dora_flags)
    y = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    u = torch.empty((M, R), device=x2.device, dtype=x2.dtype)
    z = torch.empty((M, N), device=x2.device, dtype=x2.dtype) if dora and need_z else None
    if M == 0:
        return y, u, z
    kind = "mixed_fwd" if not dora else "mixed_dora_drop_fwd" if has_dropout else "mixed_dora_fwd"
    kernel, fixed = _autotuned(_mixed_fwd_kernel, kind, x2.dtype, rank_pad(R), _weight_kind(weight))

    def grid(meta):
        # one tile per BLOCK_M rows of each segment: at most cdiv(M, BLOCK_M) + n_slots (the counts stay on
        # the device; the programs past the last tile return at once)
        groups = triton.cdiv(triton.cdiv(N, meta["BLOCK_N"]), meta["TILES_N"])
        return ((triton.cdiv(M, meta["BLOCK_M"]) + n_slots) * groups,)

    (w, *wq), w_strides, wq_scalars = _weight_args(weight, y)
    kernel[grid](
        x2, w, bias if bias is not None else y, a_stack, b_stack, y, u, scales if dora else y,
        dora_flags if dora else ranks, y if z is None else z,
        order, offsets, ranks, scalings, dropouts, *wq,
        M, N, K, R, n_slots,
        x2.stride(0), x2.stride(1), *w_strides, *a_stack.stride(), *b_stack.stride(),
        y.stride(0), y.stride(1), u.stride(0), u.stride(1),
        int(seed), wq_scalars.pop("wq_offset"), wq_scalars.pop("wq_blocksize"),
        HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout, HAS_MAGNITUDE=dora, STORE_Z=z is not None,
        **wq_scalars, **_meta(x2.dtype, R), **fixed,
    )
    return y, u, z


def mixed_backward(g, x2, u, weight, a_stack, b_stack, ranks, scalings, dropouts, order, offsets, seed: int = 0,
                   has_dropout: bool = False, need_dx: bool = True, need_dA: bool = True, need_dB: bool = True,
                   need_dbias: bool = False):
    """(dx, dA, dB, dbias) for g = dL/dy (M, N): dA (n_slots, R, K) and dB (n_slots, N, R) hold every
    slot's gradient (zero past its rank, and for absent adapters); entries not asked for are None.

    dA, dB and dbias accumulate atomically in fp32 and come back in the stacks' dtype.
    """
    return _backward(g, x2, u, weight, a_stack, b_stack, ranks, scalings, dropouts, order, offsets, seed, has_dropout,
                     need_dx, need_dA, need_dB, need_dbias, None, None, None)[:4]


def mixed_dora_backward(g, x2, u, z, weight, a_stack, b_stack, ranks, scalings, dropouts, order, offsets, scales,
                        dora_flags, seed: int = 0, has_dropout: bool = False, need_dx: bool = True,
                        need_dA: bool = True, need_dB: bool = True, need_dbias: bool = False):
    """(dx, dA, dB, dbias, dscales) of mixed_dora_forward: mixed_backward run on gc = g diag(c_a) on each slot's
    rows (c = 1 off DoRA slots; dx with dropout as in mixed_dora_ops.py), dbias from g, and dscales (n_slots + 1, N)
    fp32 (fp64 for fp64), row a = sum over DoRA slot a's rows of g z (zeros for other slots; None when z is None),
    from the pass over g for dB (the last row, the base-only rows', stays zero). dm_a = dscales[a] / n_a."""
    return _backward(g, x2, u, weight, a_stack, b_stack, ranks, scalings, dropouts, order, offsets, seed, has_dropout,
                     need_dx, need_dA, need_dB, need_dbias, scales, dora_flags, z)


def _backward(g, x2, u, weight, a_stack, b_stack, ranks, scalings, dropouts, order, offsets, seed, has_dropout,
              need_dx, need_dA, need_dB, need_dbias, scales, dora_flags, z):
    M, N = g.shape
    K = x2.shape[1]
    n_stacked, R = a_stack.shape[:2]
    if g.dtype != x2.dtype:
        g = g.to(x2.dtype)
    dora = scales is not None
    dx = torch.empty((M, K), device=g.device, dtype=g.dtype) if need_dx else None
    acc_dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    dA = torch.zeros((n_stacked, R, K), device=g.device, dtype=acc_dtype) if need_dA else None
    dB = torch.zeros((n_stacked, N, R), device=g.device, dtype=acc_dtype) if need_dB else None
    dbias = torch.zeros((N,), device=g.device, dtype=acc_dtype) if need_dbias else None
    dscales = torch.zeros(scales.shape, device=g.device, dtype=acc_dtype) if dora and z is not None else None
    slots = offsets.shape[0] - 1
    if M > 0 and (need_dx or need_dA or need_dB or need_dbias or dscales is not None):
        kind = "mixed_bwd" if not dora else "mixed_dora_drop_bwd" if has_dropout else "mixed_dora_bwd"
        kernel, fixed = _autotuned(_mixed_bwd_kernel, kind, g.dtype, rank_pad(R), _weight_kind(weight))
        dummy = g  # pointers the kernel never reads
        # accumulators not asked for: the autotuner zeroes every accumulator pointer before each trial, so those
        # get a spare buffer rather than g
        spare = torch.zeros(1, device=g.device, dtype=acc_dtype)

        def grid(meta):
            groups = triton.cdiv(triton.cdiv(K, meta["BLOCK_K"]), meta["TILES_K"])
            return ((triton.cdiv(M, meta["BLOCK_M"]) + slots) * groups,)

        (w, *wq), w_strides, wq_scalars = _weight_args(weight, dummy)
        kernel[grid](
            g, w, a_stack, b_stack, x2, u,
            dx if dx is not None else dummy, dA if dA is not None else spare,
            dB if dB is not None else spare, dbias if dbias is not None else spare,
            scales if dora else dummy, dora_flags if dora else ranks, dummy if z is None else z,
            spare if dscales is None else dscales,
            order, offsets, ranks, scalings, dropouts, *wq,
            M, N, K, R, slots,
            g.stride(0), g.stride(1), *w_strides, *a_stack.stride(), *b_stack.stride(),
            x2.stride(0), x2.stride(1), u.stride(0), u.stride(1),
            dx.stride(0) if dx is not None else 0, dx.stride(1) if dx is not None else 0,
            int(seed), wq_scalars.pop("wq_offset"), wq_scalars.pop("wq_blocksize"),
            HAS_DROPOUT=has_dropout, NEED_DX=need_dx, NEED_DA=need_dA, NEED_DB=need_dB, NEED_DBIAS=need_dbias,
            HAS_MAGNITUDE=dora, NEED_DC=dscales is not None, **wq_scalars, **_meta(g.dtype, R), **fixed,
        )
    elif need_dx:
        dx.zero_()
    return (dx,
            None if dA is None else dA.to(a_stack.dtype),
            None if dB is None else dB.to(b_stack.dtype),
            None if dbias is None else dbias.to(g.dtype),
            dscales)
