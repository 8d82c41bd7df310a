"""DoRA against lorakern.core.dora, independently of the code under test: a random DoRA layer, the scale of
each result's rounding error, and one comparison of output and every gradient (tests/test_dora.py, the kernel
tests and ``lorakern check`` use it), for one DoRA adapter or a mixed-adapter batch (``compare_mixed_dora``). The dropout mask is redrawn from the chosen path's documented generator (lorakern.testing_masks)."""
from __future__ import annotations

import math
import warnings
from typing import Optional

import numpy as np
import torch

from lorakern import core
from lorakern.layer import LoraLinear
from lorakern.testing import TOLERANCE, Comparison, bound, magnitudes, reference_scaling, rel_error


def dora_layer(K: int, N: int, r: int, dtype: torch.dtype, *, bias: bool = True, dropout: float = 0.0,
               alpha=None, seed: int = 0, backend: str = "torch", device: str = "cpu") -> LoraLinear:
    """A DoRA LoraLinear with every tensor random (B and the magnitude too: every gradient is non-trivial)."""
    gen = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # r > min(K, N) is legal
        layer = LoraLinear(K, N, bias=bias, r=r, alpha=alpha, dropout=dropout, dtype=torch.float64, use_dora=True)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(max(p.shape[-1], 1)))
    layer.backend = backend
    return layer.to(device=device, dtype=dtype)


def f64(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    return None if t is None else t.detach().to(torch.float64).cpu().numpy()


def dora_magnitudes(x, W, A, B, m, b, dy, s: float, mask, tiny: float) -> dict[str, np.ndarray]:
    """The scale of each element's rounding error (the computation on absolute values). c = m / n carries
    the conditioning of the norm identity: n^2 is a sum of terms whose absolute sum over n^2 is kappa."""
    K, N = W.shape[1], W.shape[0]
    x2, g = abs(x.reshape(-1, K)), abs(dy.reshape(-1, N))
    keep = np.ones_like(x2) if mask is None else abs(mask.reshape(-1, K))
    xl = x2 * keep
    n = core.dora.weight_norm(W, A, B, s)
    terms = (W * W).sum(1) + 2 * abs(s) * (abs(B) * abs(W @ A.T)).sum(1) + s * s * ((abs(B) @ abs(A @ A.T)) * abs(B)).sum(1)
    c = abs(m) / n * (1 + terms / n**2)
    aW, aA, aB, s = abs(W), abs(A), abs(B), abs(s)
    u = xl @ aA.T + tiny
    z = xl @ aW.T + s * (u @ aB.T)
    gc = g * c
    gcB = gc @ aB + tiny
    # with dropout: x W^T + (c - 1) x~ W^T + c s u B^T
    base = c * (xl @ aW.T) if mask is None else x2 @ aW.T + (c + 1) * (xl @ aW.T)
    return {
        "y": (base + c * s * (u @ aB.T) + (0.0 if b is None else abs(b))).reshape(dy.shape),
        "dx": (g @ aW * (mask is not None) + ((gc + g * (mask is not None)) @ aW + s * gcB @ aA) * keep).reshape(x.shape),
        "dA": s * (gcB.T @ xl),
        "dB": s * (gc.T @ u),
        "dm": (g * z).sum(0) / n * (1 + terms / n**2),
        "db": g.sum(0),
    }


def compare_dora(layer: LoraLinear, x: torch.Tensor, seed: int = 0, perturb: Optional[dict] = None) -> Comparison:
    """Run the layer's active DoRA adapter on x (train mode, fixed dropout seed), backprop, compare every
    result (those whose tensors require grad: x, A, B, m, the bias) with lorakern.core.dora in float64.
    ``perturb`` {name: factor} spoils a result by factor x its bound first (the mutation check). A 4-bit
    base's weight is decoded by lorakern.core from its bytes (x in the compute dtype)."""
    from lorakern import dispatch
    from lorakern.testing import reference_nf4_weight
    from lorakern.testing_masks import backend_mask

    dtype = x.dtype
    x = x.detach().requires_grad_(True)
    backend = dispatch.choose(layer._call_for(x), layer.backend)[0].name
    mask = None
    if layer.training and layer.dropout > 0:
        layer.dropout_seed = seed + 1
        # the chosen path's mask for that seed, recomputed from its documented generator (torch / c: torch.rand
        # from a seeded generator; triton: Philox per element), kept entries 1 / (1 - p) as a float32
        mask = backend_mask(backend, seed + 1, tuple(x.shape), layer.dropout, x.device)
    y = layer(x)
    gen = torch.Generator().manual_seed(seed)
    grad_y = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device, dtype)
    a = layer.adapters[layer.active_adapters[0]]
    wanted = {name: t for name, t in (("dx", x), ("dA", a.lora_A), ("dB", a.lora_B), ("dm", a.lora_magnitude_vector),
                                      ("db", layer.bias)) if t is not None and t.requires_grad}
    grads = dict(zip(wanted, torch.autograd.grad(y, list(wanted.values()), grad_y)))
    # the interpreted kernels convert fp32 to bf16 by truncation (lorakern.testing's note): so does W here
    W = (reference_nf4_weight(layer.nf4, dtype, truncate=backend == "triton" and x.device.type == "cpu")
         if layer.is_quantized else f64(layer.weight_out_in))
    A, B, m, b = f64(a.lora_A), f64(a.lora_B), f64(a.lora_magnitude_vector), f64(layer.bias)
    xs, dy, s = f64(x), f64(grad_y), core.scaling(a.r, a.alpha)  # s recomputed from r and alpha
    ref = {"y": core.dora.forward(xs, W, A, B, m, b, s, dropout_mask=mask),
           **core.dora.backward(xs, W, A, B, m, dy, s, dropout_mask=mask)}
    mag = dora_magnitudes(xs, W, A, B, m, b, dy, s, mask, torch.finfo(dtype).tiny)
    length = max(int(np.prod(x.shape[:-1])), layer.in_features, layer.out_features)
    # two more roundings than plain LoRA: c to the compute dtype, and the product c z
    limit = bound(dtype, length) + 2 * TOLERANCE[dtype][0]
    return _judged({"y": y, **grads}, ref, mag, limit, dtype, tuple(x.shape), perturb)


def compare_mixed_dora(layer: LoraLinear, x: torch.Tensor, slots: list[int], names: list[str], seed: int = 0,
                       perturb: Optional[dict] = None) -> Comparison:
    """A mixed batch, ``layer.forward_rows(x, slots, names)`` on a 2-D x without dropout (eval, or p = 0),
    against the float64 reference row by row: a row of a DoRA adapter through lorakern.core.dora, of a plain
    one through core LoRA, of slot -1 as x W^T + b; dx, each adapter's dA<i>, dB<i> (and dm<i> for DoRA)
    summed over its rows, db when the bias trains. Each element's allowed error comes from its row's
    computation on absolute values, against the single DoRA call's bound; ``perturb`` as in compare_dora."""
    dtype = x.dtype
    x = x.detach().requires_grad_(True)
    y = layer.forward_rows(x, torch.tensor(slots, dtype=torch.int64, device=x.device), names)
    gen = torch.Generator().manual_seed(seed)
    grad_y = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device, dtype)
    adapters = [layer.adapters[n] for n in names]
    wanted = {"dx": x}
    for i, a in enumerate(adapters):
        wanted.update({f"dA{i}": a.lora_A, f"dB{i}": a.lora_B, **({f"dm{i}": a.lora_magnitude_vector} if a.use_dora
                                                                   else {})})
    if layer.bias is not None and layer.bias.requires_grad:
        wanted["db"] = layer.bias
    got = {"y": y, **dict(zip(wanted, torch.autograd.grad(y, list(wanted.values()), grad_y)))}
    W = _reference_weight(layer, dtype)
    b, xs, dy = f64(layer.bias), f64(x), f64(grad_y)
    tiny = torch.finfo(dtype).tiny
    ref = {"y": xs @ W.T + (0.0 if b is None else b), "dx": dy @ W, "db": dy.sum(0)}
    mag = {"y": abs(xs) @ abs(W).T + (0.0 if b is None else abs(b)), "dx": abs(dy) @ abs(W), "db": abs(dy).sum(0)}
    for name in wanted:
        if name not in ref:
            ref[name], mag[name] = np.zeros(wanted[name].shape), np.zeros(wanted[name].shape)
    for row, slot in enumerate(slots):
        if slot < 0:
            continue
        a = adapters[slot]
        A, B, m = f64(a.lora_A), f64(a.lora_B), f64(a.lora_magnitude_vector)
        s = reference_scaling(a.r, a.alpha, a.use_rslora)  # recomputed, not read from the layer
        xi, gi = xs[row:row + 1], dy[row:row + 1]
        if a.use_dora:
            out = {"y": core.dora.forward(xi, W, A, B, m, b, s), **core.dora.backward(xi, W, A, B, m, gi, s)}
            part = dora_magnitudes(xi, W, A, B, m, b, gi, s, None, tiny)
        else:
            out = {"y": core.forward(xi, W, A, B, b, s), **core.backward(xi, W, A, B, gi, s)}
            part = magnitudes(xi, W, A, B, b, gi, s, None, tiny)
        for key in ("y", "dx"):
            ref[key][row], mag[key][row] = out[key][0], part[key][0]
        for key in ("dA", "dB") + (("dm",) if a.use_dora else ()):
            ref[f"{key}{slot}"] = ref[f"{key}{slot}"] + out[key]
            mag[f"{key}{slot}"] = mag[f"{key}{slot}"] + part[key]
    limit = bound(dtype, max(len(slots), layer.in_features, layer.out_features)) + 2 * TOLERANCE[dtype][0]
    return _judged(got, ref, mag, limit, dtype, tuple(x.shape), perturb)


def _judged(got: dict, ref: dict, mag: dict, limit: float, dtype: torch.dtype, shape: tuple,
            perturb: Optional[dict]) -> Comparison:
    """Each result's error against its reference, in units of its per-element bound; ``perturb`` {name: factor}
    first spoils a result by factor x its bound (the mutation check)."""
    for name, factor in (perturb or {}).items():
        got[name] = got[name].detach().double() + factor * limit * torch.as_tensor(mag[name], device=got[name].device)
    errors, details = {}, {}
    for name in got:
        errors[name], details[name] = rel_error(got[name], ref[name], mag[name], dtype)
    return Comparison(dtype, shape, errors, details, limit)


def _reference_weight(layer: LoraLinear, dtype: torch.dtype) -> np.ndarray:
    """The layer's (out, in) base weight in float64 as the reference uses it: a 4-bit base decoded by
    lorakern.core from its bytes (in the compute dtype), a dense one as it is."""
    from lorakern.testing import reference_nf4_weight

    return reference_nf4_weight(layer.nf4, dtype) if layer.is_quantized else f64(layer.weight_out_in)
