"""Shared @triton.jit helpers of the fused LoRA kernels (forward.py, backward.py, small_m.py, mixed_*.py,
and the loops they share, loops.py).

Masked tile loads and stores (of a block of rows, or of rows gathered by index), the dot with the
interpreter's bf16 workaround, atomic accumulation into fp32 buffers, the W tile (dense, or NF4 decoded
where it is loaded), the dropout mask every kernel draws from the same Philox bits and x~ = x * mask,
and the grouped program order. Also the kernel that writes that mask out (launched by dropout_mask in
launchers.py).

Triton resolves the globals of a kernel in the kernel's own module: each kernel module imports the
helpers it calls from here by name.
"""
from __future__ import annotations

import triton
import triton.language as tl


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
def _load_rows(ptr, rows, row_ok, cols, stride_rows, stride_cols, n_cols):
    """The tile at ptr[rows, cols] (rows gathered), zero where not row_ok or cols >= n_cols."""
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * stride_rows + cols[None, :] * stride_cols, mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, value, rows, row_ok, cols, stride_rows, stride_cols, n_cols):
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    tl.store(ptr + rows[:, None] * stride_rows + cols[None, :] * stride_cols, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_either(ptr, rows, row_ok, cols, stride_rows, stride_cols, n_rows, n_cols):
    """_load (row_ok None: rows < n_rows, a block of rows) or _load_rows (the rows gathered, where row_ok):
    the loops in loops.py serve the single-adapter and the segmented kernels alike."""
    if row_ok is None:
        tile = _load(ptr, rows, cols, stride_rows, stride_cols, n_rows, n_cols)
    else:
        tile = _load_rows(ptr, rows, row_ok, cols, stride_rows, stride_cols, n_cols)
    return tile


@triton.jit
def _atomic_add(ptr, value, rows, cols, n_rows, n_cols):
    """ptr[rows, cols] += value for a contiguous (n_rows, n_cols) accumulator."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.atomic_add(ptr + rows[:, None] * n_cols + cols[None, :], value, mask=mask)


@triton.jit
def _load_weight(w, offs_n, offs_k, N, K,
                 TRANSPOSED: tl.constexpr, W_NF4: tl.constexpr, W_NESTED: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """The W tile (len(offs_n), len(offs_k)), or W^T's (len(offs_k), len(offs_n)) when TRANSPOSED; zero
    outside (N, K). w is the kernel's W operand, one tuple (w_ptr, absmax_ptr, map_ptr, nested_absmax_ptr,
    nested_map_ptr, offset, blocksize, stride_wn, stride_wk); the NF4 statistics are unused for a dense W.

    With W_NF4 the tile is decoded from bitsandbytes' layout where it is loaded: element f = n K + k sits
    in byte f // 2 (high nibble first), its absmax is block f // blocksize's (decoded from the 8-bit double
    quantization with W_NESTED), and w = NF4[code] * absmax in fp32, rounded once."""
    w_ptr, absmax_ptr, map_ptr, nested_absmax_ptr, nested_map_ptr, offset, blocksize, stride_wn, stride_wk = w
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
def _dropped(x_tile, keep, keep_scale, ACC_DTYPE: tl.constexpr):
    """x~ = x * keep / (1 - p) in x's dtype, scaled in the accumulation dtype."""
    return tl.where(keep, x_tile.to(ACC_DTYPE) * keep_scale, 0.0).to(x_tile.dtype)


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
def _program_tiles(M, n_cols, n_extra_m, BLOCK_M: tl.constexpr, BLOCK_COLS: tl.constexpr, TILES: tl.constexpr,
                   GROUP_M: tl.constexpr):
    """(m tile, column group, column tiles) of this program, over cdiv(M, BLOCK_M) + n_extra_m m tiles
    (n_extra_m: n_slots for a segmented grid, else 0) and groups of TILES tiles of BLOCK_COLS columns."""
    pid = tl.program_id(0)
    num_tiles = tl.cdiv(n_cols, BLOCK_COLS)
    pid_m, pid_g = _tile_ids(pid, tl.cdiv(M, BLOCK_M) + n_extra_m, tl.cdiv(num_tiles, TILES), GROUP_M)
    return pid_m, pid_g, num_tiles


@triton.jit
def _dropout_mask_kernel(out_ptr, M, K, dropout_p, seed, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (M, K) fp32 = keep / (1 - p): the mask the fused kernels draw for ``seed``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _dropout_keep(seed, offs_m, offs_k, K, dropout_p)
    _store(out_ptr, tl.where(keep, _keep_scale(dropout_p), 0.0), offs_m, offs_k, K, 1, M, K)
