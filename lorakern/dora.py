"""DoRA (weight-decomposed LoRA) on a dense or NF4 base, as PEFT defines it, without forming B A.

    n = row norms of (W + s B A), detached (no gradient flows through n)      (N,)
    c = m / n                                                                 (N,), m the magnitude vector
    y = x W^T + b + (c - 1) (x~ W^T) + c s (x~ A^T) B^T                        x~ = dropout(x)
      = c (x W^T + s (x A^T) B^T) + b                                         without dropout (x~ = x)

The norm never forms B A: for output row i,
    n_i^2 = ||W_i||^2 + 2 s <B_i, (W A^T)_i> + s^2 B_i (A A^T) B_i^T
one N x r product W A^T and an r x r Gram matrix per call; ||W_i||^2 of a frozen base is computed once
by the layer (``row_norms_sq``) and passed in. The identity subtracts: where W_i + s (BA)_i is much smaller
than its parts its relative error grows as (||W_i|| + s ||B_i A||)^2 / n_i^2, and at 2^10 or more (a row the
adapter nearly cancels: n_i^2 could round to 0 and c = m / n to inf) that row is formed instead
(``_formed_where_cancelled``: K r multiply-adds per such row; none in a trained layer seen so far).

Importing this module attaches ``run`` to lorakern.dispatch's torch (dense, NF4) and c implementations
(``dispatch.attach_dora``), ``further_term``, which composes a further active DoRA adapter as PEFT does, and
``run_mixed`` to the torch implementations' mixed-adapter path (lorakern.mixed.run_torch with ``weight_norm``)
and to the c one (lorakern.mixed_dora_c).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from lorakern import dispatch, mixed, mixed_dora_c, native
from lorakern.errors import LorakernError
from lorakern.formulation import merged_weight, workspace_like
from lorakern.functional import (_dense_base_output, _dropped_out, _rank_r_grads_native, _rank_r_grads_torch,
                                 torch_dropout_mask)
from lorakern.native import pointer as _ptr
from lorakern.nf4 import lora as _nf4_lora  # registers the NF4 torch implementation DoRA attaches to
from lorakern.nf4.storage import NF4Storage

Weight = Union[torch.Tensor, NF4Storage]


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_norms_sq(weight: Weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """||W_i||^2 for every output row i, in ``dtype`` (default fp32, fp64 for an fp64 weight; an NF4 weight
    decoded chunk by chunk)."""
    if dtype is None:
        dtype = torch.float32 if isinstance(weight, NF4Storage) else _accumulation(weight.dtype)
    with torch.no_grad():
        if isinstance(weight, NF4Storage):
            out = torch.empty(weight.shape[0], dtype=dtype, device=weight.packed_storage.device)
            for r0, chunk in weight.row_chunks(dtype):
                out[r0:r0 + chunk.shape[0]] = chunk.square().sum(dim=1)
            return out
        return weight.detach().to(dtype).square().sum(dim=1)


_CHUNK_ELEMENTS = 1 << 20  # rows of a half-precision W up-cast at a time (4 MB of fp32)


def _weight_At(weight: Weight, lora_A: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W A^T (N x r) in ``dtype`` (fp32 or fp64), accumulated in it: a half-precision W is up-cast a chunk
    of rows at a time, since W A^T rounded to bf16 would round away the norm's cross term."""
    A_t = lora_A.to(dtype).t()
    if isinstance(weight, NF4Storage):
        out = A_t.new_empty(weight.shape[0], lora_A.shape[0])
        for r0, chunk in weight.row_chunks(dtype):
            torch.mm(chunk, A_t, out=out[r0:r0 + chunk.shape[0]])
        return out
    if weight.dtype == dtype:
        return weight @ A_t
    out = A_t.new_empty(weight.shape[0], lora_A.shape[0])
    step = max(1, _CHUNK_ELEMENTS // max(weight.shape[1], 1))
    for r0 in range(0, weight.shape[0], step):
        torch.mm(weight[r0:r0 + step].to(dtype), A_t, out=out[r0:r0 + step])
    return out


def _base_mm(x2: torch.Tensor, weight: Weight) -> torch.Tensor:
    """x W^T (M x N), a new tensor."""
    if isinstance(weight, NF4Storage):
        out = x2.new_empty(x2.shape[0], weight.shape[0])
        for r0, chunk in weight.row_chunks(x2.dtype):
            torch.mm(x2, chunk.t(), out=out[:, r0:r0 + chunk.shape[0]])
        return out
    return x2 @ weight.t()


def _add_base_grad(out: Optional[torch.Tensor], g: torch.Tensor, weight: Weight) -> torch.Tensor:
    """out + g W (M x K), accumulated into ``out`` in place (a new tensor when out is None)."""
    if isinstance(weight, NF4Storage):
        out = g.new_zeros(g.shape[0], weight.shape[1]) if out is None else out
        for r0, chunk in weight.row_chunks(g.dtype):
            out.addmm_(g[:, r0:r0 + chunk.shape[0]], chunk)
        return out
    return g @ weight if out is None else out.addmm_(g, weight)


def _norm_operands_f32(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                       base_norm_sq: Optional[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """What the C kernels that compute the norm take (dora_norm_f32, dora_merge_f32): W, A, B detached and
    contiguous, ||W_i||^2 (the cached one when given) and the Gram matrix A A^T, all fp32."""
    w2 = row_norms_sq(weight, torch.float32) if base_norm_sq is None else base_norm_sq.to(torch.float32)
    A = lora_A.detach().contiguous()
    return weight.detach().contiguous(), A, lora_B.detach().contiguous(), w2.contiguous(), A @ A.t()


def weight_norm(weight: Weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                base_norm_sq: Optional[torch.Tensor] = None, library=None) -> torch.Tensor:
    """n_i = ||W_i + s (B A)_i|| without forming B A (module docstring), detached, in fp32 (fp64 for fp64
    operands). ``base_norm_sq``: the cached ||W_i||^2 (computed here when None). ``library``: the C kernels
    (lorakern.native), which take a dense fp32 W in one pass over its rows (dora_norm_f32)."""
    with torch.no_grad():
        acc = _accumulation(lora_A.dtype)
        A, B = lora_A.detach(), lora_B.detach()
        if library is not None and isinstance(weight, torch.Tensor) and acc == torch.float32 and \
                weight.dtype == A.dtype == B.dtype == torch.float32:
            W, A, B, w2, gram = _norm_operands_f32(weight, A, B, base_norm_sq)  # named: they outlive the call
            norm = torch.empty_like(w2)
            cancelled = library.dora_norm_f32(_ptr(W), _ptr(A), _ptr(B), _ptr(w2), _ptr(gram), scaling, W.shape[0],
                                              W.shape[1], A.shape[0], _ptr(norm), torch.get_num_threads())
            # the C pass flags the rows that cancelled (norm -1) by the same test as _formed_where_cancelled
            return norm if not cancelled else _formed_rows(norm, (norm < 0).nonzero().flatten(), W, A, B, scaling)
        w2 = row_norms_sq(weight, acc) if base_norm_sq is None else base_norm_sq.to(acc)
        WA = _weight_At(weight, A, acc)
        A, B = A.to(acc), B.to(acc)
        gram = A @ A.t()
        # ||W_i||^2 + 2 s <B_i, (W A^T)_i> + s^2 B_i (A A^T) B_i^T
        n2 = w2 + (2.0 * scaling) * (B * WA).sum(dim=1) + (scaling * scaling) * ((B @ gram) * B).sum(dim=1)
        return _formed_where_cancelled(n2.clamp_min_(0.0).sqrt_(), weight, A, B, w2, gram, scaling)[0]


CANCELLATION_LIMIT = 2.0 ** -10  # n_i^2 below this share of its parts' size: the row is formed (lora_cpu/dora.h
# applies the same limit, DORA_CANCELLATION_LIMIT, in its own pass)


def _formed_where_cancelled(norm: torch.Tensor, weight: Weight, A: torch.Tensor, B: torch.Tensor,
                            w2: torch.Tensor, gram: torch.Tensor, scaling: float
                            ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(norm with the rows where the identity cancelled formed instead, those rows' indices or None).

    The identity's terms are bounded (Cauchy-Schwarz: |(W A^T)_ij| <= ||W_i|| ||A_j||, |G_jk| <= ||A_j|| ||A_k||)
    by size_i = (||W_i|| + |s| sum_j |B_ij| ||A_j||)^2, from w2 and diag(A A^T) in O(N r); its rounding error is
    a few units of size_i. Where n_i^2 <= CANCELLATION_LIMIT size_i, n_i = ||W_i + s B_i A|| from the formed row
    (fp32 at least; an NF4 base decoded). Under torch.compile such a row keeps the identity's n_i, floored at
    sqrt(CANCELLATION_LIMIT size_i)."""
    size = (w2.to(norm.dtype).sqrt() + abs(scaling) * (B.abs().to(norm.dtype) @ gram.diagonal().to(norm.dtype)
                                                         .clamp_min(0.0).sqrt())).square()
    if torch.compiler.is_compiling():
        # no data-dependent branch inside a graph: a cancelled row keeps the identity's value, floored where it
        # rounded to 0 so that c stays finite (eager forms the row)
        return torch.maximum(norm, (CANCELLATION_LIMIT * size).sqrt()), None
    cancelled = norm.square() <= CANCELLATION_LIMIT * size
    if not bool(cancelled.any()):
        return norm, None
    rows = cancelled.nonzero().flatten()
    return _formed_rows(norm, rows, weight, A, B, scaling), rows


def _formed_rows(norm: torch.Tensor, rows: torch.Tensor, weight: Weight, A: torch.Tensor, B: torch.Tensor,
                 scaling: float) -> torch.Tensor:
    """``norm`` with rows ``rows`` replaced by ||W_i + s B_i A|| of the formed rows (K r multiply-adds each)."""
    formed = _weight_rows(weight, rows, norm.dtype) + scaling * (B[rows].to(norm.dtype) @ A.to(norm.dtype))
    norm = norm.clone()
    norm[rows] = torch.linalg.vector_norm(formed, dim=1)
    return norm


def _weight_rows(weight: Weight, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``rows`` of the (out, in) base weight in ``dtype`` (an NF4 base decoded chunk by chunk)."""
    if not isinstance(weight, NF4Storage):
        return weight.detach()[rows].to(dtype)
    out = torch.empty(rows.numel(), weight.shape[1], dtype=dtype, device=rows.device)
    for r0, chunk in weight.row_chunks(dtype):
        inside = (rows >= r0) & (rows < r0 + chunk.shape[0])
        if bool(inside.any()):
            out[inside] = chunk[rows[inside] - r0]
    return out


class DoraLinearFunction(torch.autograd.Function):
    """y = c (x W^T + s u B^T) + b, u = x A^T (no dropout), or with x~ = dropout(x) on the LoRA branch
    y = x W^T + b + c z~ - x~ W^T,  z~ = x~ W^T + s u B^T,  u = x~ A^T; c = m / n, n detached.

    Derivation, with g = dL/dy (M, N) and gc = g diag(c) (each column scaled by c):
        y depends on m only through c = m / n (n a constant):   dL/dm_j = sum_i g_ij z_ij / n_j
        through u = x~ A^T and the term c s u B^T:  dL/du = s gc B
            dL/dA = s (gc B)^T x~          dL/dB = s gc^T u
        through x~ W^T (dropout on: coefficient c - 1):  dL/dx~ = (gc - g) W + s (gc B) A
        through x W^T (coefficient 1 with dropout, c without):
            with dropout: dL/dx = g W (and autograd carries dL/dx~ back through the mask)
            without:      dL/dx = gc W + s (gc B) A       (x~ = x: both terms land on x)
        dL/db = sum_rows g
    So the backward is plain LoRA's backward (lorakern.functional) run on gc, plus dm. Saved: x~ (for dA),
    u (for dB), z (M x N, for dm), c, n.
    On the fp32 CPU path with at least as many rows as input features (``folds_scale``) the call runs
    merged and gc is never formed: y = x (diag(c) (W + s B A))^T + b in one GEMM, gc (W + s B A) = g diag(c)
    (W + s B A) and gc B = g (diag(c) B) (_folded_forward_native, _folded_grads_native); dm then reads y itself,
    z = (y - b) / c, and recomputes z for the columns where y kept too few of its bits
    (_magnitude_grad_from_output): no second M x N tensor and no pass over y in the forward.
    The base weight is frozen (DoRA trains A, B and m).
    """

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_A, lora_B, magnitude, scaling: float, base_norm_sq, library):
        in_features = x.shape[-1]
        x2 = x.reshape(-1, in_features)
        separate = x_lora is not None
        xl2 = x_lora.reshape(-1, in_features) if separate else x2
        need_m = ctx.needs_input_grad[6]
        # the fp32 CPU path runs merged with c folded in (see folds_scale): no u, no B^T in the forward
        folded = library is not None and not separate and folds_scale(x2.shape[0], in_features)
        if folded:
            # n, c = m / n and diag(c) W' in one pass over W, then y = x (diag(c) W')^T + b: one GEMM
            norm, scale, y = _folded_forward_native(library, x2, weight, bias, lora_A, lora_B, magnitude, scaling,
                                                    base_norm_sq)
            u = z = None
        else:
            norm = weight_norm(weight, lora_A, lora_B, scaling, base_norm_sq, library)
            scale = (magnitude.detach().to(norm.dtype) / norm).to(x.dtype)  # c
            if library is not None and not separate:
                u, z, y = _forward_native(library, x2, weight, bias, lora_A, lora_B, scale, scaling, need_m)
            else:
                B_t = lora_B.t().contiguous()
                # u = x~ A^T;  z = x~ W^T + s u B^T
                u = xl2 @ lora_A.t()
                base_lora = _base_mm(xl2, weight)
                z = torch.addmm(base_lora, u, B_t, alpha=scaling) if separate else base_lora.addmm_(u, B_t, alpha=scaling)
                if separate:
                    # y = x W^T + b + c z~ - x~ W^T
                    y = _base_mm(x2, weight)
                    if bias is not None:
                        y.add_(bias)
                    y.addcmul_(z, scale).sub_(base_lora)
                elif need_m:
                    # y = c z + b (z kept for dm)
                    y = torch.addcmul(bias, z, scale) if bias is not None else z * scale
                else:
                    # nothing needs z: scaled in place
                    y = z.mul_(scale) if bias is None else z.mul_(scale).add_(bias)
                    z = None
        ctx.weight = weight if isinstance(weight, NF4Storage) else None
        ctx.scaling, ctx.x_shape, ctx.separate, ctx.has_bias = scaling, x.shape, separate, bias is not None
        ctx.library, ctx.m_dtype, ctx.folded = library, magnitude.dtype, folded
        # folded with m trained: y itself is kept for dm (z = (y - b) / c), not a second M x N tensor. A detached
        # alias shares y's version counter, so a write into y after this call is seen (dm then recomputes z)
        # instead of failing the backward as a saved output would; it holds no reference to this node.
        out = dispatch.function_output(y, x.shape[:-1])
        ctx.output = out.detach() if folded and need_m else None
        ctx.output_version = None if ctx.output is None else ctx.output._version
        needs = ctx.needs_input_grad
        # x~ for dA, after a folded forward (no u) for the u that dB needs, and for z where dm recomputes it
        ctx.save_for_backward(xl2 if needs[4] or (folded and (needs[5] or need_m)) else None,
                              u if needs[5] else None, z if need_m else None,
                              None if isinstance(weight, NF4Storage) else weight, lora_A, lora_B, scale, norm,
                              bias if folded and need_m else None)
        return out

    @staticmethod
    def backward(ctx, grad_y):
        x_lora, u, z, dense_weight, lora_A, lora_B, scale, norm, bias = ctx.saved_tensors
        weight = ctx.weight if ctx.weight is not None else dense_weight
        need_x, need_xl, _, need_b, need_A, need_B, need_m = ctx.needs_input_grad[:7]
        g = grad_y.reshape(-1, lora_B.shape[0])
        if ctx.folded:
            g = g.contiguous()  # an expanded gradient (from .sum()) has stride 0
            y = ctx.output
            intact = need_m and _output_intact(y, ctx.output_version)
            shift = (bias if bias is not None else g.new_zeros(g.shape[1])) if intact else None
            dx, dA, dB, sums = _folded_grads_native(ctx.library, g, x_lora, y.view(g.shape) if intact else None,
                                                    shift, weight, lora_A, lora_B, scale, ctx.scaling, need_x,
                                                    need_A, need_B)
            dm = _magnitude_grad_from_output(g, x_lora, weight, lora_A, lora_B, ctx.scaling, scale, norm,
                                             sums).to(ctx.m_dtype) if need_m else None
            db = g.sum(dim=0) if need_b and ctx.has_bias else None
            return None if dx is None else dx.reshape(ctx.x_shape), None, None, db, dA, dB, dm, None, None, None
        if ctx.library is not None:
            # gc = g diag(c) and gz = sum_rows(g * z) in one pass over g (lora_cpu.c, dora_scale_grad_f32)
            g = g.contiguous()  # an expanded gradient (from .sum()) has stride 0
            gc, gz = _scale_grad_native(ctx.library, g, z if need_m else None, scale)
        else:
            # gc = g diag(c)
            gc = g * scale
            gz = (g * z).sum(dim=0, dtype=norm.dtype) if need_m else None
        want_term = need_xl or (need_x and not ctx.separate)
        rank_r = _rank_r_grads_native if ctx.library is not None else _rank_r_grads_torch
        term, dA, dB = rank_r(ctx.library, gc, x_lora, u, lora_A, lora_B, ctx.scaling, want_term, need_A, need_B)
        dx = dxl = dm = db = None
        if ctx.separate:
            if need_x:
                # dx = g W
                dx = _add_base_grad(None, g, weight).reshape(ctx.x_shape)
            if need_xl:
                # dx~ = s (gc B) A + (gc - g) W
                dxl = _add_base_grad(term, gc - g, weight).reshape(ctx.x_shape)
        elif need_x:
            # dx = s (gc B) A + gc W: the base GEMM accumulates onto the rank-r term
            dx = _add_base_grad(term, gc, weight).reshape(ctx.x_shape)
        if need_m:
            # dm_j = sum_i g_ij z_ij / n_j
            dm = (gz.to(norm.dtype) / norm).to(ctx.m_dtype)
        if need_b and ctx.has_bias:
            db = g.sum(dim=0)
        return dx, dxl, None, db, dA, dB, dm, None, None, None


def _output_intact(y: torch.Tensor, version: int) -> bool:
    """Whether the kept output y still holds what the forward wrote (no in-place write since: its version)."""
    return y._version == version


def _folded_forward_native(library, x2, weight, bias, lora_A, lora_B, magnitude, scaling, base_norm_sq):
    """The fp32 CPU forward with c folded in (folds_scale: at least as many rows as input features). Returns
    (n, c, y). One C pass over the rows of W computes their W A^T, n (the formula in weight_norm), c = m / n
    and diag(c) W', W' = W + s B A, into this thread's workspace (lora_cpu.c, dora_merge_f32: N K r
    multiply-adds, cheaper here than the M N r rank-r term; W is read once, not once for n and again for W'):
        y = x (diag(c) W')^T + b                  one GEMM, no pass over y, no z: dm reads y (z = (y - b) / c)
    with no u: the backward forms u from x in the pass that reads x for dA."""
    (out_features, in_features), r = weight.shape, lora_A.shape[0]
    with torch.no_grad():
        W, A, B, w2, gram = _norm_operands_f32(weight, lora_A, lora_B, base_norm_sq)  # named: they outlive the call
        m = magnitude.detach().to(torch.float32).contiguous()
        norm, scale = torch.empty_like(w2), torch.empty_like(w2)
        merged = workspace_like(W)  # a workspace: nothing may hold it past this call
        cancelled = library.dora_merge_f32(_ptr(W), _ptr(A), _ptr(B), _ptr(w2), _ptr(gram), _ptr(m), scaling,
                                           out_features, in_features, r, _ptr(norm), _ptr(scale), _ptr(merged),
                                           torch.get_num_threads())
        if cancelled:  # rows whose norm cancelled (-1, c 0): formed, then their c and diag(c) W'
            rows = (norm < 0).nonzero().flatten()
            norm = _formed_rows(norm, rows, W, A, B, scaling)
            scale[rows] = m[rows] / norm[rows]
            merged[rows] = scale[rows, None] * (W[rows] + scaling * (B[rows] @ A))
    # y = x (diag(c) W')^T + b: as the frozen layer's GEMM (the caller keeps y when m trains)
    y = torch.addmm(bias, x2, merged.t()) if bias is not None else x2 @ merged.t()
    return norm, scale, y


def _forward_native(library, x2, weight, bias, lora_A, lora_B, scale, scaling, need_m):
    """The fp32 CPU forward with fewer rows than input features. Returns (u, z or None, y); z is kept only
    when m trains. BLAS writes x W^T and one C pass over the rows computes u = x A^T and finishes
    y = c (x W^T + s u B^T) + b (lora_cpu.c, dora_forward_f32): the magnitude scale costs no pass of its own."""
    rows, (out_features, r) = x2.shape[0], (weight.shape[0], lora_A.shape[0])
    b = None if bias is None else bias.contiguous()
    c = scale.contiguous()
    x2, A, B = x2.contiguous(), lora_A.contiguous(), lora_B.contiguous()  # named: the copies outlive the call
    z = torch.mm(x2, weight.t())
    y = x2.new_empty(rows, out_features) if need_m else z
    u = x2.new_empty(rows, r)
    library.dora_forward_f32(_ptr(x2), _ptr(A), _ptr(B), _ptr(b), _ptr(c), scaling, rows, x2.shape[1],
                             out_features, r, _ptr(u), _ptr(z), _ptr(y), int(need_m), torch.get_num_threads())
    return u, (z if need_m else None), y


def folds_scale(rows: int, in_features: int) -> bool:
    """Whether the fp32 CPU path runs merged with c folded into the operands (W + s B A and diag(c) B, N K r
    multiply-adds per call, in a workspace) rather than through u and a scaled M x N operand (z in the
    forward, g in the backward, M N r for the rank-r term): when there are at least as many rows as input
    features."""
    return rows >= in_features


def _folded_grads_native(library, g, x_lora, y, shift, weight, lora_A, lora_B, scale, scaling, need_x, need_A,
                         need_B):
    """The fp32 CPU backward after a folded forward, without forming gc = g diag(c). With B_c = diag(c) B
    and W'' = diag(c) (W + s B A):
        dx = gc (W + s B A) = g W''          gc B = g B_c          gc^T u = diag(c) g^T u
    so plain LoRA's C backward runs on g with B_c and no u (it forms u = x~ A^T from each chunk of x~
    before its dB): dA = s (g B_c)^T x~, P = s u^T g, dB = diag(c) P^T; dx one GEMM on W'' (this thread's
    workspace). Given the kept output y and shift = b, the pass that computes P also sums, while the rows of g
    are in cache, sums (3 x N) = sum_rows(g (y - b)), sum_rows(|g| (|y| + |b|)), sum_rows(|g (y - b)|)
    (lora_cpu.c, dora_backward_f32). Returns (dx, dA, dB, sums or None)."""
    (rows, N), (r, K) = g.shape, lora_A.shape
    threads = torch.get_num_threads()
    c = scale.contiguous()
    dA = lora_A.new_empty(r, K) if need_A else None
    dB_t = lora_B.new_empty(r, N) if need_B else None
    sums = g.new_empty(3, N) if y is not None else None
    if need_A or need_B or y is not None:
        scratch = g.new_empty(library.dora_backward_scratch(K, N, r, threads))
        # named, so that every contiguous copy outlives the call that reads it
        x_lora = x_lora.contiguous() if need_A or need_B else None
        A, Bc_t = lora_A.contiguous(), (lora_B * c[:, None]).t().contiguous()
        y, shift = (None, None) if y is None else (y.contiguous(), shift.contiguous())
        library.dora_backward_f32(_ptr(g), _ptr(x_lora), None, _ptr(A), _ptr(Bc_t), scaling, rows, K, N, r, None,
                                  _ptr(dA), _ptr(dB_t), _ptr(y), _ptr(shift), _ptr(sums), _ptr(scratch), threads)
    # dB = diag(c) P^T: the columns of P = s u^T g scaled
    dB = (dB_t * c).t() if need_B else None
    dx = None
    if need_x:
        # dx = g diag(c) (W + s B A)
        dx = g @ merged_weight(weight, lora_B, lora_A, scaling, library, c)
    return dx, dA, dB, sums


# A column of dm is recomputed from z when the rounding y - b carries exceeds this many times its size: there
# y = c z + b kept few of z's bits (c_j near 0, or b_j far larger than c_j z_j). At most 8x the error of z itself.
RECOMPUTE_RATIO = 8.0


def _magnitude_grad_from_output(g, x_lora, weight, lora_A, lora_B, scaling, scale, norm, sums) -> torch.Tensor:
    """dm_j = sum_i g_ij z_ij / n_j after a folded forward that kept y = c z + b, not z.

    From the backward's sums (``_folded_grads_native``), z = (y - b) / c:  dm_j = sum_i g_ij (y_ij - b_j) / (c_j n_j).
    y - b has lost what y's rounding lost, eps (|y| + |b|) per entry against z's own eps |c z|: a column whose
    bound sum_rows(|g| (|y| + |b|)) exceeds RECOMPUTE_RATIO x sum_rows(|g (y - b)|), or whose c_j is 0, takes
    z_j = x W'_j^T instead (a GEMM over those columns of W' = W + s B A only). ``sums`` None (y was written in
    place after the forward): every column from z = x W'^T."""
    if sums is None:
        columns = torch.arange(norm.shape[0])
        dm = norm.new_empty(norm.shape)
    else:
        signed, bound, size = sums
        dm = signed.to(norm.dtype) / (scale.to(norm.dtype) * norm)
        columns = ((bound > RECOMPUTE_RATIO * size) | (scale == 0)).nonzero().squeeze(1)
    if columns.numel():
        # z_J = x W'_J^T for the columns J
        z = x_lora @ merged_weight(weight, lora_B, lora_A, scaling).index_select(0, columns).t()
        dm[columns] = (g.index_select(1, columns) * z).sum(dim=0, dtype=norm.dtype) / norm[columns]
    return dm


def _scale_grad_native(library, g, z, scale):
    rows, out_features = g.shape
    threads = torch.get_num_threads()
    gc = torch.empty_like(g)
    gz = g.new_empty(out_features) if z is not None else None
    partial = g.new_empty(threads * out_features if z is not None else 0)
    library.dora_scale_grad_f32(_ptr(g), _ptr(z), _ptr(scale.contiguous()), rows, out_features, _ptr(gc), _ptr(gz),
                                _ptr(partial), threads)
    return gc, gz


def check_frozen_base(weight: Weight) -> None:
    """DoRA trains A, B and m on a frozen base (every implementation's gradients assume it)."""
    if isinstance(weight, torch.Tensor) and weight.requires_grad:
        raise LorakernError("DoRA here trains A, B and the magnitude on a frozen base, but the base weight requires "
                            "grad; freeze it (weight.requires_grad_(False)) or use plain LoRA")


def run(call, library=None) -> torch.Tensor:
    """The DoRA forward for a dispatch Call with a magnitude (dense or NF4 base)."""
    check_frozen_base(call.weight)
    x_lora = _dropped_out(call.x, call.dropout_p, call.seed)
    # without grad mode no backward follows: a detached m tells the forward that nothing needs z
    magnitude = call.magnitude if torch.is_grad_enabled() else call.magnitude.detach()
    return DoraLinearFunction.apply(call.x, x_lora, call.weight, call.bias, call.lora_A, call.lora_B, magnitude,
                                    call.scaling, call.base_norm_sq, library)


def further_term(y: torch.Tensor, x: torch.Tensor, weight: Weight, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                 lora_B: torch.Tensor, scaling: float, dropout_p: float, magnitude: torch.Tensor,
                 base_norm_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A further active DoRA adapter on top of y (the base and the adapters before it), as PEFT composes
    them: y + (c - 1) (y - b) + c s (x A^T) B^T without dropout (it scales everything before it), and
    y + (c - 1) (x~ W^T) + c s (x~ A^T) B^T with x~ = dropout(x). Plain torch; autograd differentiates it."""
    norm = weight_norm(weight, lora_A, lora_B, scaling, base_norm_sq)
    scale = (magnitude.to(norm.dtype) / norm).to(y.dtype)
    lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    if dropout_p > 0:
        x_lora = torch.nn.functional.dropout(x, dropout_p, training=True)
        base_part = _base_mm(x_lora.reshape(-1, x.shape[-1]), weight).reshape(y.shape)
    else:
        x_lora = x
        base_part = y - bias if bias is not None else y
    return y + (scale - 1) * base_part + scale * ((x_lora @ lora_A.t()) @ lora_B.t() * scaling)


def run_mixed(call, base_output=None) -> torch.Tensor:
    """A mixed-adapter call with DoRA slots (dispatch.MixedCall.magnitudes) on the torch path: lorakern.mixed's
    grouped terms, each DoRA slot scaled by its c = m / weight_norm (autograd differentiates them); without
    ``base_output``, on the fp32 CPU C path (lorakern.mixed_dora_c, the norms by weight_norm's C branch)."""
    check_frozen_base(call.weight)
    if base_output is None:
        return mixed_dora_c.run_mixed(call, weight_norm)
    return mixed.run_torch(call, base_output, torch_dropout_mask, weight_norm)


dispatch.attach_dora({("torch", "dense"): lambda call: run(call, None),
                      ("c", "dense"): lambda call: run(call, native.lora_library()),
                      ("torch", "nf4"): run}, further_term,
                     {("torch", "dense"): lambda call: run_mixed(call, _dense_base_output),
                      ("torch", "nf4"): lambda call: run_mixed(call, _nf4_lora._base_output),
                      ("c", "dense"): run_mixed})

__all__ = ["DoraLinearFunction", "check_frozen_base", "further_term", "row_norms_sq", "run", "run_mixed",
           "weight_norm"]
