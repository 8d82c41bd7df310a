"""LoRA on embeddings and convolutions in float64 NumPy: the oracle for lorakern.embedding and lorakern.conv.

Embedding (PEFT's layout):
    ids    (...)      integer indices into the vocabulary of V rows
    E      (V, D)     frozen embedding table
    A      (r, V)     lora_embedding_A
    B      (D, r)     lora_embedding_B
    y      (..., D)   y = E[ids] + s A^T[ids] B^T   (rows of A^T gathered, never a one-hot product)

Convolution over d = 1 or 2 spatial dimensions (PEFT's layout, torch's NC(H)W order):
    x      (N, C, *S)           input
    W      (O, C / g, *k)       frozen kernel, g groups
    A      (r, C, *k)           lora_A: an ungrouped conv with the base's stride, padding and dilation
    B      (O, r / g, *1)       lora_B: a grouped 1 x 1 conv
    y = conv_g(x, W) + b + s conv1x1_g(conv(x~, A), B),   x~ = x * mask (dropout on the LoRA branch)

Convolutions are written here as im2col (an explicit gather of every kernel tap) and a contraction, with
col2im (the scatter-add adjoint of the same gather) for the input gradient; nothing here calls torch.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .lora import _as_f64


# ---- embedding ---------------------------------------------------------------------------------------
def _ids(ids, V: int) -> np.ndarray:
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= V):
        raise ValueError(f"ids must lie in [0, {V}), got values in [{ids.min()}, {ids.max()}]")
    return ids


def embedding_forward(ids, E, A, B, s: float = 1.0) -> np.ndarray:
    """y = E[ids] + s A^T[ids] B^T."""
    E, A, B = _as_f64("E", E), _as_f64("A", A), _as_f64("B", B)
    V, D = E.shape
    if A.shape[1] != V or B.shape != (D, A.shape[0]):
        raise ValueError(f"A must be (r, {V}) and B ({D}, r), got A {A.shape}, B {B.shape}")
    ids = _ids(ids, V)
    return E[ids] + s * (A.T[ids] @ B.T)


def embedding_backward(ids, A, B, dy, s: float = 1.0, padding_idx: Optional[int] = None,
                       scale_grad_by_freq: bool = False) -> dict[str, np.ndarray]:
    """Gradients of sum(dy * y) for the LoRA term of ``embedding_forward``.

    With rows = A^T[ids] (M, r) and g = dy (M, D):
        dB = s g^T rows                                   (D, r)
        dA^T[v] = sum over positions m with ids[m] = v of s (g B)[m]   (scatter-add; A is (r, V))
    torch's embedding gradient conventions apply to A^T's rows: the padding row gets none, and
    ``scale_grad_by_freq`` divides each row's gradient by the count of its index in ``ids``.
    """
    A, B, dy = _as_f64("A", A), _as_f64("B", B), _as_f64("dy", dy)
    r, V = A.shape
    D = B.shape[0]
    flat = _ids(ids, V).reshape(-1)
    g = dy.reshape(-1, D)
    rows = A.T[flat]
    d_rows = s * (g @ B)
    if scale_grad_by_freq:
        counts = np.bincount(flat, minlength=V)
        d_rows = d_rows / counts[flat][:, None]
    dAT = np.zeros((V, r))
    np.add.at(dAT, flat, d_rows)
    if padding_idx is not None:
        dAT[padding_idx] = 0.0
    return {"dA": dAT.T, "dB": s * (g.T @ rows)}


def embedding_delta(A, B, s: float = 1.0) -> np.ndarray:
    """The update of the table, (V, D): s (B A)^T. E + this computes what the unmerged layer does."""
    A, B = _as_f64("A", A), _as_f64("B", B)
    return s * (B @ A).T


# ---- convolution -------------------------------------------------------------------------------------
def _tuple(value, d: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, Sequence) else (int(value),) * d


def _taps(spatial: tuple[int, ...], kernel: tuple[int, ...], stride, padding, dilation):
    """Index arrays into the zero-padded input for every (kernel tap, output position), and the output size."""
    d = len(spatial)
    out = tuple((spatial[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(d))
    if min(out) < 1:
        raise ValueError(f"the kernel {kernel} (dilation {dilation}) does not fit the padded input {spatial} "
                         f"+ 2 x {padding}")
    index = []
    for i in range(d):
        taps = np.arange(kernel[i])[:, None] * dilation[i] + np.arange(out[i])[None, :] * stride[i]  # (k_i, L_i)
        shape = [1] * (2 * d)
        shape[i], shape[d + i] = kernel[i], out[i]
        index.append(taps.reshape(shape))
    return tuple(index), out


def _im2col(x: np.ndarray, kernel, stride, padding, dilation):
    """(cols (N, C, prod k, prod L), the gather's index, padded shape, output size)."""
    d = x.ndim - 2
    pad = [(0, 0), (0, 0)] + [(p, p) for p in padding]
    xp = np.pad(x, pad)
    index, out = _taps(x.shape[2:], kernel, stride, padding, dilation)
    cols = xp[(slice(None), slice(None), *index)]  # (N, C, *k, *L)
    N, C = x.shape[:2]
    return cols.reshape(N, C, int(np.prod(kernel)), int(np.prod(out))), index, xp.shape, out, d


def _col2im(dcols: np.ndarray, index, padded_shape, kernel, out, padding) -> np.ndarray:
    """The adjoint of _im2col: every tap's gradient added back where it was read, the padding cut off."""
    N, C = dcols.shape[:2]
    dxp = np.zeros(padded_shape)
    np.add.at(dxp, (slice(None), slice(None), *index), dcols.reshape(N, C, *kernel, *out))
    inner = tuple(slice(p, dxp.shape[2 + i] - p) for i, p in enumerate(padding))
    return dxp[(slice(None), slice(None), *inner)]


def _grouped(cols: np.ndarray, W: np.ndarray, groups: int) -> np.ndarray:
    """y[n, o, l] = sum over c in o's group and taps t of W[o, c, t] cols[n, c, t, l]."""
    N, C, T, L = cols.shape
    O = W.shape[0]
    Wf = W.reshape(O, C // groups, T)
    parts = [np.einsum("oct,nctl->nol", Wf[j * O // groups:(j + 1) * O // groups],
                       cols[:, j * C // groups:(j + 1) * C // groups]) for j in range(groups)]
    return np.concatenate(parts, axis=1)


def _grouped_grads(cols: np.ndarray, W: np.ndarray, dy: np.ndarray, groups: int):
    """(dW (shape of W), dcols (shape of cols)) of sum(dy * _grouped(cols, W, groups))."""
    N, C, T, L = cols.shape
    O = W.shape[0]
    Wf = W.reshape(O, C // groups, T)
    dW, dcols = np.zeros_like(Wf), np.zeros_like(cols)
    for j in range(groups):
        o, c = slice(j * O // groups, (j + 1) * O // groups), slice(j * C // groups, (j + 1) * C // groups)
        dW[o] = np.einsum("nol,nctl->oct", dy[:, o], cols[:, c])
        dcols[:, c] = np.einsum("oct,nol->nctl", Wf[o], dy[:, o])
    return dW.reshape(W.shape), dcols


def _conv_setup(x, W, A, B, stride, padding, dilation, groups):
    d = x.ndim - 2
    if d < 1 or W.ndim != d + 2:
        raise ValueError(f"x (N, C, *S) and W (O, C/g, *k) must agree on the spatial rank, got {x.shape}, {W.shape}")
    O, kernel = W.shape[0], W.shape[2:]
    r = A.shape[0]
    if x.shape[1] % groups or O % groups or r % groups:
        raise ValueError(f"channels {x.shape[1]}, outputs {O} and r={r} must each be divisible by groups={groups}")
    if W.shape[1] != x.shape[1] // groups or A.shape != (r, x.shape[1], *kernel) or B.shape != (O, r // groups) + (1,) * d:
        raise ValueError(f"shapes disagree: x {x.shape}, W {W.shape}, A {A.shape}, B {B.shape}, groups={groups}")
    return d, kernel, _tuple(stride, d), _tuple(padding, d), _tuple(dilation, d)


def conv_forward(x, W, A, B, b=None, s: float = 1.0, stride=1, padding=0, dilation=1, groups: int = 1,
                 dropout_mask=None) -> np.ndarray:
    """y = conv_g(x, W) + b + s conv1x1_g(conv(x~, A), B), padding with zeros, as PEFT's LoRA conv."""
    x, W, A, B = (_as_f64(n, v) for n, v in (("x", x), ("W", W), ("A", A), ("B", B)))
    d, kernel, stride, padding, dilation = _conv_setup(x, W, A, B, stride, padding, dilation, groups)
    cols, _, _, out, _ = _im2col(x, kernel, stride, padding, dilation)
    y = _grouped(cols, W, groups)
    x_lora = x if dropout_mask is None else x * _as_f64("dropout_mask", dropout_mask)
    u = _grouped(_im2col(x_lora, kernel, stride, padding, dilation)[0], A, 1)  # (N, r, L)
    y = y + s * _grouped(u[:, :, None, :], B, groups)
    if b is not None:
        y = y + _as_f64("b", b)[None, :, None]
    return y.reshape(x.shape[0], W.shape[0], *out)


def conv_backward(x, W, A, B, dy, s: float = 1.0, stride=1, padding=0, dilation=1, groups: int = 1,
                  dropout_mask=None) -> dict[str, np.ndarray]:
    """Gradients of sum(dy * y) for y = conv_forward(...): dx, dA, dB, db.

    With cols = im2col(x), cols~ = im2col(x~), u = A cols~ (N, r, L), g = dy (N, O, L):
        dB = s g u^T (per group)         du = s B^T g (per group)
        dA = du cols~^T                  dx = col2im(W^T g) + col2im(A^T du) * mask
        db = g summed over N and L
    """
    x, W, A, B, dy = (_as_f64(n, v) for n, v in (("x", x), ("W", W), ("A", A), ("B", B), ("dy", dy)))
    d, kernel, stride, padding, dilation = _conv_setup(x, W, A, B, stride, padding, dilation, groups)
    mask = None if dropout_mask is None else _as_f64("dropout_mask", dropout_mask)
    x_lora = x if mask is None else x * mask
    cols, index, padded, out, _ = _im2col(x, kernel, stride, padding, dilation)
    cols_lora = _im2col(x_lora, kernel, stride, padding, dilation)[0]
    N, O = x.shape[0], W.shape[0]
    g = dy.reshape(N, O, -1)
    u = _grouped(cols_lora, A, 1)
    dB, du = _grouped_grads(u[:, :, None, :], B, s * g, groups)
    dA, dcols_lora = _grouped_grads(cols_lora, A, du[:, :, 0, :], 1)
    _, dcols = _grouped_grads(cols, W, g, groups)
    dx_lora = _col2im(dcols_lora, index, padded, kernel, out, padding)
    if mask is not None:
        dx_lora = dx_lora * mask
    dx = _col2im(dcols, index, padded, kernel, out, padding) + dx_lora
    return {"dx": dx, "dA": dA, "dB": dB, "db": g.sum(axis=(0, 2))}


def conv_delta(A, B, s: float = 1.0) -> np.ndarray:
    """The update of an ungrouped kernel, (O, C, *k): delta[o, c, t] = s sum_j B[o, j] A[j, c, t]."""
    A, B = _as_f64("A", A), _as_f64("B", B)
    return s * np.einsum("oj,jct->oct", B.reshape(B.shape[0], -1), A.reshape(A.shape[0], A.shape[1], -1)
                         ).reshape(B.shape[0], *A.shape[1:])


__all__ = ["conv_backward", "conv_delta", "conv_forward", "embedding_backward", "embedding_delta", "embedding_forward"]
