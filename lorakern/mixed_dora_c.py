"""The C implementation of a mixed-adapter batch with DoRA slots on a dense base (fp32, CPU): plain-LoRA rows,
DoRA rows and base-only rows in one pass over the rows grouped by slot (lorakern/native/lora_cpu.c,
``dora_mixed_*`` beside the plain ``lora_mixed_*`` kernels this reuses for the backward's rank-r products).

PEFT's DoRA per DoRA slot a, with n_a = ||W + s_a B_a A_a|| (row norms, detached) and c_a = m_a / n_a:

    y_i = c_a (x_i W^T + s_a (x_i A_a^T) B_a^T) + b                       row i of DoRA slot a (no dropout)
    y_i = x_i W^T + b + (c_a - 1) (x~_i W^T) + c_a s_a (x~_i A_a^T) B_a^T    row i of DoRA slot a with dropout
    y_i = x_i W^T + s_a (x~_i A_a^T) B_a^T + b                            row i of plain slot a
    y_i = x_i W^T + b                                                     a base-only row

The norm is the single-adapter C norm (lorakern.dora.weight_norm: W A_a^T and A_a A_a^T, no B A), once per
DoRA slot that has rows in the call. Dropout: each row's mask with its slot's p from one torch.rand
(lorakern.mixed_c.mixed_dropout); a DoRA slot that drops out pays PEFT's second base product x~ W^T on its
rows (one GEMM over the gathered rows of every such slot). A mixed call without DoRA slots never comes here
(lorakern.mixed_c, unchanged).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from lorakern import dispatch, mixed_c, native
from lorakern.mixed_c import _addresses, _Plan, _slots_in, _transposed
from lorakern.native import pointer as _ptr


class _DoraSlots:
    """Per slot: n_a and c_a (fp32, (N,)) for a DoRA slot with rows in this call, else None (a DoRA slot without
    rows gets no norm: its magnitude's gradient is zero); ``dropped``: the DoRA slots with rows whose dropout is
    on; ``counts`` the host segment sizes."""

    def __init__(self, norms: list, scales: list, p: Sequence[float], counts: Sequence[int]) -> None:
        self.norms, self.scales, self.counts = norms, scales, tuple(counts)
        self.dropped = [a for a, (c, p_a) in enumerate(zip(scales, p)) if c is not None and p_a > 0]
        self.starts = [sum(self.counts[:a]) for a in range(len(self.counts))]

    def rows(self, order: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
        """The rows of x of ``slots``, slot after slot (each in its segment's order)."""
        return torch.cat([order[self.starts[a]:self.starts[a] + self.counts[a]] for a in slots])


def slot_scales(call: Any, norm: Callable) -> tuple[list, list]:
    """([n_a], [c_a]) per slot: the detached row norms of W + s_a B_a A_a and c_a = m_a / n_a (fp32) for each
    DoRA slot with rows, None elsewhere. ``norm(weight, A, B, s, base_norm_sq)`` computes n."""
    norms, scales = [], []
    for adapter, magnitude, count in zip(call.adapters, call.magnitudes, call.counts):
        if adapter is None or magnitude is None or count == 0:
            norms.append(None)
            scales.append(None)
            continue
        n = norm(call.weight, adapter[0], adapter[1], adapter[2], call.base_norm_sq)
        norms.append(n)
        scales.append((magnitude.detach().to(n.dtype) / n).to(torch.float32).contiguous())
    return norms, scales


def _slot_blocks(buffer: torch.Tensor, keep: Sequence[bool], counts: Sequence[int]) -> list:
    """Each kept slot's rows of a buffer holding one row per row of the kept slots (slot after slot, each in its
    segment's order: z, v), None for the other slots."""
    out, start = [], 0
    for kept, count in zip(keep, counts):
        out.append(buffer[start:start + count] if kept else None)
        start += count if kept else 0
    return out


class MixedDoraFunction(torch.autograd.Function):
    """y as in the module docstring, with a hand-written backward.

    Derivation, g = dL/dy (M, N). Row i of DoRA slot a: y_i = c_a z_i + b, z_i = x_i W^T + s_a u_i B_a^T,
    u_i = x_i A_a^T, c_a = m_a / n_a with n_a a constant (detached, as PEFT):
        dL/dm_a = sum_{i in a} g_i z_i / n_a                            (elementwise, per column)
        dL/dz_i = c_a g_i =: g'_i
    so z_i's inputs see g'_i as a plain row's terms see g_i. With g' = g on every other row:
        dL/dx_i  = g'_i W + s_a (g'_i B_a) A_a    (the second term through x~ when x~ is not x; base rows: g_i W)
        dL/dA_a  = s_a sum_{i in a} (g'_i B_a)^T x~_i        dL/dB_a = s_a sum_{i in a} g'^T_i u_i
        dL/db    = sum_i g_i                                   (the bias is outside c_a: unscaled g)
    That is the plain mixed backward (lorakern.mixed_c, ``rank_r_grads``) run on g', plus dm and db from g.
    A DoRA slot a that drops out: y_i = x_i W^T + b + c_a z_i - v_i with v_i = x~_i W^T, z_i = v_i + s_a u_i B_a^T,
    u_i = x~_i A_a^T. dm_a, dA_a, dB_a as above (z_i the dropped one); x_i W^T is unscaled and v_i enters with
    c_a - 1:
        dL/dx_i = g_i W          dL/dx~_i = (g'_i - g_i) W + s_a (g'_i B_a) A_a    (autograd: through the mask)
    so those rows keep g_i in the matrix the GEMM for dx reads, and the rank-r products take c_a from the
    factors instead: g'_i B_a = g_i (diag(c_a) B_a), s_a sum u_i^T g'_i = (s_a sum u_i^T g_i) diag(c_a).
    Forward: BLAS writes x W^T (and v on the dropped slots' rows), then one C pass adds each row's rank-r term
    and, on DoRA rows, keeps z (for a magnitude that trains) and scales by c_a, then adds b. Backward: one C
    pass forms g' and every sum_{i in a} g_i z_i, the mixed C backward runs on g', the base GEMM accumulates
    g' W onto dx (and ((c_a - 1) g_i) W onto dx~ of the dropped slots' rows).
    The base weight is frozen (DoRA trains A, B and m; lorakern.dora.check_frozen_base).
    """

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, plan: _Plan, library, slots: _DoraSlots, *factors):
        K, N = x.shape[-1], weight.shape[0]
        x2 = x.reshape(-1, K).contiguous()
        xl2 = x2 if x_lora is None else x_lora.reshape(-1, K).contiguous()
        rows, n = x2.shape[0], len(plan.present)
        A = [factors[3 * a].contiguous() if plan.present[a] else None for a in range(n)]
        B_t = _transposed(library, plan, [factors[3 * a + 1] if plan.present[a] else None for a in range(n)], N)
        need_m = ctx.needs_input_grad[7 + 2::3]
        # z of a DoRA slot whose magnitude trains (dm needs it), its rows' block of one buffer
        keep = [c is not None and need for c, need in zip(slots.scales, need_m)]
        z = x2.new_empty(sum(count for kept, count in zip(keep, slots.counts) if kept), N)
        b = None if bias is None else bias.contiguous()
        u = x2.new_empty(rows, plan.r_max)
        # y = x W^T (no bias: c_a scales the base product, not b)
        y = torch.mm(x2, weight.t())
        v_blocks, dropped_rows = [None] * n, None
        if slots.dropped:
            # v_i = x~_i W^T on the rows of the DoRA slots that drop out: PEFT's second base product
            dropped_rows = slots.rows(plan.order, slots.dropped)
            v_blocks = _slot_blocks(torch.mm(xl2.index_select(0, dropped_rows), weight.t()),
                                 [a in slots.dropped for a in range(n)], slots.counts)
        # per row: u_i = x~_i A_a^T; plain: y_i += s_a u_i B_a^T + b;
        # DoRA: z_i = y_i + s_a u_i B_a^T, y_i = c_a z_i + b;
        # DoRA dropping out: z_i = v_i + s_a u_i B_a^T, y_i += c_a z_i - v_i + b
        library.dora_mixed_forward_f32(
            _ptr(xl2), _ptr(plan.order), _ptr(plan.offsets), n, _addresses(A), _slots_in(B_t, plan, N), plan.ranks,
            plan.scaling, _addresses(slots.scales), _addresses(v_blocks), _ptr(b), rows, K, N, plan.r_max, _ptr(u),
            _ptr(y), _addresses(_slot_blocks(z, keep, slots.counts)), torch.get_num_threads(),
        )
        ctx.dropped_rows = dropped_rows
        ctx.plan, ctx.library, ctx.slots, ctx.keep, ctx.x_shape = plan, library, slots, keep, x.shape
        ctx.lora_separate, ctx.has_bias = x_lora is not None, bias is not None
        ctx.m_dtypes = [None if m is None else m.dtype for m in factors[2::3]]
        ctx.save_for_backward(xl2, u, weight, B_t, z, *A)  # A[a] None: no adapter
        return dispatch.function_output(y, x.shape[:-1])

    @staticmethod
    def backward(ctx, grad_y):
        plan, library, slots = ctx.plan, ctx.library, ctx.slots
        xl2, u, weight, B_t, z, *A = ctx.saved_tensors
        n = len(plan.present)
        need_x, need_xl, _, need_b = ctx.needs_input_grad[:4]
        needs = ctx.needs_input_grad[7:]
        g = grad_y.reshape(-1, weight.shape[0]).contiguous()  # an expanded gradient (from .sum()) has stride 0
        rows, N = g.shape
        threads = torch.get_num_threads()
        gc = torch.empty_like(g)
        gz = [g.new_empty(N) if kept else None for kept in ctx.keep]
        gz_addr = _addresses(gz)
        scratch = g.new_empty(library.dora_mixed_scale_grad_scratch(N, gz_addr, n, threads))
        scaled = [None if a in slots.dropped else c for a, c in enumerate(slots.scales)]
        # g'_i = c_a g_i on DoRA rows (g_i elsewhere, and on the rows of DoRA slots that drop out); gz_a = sum g_i z_i
        library.dora_mixed_scale_grad_f32(
            _ptr(g), _ptr(plan.order), _ptr(plan.offsets), n, _addresses(scaled),
            _addresses(_slot_blocks(z, ctx.keep, slots.counts)), rows, N, _ptr(gc), gz_addr, _ptr(scratch), threads,
        )
        if slots.dropped:
            # the slots that drop out: g'_i B_a = g_i (diag(c_a) B_a), their B_a^T blocks scaled by column
            B_t = B_t.clone()
            for a in slots.dropped:
                start = plan.bt_offset[a] * N
                B_t[start:start + A[a].shape[0] * N].view(-1, N).mul_(slots.scales[a])
        want_term = need_xl or (need_x and not ctx.lora_separate)
        # the plain mixed backward on g': s_a (g' B_a) A_a per row, dA_a, dB_a^T
        term, dA, dB_t = mixed_c.rank_r_grads(library, plan, gc, xl2, u, A, B_t, want_term, needs[0::3], needs[1::3])
        for a in slots.dropped:
            if dB_t[a] is not None:
                # s_a sum u_i^T g'_i = (s_a sum u_i^T g_i) diag(c_a)
                dB_t[a].mul_(slots.scales[a])
        if term is not None and slots.dropped:
            # dx~_i += ((c_a - 1) g_i) W on the rows of the DoRA slots that drop out
            g_d = torch.cat([g.index_select(0, slots.rows(plan.order, [a])) * (slots.scales[a] - 1)
                             for a in slots.dropped])
            term.index_add_(0, ctx.dropped_rows, g_d @ weight)
        # dx = s (g' B) A + g' W, or with dropout dx = g' W (g W on the rows of DoRA slots that drop out) and
        # dx~ = s (g' B) A
        dx, dxl = mixed_c.input_grads(term, gc, weight, need_x, need_xl, ctx.lora_separate, ctx.x_shape)
        db = g.sum(dim=0) if need_b and ctx.has_bias else None
        grads = []
        for a in range(n):
            dm = None
            if needs[3 * a + 2]:
                # dm_a = sum_{i in a} g_i z_i / n_a; zero for a DoRA slot without rows
                dm = (gz[a] / slots.norms[a]).to(ctx.m_dtypes[a]) if ctx.keep[a] else \
                    torch.zeros(N, dtype=ctx.m_dtypes[a], device=g.device)
            grads += [dA[a], None if dB_t[a] is None else dB_t[a].t(), dm]
        return (dx, dxl, None, db, None, None, None, *grads)


def run_mixed(call: Any, norm: Callable) -> torch.Tensor:
    """y for a mixed call with DoRA slots (lorakern.dispatch.MixedCall.magnitudes) on a dense fp32 CPU base.
    ``norm``: lorakern.dora.weight_norm (given the C library, its one-pass C norm)."""
    library = native.lora_library()
    x_lora = mixed_c.mixed_dropout(call.x, call.slot, call.adapters, call.seed)
    plan = _Plan(call.adapters, call.order, call.offsets)
    norms, scales = slot_scales(call, lambda *args: norm(*args, library=library))
    slots = _DoraSlots(norms, scales, [0.0 if a is None else a[3] for a in call.adapters], call.counts)
    grad = torch.is_grad_enabled()
    factors = []
    for adapter, magnitude in zip(call.adapters, call.magnitudes):
        if adapter is None:
            factors += [None, None, None]
        else:
            # without grad mode no backward follows: a detached m tells the forward that nothing needs z
            factors += [adapter[0], adapter[1], magnitude if magnitude is None or grad else magnitude.detach()]
    return MixedDoraFunction.apply(call.x, x_lora, call.weight, call.bias, plan, library, slots, *factors)


__all__ = ["MixedDoraFunction", "run_mixed", "slot_scales"]
