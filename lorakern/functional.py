"""The torch and C implementations of a LoRA linear layer on a dense base (registered with
lorakern.dispatch as "torch" and "c"), and ``lora_linear``, the functional form.

    y = x W^T + b + s (x~ A^T) B^T,   x~ = dropout(x) on the LoRA branch only

Shapes: x (..., K), W (N, K), b (N,), A (r, K), B (N, r), y (..., N). Which formulation a call takes (factored
or merged) and the merged weight's workspace: lorakern.formulation.
"""
from __future__ import annotations

from typing import Optional

import torch

from lorakern import dispatch, mixed, mixed_c, native
from lorakern.dispatch import Call, Implementation
from lorakern.errors import LorakernError
from lorakern.formulation import Formulation, choose_formulation, merged_weight
from lorakern.masks import seeded_rand
from lorakern.native import pointer as _ptr


def forward_output(x2: torch.Tensor, xl2: torch.Tensor, lora_separate: bool, weight: torch.Tensor,
                   bias: Optional[torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                   library=None) -> tuple[torch.Tensor, Optional[torch.Tensor], Formulation]:
    """LoraLinearFunction's forward on rows: (y (M, N), u = x~ A^T or None when the merged form defers it, the
    formulation), without an autograd node (the Function's forward, and ``_run`` when nothing needs a gradient)."""
    rows, in_features = x2.shape
    out_features, r = weight.shape[0], lora_A.shape[0]
    form = choose_formulation(rows, in_features, out_features, r, lora_separate, x2.dtype)
    if form.forward == "merged":
        # y = x (W + s B A)^T + b: one N x K weight formed, the base GEMM runs on it. u = x A^T is left to
        # the backward, whose pass over x for dA computes it chunk by chunk (no pass over x here)
        merged = merged_weight(weight, lora_B, lora_A, scaling, library)
        y = torch.addmm(bias, x2, merged.t()) if bias is not None else x2 @ merged.t()
        del merged  # a workspace: nothing may hold it past this call
        u = None
    elif library is not None:
        # u = x~ A^T and y = b + s u B^T in one pass over x~ (lorakern/native/lora_cpu.c; it transposes B)
        xl2, A, B = xl2.contiguous(), lora_A.contiguous(), lora_B.contiguous()  # named: copies outlive the call
        b = None if bias is None else bias.contiguous()
        u = xl2.new_empty(rows, r)
        y = x2.new_empty(rows, out_features)
        library.lora_forward_f32(
            _ptr(xl2), _ptr(A), _ptr(B), _ptr(b), scaling,
            rows, in_features, out_features, r, _ptr(u), _ptr(y), torch.get_num_threads(),
        )
        # y += x W^T: the base GEMM accumulates onto it, in place (no second M x N temporary)
        y.addmm_(x2, weight.t())
    else:
        B_t = lora_B.t().contiguous()
        # u = x~ A^T
        u = xl2 @ lora_A.t()
        # y = b + s u B^T: the rank-r term initialises y where the bias broadcast would
        if bias is None:
            y = x2.new_empty(rows, out_features)
            y.addmm_(u, B_t, beta=0.0, alpha=scaling)  # beta = 0 ignores the uninitialised memory
        else:
            y = torch.addmm(bias, u, B_t, alpha=scaling)
        # y += x W^T: the base GEMM accumulates onto it, in place (no second M x N temporary)
        y.addmm_(x2, weight.t())
    return y, u, form


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + s u B^T with u = x~ A^T, or, where cheaper, y = x (W + s B A)^T + b.

    Two formulations, chosen per call by ``choose_formulation`` (cost model in its docstring):
    factored (below) never forms B A; merged forms W' = W + s B A for the call (an N x K x r product,
    cheaper than the M x N x r rank-r term once M > K (1 + c / r)) and runs the base GEMM on it. The
    merged backward forms W' again and computes dx = g W' (unfused: g W + s (g B) A); dA and dB are the
    same in both forms. Merged needs x~ = x (no dropout) and fp32/fp64.

    Derivation, with g = dL/dy flattened to (M, N) and x~ = x (no dropout) or the dropped-out x:
        dL/dx~ = s (g B) A        since y depends on x~ only through u = x~ A^T and s u B^T
        dL/dx  = g W  (+ dL/dx~ when x~ is x itself)
        dL/dA  = s (g B)^T x~     the r x K gradient: (g B) is M x r, computed once
        dL/dB  = s g^T u = s (u^T g)^T   u saved from the factored forward; after a merged one (which
                                          computes no u) the backward forms it from x~ as it reads x~ for dA
        dL/db  = sum_rows g
        dL/dW  = g^T x            only when the base weight is trainable
    Saved for backward: x~ (x when there is no dropout) and u (M x r, only when B trains, factored forward
    only); x itself only when W trains. The only M x N tensor is y itself.

    Why it is written this way (CPU, measured with ``lorakern bench``): the rank-r GEMMs are memory bound
    and the big GEMM is not, so every rank-r term that lands in an M x N (or M x K) result is written
    first and the big GEMM then accumulates onto it (beta = 1): y starts as b + s u B^T, which replaces
    the bias broadcast the base GEMM would do anyway, and dx starts as s (g B) A. That leaves no separate
    pass over y or dx for the low-rank term. s rides in the GEMMs' alpha (no scaled copy of any operand,
    and s is applied before rounding to a half dtype); B is used as a contiguous r x N copy and dB is
    computed as u^T g (an r x N result), the layouts MKL runs fastest for these thin products. Walking the
    rows in cache-sized chunks was measured too and lost: the base GEMM runs slower on row chunks than
    the thin GEMMs gain, since at these sizes x and dY already sit in the last-level cache.

    fp32 on the CPU goes further (``lorakern.native.lora_library``, lorakern/native/lora_cpu.c): BLAS runs
    the thin products far below the memory bandwidth, so the C kernels compute u and the rank-r term of y
    in one pass over x~, and dB in one pass over g, then gB, s gB A and dA in one pass over the rows of g
    and x~ (four rows at a time, gB never stored); the big GEMMs stay with BLAS and accumulate onto those
    results as above.
    Other dtypes, torch.compile's tracing and LORAKERN_NATIVE=0 keep the plain-torch formulation; the
    backward follows the forward's choice.

    ``x_lora`` is None when the LoRA branch sees x unchanged; otherwise it is dropout(x), and autograd
    carries its gradient back through the dropout.
    """

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_A, lora_B, scaling: float, library=None):
        in_features = x.shape[-1]
        x2 = x.reshape(-1, in_features)
        xl2 = x2 if x_lora is None else x_lora.reshape(-1, in_features)
        y, u, form = forward_output(x2, xl2, x_lora is not None, weight, bias, lora_A, lora_B, scaling, library)
        need_u = ctx.needs_input_grad[5]  # u = x~ A^T is kept only for dB = s g^T u
        ctx.library = library  # the backward takes the forward's path
        ctx.merged_backward = form.backward == "merged"
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        ctx.lora_separate = x_lora is not None
        ctx.has_bias = bias is not None
        ctx.save_for_backward(
            xl2 if ctx.needs_input_grad[4] or (need_u and u is None) else None,  # x~ for dA, and for u when deferred
            u if need_u else None,
            x2 if ctx.needs_input_grad[2] else None,
            weight,
            lora_A,
            lora_B,
        )
        return dispatch.function_output(y, x.shape[:-1])

    @staticmethod
    def backward(ctx, grad_y):
        x_lora, u, x, weight, lora_A, lora_B = ctx.saved_tensors
        need_x, need_xl, need_W, need_b, need_A, need_B = ctx.needs_input_grad[:6]
        g = grad_y.reshape(-1, weight.shape[0])
        # dx = g (W + s B A) in one GEMM (merged), or g W accumulated onto the rank-r term s (g B) A (factored)
        merged_dx = need_x and ctx.merged_backward
        # the rank-r term s (g B) A of dx~: dx~'s own gradient, or the start of dx when x~ is x
        want_term = need_xl or (need_x and not ctx.lora_separate and not merged_dx)
        library = ctx.library
        rank_r = _rank_r_grads_native if library is not None else _rank_r_grads_torch
        term, dA, dB = rank_r(library, g, x_lora, u, lora_A, lora_B, ctx.scaling, want_term, need_A, need_B)
        dx = dxl = None
        if need_x:
            if merged_dx:
                # W + s B A formed again here rather than kept from the forward (N x K per layer held until now)
                dx = g @ merged_weight(weight, lora_B, lora_A, ctx.scaling, library)
            elif ctx.lora_separate:
                dx = g @ weight
                dxl = term
            else:
                # dx = s (g B) A + g W: the base GEMM accumulates onto the rank-r term, in place
                dx = term.addmm_(g, weight)
            dx = dx.reshape(ctx.x_shape)
        elif need_xl:
            dxl = term
        if dxl is not None:
            dxl = dxl.reshape(ctx.x_shape)
        db = g.sum(dim=0) if need_b and ctx.has_bias else None
        dW = g.t() @ x if need_W else None  # only when the base weight trains
        return dx, dxl, dW, db, dA, dB, None, None


def _rank_r_grads_torch(library, g, x_lora, u, lora_A, lora_B, s, want_term, need_A, need_B):
    """(s (g B) A or None, dA or None, dB or None) with torch: (g B) is M x r, computed once for both. u None:
    the forward kept none (merged), u = x~ A^T here."""
    if need_B and u is None:
        u = x_lora @ lora_A.t()
    gB = g @ lora_B.t().contiguous().t() if want_term or need_A else None
    term = dA = dB = None
    if want_term:
        # s (g B) A
        term = g.new_empty(g.shape[0], lora_A.shape[1]).addmm_(gB, lora_A, beta=0.0, alpha=s)
    if need_A:
        # dA = s (g B)^T x~
        dA = lora_A.new_empty(lora_A.shape).addmm_(gB.t(), x_lora, beta=0.0, alpha=s)
    if need_B:
        # dB = s (u^T g)^T: computed r x N, handed back as its N x r transpose (a view)
        dB = lora_B.new_empty(lora_B.shape[1], g.shape[1]).addmm_(u.t(), g, beta=0.0, alpha=s).t()
    return term, dA, dB


def _rank_r_grads_native(library, g, x_lora, u, lora_A, lora_B, s, want_term, need_A, need_B):
    """The same in C (lorakern/native/lora_cpu.c): dB^T = s u^T g in one pass over g, then g B four rows at
    a time (never stored), s (g B) A and dA = s (g B)^T x~ in one pass over the rows of g and x~. u None (the
    merged forward kept none): the pass computes u = x~ A^T from each chunk of x~ before its dB."""
    (r, K), N = lora_A.shape, g.shape[1]
    g = g.contiguous()  # an expanded gradient (from .sum()) has stride 0
    rows = g.shape[0]
    threads = torch.get_num_threads()
    term = g.new_empty(rows, K) if want_term else None
    dA = lora_A.new_empty(r, K) if need_A else None
    dB_t = lora_B.new_empty(r, N) if need_B else None
    scratch = g.new_empty(library.lora_backward_scratch(K, N, r, threads) if need_A or need_B else 0)
    # named, so that every contiguous copy outlives the call that reads it
    x_lora = x_lora.contiguous() if need_A or (need_B and u is None) else None
    A, B = lora_A.contiguous(), lora_B.contiguous()
    library.lora_backward_f32(
        _ptr(g), _ptr(x_lora), _ptr(u if need_B else None), _ptr(A), _ptr(B), s, rows, K, N, r,
        _ptr(term), _ptr(dA), _ptr(dB_t), _ptr(scratch), threads,
    )
    return term, dA, None if dB_t is None else dB_t.t()


NATIVE_MAX_RANK = native.LORA_MAX_RANK


def _c_unsupported(call: Call) -> Optional[str]:
    """Why the C kernels cannot take ``call``: fp32 on the CPU, eager, at least one row, r <= 256, built."""
    common = _c_unsupported_common(call.x)
    if common is not None:
        return common
    if call.rank > NATIVE_MAX_RANK:
        return f"r={call.rank} > {NATIVE_MAX_RANK}"
    return None


def _c_unsupported_common(x: torch.Tensor) -> Optional[str]:
    if x.device.type != "cpu":
        return f"CPU only (the input is on {x.device})"
    if x.dtype != torch.float32:
        return f"fp32 only (this call computes in {x.dtype})"
    if torch.compiler.is_compiling():
        return "eager only (torch.compile traces the plain-torch formulation)"
    if x.numel() == 0:
        return "no rows"
    if native.lora_library() is None:
        _, why = native.build_status()
        return f"not built: {why}"
    return None


def torch_dropout_mask(seed: int, shape, p: float, device) -> torch.Tensor:
    """The torch path's mask: torch.rand from a generator seeded with ``seed`` on the input's device (the
    custom op lorakern.masks.seeded_rand, so that torch.compile traces a fixed seed)."""
    keep = seeded_rand(shape, seed, device) >= p
    return keep.to(torch.float32) * (1.0 / (1.0 - p))


def _dropped_out(x: torch.Tensor, dropout_p: float, seed) -> Optional[torch.Tensor]:
    """The LoRA branch's input: None when it is x itself; torch's dropout (global generator: traced by
    torch.compile, redrawn identically by activation checkpointing) or a fixed seed's mask otherwise."""
    if dropout_p == 0:
        return None
    if seed is None:
        return torch.nn.functional.dropout(x, dropout_p, training=True)
    return x * torch_dropout_mask(seed, x.shape, dropout_p, x.device).to(x.dtype)


def _run(call: Call, library) -> torch.Tensor:
    x_lora = _dropped_out(call.x, call.dropout_p, call.seed)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in
                                              (call.x, x_lora, call.weight, call.bias, call.lora_A, call.lora_B)):
        # nothing to differentiate (inference): the same forward without an autograd node, whose apply cost
        # ~30 us a call (a 16-token layer's whole LoRA cost is ~100 us)
        x2 = call.x.reshape(-1, call.x.shape[-1])
        xl2 = x2 if x_lora is None else x_lora.reshape(-1, call.x.shape[-1])
        y, _, _ = forward_output(x2, xl2, x_lora is not None, call.weight, call.bias, call.lora_A, call.lora_B,
                                 call.scaling, library)
        return y.reshape(*call.x.shape[:-1], y.shape[-1])
    return LoraLinearFunction.apply(call.x, x_lora, call.weight, call.bias, call.lora_A, call.lora_B, call.scaling,
                                    library)


def _dense_base_output(call) -> torch.Tensor:
    return torch.nn.functional.linear(call.x, call.weight, call.bias)


dispatch.register(Implementation("torch", "dense", lambda call: _run(call, None), torch_dropout_mask,
                                 lambda call: None,
                                 run_mixed=lambda call: mixed.run_torch(call, _dense_base_output, torch_dropout_mask)))
def _c_mixed_unsupported(call) -> Optional[str]:
    """Why the C mixed path (lorakern.mixed_c) cannot take ``call``: a dense base and the single-adapter rules."""
    if call.base != "dense":
        return f"dense bases only (this layer's base is {call.base})"
    common = _c_unsupported_common(call.x)
    if common is not None:
        return common
    top = max([0] + [a[0].shape[0] for a in call.adapters if a is not None])
    if top > NATIVE_MAX_RANK:
        return f"r={top} > {NATIVE_MAX_RANK}"
    return None


dispatch.register(Implementation("c", "dense", lambda call: _run(call, native.lora_library()), torch_dropout_mask,
                                 _c_unsupported,
                                 run_mixed=mixed_c.run_mixed, unsupported_mixed=_c_mixed_unsupported))


def check_operands(x, weight, bias, lora_A, lora_B) -> None:
    N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise LorakernError(
            f"input has shape {tuple(x.shape)} but this layer takes in_features={K} in the last dimension; "
            f"reshape the input to (..., {K})"
        )
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None and t.device != x.device:
            raise LorakernError(
                f"input is on {x.device} but {name} is on {t.device}; move the input or the layer "
                f"(layer.to({str(x.device)!r})) so they share a device"
            )
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got dtype {x.dtype}; cast it with x.float()")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise LorakernError(
            f"input dtype {x.dtype} does not match the layer's weight dtype {weight.dtype}; cast the input "
            f"(x.to({weight.dtype})) or the layer (layer.to({x.dtype})), or run under torch.autocast"
        )
    r = lora_A.shape[0]
    if lora_A.shape != (r, K) or lora_B.shape != (N, r):
        raise LorakernError(
            f"lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} do not fit a ({N}, {K}) weight; "
            f"expected ({r}, {K}) and ({N}, {r})"
        )


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """y = x W^T + b + s (x~ A^T) B^T with x~ = dropout(x, dropout_p) (inverted dropout, LoRA branch only).

    ``seed`` fixes the dropout mask (the chosen implementation's ``dropout_mask`` rebuilds it); with None the
    mask follows torch's global generator (torch.manual_seed). Computes in x's dtype (or the autocast
    dtype): lora_A and lora_B are cast to it when they differ, and their gradients come back in their own
    dtypes. ``backend`` (or $LORAKERN_BACKEND) pins an implementation; see lorakern.dispatch.
    """
    check_operands(x, weight, bias, lora_A, lora_B)
    if not 0.0 <= dropout_p < 1.0:
        raise LorakernError(f"dropout_p must be in [0, 1), got {dropout_p}; use 0.0 to disable dropout")
    return dispatch.lora_forward(x, "dense", weight, bias, [(lora_A, lora_B, scaling, dropout_p)], seed=seed,
                                 requested=backend)
