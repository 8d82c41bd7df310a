"""What lorakern bench times: each provider builds, from the same operands (x, W, b, A, B, scale), a
forward and the tensors a training step differentiates (see lorakern.bench's docstring for the list)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from lorakern.bench.shapes import Shape
from lorakern.functional import lora_linear

FROZEN = "frozen nn.Linear"


@dataclass
class Operands:
    x: torch.Tensor
    W: torch.Tensor
    b: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    s: float
    grad: torch.Tensor


def make_operands(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> Operands:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rand = lambda *size, scale=1.0: (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)
    return Operands(
        x=rand(shape.M, shape.K).requires_grad_(True),
        W=rand(shape.N, shape.K, scale=shape.K ** -0.5),
        b=rand(shape.N, scale=0.1),
        A=rand(shape.r, shape.K, scale=shape.K ** -0.5).requires_grad_(True),
        B=rand(shape.N, shape.r, scale=shape.r ** -0.5).requires_grad_(True),
        s=2.0,
        grad=rand(shape.M, shape.N),
    )


@dataclass
class Built:
    """A provider bound to operands: ``forward()`` computes y from o.x; ``params`` are the tensors whose
    gradients a training step needs, in the order (x, A, B) (just (x,) for the frozen layer)."""

    forward: Callable[[], torch.Tensor]
    params: list


def _frozen(o: Operands) -> Built:
    return Built(lambda: F.linear(o.x, o.W, o.b), [o.x])


def _naive(o: Operands) -> Built:
    # The seed's formulation: forms B @ A on every call.
    return Built(lambda: F.linear(o.x, o.W + o.s * (o.B @ o.A), o.b), [o.x, o.A, o.B])


def _lorakern(backend: Optional[str]) -> Callable[[Operands], Built]:
    def build(o: Operands) -> Built:
        return Built(lambda: lora_linear(o.x, o.W, o.b, o.A, o.B, o.s, backend=backend), [o.x, o.A, o.B])

    return build


def _lorakern_pinned(formulation: str) -> Callable[[Operands], Built]:
    """lorakern's torch path with the formulation pinned (``formulation.choose_formulation`` picks one of
    these two by cost for the plain provider): what the choice buys, side by side."""
    from lorakern.formulation import pinned_formulation

    def build(o: Operands) -> Built:
        def forward() -> torch.Tensor:
            with pinned_formulation(formulation):  # the backward follows the forward's choice
                return lora_linear(o.x, o.W, o.b, o.A, o.B, o.s, backend=None if o.x.device.type == "cpu" else "torch")

        return Built(forward, [o.x, o.A, o.B])

    return build


def _lorakern_without_c(o: Operands) -> Built:
    """The torch path with lorakern.native switched off: what the C kernels for the rank-r products buy."""
    from lorakern import native

    def forward() -> torch.Tensor:
        with native.disabled():  # the backward follows the forward's choice
            return lora_linear(o.x, o.W, o.b, o.A, o.B, o.s, backend="torch")

    return Built(forward, [o.x, o.A, o.B])


def _base_linear(o: Operands) -> torch.nn.Linear:
    N, K = o.W.shape
    base = torch.nn.Linear(K, N, device=o.W.device, dtype=o.W.dtype)
    with torch.no_grad():
        base.weight.copy_(o.W)
        base.bias.copy_(o.b)
    base.requires_grad_(False)
    return base


def _peft(o: Operands) -> Built:
    """PEFT's LoRA Linear wrapping an nn.Linear that holds W and b; A, B and the scale copied in."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear

    r = o.A.shape[0]
    layer = Linear(_base_linear(o), "default", config=LoraConfig(r=r, lora_alpha=o.s * r), r=r, lora_alpha=o.s * r)
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        lora_A.copy_(o.A)
        lora_B.copy_(o.B)
    layer.scaling["default"] = o.s
    layer.to(device=o.W.device, dtype=o.W.dtype).train()
    return Built(lambda: layer(o.x), [o.x, lora_A, lora_B])


def _loralib(o: Operands) -> Built:
    """loralib's Linear with the same weights (merge_weights=False, so it never folds B A into W)."""
    import loralib

    N, K = o.W.shape
    r = o.A.shape[0]
    layer = loralib.Linear(K, N, r=r, lora_alpha=o.s * r, merge_weights=False)
    with torch.no_grad():
        layer.weight.copy_(o.W)
        layer.bias.copy_(o.b)
        layer.lora_A.copy_(o.A)
        layer.lora_B.copy_(o.B)
    layer.bias.requires_grad_(False)
    layer.scaling = o.s
    layer.to(device=o.W.device, dtype=o.W.dtype).train()
    return Built(lambda: layer(o.x), [o.x, layer.lora_A, layer.lora_B])


def _magnitude(o: Operands) -> torch.Tensor:
    """A DoRA magnitude 10% above the row norms of W + s B A (so m / n is not 1), as a trained one."""
    from lorakern.dora import weight_norm

    return (1.1 * weight_norm(o.W, o.A, o.B, o.s)).to(o.W.dtype).requires_grad_(True)


def _lorakern_dora(o: Operands, cuda_backend: str = "torch") -> Built:
    """lorakern's DoRA as a layer runs it: ||W_i||^2 computed once (the layer caches it), the rest per call;
    on CUDA on ``cuda_backend`` (the torch path, or the Triton kernels: "lorakern DoRA triton")."""
    from lorakern import dispatch
    from lorakern.dora import row_norms_sq

    m, norm_sq = _magnitude(o), row_norms_sq(o.W)
    backend = None if o.x.device.type == "cpu" else cuda_backend
    return Built(lambda: dispatch.lora_forward(o.x, "dense", o.W, o.b, [(o.A, o.B, o.s, 0.0, m)], requested=backend,
                                               base_norm_sq=norm_sq), [o.x, o.A, o.B, m])


def _peft_dora(o: Operands) -> Built:
    """PEFT's DoRA Linear (use_dora=True) with the same W, b, A, B, s and magnitude."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear

    r = o.A.shape[0]
    layer = Linear(_base_linear(o), "default", config=LoraConfig(r=r, lora_alpha=o.s * r, use_dora=True), r=r,
                   lora_alpha=o.s * r, use_dora=True)
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    magnitude = layer.lora_magnitude_vector["default"].weight
    layer.scaling["default"] = o.s
    with torch.no_grad():
        lora_A.copy_(o.A)
        lora_B.copy_(o.B)
        magnitude.copy_(_magnitude(o))
    layer.to(device=o.W.device, dtype=o.W.dtype).train()
    return Built(lambda: layer(o.x), [o.x, lora_A, lora_B, magnitude])


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def providers(device: str) -> dict[str, Callable[[Operands], Built]]:
    """Every provider available here, by name: peers only when their package is installed."""
    # "lorakern torch": lorakern's torch-side path as auto picks it (with the C kernels for fp32 on a CPU)
    out = {FROZEN: _frozen, "naive (forms B@A)": _naive, "lorakern torch": _lorakern(None if device == "cpu" else "torch")}
    if device == "cuda":
        out["lorakern triton"] = _lorakern("triton")
    else:
        out["lorakern torch, no C"] = _lorakern_without_c
    out["lorakern, factored"] = _lorakern_pinned("factored")
    out["lorakern, merged"] = _lorakern_pinned("merged")
    out["lorakern DoRA"] = _lorakern_dora
    if device == "cuda":
        out["lorakern DoRA triton"] = lambda o: _lorakern_dora(o, "triton")
    if _importable("peft"):
        out["PEFT lora.Linear"] = _peft
        out["PEFT DoRA"] = _peft_dora
    if _importable("loralib"):
        out["loralib Linear"] = _loralib
    return out
