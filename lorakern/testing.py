"""Comparison against lorakern.core shared by the tests and ``lorakern check``.

Everything the reference uses is recomputed here, never read from the layer under test: the scaling
from (r, alpha, use_rslora), the dropout mask from the seed through the chosen backend's documented
generator (lorakern.testing_masks), and a 4-bit base's weight decoded by lorakern.core from the
packed bytes and block statistics. The inputs are the layer's operands cast to the compute dtype, so
the float64 reference sees exactly the values the backend sees. (One documented conversion is modelled:
the Triton interpreter converts fp32 to bf16 by truncation, so there the decoded 4-bit weight is truncated
to bf16 as the interpreted kernel does; compiled kernels and torch round to nearest. Compiled kernels may
fuse the double-quantized absmax's multiply-add, an fp32 ulp that can flip W's half rounding: R below then
counts W as a rounded value too.)

Each element's error |got - ref| is compared with its own allowed error

    allowed = eps_s * R + sqrt(L) * eps_a * mag

eps_s the storage dtype's eps (2 unit roundoffs u_s), eps_a the accumulation dtype's (fp32 for fp16 and
bf16), L the longest reduction (max of M, K, N), and:

- mag: the computation on absolute values (|x| |W|^T + |b| + s (|x~| |A|^T) |B|^T for y, likewise for
  each gradient, ``magnitudes``): a length-L dot product accumulated in a dtype of unit roundoff u_a
  errs by at most L u_a mag (the worst case, Higham 2002 eq. 3.5); its rounding errors are
  independent and centred, so in practice they grow like sqrt(L) u_a mag (Higham and Mary 2019,
  probabilistic bound), which the second term allows twice over (eps_a = 2 u_a).
- R, the values rounded to the storage dtype on the way to the element. fl(t) = t (1 + d), |d| <= u_s,
  so each rounded t contributes at most u_s |t| times t's weight in the result:
    fp32 / fp64 (the accumulation dtype is the storage dtype; W + s B A of the merged formulation rounds
    operands inside the reduction): R = STORE_ULPS * mag, the flat (2 eps + sqrt(L) eps) mag bound.
    fp16 / bf16 (only the factored formulation; products accumulate in fp32 from exact half inputs, and
    only results and rank-r intermediates are rounded): with u = x~ A^T, v = g B (signed, float64)
      y:  |y| + |x W^T| + |b| + 2 |s u B^T| + s |u| |B|^T       (+ s (|x~| |A|^T) |B|^T with dropout: x~ rounded)
      dx: |dx| + |g W| + 2 |s (v A) m| + s (|v| |A|) |m|
      dA: 2 |dA| + s |v|^T |x~|                                 (twice with dropout)
      dB: 2 |dB| + s |g|^T |u|                                  (+ s |g|^T (|x~| |A|^T) with dropout)
      db: |db|
    each listed term a rounding (the partial results y and dx are summed from, the rank-r
    intermediates, the result itself; the LoRA terms twice, for the product by s) and eps_s = 2 u_s
    a factor two of slack over first order. This bound follows the values, not the magnitudes: an
    element whose terms cancel is held to its own size, which is why it sees an error a flat
    2 eps mag (1.6% of the magnitude for bf16) would let through.

Values at or below the dtype's smallest normal number round to a fixed spacing, so R also has a floor
of 8 tiny. The comparison passes when every element's |got - ref| <= allowed; the errors reported are
the worst ratio |got - ref| / allowed per tensor (1.0 is the bound).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch

from lorakern import core
from lorakern.testing_masks import backend_mask

# dtype -> (storage eps, accumulation eps)
TOLERANCE = {
    torch.float64: (torch.finfo(torch.float64).eps, torch.finfo(torch.float64).eps),
    torch.float32: (torch.finfo(torch.float32).eps, torch.finfo(torch.float32).eps),
    torch.float16: (torch.finfo(torch.float16).eps, torch.finfo(torch.float32).eps),
    torch.bfloat16: (torch.finfo(torch.bfloat16).eps, torch.finfo(torch.float32).eps),
}
HALF_DTYPES = (torch.float16, torch.bfloat16)
# fp32 / fp64: roundings to the storage dtype on the way to one result, in units of eps * mag: the inputs
# are exact, and each result passes through at most two rank-r intermediates, two GEMM outputs and one addition.
STORE_ULPS = 2.0


class LibrarySpy:
    """A compiled C library (lorakern.native) whose calls are recorded by name in ``calls``: the tests that check
    which C functions a path runs put it where ``native.lora_library()`` is asked for."""

    def __init__(self, library) -> None:
        self.library, self.calls = library, []

    def __getattr__(self, name: str):
        function = getattr(self.library, name)

        def call(*args):
            self.calls.append(name)
            return function(*args)

        return call


def bound(dtype: torch.dtype, reduction_length: int) -> float:
    """The fp32 / fp64 bound relative to the magnitude: (STORE_ULPS eps_s + sqrt(L) eps_a)."""
    store, accumulate = TOLERANCE[dtype]
    return STORE_ULPS * store + math.sqrt(max(reduction_length, 1)) * accumulate


def reference_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """LoRA's s: alpha / r, or rsLoRA's alpha / sqrt(r) (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def reference_nf4_weight(storage, dtype: torch.dtype, truncate: bool = False) -> np.ndarray:
    """A 4-bit base's (out, in) weight decoded by lorakern.core from its packed bytes and statistics (code
    tables from core, not the layer's buffers), in fp32, then converted to the compute ``dtype``: rounded to
    nearest, or with ``truncate`` cut toward zero to bf16, as the Triton interpreter converts fp32 to bf16
    (compiled kernels round to nearest)."""
    numpy = lambda t: t.detach().cpu().numpy()
    state = core.nf4.NF4State(packed=numpy(storage.packed), shape=tuple(storage.shape), dtype=storage.dtype_name,
                              blocksize=storage.blocksize)
    if storage.double_quant:
        state.absmax_codes, state.nested_absmax = numpy(storage.absmax), numpy(storage.nested_absmax)
        state.nested_map, state.offset = core.nf4.NESTED_MAP.copy(), np.float32(numpy(storage.offset))
    else:
        state.absmax = numpy(storage.absmax)
    decoded = core.nf4.nf4_dequantize(state)
    if truncate and dtype == torch.bfloat16:
        decoded = (decoded.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    return torch.from_numpy(decoded).to(dtype).to(torch.float64).numpy()


def magnitudes(x, W, A, B, b, dy, s, mask, tiny: float) -> dict[str, np.ndarray]:
    """The scale of each element's accumulation error: the computation on absolute values.

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


def rounded_values(x, W, A, B, b, dy, s, mask, reference: dict, weight_rounding: bool = False
                   ) -> dict[str, np.ndarray]:
    """R of the module docstring for fp16 / bf16: the values rounded to the storage dtype on the way to each
    element (without the tiny floor). ``weight_rounding``: W itself may round to the other neighbour (a
    compiled kernel fuses the nested absmax's multiply-add, so its fp32 decode can be an ulp off core's),
    adding |x| |W|^T to y and |g| |W| to dx."""
    K, N = W.shape[1], W.shape[0]
    x2, g = x.reshape(-1, K), dy.reshape(-1, N)
    m = np.ones_like(x2) if mask is None else mask.reshape(-1, K)
    xl = x2 * m
    u, v = xl @ A.T, g @ B
    s = abs(s)
    dropped = mask is not None
    y = (abs(reference["y"].reshape(-1, N)) + abs(x2 @ W.T) + (0.0 if b is None else abs(b))
         + 2 * abs(s * (u @ B.T)) + s * (abs(u) @ abs(B).T))
    dx = abs(reference["dx"].reshape(-1, K)) + abs(g @ W) + 2 * abs(s * (v @ A) * m) + s * (abs(v) @ abs(A)) * abs(m)
    dA = 2 * abs(reference["dA"]) + (2 if dropped else 1) * s * (abs(v).T @ abs(xl))
    dB = 2 * abs(reference["dB"]) + s * (abs(g).T @ abs(u))
    if weight_rounding:
        y = y + abs(x2) @ abs(W).T
        dx = dx + abs(g) @ abs(W)
    if dropped:
        y = y + s * ((abs(xl) @ abs(A).T) @ abs(B).T)
        dB = dB + s * (abs(g).T @ (abs(xl) @ abs(A).T))
    return {"y": y.reshape(dy.shape), "dx": dx.reshape(x.shape), "dA": dA, "dB": dB, "db": abs(reference["db"])}


def error_over_allowed(actual: torch.Tensor, expected: np.ndarray, allowed: np.ndarray) -> tuple[float, str]:
    """(max over elements of |a - e| / allowed, a description of the worst element)."""
    a = actual.detach().to(torch.float64).cpu().numpy()
    if a.shape != expected.shape:
        return math.inf, f"shape {a.shape} != reference {expected.shape}"
    if a.size == 0:
        return 0.0, "empty"
    if not np.all(np.isfinite(a)):
        return math.inf, f"non-finite values at {np.argwhere(~np.isfinite(a))[:3].tolist()}"
    diff = np.abs(a - expected)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / allowed)
    worst = np.unravel_index(int(rel.argmax()), rel.shape)
    return float(rel[worst]), (f"worst at {tuple(int(i) for i in worst)}: got {a[worst]:.6g}, "
                               f"reference {expected[worst]:.6g}, allowed error {allowed[worst]:.3g}")


def rel_error(actual: torch.Tensor, expected: np.ndarray, magnitude: np.ndarray, dtype: torch.dtype = torch.float64
              ) -> tuple[float, str]:
    """(max over elements of |a - e| / (magnitude + tiny), the worst element): the error relative to the
    computation on absolute values, to hold against ``bound(dtype, L)``. ``tiny``, the dtype's smallest
    normal number, floors the scale: below it the dtype is subnormal and rounds to a fixed spacing."""
    return error_over_allowed(actual, expected, magnitude + torch.finfo(dtype).tiny)


@dataclass
class Comparison:
    """``errors``: per tensor, the worst |got - ref| / allowed (the comparison passes at <= ``bound`` = 1)."""

    dtype: torch.dtype
    shape: tuple
    errors: dict[str, float]
    details: dict[str, str]
    bound: float = 1.0

    @property
    def worst(self) -> tuple[str, float]:
        name = max(self.errors, key=self.errors.get)
        return name, self.errors[name]

    @property
    def passed(self) -> bool:
        return all(e <= self.bound for e in self.errors.values())

    def report(self) -> str:
        if self.bound == 1.0:  # errors are ratios to each element's allowed error
            return "; ".join(f"{k}: {self.errors[k]:.3g} x its bound ({self.details[k]})" for k in self.errors)
        return "; ".join(f"{k}: {self.errors[k]:.3g} ({self.details[k]})" for k in self.errors) + f"; bound {self.bound:.3g}"


def assert_matches_reference(comparison: Comparison) -> None:
    """Fail with every tensor's worst element when a comparison is outside its bound."""
    assert comparison.passed, f"{comparison.dtype} x{comparison.shape}: {comparison.report()}"


def compare_layer(layer, x: torch.Tensor, grad_y: Optional[torch.Tensor] = None, seed: int = 0,
                  perturb: Optional[Mapping[str, float]] = None) -> Comparison:
    """Run ``layer`` (a LoraLinear in training mode or not) on x, backprop grad_y, compare with core.

    With dropout active the layer runs with a fixed dropout seed, and the reference redraws that seed's
    mask through the chosen backend's documented generator (lorakern.testing_masks). ``perturb`` (the
    mutation tests) adds that many times each element's allowed error to the named results ("y", "dx",
    "dA", "dB", "db") in their own dtype before comparing, to show that the comparison sees it.
    """
    from lorakern import dispatch
    from lorakern.layer import LoraLinear

    if not isinstance(layer, LoraLinear):
        raise TypeError(f"compare_layer takes a LoraLinear, got {type(layer).__name__}")
    x = x.detach().requires_grad_(True)
    call = layer._call_for(x)
    dtype = call.x.dtype  # the compute dtype: a 4-bit base's, or x's
    backend = dispatch.choose(call, layer.backend)[0].name
    mask = None
    previous_seed = layer.dropout_seed
    if layer.training and layer.dropout > 0:
        layer.dropout_seed = seed + 1
        mask = backend_mask(backend, seed + 1, tuple(x.shape), layer.dropout, x.device)
    try:
        y = layer(x)
    finally:
        layer.dropout_seed = previous_seed
    if grad_y is None:
        gen = torch.Generator().manual_seed(seed)
        grad_y = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(device=y.device, dtype=y.dtype)
    trainable = [p for p in (layer.lora_A, layer.lora_B, layer.bias) if p is not None and p.requires_grad]
    grads = torch.autograd.grad(y, [x, *trainable], grad_y, allow_unused=True)
    grad_of = dict(zip(["x", *[id(p) for p in trainable]], grads))

    def f64(t):
        return None if t is None else t.detach().to(dtype).to(torch.float64).cpu().numpy()

    interpreted = backend == "triton" and x.device.type == "cpu"  # TRITON_INTERPRET=1
    W = reference_nf4_weight(layer.nf4, dtype, truncate=interpreted) if layer.is_quantized else \
        f64(layer.base.operand(layer))
    A, B, b = f64(layer.lora_A), f64(layer.lora_B), f64(layer.bias)
    xs, dy = f64(x), f64(grad_y)
    s = reference_scaling(layer.r, layer.alpha, layer.use_rslora)
    reference = core.backward(xs, W, A, B, dy, s, dropout_mask=mask)
    reference["y"] = core.forward(xs, W, A, B, b, s, dropout_mask=mask)
    tiny = torch.finfo(dtype).tiny
    mag = magnitudes(xs, W, A, B, b, dy, s, mask, tiny)
    M = int(np.prod(x.shape[:-1])) if x.dim() > 1 else 1
    length = max(M, layer.in_features, layer.out_features)
    store, accumulate = TOLERANCE[dtype]
    fused_decode = layer.is_quantized and layer.nf4.double_quant and backend == "triton" and not interpreted
    rounded = rounded_values(xs, W, A, B, b, dy, s, mask, reference, fused_decode) if dtype in HALF_DTYPES else \
        {k: STORE_ULPS * v for k, v in mag.items()}
    results = {"y": y, "dx": grad_of["x"]}
    for name, p in (("dA", layer.lora_A), ("dB", layer.lora_B), ("db", layer.bias)):
        if p is not None and p.requires_grad:
            results[name] = grad_of[id(p)]
    errors, details = {}, {}
    for name, actual in results.items():
        allowed = store * (rounded[name] + 8 * tiny) + math.sqrt(length) * accumulate * mag[name]
        if perturb and name in perturb:
            shift = torch.from_numpy(perturb[name] * allowed).to(actual.device)
            actual = (actual.detach().to(torch.float64) + shift).to(actual.dtype)
        errors[name], details[name] = error_over_allowed(actual, reference[name], allowed)
    return Comparison(dtype, tuple(x.shape), errors, details)


def random_layer(
    in_features: int, out_features: int, r: int, dtype: torch.dtype, *, bias: bool = True, alpha: Optional[float] = None,
    dropout: float = 0.0, seed: int = 0, train_bias: bool = True, device: str = "cpu", use_rslora: bool = False,
):
    """A LoraLinear with every parameter random (B too, so every gradient is non-trivial)."""
    import warnings

    from lorakern.layer import LoraLinear

    gen = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # r > min(in, out) is legal here on purpose
        layer = LoraLinear(in_features, out_features, bias=bias, r=r, alpha=alpha, dropout=dropout,
                           use_rslora=use_rslora, dtype=torch.float64)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(max(p.shape[-1], 1)))
    if bias and train_bias:
        layer.bias.requires_grad_(True)
    return layer.to(device=device, dtype=dtype)
