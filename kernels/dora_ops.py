"""DoRA on the fused kernels as torch.library custom ops, with autograd: dora_linear_triton.

lorakern::dora_linear_fwd and lorakern::dora_linear_bwd wrap dora_forward / dora_backward (launchers.py),
the same kernels as plain LoRA with HAS_MAGNITUDE set; each op has a fake implementation, and the forward's
gradient is registered with register_autograd (as ops.py does for LoRA, and for the same reasons).
run_dora and unsupported_dora are what lorakern.dispatch calls (lora_linear.py attaches them).
"""
from __future__ import annotations

from typing import Optional

import torch

from lorakern.dora import check_frozen_base, weight_norm
from lorakern.kernels.configs import INTERPRETED, _small_m_configs, get_autotune_config, rank_pad
from lorakern.kernels.launchers import _check, _is_nf4, dora_backward, dora_forward, unsupported
from lorakern.kernels.ops import _seed_tensor, _weight_from_parts, _weight_parts


def _dora_fwd_impl(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                   lora_B: torch.Tensor, scale: torch.Tensor, scaling: float, dropout_p: float, seed: torch.Tensor,
                   nf4_state: list[torch.Tensor], nf4_blocksize: int, need_z: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dora_forward as an op: (y, u, z), z an empty (0,) tensor unless ``need_z``."""
    W = _weight_from_parts(weight, nf4_state, nf4_blocksize, lora_B.shape[0], lora_A.shape[1])
    y, u, z = dora_forward(x2, W, bias, lora_A, lora_B, scale, scaling, dropout_p, int(seed), need_z)
    return y, u, x2.new_empty(0) if z is None else z


_dora_linear_fwd = torch.library.custom_op("lorakern::dora_linear_fwd", _dora_fwd_impl, mutates_args=())


@_dora_linear_fwd.register_fake
def _dora_fwd_fake(x2, weight, bias, lora_A, lora_B, scale, scaling, dropout_p, seed, nf4_state, nf4_blocksize,
                   need_z):
    _check(x2, _weight_from_parts(weight, nf4_state, nf4_blocksize, lora_B.shape[0], lora_A.shape[1]), bias,
           lora_A, lora_B)
    M, (N, r) = x2.shape[0], lora_B.shape
    return x2.new_empty((M, N)), x2.new_empty((M, r)), x2.new_empty((M, N) if need_z else 0)


def _dora_bwd_impl(g: torch.Tensor, x2: torch.Tensor, u: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                   lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor, scaling: float, dropout_p: float,
                   seed: torch.Tensor, nf4_state: list[torch.Tensor], nf4_blocksize: int, needs: list[bool]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dora_backward as an op: (dx, dA, dB, dbias, dscale) for ``needs`` = [dx, dA, dB, dbias, dscale]; one
    not asked for comes back as an empty (0,) tensor."""
    W = _weight_from_parts(weight, nf4_state, nf4_blocksize, lora_B.shape[0], lora_A.shape[1])
    need_dx, need_dA, need_dB, need_dbias, need_dscale = needs
    grads = dora_backward(g, x2, u, z if need_dscale else None, W, lora_A, lora_B, scale, scaling, dropout_p,
                          int(seed), need_dx, need_dA, need_dB, need_dbias)
    return tuple(x2.new_empty(0) if grad is None else grad for grad in grads)


_dora_linear_bwd = torch.library.custom_op("lorakern::dora_linear_bwd", _dora_bwd_impl, mutates_args=())


@_dora_linear_bwd.register_fake
def _dora_bwd_fake(g, x2, u, z, weight, lora_A, lora_B, scale, scaling, dropout_p, seed, nf4_state, nf4_blocksize,
                   needs):
    M, N = g.shape
    r, K = lora_A.shape
    need_dx, need_dA, need_dB, need_dbias, need_dscale = needs
    return (x2.new_empty((M, K) if need_dx else 0), lora_A.new_empty((r, K) if need_dA else 0),
            lora_B.new_empty((N, r) if need_dB else 0), x2.new_empty((N,) if need_dbias else 0),
            scale.new_empty((N,) if need_dscale else 0))


def _setup_context(ctx, inputs, output) -> None:
    x2, weight, bias, lora_A, lora_B, scale, scaling, dropout_p, seed, nf4_state, nf4_blocksize, need_z = inputs
    _, u, z = output
    ctx.mark_non_differentiable(u, z)  # saved for the backward, not outputs of the layer
    ctx.set_materialize_grads(False)  # so autograd does not fill an (M, N) zero gradient for z
    ctx.save_for_backward(x2, u, z, weight, lora_A, lora_B, scale, seed, *nf4_state)
    ctx.scaling, ctx.dropout_p, ctx.nf4_blocksize, ctx.has_bias, ctx.has_z = (scaling, dropout_p, nf4_blocksize,
                                                                             bias is not None, need_z)


def _backward(ctx, grad_y: torch.Tensor, grad_u: Optional[torch.Tensor], grad_z: Optional[torch.Tensor]) -> tuple:
    """The gradients of dora_linear_fwd; the derivation is in dora_linear_triton's docstring."""
    x2, u, z, weight, lora_A, lora_B, scale, seed, *nf4_state = ctx.saved_tensors
    if grad_y is None:  # grads are not materialised (setup_context): y took no part in the loss
        return (None,) * 9 + ([None] * len(nf4_state), None, None)
    need_x, _, need_b, need_A, need_B, need_c = ctx.needs_input_grad[:6]
    if need_c and not ctx.has_z:
        raise RuntimeError("the DoRA scale needs a gradient, but the forward ran without keeping z (need_z=False); "
                           "call dora_linear_triton, which keeps z whenever the magnitude requires grad")
    needs = [need_x, need_A, need_B, need_b and ctx.has_bias, need_c]
    # dx, dA, dB: LoRA's on gc = g diag(c);  dbias = sum_rows g;  dc_j = sum_i g_ij z_ij   (one launch)
    dx, dA, dB, db, dc = torch.ops.lorakern.dora_linear_bwd(grad_y, x2, u, z, weight, lora_A, lora_B, scale,
                                                            ctx.scaling, ctx.dropout_p, seed, nf4_state,
                                                            ctx.nf4_blocksize, needs)
    return (dx if need_x else None, None, db if needs[3] else None, dA if need_A else None, dB if need_B else None,
            dc if need_c else None, None, None, None, [None] * len(nf4_state), None, None)


_dora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def dora_linear_triton(x: torch.Tensor, weight, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                       lora_B: torch.Tensor, magnitude: torch.Tensor, scaling: float, dropout_p: float = 0.0,
                       seed: int | torch.Tensor = 0, base_norm_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DoRA (docs/dora.md) in one forward launch and one backward launch, on a frozen dense or NF4 base.

        n = ||W_i + s (B A)_i|| (lorakern.dora.weight_norm: W A^T and A A^T, never B A), detached
        c = m / n                                            (N,), fp32 (fp64 for fp64 operands)
        y = c z + b,  z = x W^T + s u B^T,  u = x A^T                     without dropout
        y = x W^T - x~ W^T + c z~ + b,  z~ = x~ W^T + s u B^T,  u = x~ A^T    x~ = x * mask (PEFT's form)

    Derivation, with g = dL/dy (M, N) and gc = g diag(c):
        through c z (z~), columnwise:  dL/dc_j = sum_i g_ij z_ij       (the kernel; autograd's c = m / n
                                       then gives dm_j = dL/dc_j / n_j, n a constant)
        through c s u B^T:             dL/du = s gc B,  dA = s (gc B)^T x~,  dB = s gc^T u
        without dropout (x~ = x):      dx = gc W + s (gc B) A         (LoRA's backward run on gc)
        with dropout:                  dx = g W + mask * ((gc - g) W + s (gc B) A)
                                       (g W from x W^T, (gc - g) W from - x~ W^T + c x~ W^T)
        dbias = sum_rows g
    The backward kernel scales each g tile by c where it loads it (gc never materialised), accumulates
    (gc - g) W beside g W with dropout, and adds dc from the z tiles in the pass over g that computes dB.
    Saved: x, u (M x r), z (M x N, only when m trains: (y - b) / c would lose precision where b dominates),
    c; the mask is redrawn from the seed. The base is frozen (DoRA trains A, B and m).
    """
    if x.dim() < 1:
        raise ValueError(f"x must have shape (..., {lora_A.shape[1]}), got a 0-d tensor; reshape it to (1, K)")
    check_frozen_base(weight)
    norm = weight_norm(weight, lora_A, lora_B, scaling, base_norm_sq)
    scale = magnitude.to(norm.dtype) / norm  # c; its gradient reaches m as dc / n
    x2 = x.reshape(-1, x.shape[-1])
    w, nf4_state, nf4_blocksize = _weight_parts(weight)
    need_z = torch.is_grad_enabled() and scale.requires_grad
    y, _, _ = torch.ops.lorakern.dora_linear_fwd(x2, w, bias, lora_A, lora_B, scale, float(scaling), float(dropout_p),
                                                 _seed_tensor(seed), nf4_state, nf4_blocksize, need_z)
    return y.reshape(*x.shape[:-1], lora_B.shape[0])


def unsupported_dora(x: torch.Tensor, weight, lora_A: torch.Tensor, dropout_p: float) -> Optional[str]:
    """None when the kernels can run DoRA on these operands, else the reason."""
    reason = unsupported(x, weight, lora_A)
    if reason is not None or INTERPRETED:
        return reason
    base = "nf4" if _is_nf4(weight) else "dense"
    r_pad, drop = rank_pad(lora_A.shape[0]), "drop_" if dropout_p > 0 else ""
    if not (get_autotune_config(f"dora_{drop}fwd", x.dtype, r_pad, base)
            and get_autotune_config(f"dora_{drop}bwd", x.dtype, r_pad, base)
            and _small_m_configs(x.dtype, base, f"dora_{drop}small")):
        return (f"DoRA{' with dropout' if drop else ''} on {'an NF4' if base == 'nf4' else 'a dense'} base in "
                f"{x.dtype} at r={lora_A.shape[0]} (no DoRA kernel config for it has passed the sm_80/sm_90 compile "
                f"checks yet)")
    return None


def run_dora(call) -> torch.Tensor:
    """lorakern.dispatch's DoRA run (a Call with a magnitude) on the fused kernels."""
    seed = 0 if call.seed is None else call.seed
    return dora_linear_triton(call.x, call.weight, call.bias, call.lora_A, call.lora_B, call.magnitude, call.scaling,
                              call.dropout_p, seed, call.base_norm_sq)


__all__ = ["dora_linear_triton", "run_dora", "unsupported_dora"]
