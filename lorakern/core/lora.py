"""The LoRA math in float64 NumPy: the oracle every fast path is tested against.

Shapes (the names used throughout lorakern):
    x      (..., K)   input, any leading shape; flattened to (M, K)
    W      (N, K)     frozen base weight, nn.Linear layout (out_features, in_features)
    b      (N,)       base bias, optional
    A      (r, K)     lora_A
    B      (N, r)     lora_B
    y      (..., N)   y = x W^T + b + s (x~ A^T) B^T,  x~ = x * mask (dropout on the LoRA branch)

The product B @ A is never formed here either: the reference follows the same association as
the kernels, so a test that compares them checks the math, not a different rounding order.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

INITS = ("kaiming", "gaussian", "normal")


def _as_f64(name: str, array) -> np.ndarray:
    out = np.asarray(array, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        bad = np.argwhere(~np.isfinite(out))
        raise ValueError(f"{name} holds {len(bad)} non-finite values, the first at index {tuple(int(i) for i in bad[0])} "
                         f"({out[tuple(bad[0])]}); the reference needs finite inputs: pass finite values")
    return out


def _check_shapes(x: np.ndarray, W: np.ndarray, A: np.ndarray, B: np.ndarray, b: Optional[np.ndarray]) -> None:
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (out_features, in_features), got shape {W.shape}")
    N, K = W.shape
    if x.ndim < 1 or x.shape[-1] != K:
        raise ValueError(f"x must end in in_features={K}, got shape {x.shape}")
    if A.ndim != 2 or A.shape[1] != K:
        raise ValueError(f"A must have shape (r, {K}), got {A.shape}")
    if B.shape != (N, A.shape[0]):
        raise ValueError(f"B must have shape ({N}, {A.shape[0]}) to match W and A, got {B.shape}")
    if b is not None and b.shape != (N,):
        raise ValueError(f"b must have shape ({N},), got {b.shape}")


def scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The LoRA scale s: alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA."""
    if r <= 0:
        raise ValueError(f"r must be a positive integer, got {r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def forward(
    x,
    W,
    A,
    B,
    b=None,
    s: float = 1.0,
    dropout_mask=None,
) -> np.ndarray:
    """y = x W^T + b + s (x~ A^T) B^T for x of any leading shape.

    ``dropout_mask`` (same shape as x) multiplies x on the LoRA branch only; pass the mask already
    divided by (1 - p), as inverted dropout does.
    """
    x, W, A, B = (_as_f64(n, v) for n, v in (("x", x), ("W", W), ("A", A), ("B", B)))
    b = None if b is None else _as_f64("b", b)
    _check_shapes(x, W, A, B, b)
    x_lora = x if dropout_mask is None else x * _as_f64("dropout_mask", dropout_mask)
    y = x @ W.T + s * ((x_lora @ A.T) @ B.T)
    if b is not None:
        y = y + b
    return y


def backward(
    x,
    W,
    A,
    B,
    dy,
    s: float = 1.0,
    dropout_mask=None,
) -> dict[str, np.ndarray]:
    """Gradients of sum(dy * y) for y = forward(x, W, A, B, b, s, dropout_mask).

    With g = dy flattened to (M, N), x~ = x * mask, u = x~ A^T (M, r):
        dx = g W + s ((g B) A) * mask
        dA = s (g B)^T x~          (r, K)
        dB = s g^T u               (N, r)
        db = sum over rows of g    (N,)
    W is frozen: its gradient is not part of LoRA training and is not returned.
    Returned gradients keep the leading shape of x (dx) and the parameter shapes.
    """
    x, W, A, B, dy = (_as_f64(n, v) for n, v in (("x", x), ("W", W), ("A", A), ("B", B), ("dy", dy)))
    _check_shapes(x, W, A, B, None)
    N, K = W.shape
    if dy.shape != x.shape[:-1] + (N,):
        raise ValueError(f"dy must have shape {x.shape[:-1] + (N,)}, got {dy.shape}")
    mask = None if dropout_mask is None else _as_f64("dropout_mask", dropout_mask).reshape(-1, K)
    x2 = x.reshape(-1, K)
    g = dy.reshape(-1, N)
    x_lora = x2 if mask is None else x2 * mask
    u = x_lora @ A.T
    gB = g @ B
    dx_lora = s * (gB @ A)
    if mask is not None:
        dx_lora = dx_lora * mask
    dx = g @ W + dx_lora
    return {
        "dx": dx.reshape(x.shape),
        "dA": s * (gB.T @ x_lora),
        "dB": s * (g.T @ u),
        "db": g.sum(axis=0),
    }


def delta_weight(A, B, s: float = 1.0) -> np.ndarray:
    """The update s B A in W's layout (N, K). Only merging forms it."""
    A, B = _as_f64("A", A), _as_f64("B", B)
    if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"A (r, K) and B (N, r) must agree on r, got A {A.shape} and B {B.shape}")
    return s * (B @ A)


def merge(W, A, B, s: float = 1.0) -> np.ndarray:
    """W + s B A: the weight of a plain Linear that computes the same y as the unmerged layer."""
    W = _as_f64("W", W)
    delta = delta_weight(A, B, s)
    if delta.shape != W.shape:
        raise ValueError(f"s B A has shape {delta.shape} but W has shape {W.shape}")
    return W + delta


def unmerge(W_merged, A, B, s: float = 1.0) -> np.ndarray:
    """The inverse of merge: W_merged - s B A."""
    W_merged = _as_f64("W_merged", W_merged)
    delta = delta_weight(A, B, s)
    if delta.shape != W_merged.shape:
        raise ValueError(f"s B A has shape {delta.shape} but W has shape {W_merged.shape}")
    return W_merged - delta


def kaiming_uniform_bound(fan_in: int, a: float = math.sqrt(5)) -> float:
    """Bound of kaiming_uniform_(a=a) with fan_in inputs: gain * sqrt(3 / fan_in).

    With a = sqrt(5) (nn.Linear's and PEFT's choice) the gain is sqrt(2 / (1 + 5)) and the
    bound reduces to 1 / sqrt(fan_in).
    """
    if fan_in <= 0:
        raise ValueError(f"fan_in must be positive, got {fan_in}")
    gain = math.sqrt(2.0 / (1.0 + a * a))
    return gain * math.sqrt(3.0 / fan_in)


def init_std(init: str, r: int, in_features: int) -> float:
    """Standard deviation of lora_A's entries under each init rule.

    kaiming:  U(-1/sqrt(K), 1/sqrt(K))  -> std 1/sqrt(3K)   (PEFT's default)
    gaussian: N(0, std = 1/r)                               (PEFT's init_lora_weights="gaussian")
    normal:   N(0, 1)                                       (the seed's rule)
    """
    if init == "kaiming":
        return kaiming_uniform_bound(in_features) / math.sqrt(3.0)
    if init == "gaussian":
        return 1.0 / r
    if init == "normal":
        return 1.0
    raise ValueError(f"init must be one of {INITS}, got {init!r}")


def init_lora(
    r: int, in_features: int, out_features: int, init: str = "kaiming", rng: Optional[np.random.Generator] = None
) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) drawn by the init rule; B is zero in every rule, so the layer starts as its base."""
    if r <= 0:
        raise ValueError(f"r must be a positive integer, got {r}")
    rng = np.random.default_rng() if rng is None else rng
    if init == "kaiming":
        bound = kaiming_uniform_bound(in_features)
        A = rng.uniform(-bound, bound, size=(r, in_features))
    elif init in ("gaussian", "normal"):
        A = rng.normal(0.0, init_std(init, r, in_features), size=(r, in_features))
    else:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    return A, np.zeros((out_features, r))


def _mixed_operands(x, W, adapters, row_adapter):
    x, W = _as_f64("x", x), _as_f64("W", W)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (rows, in_features) for a mixed batch, got shape {x.shape}")
    slots = np.asarray(row_adapter).astype(np.int64)
    if slots.shape != (x.shape[0],) or np.any(slots < -1) or np.any(slots >= len(adapters)):
        raise ValueError(f"row_adapter must give each of the {x.shape[0]} rows a slot in -1..{len(adapters) - 1}")
    factors = []
    for slot, adapter in enumerate(adapters):
        if adapter is None:
            factors.append(None)
            continue
        A, B, s = _as_f64(f"A[{slot}]", adapter[0]), _as_f64(f"B[{slot}]", adapter[1]), float(adapter[2])
        _check_shapes(x, W, A, B, None)
        factors.append((A, B, s))
    return x, W, factors, slots


def mixed_forward(x, W, adapters, row_adapter, b=None, dropout_masks=None) -> np.ndarray:
    """A mixed-adapter batch, row by row: y_i = x_i W^T + b + s_a (x~_i A_a^T) B_a^T with a = row_adapter[i],
    and no LoRA term where a = -1 or ``adapters[a]`` is None (a layer without that adapter).

    x (M, K); ``adapters`` one (A, B, s) or None per slot; ``dropout_masks`` None or one (M, K) mask (or
    None) per slot, already divided by (1 - p). Each row is computed on its own (no grouping), so the
    reference shares nothing with the gathered or masked formulations it checks."""
    x, W, factors, slots = _mixed_operands(x, W, adapters, row_adapter)
    y = x @ W.T
    if b is not None:
        y = y + _as_f64("b", b)
    for i, slot in enumerate(slots):
        if slot < 0 or factors[slot] is None:
            continue
        A, B, s = factors[slot]
        mask = None if dropout_masks is None or dropout_masks[slot] is None else dropout_masks[slot][i]
        x_lora = x[i] if mask is None else x[i] * _as_f64("dropout_mask", mask)
        y[i] = y[i] + s * ((x_lora @ A.T) @ B.T)
    return y


def mixed_backward(x, W, adapters, row_adapter, dy, dropout_masks=None) -> dict:
    """Gradients of sum(dy * y) for y = mixed_forward(x, W, adapters, row_adapter, b, dropout_masks), row
    by row: row i of adapter a adds s (g_i B) A * mask_i to dx_i, s (g_i B)^T x~_i to dA_a and
    s g_i^T (x~_i A^T) to dB_a. Returns dx (M, K), dA and dB (lists per slot: zeros for an adapter with no
    rows, None for a slot whose adapter is None) and db."""
    x, W, factors, slots = _mixed_operands(x, W, adapters, row_adapter)
    dy = _as_f64("dy", dy)
    if dy.shape != (x.shape[0], W.shape[0]):
        raise ValueError(f"dy must have shape {(x.shape[0], W.shape[0])}, got {dy.shape}")
    dx = dy @ W
    dA = [None if f is None else np.zeros_like(f[0]) for f in factors]
    dB = [None if f is None else np.zeros_like(f[1]) for f in factors]
    for i, slot in enumerate(slots):
        if slot < 0 or factors[slot] is None:
            continue
        A, B, s = factors[slot]
        mask = None if dropout_masks is None or dropout_masks[slot] is None else _as_f64("dropout_mask",
                                                                                        dropout_masks[slot][i])
        x_lora = x[i] if mask is None else x[i] * mask
        gB = dy[i] @ B  # (r,)
        dx_lora = s * (gB @ A)
        dx[i] = dx[i] + (dx_lora if mask is None else dx_lora * mask)
        dA[slot] = dA[slot] + s * np.outer(gB, x_lora)
        dB[slot] = dB[slot] + s * np.outer(dy[i], x_lora @ A.T)
    return {"dx": dx, "dA": dA, "dB": dB, "db": dy.sum(axis=0)}
