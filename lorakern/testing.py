"""Comparison against lorakern.core shared by the tests and ``lorakern check``.

Errors are measured element by element against the float64 reference computed from the very same
low-precision inputs, relative to the magnitude of the terms that make up each element (the same
computation on absolute values: |x| |W|^T + |b| + s (|x| |A|^T) |B|^T for y, likewise for every gradient,
see ``magnitudes``).
That is the scale floating-point error is proportional to, so cancellation cannot fake a failure. The
error is bounded by one table:

    bound(dtype, L) = STORE_ULPS * eps(dtype) + sqrt(L) * eps(accumulation dtype)

The first term is the rounding of results (and of the rank-r intermediates x A^T and dY B) to the
storage dtype; the second the accumulation of a length-L reduction (L = the longest of M, K, N), whose
random-walk error grows like sqrt(L). fp16 and bf16 accumulate in fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from lorakern import core

# dtype -> (storage eps, accumulation eps)
TOLERANCE = {
    torch.float64: (torch.finfo(torch.float64).eps, torch.finfo(torch.float64).eps),
    torch.float32: (torch.finfo(torch.float32).eps, torch.finfo(torch.float32).eps),
    torch.float16: (torch.finfo(torch.float16).eps, torch.finfo(torch.float32).eps),
    torch.bfloat16: (torch.finfo(torch.bfloat16).eps, torch.finfo(torch.float32).eps),
}
# Roundings to the storage dtype on the way to one result: the inputs are exact, and each result passes
# through at most two rank-r intermediates, two GEMM outputs and one addition.
STORE_ULPS = 2.0


def bound(dtype: torch.dtype, reduction_length: int) -> float:
    store, accumulate = TOLERANCE[dtype]
    return STORE_ULPS * store + math.sqrt(max(reduction_length, 1)) * accumulate


def rel_error(actual: torch.Tensor, expected: np.ndarray, magnitude: np.ndarray, dtype: torch.dtype = torch.float64
              ) -> tuple[float, str]:
    """(max over elements of |a - e| / (magnitude + tiny), a description of the worst element).

    ``tiny``, the dtype's smallest normal number, floors the scale: below it the dtype is subnormal and
    rounds to a fixed spacing (tiny * eps), not to a fraction of the value.
    """
    a = actual.detach().to(torch.float64).cpu().numpy()
    if a.shape != expected.shape:
        return math.inf, f"shape {a.shape} != reference {expected.shape}"
    if a.size == 0:
        return 0.0, "empty"
    if not np.all(np.isfinite(a)):
        return math.inf, f"non-finite values at {np.argwhere(~np.isfinite(a))[:3].tolist()}"
    diff = np.abs(a - expected)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / (magnitude + torch.finfo(dtype).tiny))
    worst = np.unravel_index(int(rel.argmax()), rel.shape)
    return float(rel[worst]), (f"worst at {tuple(int(i) for i in worst)}: got {a[worst]:.6g}, "
                               f"reference {expected[worst]:.6g}, term magnitude {magnitude[worst]:.3g}")


def magnitudes(x, W, A, B, b, dy, s, mask, tiny: float) -> dict[str, np.ndarray]:
    """The scale of each element's rounding error: the computation on absolute values.

    The rank-r intermediates u = x~ A^T and g B are stored in the low-precision dtype; where they fall
    below its smallest normal number ``tiny`` they round to a fixed spacing, so they enter as |.| + tiny.
    """
    K, N = W.shape[1], W.shape[0]
    x2, g = abs(x.reshape(-1, K)), abs(dy.reshape(-1, N))
    keep = np.ones_like(x2) if mask is None else abs(mask.reshape(-1, K))
    x_lora = x2 * keep
    W, A, B, s = abs(W), abs(A), abs(B), abs(s)
    u = x_lora @ A.T + tiny
    gB = g @ B + tiny
    y = x2 @ W.T + s * (u @ B.T) + (0.0 if b is None else abs(b))
    dx = g @ W + s * (gB @ A) * keep
    return {
        "y": y.reshape(dy.shape),
        "dx": dx.reshape(x.shape),
        "dA": s * (gB.T @ x_lora),
        "dB": s * (g.T @ u),
        "db": g.sum(axis=0),
    }


@dataclass
class Comparison:
    dtype: torch.dtype
    shape: tuple
    errors: dict[str, float]
    details: dict[str, str]
    bound: float

    @property
    def worst(self) -> tuple[str, float]:
        name = max(self.errors, key=self.errors.get)
        return name, self.errors[name]

    @property
    def passed(self) -> bool:
        return all(e <= self.bound for e in self.errors.values())

    def report(self) -> str:
        return "; ".join(f"{k}: {self.errors[k]:.3g} ({self.details[k]})" for k in self.errors) + f"; bound {self.bound:.3g}"


def assert_matches_reference(comparison: Comparison) -> None:
    """Fail with every tensor's worst element when a comparison is outside its bound."""
    assert comparison.passed, f"{comparison.dtype} x{comparison.shape}: {comparison.report()}"


def compare_layer(layer, x: torch.Tensor, grad_y: Optional[torch.Tensor] = None, seed: int = 0) -> Comparison:
    """Run ``layer`` (a LoraLinear in training mode or not) on x, backprop grad_y, compare with core.

    With dropout active the layer runs with a fixed dropout seed, and the reference uses the mask the
    chosen backend draws for that seed (``Backend.dropout_mask``).
    """
    from lorakern.layer import LoraLinear

    if not isinstance(layer, LoraLinear):
        raise TypeError(f"compare_layer takes a LoraLinear, got {type(layer).__name__}")
    dtype = x.dtype
    x = x.detach().requires_grad_(True)
    mask = None
    previous_seed = layer.dropout_seed
    if layer.training and layer.dropout > 0:
        layer.dropout_seed = seed + 1
        mask = layer.dropout_mask(seed + 1, x).to(torch.float64).cpu().numpy()
    try:
        y = layer(x)
    finally:
        layer.dropout_seed = previous_seed
    if grad_y is None:
        gen = torch.Generator().manual_seed(seed)
        grad_y = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
    trainable = [p for p in (layer.lora_A, layer.lora_B, layer.bias) if p is not None and p.requires_grad]
    grads = torch.autograd.grad(y, [x, *trainable], grad_y, allow_unused=True)
    grad_of = dict(zip(["x", *[id(p) for p in trainable]], grads))

    def f64(t):
        return None if t is None else t.detach().to(torch.float64).cpu().numpy()

    W = f64(layer.weight_out_in)
    A, B, b = f64(layer.lora_A), f64(layer.lora_B), f64(layer.bias)
    xs = f64(x)
    dy = f64(grad_y)
    s = layer.scaling
    y_ref = core.forward(xs, W, A, B, b, s, dropout_mask=mask)
    g = core.backward(xs, W, A, B, dy, s, dropout_mask=mask)
    mag = magnitudes(xs, W, A, B, b, dy, s, mask, torch.finfo(dtype).tiny)
    results = {"y": (y, y_ref, mag["y"]), "dx": (grad_of["x"], g["dx"], mag["dx"])}
    if layer.lora_A.requires_grad:
        results["dA"] = (grad_of[id(layer.lora_A)], g["dA"], mag["dA"])
    if layer.lora_B.requires_grad:
        results["dB"] = (grad_of[id(layer.lora_B)], g["dB"], mag["dB"])
    if layer.bias is not None and layer.bias.requires_grad:
        results["db"] = (grad_of[id(layer.bias)], g["db"], mag["db"])
    errors, details = {}, {}
    for name, (actual, expected, magnitude) in results.items():
        errors[name], details[name] = rel_error(actual, expected, magnitude, dtype)
    M = int(np.prod(x.shape[:-1])) if x.dim() > 1 else 1
    length = max(M, layer.in_features, layer.out_features)
    return Comparison(dtype, tuple(x.shape), errors, details, bound(dtype, length))


def random_layer(
    in_features: int, out_features: int, r: int, dtype: torch.dtype, *, bias: bool = True, alpha: Optional[float] = None,
    dropout: float = 0.0, seed: int = 0, train_bias: bool = True, device: str = "cpu",
):
    """A LoraLinear with every parameter random (B too, so every gradient is non-trivial)."""
    import warnings

    from lorakern.layer import LoraLinear

    gen = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # r > min(in, out) is legal here on purpose
        layer = LoraLinear(in_features, out_features, bias=bias, r=r, alpha=alpha, dropout=dropout,
                           dtype=torch.float64)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(max(p.shape[-1], 1)))
    if bias and train_bias:
        layer.bias.requires_grad_(True)
    return layer.to(device=device, dtype=dtype)
