"""Mixed-adapter batches with DoRA slots as torch.library custom ops, with autograd: run_mixed_dora.

lorakern::mixed_dora_fwd and lorakern::mixed_dora_bwd wrap mixed_dora_forward / mixed_dora_backward
(mixed_launchers.py): the segmented kernels with HAS_MAGNITUDE, each op with a fake implementation and the
forward's gradient registered with register_autograd (as mixed_ops.py does for plain slots). The scales
c_a = m_a / n_a are stacked under autograd, so the ops' gradient of the stack reaches each m_a as dc_a / n_a.
"""
from __future__ import annotations

from typing import Optional

import torch

from lorakern.dora import check_frozen_base, weight_norm
from lorakern.kernels.mixed_launchers import _check_mixed, mixed_dora_backward, mixed_dora_forward
from lorakern.kernels.mixed_ops import _stacked, checked_seed
from lorakern.kernels.ops import _seed_tensor, _weight_from_parts, _weight_parts


def _fwd_impl(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], a_stack: torch.Tensor,
              b_stack: torch.Tensor, ranks: torch.Tensor, scalings: torch.Tensor, dropouts: torch.Tensor,
              order: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor, dora_flags: torch.Tensor,
              seed: torch.Tensor, has_dropout: bool, nf4_state: list[torch.Tensor], nf4_blocksize: int, need_z: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mixed_dora_forward as an op: (y, u, z), z an empty (0,) tensor unless ``need_z``."""
    W = _weight_from_parts(weight, nf4_state, nf4_blocksize, b_stack.shape[1], a_stack.shape[2])
    y, u, z = mixed_dora_forward(x2, W, bias, a_stack, b_stack, ranks, scalings, dropouts, order, offsets, scales,
                                 dora_flags, int(seed), has_dropout, need_z)
    return y, u, x2.new_empty(0) if z is None else z


_mixed_dora_fwd = torch.library.custom_op("lorakern::mixed_dora_fwd", _fwd_impl, mutates_args=())


@_mixed_dora_fwd.register_fake
def _fwd_fake(x2, weight, bias, a_stack, b_stack, ranks, scalings, dropouts, order, offsets, scales, dora_flags, seed,
              has_dropout, nf4_state, nf4_blocksize, need_z):
    _check_mixed(x2, _weight_from_parts(weight, nf4_state, nf4_blocksize, b_stack.shape[1], a_stack.shape[2]), bias,
                 a_stack, b_stack, ranks, scalings, dropouts, order, offsets)
    M, N = x2.shape[0], b_stack.shape[1]
    return x2.new_empty((M, N)), x2.new_empty((M, a_stack.shape[1])), x2.new_empty((M, N) if need_z else 0)


def _bwd_impl(g: torch.Tensor, x2: torch.Tensor, u: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
              a_stack: torch.Tensor, b_stack: torch.Tensor, ranks: torch.Tensor, scalings: torch.Tensor,
              dropouts: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor,
              dora_flags: torch.Tensor, seed: torch.Tensor, has_dropout: bool, nf4_state: list[torch.Tensor],
              nf4_blocksize: int, needs: list[bool]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mixed_dora_backward as an op: (dx, dA stack, dB stack, dbias, dscales) for ``needs`` = [dx, dA, dB, dbias,
    dscales]; one not asked for comes back as an empty (0,) tensor."""
    W = _weight_from_parts(weight, nf4_state, nf4_blocksize, b_stack.shape[1], a_stack.shape[2])
    need_dx, need_dA, need_dB, need_dbias, need_dscales = needs
    grads = mixed_dora_backward(g, x2, u, z if need_dscales else None, W, a_stack, b_stack, ranks, scalings, dropouts,
                                order, offsets, scales, dora_flags, int(seed), has_dropout, need_dx, need_dA, need_dB,
                                need_dbias)
    return tuple(x2.new_empty(0) if grad is None else grad for grad in grads)


_mixed_dora_bwd = torch.library.custom_op("lorakern::mixed_dora_bwd", _bwd_impl, mutates_args=())


@_mixed_dora_bwd.register_fake
def _bwd_fake(g, x2, u, z, weight, a_stack, b_stack, ranks, scalings, dropouts, order, offsets, scales, dora_flags,
              seed, has_dropout, nf4_state, nf4_blocksize, needs):
    M, N = g.shape
    need_dx, need_dA, need_dB, need_dbias, need_dscales = needs
    return (x2.new_empty((M, x2.shape[1]) if need_dx else 0), a_stack.new_empty(a_stack.shape if need_dA else 0),
            b_stack.new_empty(b_stack.shape if need_dB else 0), x2.new_empty((N,) if need_dbias else 0),
            scales.new_empty(scales.shape if need_dscales else 0))


def _setup_context(ctx, inputs, output) -> None:
    (x2, weight, bias, a_stack, b_stack, ranks, scalings, dropouts, order, offsets, scales, dora_flags, seed,
     has_dropout, nf4_state, nf4_blocksize, need_z) = inputs
    _, u, z = output
    ctx.mark_non_differentiable(u, z)  # saved for the backward, not outputs of the layer
    ctx.set_materialize_grads(False)  # so autograd does not fill an (M, N) zero gradient for z
    ctx.save_for_backward(x2, u, z, weight, a_stack, b_stack, ranks, scalings, dropouts, order, offsets, scales,
                          dora_flags, seed, *nf4_state)
    ctx.has_dropout, ctx.nf4_blocksize, ctx.has_bias, ctx.has_z = has_dropout, nf4_blocksize, bias is not None, need_z


def _backward(ctx, grad_y: Optional[torch.Tensor], grad_u, grad_z) -> tuple:
    """The gradients of mixed_dora_fwd; the derivation is in mixed_dora_triton's docstring."""
    (x2, u, z, weight, a_stack, b_stack, ranks, scalings, dropouts, order, offsets, scales, dora_flags, seed,
     *nf4_state) = ctx.saved_tensors
    if grad_y is None:  # grads are not materialised (setup_context): y took no part in the loss
        return (None,) * 14 + ([None] * len(nf4_state), None, None)
    need_x, _, need_b, need_A, need_B = ctx.needs_input_grad[:5]
    need_c = ctx.needs_input_grad[10]
    if need_c and not ctx.has_z:
        raise RuntimeError("the DoRA scales need a gradient, but the forward ran without keeping z (need_z=False); "
                           "call mixed_dora_triton, which keeps z whenever a magnitude requires grad")
    needs = [need_x, need_A, need_B, need_b and ctx.has_bias, need_c]
    dx, dA, dB, db, dc = torch.ops.lorakern.mixed_dora_bwd(grad_y, x2, u, z, weight, a_stack, b_stack, ranks,
                                                           scalings, dropouts, order, offsets, scales, dora_flags,
                                                           seed, ctx.has_dropout, nf4_state, ctx.nf4_blocksize, needs)
    return (dx if need_x else None, None, db if needs[3] else None, dA if need_A else None, dB if need_B else None,
            None, None, None, None, None, dc if need_c else None, None, None, None, [None] * len(nf4_state), None,
            None)


_mixed_dora_fwd.register_autograd(_backward, setup_context=_setup_context)


def mixed_dora_triton(x2: torch.Tensor, weight, bias: Optional[torch.Tensor], adapters: list,
                      magnitudes: list[Optional[torch.Tensor]], order: torch.Tensor, offsets: torch.Tensor,
                      seed: int | torch.Tensor = 0, base_norm_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y (M, N) of a mixed batch whose slots may be DoRA (``magnitudes[a]`` m_a (N,)) or plain (None), on a
    frozen dense or NF4 base: one forward launch and one backward launch, as mixed_lora_triton.

    Per DoRA slot a, once per call: n_a = ||W_i + s_a (B_a A_a)_i|| (lorakern.dora.weight_norm, never B A),
    detached, and c_a = m_a / n_a (N,) in fp32 (fp64 for fp64 operands), stacked with ones for every other
    slot and for the base-only rows into C (n_slots + 1, N). Row i of DoRA slot a, x~_i = x_i * m_i (its
    dropout mask / (1 - p_a); x~_i = x_i without dropout):
        y_i = x_i W^T - x~_i W^T + c_a z_i + b,  z_i = x~_i W^T + s_a u_i B_a^T,  u_i = x~_i A_a^T
    (= c_a z_i + b without dropout, PEFT's form with it). Plain and base-only rows: mixed_lora_triton's y_i.
    Derivation for a DoRA row, g_i = dL/dy_i, gc_i = g_i diag(c_a) (n_a constant):
        through c_a z_i, columnwise:   dL/dc_a = sum_{i in a} g_i * z_i       (the kernel; then autograd's
                                       c_a = m_a / n_a gives dm_a = dL/dc_a / n_a; zero for a slot without rows)
        through c_a s_a u_i B_a^T:     dL/du_i = s_a gc_i B_a,   dA_a = s_a sum_{i in a} (gc_i B_a)^T x~_i,
                                       dB_a = s_a sum_{i in a} gc_i^T u_i
        through x~_i W^T (coefficient c_a - 1: - x~_i W^T and c_a x~_i W^T inside c_a z_i):
                                       dL/dx~_i = (gc_i - g_i) W + s_a (gc_i B_a) A_a
        through x_i W^T (coefficient 1):   dL/dx_i = g_i W + m_i * dL/dx~_i   (x~_i = x_i * m_i)
                                       = g_i W + m_i * ((gc_i - g_i) W + s_a (gc_i B_a) A_a)
        without dropout (m_i = 1):     dL/dx_i = gc_i W + s_a (gc_i B_a) A_a   (the two W terms merge)
        db = sum over all rows of g_i
    That is plain LoRA's segmented backward on gc (c = 1 on plain and base-only rows, where gc = g and
    (gc - g) W = 0 exactly), plus dc. The kernel scales each g tile by its segment's c where it loads it,
    accumulates (gc - g) W beside g W with dropout, and adds dc_a from the z tiles in the pass over g that
    computes dB. Saved: x, u (M x R), z (M x N, DoRA rows only, when a magnitude trains), C; the masks are
    redrawn from the seed. The base is frozen (DoRA trains A, B and m).
    """
    check_frozen_base(weight)
    a_stack, b_stack, ranks, scalings, dropouts, has_dropout = _stacked(x2, weight, adapters)
    scales, dora_flags = _slot_scales(x2, weight, adapters, magnitudes, base_norm_sq)
    bias = None if bias is None else bias.to(x2.dtype)
    w, nf4_state, nf4_blocksize = _weight_parts(weight)
    if nf4_blocksize == 0:  # a dense W
        w = w.to(x2.dtype)
    need_z = torch.is_grad_enabled() and scales.requires_grad
    y, _, _ = torch.ops.lorakern.mixed_dora_fwd(x2, w, bias, a_stack, b_stack, ranks, scalings, dropouts, order,
                                                offsets, scales, dora_flags, _seed_tensor(seed), has_dropout,
                                                nf4_state, nf4_blocksize, need_z)
    return y


def _slot_scales(x2: torch.Tensor, weight, adapters: list, magnitudes: list, base_norm_sq: Optional[torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(C (n_slots + 1, N), flags (n_slots,) int32): row a c_a = m_a / n_a (flag 1) for a DoRA slot, ones (flag 0)
    for any other slot and, in the last row, for the base-only rows; C in fp32 (fp64 for fp64 operands), under
    autograd in m_a (n_a detached: weight_norm runs without grad)."""
    acc = torch.float64 if x2.dtype == torch.float64 else torch.float32
    ones = torch.ones(weight.shape[0], device=x2.device, dtype=acc)
    rows, flags = [], []
    for adapter, magnitude in zip(adapters, magnitudes):
        if adapter is None or magnitude is None:
            rows.append(ones)
            flags.append(0)
            continue
        A, B, scaling, _ = adapter
        norm = weight_norm(weight, A, B, scaling, base_norm_sq)
        rows.append((magnitude.to(norm.dtype) / norm).to(acc))  # c_a; its gradient reaches m_a as dc_a / n_a
        flags.append(1)
    return torch.stack(rows + [ones]), torch.tensor(flags or [0], dtype=torch.int32, device=x2.device)


def run_mixed_dora(call) -> torch.Tensor:
    """lorakern.dispatch's run for a MixedCall with DoRA slots (``call.magnitudes``) on the segmented kernels.

    Raises ValueError with the reason when the kernels cannot take the call (unsupported_mixed); dropout with
    no seed fixed draws one from torch's generator, as run_mixed."""
    seed = checked_seed(call)
    magnitudes = call.magnitudes if call.magnitudes is not None else [None] * len(call.adapters)
    if not torch.is_grad_enabled():  # no backward follows: detached magnitudes tell the forward to keep no z
        magnitudes = [None if m is None else m.detach() for m in magnitudes]
    return mixed_dora_triton(call.x, call.weight, call.bias, list(call.adapters), list(magnitudes), call.order,
                             call.offsets, seed, call.base_norm_sq)


__all__ = ["mixed_dora_triton", "run_mixed_dora"]
