"""The C implementation of a mixed-adapter batch on a dense base (fp32, CPU): each row of x uses the adapter
of its slot, all adapters in one pass over the rows (lorakern/native/lora_cpu.c, ``lora_mixed_*``).

    y_i = x_i W^T + b + s_a (x~_i A_a^T) B_a^T   for row i of slot a;   y_i = x_i W^T + b for a base-only row

The rows arrive grouped by slot (``order``/``offsets`` of the call, one sort per batch); the C kernels walk
each slot's rows through gathered row pointers, so nothing is copied into per-adapter batches. The base GEMMs
stay with BLAS and accumulate onto the rank-r results (beta = 1), as in the single-adapter C path
(lorakern.functional.LoraLinearFunction).
"""
from __future__ import annotations

import ctypes
from typing import Any, Optional, Sequence

import torch

from lorakern import dispatch, native
from lorakern.masks import seeded_rand
from lorakern.native import pointer as _ptr

_Adapters = Sequence[Optional[tuple[torch.Tensor, torch.Tensor, float, float]]]


def _addresses(tensors: Sequence[Optional[torch.Tensor]]) -> ctypes.Array:
    """The tensors' data pointers (NULL for None) as a C ``const float *const *``. A ctypes array, not a torch
    one: torch.tensor(list) cost ~6 us a call, and a call makes up to six. Passed as it is, ctypes holds it
    for the duration of the call."""
    return (ctypes.c_void_p * max(1, len(tensors)))(*[None if t is None else t.data_ptr() for t in tensors])


class _Plan:
    """The call's grouping and per-slot constants, in the form the C kernels read (host int64 / fp32 arrays)."""

    def __init__(self, adapters: _Adapters, order: torch.Tensor, offsets: torch.Tensor) -> None:
        n = len(adapters)
        self.present = [a is not None for a in adapters]
        self.order = order.to(torch.int64).contiguous()
        self.offsets = offsets.to(torch.int64).contiguous()
        ranks = [0 if a is None else a[0].shape[0] for a in adapters]
        self.ranks = (ctypes.c_int64 * max(1, n))(*ranks)
        self.scaling = (ctypes.c_float * max(1, n))(*[0.0 if a is None else float(a[2]) for a in adapters])
        self.r_max = max([1, *ranks])
        # where slot a's B_a^T starts in the one buffer that holds them all (lora_transpose_many_f32)
        self.bt_offset = [sum(ranks[:a]) for a in range(n)]
        self.r_total = sum(ranks)


def _transposed(library, plan: _Plan, B: Sequence[Optional[torch.Tensor]], N: int) -> torch.Tensor:
    """Every present B_a (N x r_a) as B_a^T (r_a x N), one after another in one buffer, by one C call."""
    B = [None if b is None else b.contiguous() for b in B]  # named: the copies outlive the call
    buffer = torch.empty(plan.r_total * N, dtype=torch.float32)
    library.lora_transpose_many_f32(_addresses(B), plan.ranks, len(B), N, _ptr(buffer))
    return buffer


def _slots_in(buffer: torch.Tensor, plan: _Plan, N: int) -> ctypes.Array:
    """Pointers to each present slot's r_a x N block of ``buffer`` (laid out as ``_transposed`` writes it)."""
    start, size = buffer.data_ptr(), buffer.element_size()
    return (ctypes.c_void_p * max(1, len(plan.present)))(
        *[start + plan.bt_offset[a] * N * size if present else None for a, present in enumerate(plan.present)])


def rank_r_grads(library, plan: _Plan, g: torch.Tensor, xl2: torch.Tensor, u: torch.Tensor,
                 A: Sequence[Optional[torch.Tensor]], B_t: torch.Tensor, want_term: bool, need_A: Sequence[bool],
                 need_B: Sequence[bool]) -> tuple:
    """(term, [dA_a], [dB_a^T]) of every slot's rows of g in one C pass (``lora_mixed_backward_f32``):
    term (M, K) = s_a (g_i B_a) A_a on slot a's rows, 0 on the others (None unless ``want_term``);
    dA_a = s_a sum_i (g_i B_a)^T x~_i and dB_a^T = s_a sum_i u_i^T g_i over a's rows (None where not needed)."""
    n, (rows, N), K = len(plan.present), g.shape, xl2.shape[1]
    term = g.new_empty(rows, K) if want_term else None
    # each gradient its own tensor: autograd may keep a handed-back gradient as the parameter's .grad
    dA = [A[a].new_empty(A[a].shape) if A[a] is not None and need_A[a] else None for a in range(n)]
    dB_t = [A[a].new_empty(A[a].shape[0], N) if A[a] is not None and need_B[a] else None for a in range(n)]
    A_addr, Bt_addr, dA_addr, dBt_addr = _addresses(A), _slots_in(B_t, plan, N), _addresses(dA), _addresses(dB_t)
    threads = torch.get_num_threads()
    scratch = g.new_empty(library.lora_mixed_backward_scratch(K, N, plan.ranks, A_addr, n, threads))
    # per slot a: s_a (g B_a) A_a into term's rows, dA_a = s_a (g B_a)^T x~, dB_a^T = s_a u^T g over a's rows
    library.lora_mixed_backward_f32(
        _ptr(g), _ptr(xl2), _ptr(u), _ptr(plan.order), _ptr(plan.offsets), n, A_addr, Bt_addr, plan.ranks,
        plan.scaling, rows, K, N, plan.r_max, _ptr(term), dA_addr, dBt_addr, _ptr(scratch), threads,
    )
    return term, dA, dB_t


class MixedLoraFunction(torch.autograd.Function):
    """y = x W^T + b + (each row's) s_a (x~ A_a^T) B_a^T, with a hand-written backward.

    Derivation, per row i of slot a, g = dL/dy (M, N), u_i = x~_i A_a^T (saved from the forward):
        dL/dx~_i = s_a (g_i B_a) A_a        (rows without an adapter: 0)
        dL/dx_i  = g_i W  (+ dL/dx~_i when x~ is x itself)
        dL/dA_a  = s_a sum_{i in a} (g_i B_a)^T x~_i
        dL/dB_a  = s_a sum_{i in a} g_i^T u_i
        dL/db    = sum_i g_i
    Each adapter's sums run only over its own rows (its segment of ``order``), so an adapter learns from its
    rows alone and an adapter with no rows gets a zero gradient.
    """

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, plan: _Plan, library, *factors):
        K, N = x.shape[-1], weight.shape[0]
        x2 = x.reshape(-1, K).contiguous()
        xl2 = x2 if x_lora is None else x_lora.reshape(-1, K).contiguous()
        rows = x2.shape[0]
        A = [factors[2 * a].contiguous() if plan.present[a] else None for a in range(len(plan.present))]
        B_t = _transposed(library, plan, [factors[2 * a + 1] if plan.present[a] else None
                                          for a in range(len(plan.present))], N)
        b = None if bias is None else bias.contiguous()
        u = x2.new_empty(rows, plan.r_max)
        y = x2.new_empty(rows, N)
        A_addr, Bt_addr = _addresses(A), _slots_in(B_t, plan, N)
        # u_i = x~_i A_a^T and y_i = b + s_a u_i B_a^T per row of slot a (b alone for the other rows)
        library.lora_mixed_forward_f32(
            _ptr(xl2), _ptr(plan.order), _ptr(plan.offsets), len(A), A_addr, Bt_addr, plan.ranks, plan.scaling,
            _ptr(b), rows, K, N, plan.r_max, _ptr(u), _ptr(y), torch.get_num_threads(),
        )
        # y += x W^T: the base GEMM accumulates onto every row, in place
        y.addmm_(x2, weight.t())
        ctx.plan, ctx.library, ctx.x_shape = plan, library, x.shape
        ctx.lora_separate, ctx.has_bias = x_lora is not None, bias is not None
        ctx.save_for_backward(xl2, u, x2 if ctx.needs_input_grad[2] else None, weight, B_t, *A)  # A[a] None: no adapter
        return dispatch.function_output(y, x.shape[:-1])

    @staticmethod
    def backward(ctx, grad_y):
        plan, library = ctx.plan, ctx.library
        xl2, u, x2, weight, *factors = ctx.saved_tensors
        n = len(plan.present)
        B_t, *A = factors
        need_x, need_xl, need_W, need_b = ctx.needs_input_grad[:4]
        factor_needs = ctx.needs_input_grad[6:]
        g = grad_y.reshape(-1, weight.shape[0]).contiguous()
        want_term = need_xl or (need_x and not ctx.lora_separate)
        term, dA, dB_t = rank_r_grads(library, plan, g, xl2, u, A, B_t, want_term, factor_needs[0::2],
                                      factor_needs[1::2])
        dx, dxl = input_grads(term, g, weight, need_x, need_xl, ctx.lora_separate, ctx.x_shape)
        db = g.sum(dim=0) if need_b and ctx.has_bias else None
        dW = g.t() @ x2 if need_W else None
        grads = []
        for a in range(n):
            grads += [dA[a], None if dB_t[a] is None else dB_t[a].t()]
        return (dx, dxl, dW, db, None, None, *grads)


def input_grads(term: Optional[torch.Tensor], g: torch.Tensor, weight: torch.Tensor, need_x: bool, need_xl: bool,
                lora_separate: bool, x_shape) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx, dx~) of a mixed backward from the rank-r term s (g B) A (``term``) and g (the plain path's g, the
    DoRA path's g' = c g): with dropout dx = g W and dx~ = term (autograd carries it through the mask);
    without, dx = term + g W, the base GEMM accumulating onto the term in place."""
    dx = dxl = None
    if need_x:
        if lora_separate:
            dx, dxl = (g @ weight).reshape(x_shape), term
        else:
            # dx = s (g B) A + g W: the base GEMM accumulates onto the rank-r term, in place
            dx = term.addmm_(g, weight).reshape(x_shape)
    elif need_xl:
        dxl = term
    return dx, None if dxl is None else dxl.reshape(x_shape)


def mixed_dropout(x: torch.Tensor, slot: torch.Tensor, adapters: _Adapters,
                  seed: Optional[Any]) -> Optional[torch.Tensor]:
    """x~: each row dropped out with its slot's p (inverted dropout), or None when no adapter drops out.
    The mask is torch.rand over x's shape (a generator seeded with ``seed``, else torch's global one)."""
    p = [0.0 if a is None else float(a[3]) for a in adapters]
    if not any(p):
        return None
    p_row = torch.tensor(p + [0.0], dtype=torch.float32, device=x.device)[slot.clamp(min=-1)]  # -1: the last, 0
    uniform = torch.rand(x.shape, device=x.device) if seed is None else seeded_rand(x.shape, seed, x.device)
    keep = uniform >= p_row[:, None]
    return x * (keep.to(x.dtype) / (1.0 - p_row)[:, None].to(x.dtype))


def run_mixed(call: Any) -> torch.Tensor:
    """y for a mixed call (lorakern.dispatch.MixedCall: x (M, K), dense weight, per-slot adapters, grouping)."""
    x_lora = mixed_dropout(call.x, call.slot, call.adapters, call.seed)
    plan = _Plan(call.adapters, call.order, call.offsets)
    factors = []
    for adapter in call.adapters:
        factors += [None, None] if adapter is None else [adapter[0], adapter[1]]
    return MixedLoraFunction.apply(call.x, x_lora, call.weight, call.bias, plan, native.lora_library(), *factors)
