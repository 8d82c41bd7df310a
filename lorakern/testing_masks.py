"""Dropout masks recomputed from the seed, independently of the backends that draw them.

Each backend documents its generator (``Implementation.dropout_mask``); the tests must not take the
mask from the code under test, so the rules are rewritten here from their published definitions:

- triton: every kernel keeps x's logical element f = row * K + col where ``tl.rand(seed, f) >= p``.
  ``tl.rand`` (triton/language/random.py) is Philox-4x32 with 10 rounds on the counter
  (f mod 2^32, f >> 32, 0, 0) and the key (seed mod 2^32, seed >> 32); its first output word, read as
  int32 x, becomes the fp32 value (x < 0 ? ~x : x) * 4.6566127342e-10. Reproduced in NumPy below.
- torch / c (and the torch NF4 path): ``torch.rand(shape, generator=torch.Generator(device).manual_seed(seed)) >= p``.
  On the CPU torch's generator is MT19937 seeded by init_genrand(seed) (NumPy's legacy seeding of the
  same engine), and a float32 uniform is (word & (2^24 - 1)) * 2^-24 per 32-bit word, in order
  (aten/src/ATen/core/TransformationHelper.h, uniform_real). Reproduced in NumPy below; other devices
  (CUDA's Philox offsets) fall back to that documented torch call.

A kept element is scaled by 1 / (1 - p) rounded to fp32, as each backend does it (triton: 1 / (1 - p) in
fp32 arithmetic; torch: the double 1 / (1 - p) rounded to fp32).
"""
from __future__ import annotations

import numpy as np

_PHILOX_ROUND = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_KEY = (np.uint64(0x9E3779B9), np.uint64(0xBB67AE85))
_WORD = np.uint64(0xFFFFFFFF)


def philox_uniform(seed: int, offsets: np.ndarray) -> np.ndarray:
    """triton's ``tl.rand(seed, offsets)`` for int64 offsets: fp32 values in [0, 1)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    c0 = (offsets & 0xFFFFFFFF).astype(np.uint64)
    c1 = ((offsets >> 32) & 0xFFFFFFFF).astype(np.uint64)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    round_a, round_b = _PHILOX_ROUND
    for _ in range(10):
        # products of two 32-bit words fit in 64 bits: hi = p >> 32, lo = p & (2^32 - 1)
        p0, p1 = round_b * c2, round_a * c0
        c0, c2 = (p0 >> np.uint64(32)) ^ c1 ^ k0, (p1 >> np.uint64(32)) ^ c3 ^ k1
        c1, c3 = p0 & _WORD, p1 & _WORD
        k0, k1 = (k0 + _PHILOX_KEY[0]) & _WORD, (k1 + _PHILOX_KEY[1]) & _WORD
    x = c0.astype(np.uint32).view(np.int32)
    x = np.where(x < 0, ~x, x)
    return x.astype(np.float32) * np.float32(4.6566127342e-10)


def mt19937_uniform(seed: int, count: int) -> np.ndarray:
    """torch.rand(count, generator=torch.Generator().manual_seed(seed)) on the CPU, in NumPy."""
    engine = np.random.MT19937(0)
    engine._legacy_seeding(int(seed))
    words = engine.random_raw(count).astype(np.uint64)
    return ((words & np.uint64(0xFFFFFF)).astype(np.float64) * 2.0**-24).astype(np.float32)


def triton_mask(seed: int, shape, p: float) -> np.ndarray:
    """The mask the Triton kernels draw (float64 array of kept / (1 - p), else 0) for x of ``shape``."""
    n = int(np.prod(shape, dtype=np.int64))
    keep = philox_uniform(int(seed), np.arange(n, dtype=np.int64)) >= np.float32(p)
    scale = np.float32(1.0) / (np.float32(1.0) - np.float32(p))
    return np.where(keep, np.float64(scale), 0.0).reshape(shape)


def torch_mask(seed: int, shape, p: float, device="cpu") -> np.ndarray:
    """The mask the torch and C paths draw (float64 array of kept / (1 - p), else 0) for x of ``shape``."""
    n = int(np.prod(shape, dtype=np.int64))
    if str(device) == "cpu":
        uniform = mt19937_uniform(seed, n)
    else:
        import torch

        generator = torch.Generator(device=device).manual_seed(int(seed))
        uniform = torch.rand(n, generator=generator, device=device).cpu().numpy()
    keep = uniform >= np.float32(p)
    return np.where(keep, np.float64(np.float32(1.0 / (1.0 - p))), 0.0).reshape(shape)


def backend_mask(backend: str, seed: int, shape, p: float, device="cpu") -> np.ndarray:
    """The mask backend ``backend`` ("triton", "c" or "torch") draws for ``seed``, recomputed here."""
    if backend == "triton":
        return triton_mask(seed, shape, p)
    if backend in ("torch", "c"):
        return torch_mask(seed, shape, p, device)
    raise ValueError(f"no documented dropout generator for backend {backend!r}; add its rule to lorakern.testing_masks")
