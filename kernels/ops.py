"""The fused LoRA linear as torch.library custom ops, with autograd: lora_linear_triton.

lorakern::lora_linear_fwd and lorakern::lora_linear_bwd wrap the launchers (launchers.py), each with a
fake implementation; the forward's gradient is registered with register_autograd. Importing this module
registers the ops.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from lorakern.kernels.launchers import _check, _is_nf4, lora_backward, lora_forward


# The launchers run as two opaque custom ops registered with torch.library, lorakern::lora_linear_fwd
# and lorakern::lora_linear_bwd, each with a fake (meta) implementation, and the forward's gradient is
# registered with register_autograd: torch.compile (dynamo, AOTAutograd) traces around the kernels
# with no graph break and calls them as they are. Not torch.library.triton_op: under the interpreter
# wrap_triton sees no JITFunction and tracing runs the kernel on fake tensors (tried with torch 2.13,
# triton 3.8), and inductor has nothing to gain from looking inside these kernels anyway.
#
# Ops take tensors, ints and floats, not modules: an NF4 base travels as its packed bytes (``weight``),
# its statistics (``nf4_state``) and its blocksize (``nf4_blocksize``, 0 for a dense W), and the
# dropout seed as a 0-d int64 tensor, so a fresh one drawn by torch.randint stays in the graph (a
# Python int would need .item(), a graph break).
class _NF4Weight(NamedTuple):
    """An NF4 base weight rebuilt from an op's arguments: the attributes the launchers read."""

    packed: torch.Tensor
    absmax: torch.Tensor
    quant_map: torch.Tensor
    nested_absmax: Optional[torch.Tensor]
    nested_map: Optional[torch.Tensor]
    offset: Optional[torch.Tensor]
    blocksize: int
    shape: tuple[int, int]
    double_quant: bool


def _weight_parts(weight) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """(weight tensor, NF4 statistics, NF4 blocksize): the dense W as (W, [], 0), an NF4 storage as
    (packed, [absmax, quant_map (, nested_absmax, nested_map, offset)], blocksize)."""
    if not _is_nf4(weight):
        return weight, [], 0
    state = [weight.absmax, weight.quant_map]
    if weight.double_quant:
        state += [weight.nested_absmax, weight.nested_map, weight.offset]
    return weight.packed, state, weight.blocksize


def _weight_from_parts(weight: torch.Tensor, nf4_state: list[torch.Tensor], nf4_blocksize: int, N: int, K: int
                       ) -> torch.Tensor | _NF4Weight:
    """The inverse of _weight_parts: the dense W, or an _NF4Weight of shape (N, K)."""
    if nf4_blocksize == 0:
        return weight
    absmax, quant_map, *nested = nf4_state
    nested_absmax, nested_map, offset = nested if nested else (None, None, None)
    return _NF4Weight(weight, absmax, quant_map, nested_absmax, nested_map, offset, nf4_blocksize, (N, K), bool(nested))


def _seed_tensor(seed: int | torch.Tensor) -> torch.Tensor:
    """``seed`` (an int, or a 0-d integer tensor) as the 0-d int64 tensor the ops take."""
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.is_floating_point() or seed.is_complex():
            raise ValueError(f"seed must be an int or a 0-d integer tensor, got a {seed.dtype} tensor of shape "
                             f"{tuple(seed.shape)}; draw one with torch.randint(0, 2**31 - 1, ())")
        return seed.to(torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int or a 0-d integer tensor, got {seed!r} ({type(seed).__name__})")
    return torch.tensor(seed, dtype=torch.int64)


def _lora_linear_fwd_impl(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dropout_p: float,
                          seed: torch.Tensor, nf4_state: list[torch.Tensor], nf4_blocksize: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_forward as an op: (y, u) for x2 (M, K)."""
    W = _weight_from_parts(weight, nf4_state, nf4_blocksize, lora_B.shape[0], lora_A.shape[1])
    return lora_forward(x2, W, bias, lora_A, lora_B, scaling, dropout_p, int(seed))


# Registered by call, not as a decorator: the implementation stays reachable as a plain function, which
# tests run under a dispatch mode to see the allocations inside the op.
_lora_linear_fwd = torch.library.custom_op("lorakern::lora_linear_fwd", _lora_linear_fwd_impl, mutates_args=())


@_lora_linear_fwd.register_fake
def _lora_linear_fwd_fake(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, nf4_state, nf4_blocksize):
    # The launcher's checks, at trace time: a bad operand fails while compiling, with the same message.
    _check(x2, _weight_from_parts(weight, nf4_state, nf4_blocksize, lora_B.shape[0], lora_A.shape[1]), bias,
           lora_A, lora_B)
    M = x2.shape[0]
    N, r = lora_B.shape
    return x2.new_empty((M, N)), x2.new_empty((M, r))


def _lora_linear_bwd_impl(g: torch.Tensor, x2: torch.Tensor, u: torch.Tensor, weight: torch.Tensor,
                          lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dropout_p: float,
                          seed: torch.Tensor, nf4_state: list[torch.Tensor], nf4_blocksize: int, needs: list[bool]
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """lora_backward as an op: (dx, dA, dB, dbias) for ``needs`` = [dx, dA, dB, dbias]; an op returns
    tensors, not None, so a gradient not asked for comes back as an empty (0,) tensor."""
    W = _weight_from_parts(weight, nf4_state, nf4_blocksize, lora_B.shape[0], lora_A.shape[1])
    grads = lora_backward(g, x2, u, W, lora_A, lora_B, scaling, dropout_p, int(seed), *needs)
    return tuple(x2.new_empty(0) if grad is None else grad for grad in grads)


_lora_linear_bwd = torch.library.custom_op("lorakern::lora_linear_bwd", _lora_linear_bwd_impl, mutates_args=())


@_lora_linear_bwd.register_fake
def _lora_linear_bwd_fake(g, x2, u, weight, lora_A, lora_B, scaling, dropout_p, seed, nf4_state, nf4_blocksize,
                          needs):
    M, N = g.shape
    r, K = lora_A.shape
    need_dx, need_dA, need_dB, need_dbias = needs
    # lora_backward computes in x's dtype and hands dA and dB back in the parameters' dtypes
    return (x2.new_empty((M, K) if need_dx else 0), lora_A.new_empty((r, K) if need_dA else 0),
            lora_B.new_empty((N, r) if need_dB else 0), x2.new_empty((N,) if need_dbias else 0))


def _setup_context(ctx, inputs, output) -> None:
    x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, nf4_state, nf4_blocksize = inputs
    _, u = output
    # u is saved for the backward (dB = s g^T u), not an output of the layer: no gradient flows into it
    ctx.mark_non_differentiable(u)
    ctx.save_for_backward(x2, u, weight, lora_A, lora_B, seed, *nf4_state)
    ctx.scaling, ctx.dropout_p, ctx.nf4_blocksize = scaling, dropout_p, nf4_blocksize
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y: torch.Tensor, grad_u: Optional[torch.Tensor]) -> tuple:
    """The gradients of lora_linear_fwd; the derivation is in lora_linear_triton's docstring."""
    x2, u, weight, lora_A, lora_B, seed, *nf4_state = ctx.saved_tensors
    need_x, need_W, need_b, need_A, need_B = ctx.needs_input_grad[:5]
    needs = [need_x, need_A, need_B, need_b and ctx.has_bias]
    dx, dA, dB, db = torch.ops.lorakern.lora_linear_bwd(grad_y, x2, u, weight, lora_A, lora_B, ctx.scaling,
                                                        ctx.dropout_p, seed, nf4_state, ctx.nf4_blocksize, needs)
    # dW = g^T x, only when the base weight trains (then by torch; an NF4 base never does)
    dW = grad_y.t().to(x2.dtype) @ x2 if need_W else None
    return (dx if need_x else None, dW, db if needs[3] else None, dA if need_A else None, dB if need_B else None,
            None, None, None, [None] * len(nf4_state), None)


_lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def lora_linear_triton(x: torch.Tensor, weight, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                       lora_B: torch.Tensor, scaling: float, dropout_p: float = 0.0, seed: int | torch.Tensor = 0
                       ) -> torch.Tensor:
    """y = x W^T + b + s u B^T, u = x~ A^T, in one launch forward and one launch backward.

    ``x`` (..., K); ``weight`` the dense (N, K) W, or an NF4 storage (lorakern.quant.NF4Storage) decoded
    in-kernel; ``seed`` an int or a 0-d integer tensor (torch.compile traces a tensor drawn in the graph).

    Derivation, with g = dL/dy flattened to (M, N), x~ = x * m (m the dropout mask / (1 - p), or 1):
        y   = x W^T + b + s (x~ A^T) B^T
        dx  = g W + s ((g B) A) * m         the LoRA path reaches x only through x~
        dA  = s (g B)^T x~                  (g B) is M x r: computed once per program, in the same pass
        dB  = s g^T u                        as g W, and never written to memory
        db  = sum over rows of g
        dW  = g^T x                          only when the base weight trains (then by torch)
    Saved for backward: x and u (M x r); the mask is redrawn from the seed, never stored.
    """
    if x.dim() < 1:
        raise ValueError(f"x must have shape (..., {lora_A.shape[1]}), got a 0-d tensor; reshape it to (1, K)")
    x2 = x.reshape(-1, x.shape[-1])
    w, nf4_state, nf4_blocksize = _weight_parts(weight)
    y, _ = torch.ops.lorakern.lora_linear_fwd(x2, w, bias, lora_A, lora_B, float(scaling), float(dropout_p),
                                              _seed_tensor(seed), nf4_state, nf4_blocksize)
    return y.reshape(*x.shape[:-1], lora_B.shape[0])
