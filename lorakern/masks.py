"""A fixed dropout seed's uniform draw as a torch.library custom op, so that torch.compile traces it.

    seeded_rand(shape, seed, device) = torch.rand(shape, generator=torch.Generator(device).manual_seed(seed),
                                                  device=device)

The torch and C paths build their fixed-seed dropout masks from this draw (lorakern.functional.torch_dropout_mask,
lorakern.mixed_c.mixed_dropout); lorakern.testing_masks recomputes it in NumPy. Written inline, the Generator
built in the call is a graph break under torch.compile (fullgraph=True raises). As the opaque custom op
``lorakern::seeded_rand``, with a fake implementation that only gives the shape, dynamo and AOTAutograd trace
around it and the compiled graph calls the same eager code, so a compiled run draws eager's mask bit for bit.
The draw takes no tensor input and its output is not differentiable (the mask multiplies x; autograd
differentiates that product), so no autograd formula is registered.

The seed is an int argument: a Python int (``LoraLinear.dropout_seed``) is a constant dynamo guards on, so a
new seed recompiles the graph (under torch._dynamo.config.allow_unspec_int_on_nn_module dynamo makes it a
SymInt after the first change, which the op takes: no recompile per seed then).
Eager calls skip the op's dispatcher and run its body directly (the same code, without the custom op's
per-call overhead).
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch

from lorakern.errors import LorakernError

_SEED_LOW, _SEED_END = -(2**63), 2**64  # what torch.Generator.manual_seed takes


def _seeded_rand_impl(shape: Sequence[int], seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(shape, generator=generator, device=device)


_seeded_rand_op = torch.library.custom_op("lorakern::seeded_rand", _seeded_rand_impl, mutates_args=())


@_seeded_rand_op.register_fake
def _seeded_rand_fake(shape: Sequence[int], seed: int, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32, device=device)


def _as_int64(seed) -> int:
    """``seed`` as the int64 the op's schema holds, drawing the same generator state: manual_seed reads a
    negative seed as seed + 2^64, so a seed in [2^63, 2^64) is passed as seed - 2^64. Only comparisons
    touch an int: traced, a SymInt seed stays symbolic (operator.index would specialize it)."""
    if isinstance(seed, bool):
        raise LorakernError(f"dropout seed must be an int, got {seed!r}; set layer.dropout_seed to an int, "
                            f"or None for a fresh mask per call")
    if not isinstance(seed, int):
        try:
            seed = operator.index(seed)  # a NumPy integer or a 0-d integer tensor (a host read)
        except TypeError:
            raise LorakernError(f"dropout seed must be an int, got {seed!r} ({type(seed).__name__}); set "
                                f"layer.dropout_seed to an int, or None for a fresh mask per call") from None
    if not _SEED_LOW <= seed < _SEED_END:
        raise LorakernError(f"dropout seed {seed} is outside [-2**63, 2**64), the range torch.Generator takes; "
                            f"use a smaller seed (e.g. seed % 2**63)")
    return seed - _SEED_END if seed >= 2**63 else seed


def seeded_rand(shape: Sequence[int], seed, device) -> torch.Tensor:
    """float32 uniforms in [0, 1) of ``shape`` from a generator on ``device`` seeded with ``seed`` (module
    docstring); traced by torch.compile as the custom op lorakern::seeded_rand."""
    device = torch.device(device)
    if torch.compiler.is_compiling():
        return _seeded_rand_op(list(shape), _as_int64(seed), device)
    return _seeded_rand_impl(shape, _as_int64(seed), device)


__all__ = ["seeded_rand"]
