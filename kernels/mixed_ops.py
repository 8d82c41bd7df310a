"""Mixed-adapter batches as torch.library custom ops, with autograd: run_mixed and unsupported_mixed.

lorakern::mixed_lora_fwd and lorakern::mixed_lora_bwd wrap the segmented launchers (mixed_launchers.py),
each with a fake implementation (torch.compile traces around them with no graph break, as the
single-adapter ops in ops.py); the forward's gradient is registered with register_autograd. run_mixed
stacks the adapters under autograd (torch.stack of F.pad: each adapter's gradient is its slice of the
stacked one), so one launch serves every adapter forward and one backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lorakern.kernels.mixed_launchers import _check_mixed, mixed_backward, mixed_forward, unsupported_mixed
from lorakern.kernels.ops import _seed_tensor, _weight_from_parts, _weight_parts


def _mixed_fwd_impl(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], a_stack: torch.Tensor,
                    b_stack: torch.Tensor, ranks: torch.Tensor, scalings: torch.Tensor, dropouts: torch.Tensor,
                    order: torch.Tensor, offsets: torch.Tensor, seed: torch.Tensor, has_dropout: bool,
                    nf4_state: list[torch.Tensor], nf4_blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mixed_forward as an op: (y, u) for x2 (M, K)."""
    W = _weight_from_parts(weight, nf4_state, nf4_blocksize, b_stack.shape[1], a_stack.shape[2])
    return mixed_forward(x2, W, bias, a_stack, b_stack, ranks, scalings, dropouts, order, offsets, int(seed),
                         has_dropout)


_mixed_lora_fwd = torch.library.custom_op("lorakern::mixed_lora_fwd", _mixed_fwd_impl, mutates_args=())


@_mixed_lora_fwd.register_fake
def _mixed_fwd_fake(x2, weight, bias, a_stack, b_stack, ranks, scalings, dropouts, order, offsets, seed, has_dropout,
                    nf4_state, nf4_blocksize):
    _check_mixed(x2, _weight_from_parts(weight, nf4_state, nf4_blocksize, b_stack.shape[1], a_stack.shape[2]), bias,
                 a_stack, b_stack, ranks, scalings, dropouts, order, offsets)
    return x2.new_empty((x2.shape[0], b_stack.shape[1])), x2.new_empty((x2.shape[0], a_stack.shape[1]))


def _mixed_bwd_impl(g: torch.Tensor, x2: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, a_stack: torch.Tensor,
                    b_stack: torch.Tensor, ranks: torch.Tensor, scalings: torch.Tensor, dropouts: torch.Tensor,
                    order: torch.Tensor, offsets: torch.Tensor, seed: torch.Tensor, has_dropout: bool,
                    nf4_state: list[torch.Tensor], nf4_blocksize: int, needs: list[bool]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mixed_backward as an op: (dx, dA stack, dB stack, dbias) for ``needs`` = [dx, dA, dB, dbias]; a gradient
    not asked for comes back as an empty (0,) tensor."""
    W = _weight_from_parts(weight, nf4_state, nf4_blocksize, b_stack.shape[1], a_stack.shape[2])
    grads = mixed_backward(g, x2, u, W, a_stack, b_stack, ranks, scalings, dropouts, order, offsets, int(seed),
                           has_dropout, *needs)
    return tuple(x2.new_empty(0) if grad is None else grad for grad in grads)


_mixed_lora_bwd = torch.library.custom_op("lorakern::mixed_lora_bwd", _mixed_bwd_impl, mutates_args=())


@_mixed_lora_bwd.register_fake
def _mixed_bwd_fake(g, x2, u, weight, a_stack, b_stack, ranks, scalings, dropouts, order, offsets, seed, has_dropout,
                    nf4_state, nf4_blocksize, needs):
    M, N = g.shape
    need_dx, need_dA, need_dB, need_dbias = needs
    return (x2.new_empty((M, x2.shape[1]) if need_dx else 0), a_stack.new_empty(a_stack.shape if need_dA else 0),
            b_stack.new_empty(b_stack.shape if need_dB else 0), x2.new_empty((N,) if need_dbias else 0))


def _setup_context(ctx, inputs, output) -> None:
    (x2, weight, bias, a_stack, b_stack, ranks, scalings, dropouts, order, offsets, seed, has_dropout, nf4_state,
     nf4_blocksize) = inputs
    _, u = output
    ctx.mark_non_differentiable(u)  # saved for dB_a = s_a g^T u, not an output of the layer
    ctx.save_for_backward(x2, u, weight, a_stack, b_stack, ranks, scalings, dropouts, order, offsets, seed,
                          *nf4_state)
    ctx.has_dropout, ctx.nf4_blocksize, ctx.has_bias = has_dropout, nf4_blocksize, bias is not None


def _backward(ctx, grad_y: torch.Tensor, grad_u: Optional[torch.Tensor]) -> tuple:
    """The gradients of mixed_lora_fwd; the derivation is in mixed_lora_triton's docstring."""
    x2, u, weight, a_stack, b_stack, ranks, scalings, dropouts, order, offsets, seed, *nf4_state = ctx.saved_tensors
    need_x, need_W, need_b, need_A, need_B = ctx.needs_input_grad[:5]
    needs = [need_x, need_A, need_B, need_b and ctx.has_bias]
    dx, dA, dB, db = torch.ops.lorakern.mixed_lora_bwd(grad_y, x2, u, weight, a_stack, b_stack, ranks, scalings,
                                                       dropouts, order, offsets, seed, ctx.has_dropout, nf4_state,
                                                       ctx.nf4_blocksize, needs)
    # dW = g^T x, only when the base weight trains (then by torch; an NF4 base never does)
    dW = grad_y.t().to(x2.dtype) @ x2 if need_W else None
    return (dx if need_x else None, dW, db if needs[3] else None, dA if need_A else None, dB if need_B else None,
            None, None, None, None, None, None, None, [None] * len(nf4_state), None)


_mixed_lora_fwd.register_autograd(_backward, setup_context=_setup_context)


def mixed_lora_triton(x2: torch.Tensor, weight, bias: Optional[torch.Tensor],
                      adapters: list[Optional[tuple[torch.Tensor, torch.Tensor, float, float]]],
                      order: torch.Tensor, offsets: torch.Tensor, seed: int | torch.Tensor = 0) -> torch.Tensor:
    """y (M, N) of a mixed-adapter batch in one launch forward and one backward.

    ``x2`` (M, K); ``weight`` the dense (N, K) W or an NF4 storage; ``adapters`` per slot (A (r_a, K),
    B (N, r_a), s_a, p_a) or None; slot a's rows are order[offsets[a]:offsets[a+1]], the base-only rows
    order[offsets[-1]:]. Row i of slot a, with x~_i = x_i * m_i (m_i its dropout mask / (1 - p_a)):

        y_i  = x_i W^T + b + s_a (x~_i A_a^T) B_a^T        (x_i W^T + b: base-only rows, absent adapters)
        u_i  = x~_i A_a^T                                    saved from the forward, (M, R)
    With g = dL/dy, differentiating y_i term by term (each row touches one adapter only):
        dx_i = g_i W + s_a ((g_i B_a) A_a) * m_i            the LoRA path reaches x only through x~
        dA_a = s_a sum_{i in a} (g_i B_a)^T x~_i            (g_i B_a) is 1 x r_a: computed once per tile, in
        dB_a = s_a sum_{i in a} g_i^T u_i                   the same pass as g W, never written to memory
        db   = sum_i g_i,   dW = g^T x (only when the base weight trains, by torch)
    Each adapter's sums run over its own rows only: the kernels' tiles never mix adapters, and each adds
    its partial sums into slot a of the (n, R, K) / (n, N, R) accumulators. Ranks differ: A and B are
    stacked zero-padded to R = max r_a (torch.stack of F.pad, so autograd hands each adapter the first
    r_a rows of its slice); the kernels mask at r_a. B A is never formed.
    """
    a_stack, b_stack, ranks, scalings, dropouts, has_dropout = _stacked(x2, weight, adapters)
    # operands in x's dtype (no-ops when they are already; gradients flow back through the casts)
    bias = None if bias is None else bias.to(x2.dtype)
    w, nf4_state, nf4_blocksize = _weight_parts(weight)
    if nf4_blocksize == 0:  # a dense W
        w = w.to(x2.dtype)
    y, _ = torch.ops.lorakern.mixed_lora_fwd(x2, w, bias, a_stack, b_stack, ranks, scalings, dropouts, order, offsets,
                                             _seed_tensor(seed), has_dropout, nf4_state, nf4_blocksize)
    return y


def _stacked(x2: torch.Tensor, weight, adapters: list) -> tuple:
    """(A stack (n, R, K), B stack (n, N, R), ranks, scalings, dropouts, any p > 0) of the slots' adapters,
    zero-padded to R = max r_a under autograd (mixed_lora_triton's docstring); the per-slot tensors on x's device."""
    if x2.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K) for a mixed batch, got shape {tuple(x2.shape)}")
    K = x2.shape[1]
    N = weight.shape[0]
    present = [adapter for adapter in adapters if adapter is not None]
    R = max([1] + [A.shape[0] for A, *_ in present])
    a_parts, b_parts = [], []
    for adapter in adapters or [None]:
        if adapter is None:  # the layer lacks this slot's adapter: zeros the kernels never read (rank 0)
            a_parts.append(x2.new_zeros((R, K)))
            b_parts.append(x2.new_zeros((N, R)))
            continue
        A, B, _, _ = adapter
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != K or B.shape != (N, A.shape[0]):
            raise ValueError(f"an adapter's A {tuple(A.shape)} and B {tuple(B.shape)} do not fit x (M, {K}) and W "
                             f"{tuple(weight.shape)}: expected A (r, {K}) and B ({N}, r)")
        # pad under autograd: the gradient of the padded stack routes back to A[:r] and B[:, :r]
        a_parts.append(F.pad(A.to(x2.dtype), (0, 0, 0, R - A.shape[0])))
        b_parts.append(F.pad(B.to(x2.dtype), (0, R - A.shape[0])))
    a_stack, b_stack = torch.stack(a_parts), torch.stack(b_parts)
    slots = adapters or [None]
    ranks = torch.tensor([0 if a is None else a[0].shape[0] for a in slots], dtype=torch.int32, device=x2.device)
    scalings = torch.tensor([0.0 if a is None else float(a[2]) for a in slots], dtype=torch.float32, device=x2.device)
    dropout_ps = [0.0 if a is None else float(a[3]) for a in slots]
    for slot, p in enumerate(dropout_ps):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"the adapter of slot {slot} has dropout_p={p}; it must be in [0, 1): use 0.0 to "
                             f"disable dropout")
    dropouts = torch.tensor(dropout_ps, dtype=torch.float32, device=x2.device)
    return a_stack, b_stack, ranks, scalings, dropouts, any(p > 0 for p in dropout_ps)


def run_mixed(call) -> torch.Tensor:
    """y (M, N) for a lorakern.dispatch.MixedCall, differentiable in x and every adapter's A and B.

    Raises ValueError with the reason when the kernels cannot take the call (unsupported_mixed). Dropout
    with no seed fixed draws one from torch's generator (a 0-d tensor, so torch.compile traces it).
    """
    return mixed_lora_triton(call.x, call.weight, call.bias, list(call.adapters), call.order, call.offsets,
                             checked_seed(call))


def checked_seed(call) -> object:
    """The seed a MixedCall's launch takes, after the kernels' checks: ValueError with the reason when they
    cannot take the call (unsupported_mixed); with dropout and no seed fixed, one drawn from torch's generator
    (a 0-d tensor, so torch.compile traces it); 0 without dropout."""
    reason = unsupported_mixed(call)
    if reason is not None:
        raise ValueError(f"the triton kernels cannot take this mixed batch: {reason}")
    if call.seed is not None:
        return call.seed
    drops = any(adapter is not None and adapter[3] > 0 for adapter in call.adapters)
    return torch.randint(0, 2**31 - 1, ()) if drops else 0


__all__ = ["mixed_lora_triton", "run_mixed", "unsupported_mixed"]
