"""DoRA in float64 NumPy, as PEFT defines it: the oracle the torch and C paths are tested against.

Shapes as in lorakern.core.lora, plus m (N,), the magnitude vector. With x~ = x * mask (the LoRA
branch's dropout; x~ = x without it):
    n = row norms of W + s B A        (formed here; the fast paths never form B A), a constant for gradients
    c = m / n
    y = x W^T + b + (c - 1) (x~ W^T) + c s (x~ A^T) B^T
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .lora import _as_f64, _check_shapes, delta_weight


def weight_norm(W, A, B, s: float = 1.0) -> np.ndarray:
    """||W_i + s (B A)_i|| for every output row i, by forming W + s B A."""
    W = _as_f64("W", W)
    return np.linalg.norm(W + delta_weight(A, B, s), axis=1)


def _parts(x, W, A, B, m, s, dropout_mask):
    x, W, A, B, m = (_as_f64(k, v) for k, v in (("x", x), ("W", W), ("A", A), ("B", B), ("m", m)))
    _check_shapes(x, W, A, B, None)
    if m.shape != (W.shape[0],):
        raise ValueError(f"m must have shape ({W.shape[0]},), got {m.shape}")
    K = W.shape[1]
    x2 = x.reshape(-1, K)
    mask = None if dropout_mask is None else _as_f64("dropout_mask", dropout_mask).reshape(-1, K)
    x_lora = x2 if mask is None else x2 * mask
    n = weight_norm(W, A, B, s)
    return x, x2, x_lora, mask, W, A, B, n, m / n


def forward(x, W, A, B, m, b=None, s: float = 1.0, dropout_mask=None) -> np.ndarray:
    """y = x W^T + b + (c - 1) (x~ W^T) + c s (x~ A^T) B^T, c = m / ||W + s B A|| (rows)."""
    x, x2, x_lora, mask, W, A, B, _, c = _parts(x, W, A, B, m, s, dropout_mask)
    lora = s * ((x_lora @ A.T) @ B.T)
    if mask is None:  # x~ = x: c (x W^T + s u B^T), without the cancellation of x W^T + (c - 1) x W^T
        y = c * (x2 @ W.T + lora)
    else:
        y = x2 @ W.T + (c - 1.0) * (x_lora @ W.T) + c * lora
    if b is not None:
        y = y + _as_f64("b", b)
    return y.reshape(x.shape[:-1] + (W.shape[0],))


def backward(x, W, A, B, m, dy, s: float = 1.0, dropout_mask=None) -> dict[str, np.ndarray]:
    """Gradients of sum(dy * y) for y = forward(...), the norm n held constant (PEFT detaches it).

    With g = dy as (M, N), gc = g * c (columns scaled), u = x~ A^T, z = x~ W^T + s u B^T:
        dx = g W + mask * ((gc - g) W + s (gc B) A)
        dA = s (gc B)^T x~,   dB = s gc^T u,   dm = sum_rows(g * z) / n,   db = sum_rows g
    """
    x, x2, x_lora, mask, W, A, B, n, c = _parts(x, W, A, B, m, s, dropout_mask)
    N = W.shape[0]
    g = _as_f64("dy", dy).reshape(-1, N)
    if g.shape[0] != x2.shape[0]:
        raise ValueError(f"dy must have shape {x.shape[:-1] + (N,)}, got {np.shape(dy)}")
    gc = g * c
    u = x_lora @ A.T
    z = x_lora @ W.T + s * (u @ B.T)
    if mask is None:  # x~ = x: gc W + s (gc B) A, the same without the cancellation of g W + (gc - g) W
        dx = gc @ W + s * ((gc @ B) @ A)
    else:
        dx = g @ W + mask * ((gc - g) @ W + s * ((gc @ B) @ A))
    return {
        "dx": dx.reshape(x.shape),
        "dA": s * ((gc @ B).T @ x_lora),
        "dB": s * (gc.T @ u),
        "dm": (g * z).sum(axis=0) / n,
        "db": g.sum(axis=0),
    }


def merge(W, A, B, m, s: float = 1.0, norm: Optional[np.ndarray] = None) -> np.ndarray:
    """(m / n) * (W + s B A) row-wise, n = ||W + s B A|| (or ``norm``, the unmerged weight's, given)."""
    W = _as_f64("W", W)
    n = weight_norm(W, A, B, s) if norm is None else _as_f64("norm", norm)
    return (_as_f64("m", m) / n)[:, None] * (W + delta_weight(A, B, s))


def unmerge(W_merged, A, B, m, norm, s: float = 1.0) -> np.ndarray:
    """The inverse of merge: W_merged / (m / n) - s B A, with n the norm merge used."""
    scale = _as_f64("m", m) / _as_f64("norm", norm)
    return _as_f64("W_merged", W_merged) / scale[:, None] - delta_weight(A, B, s)


__all__ = ["backward", "forward", "merge", "unmerge", "weight_norm"]
