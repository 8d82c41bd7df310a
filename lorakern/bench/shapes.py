"""What lorakern bench measures: the layer shapes (real models' layers, token counts per device, ranks),
and each shape's FLOPs, compulsory bytes and the card's peaks for the roofline columns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Shape:
    name: str
    M: int
    K: int
    N: int
    r: int


# Layers of real models (in_features K, out_features N). Token counts M: sized for 2 CPU cores (a
# training step of the largest shape stays under a second) and real batch sizes on a GPU.
LAYERS = {
    "768x768": ("roberta-base attention", 768, 768),
    "768x3072": ("roberta-base FFN up", 768, 3072),
    "4096x4096": ("LLaMA-style 4096", 4096, 4096),
}
TOKENS_CPU = {"768x768": 4096, "768x3072": 4096, "4096x4096": 1024}
TOKENS_GPU = {"768x768": 8192, "768x3072": 8192, "4096x4096": 8192}
RANKS = (8, 16, 64)


def shape_grid(layers=tuple(LAYERS), ranks=RANKS, device: str = "cpu", tokens: Optional[int] = None) -> list[Shape]:
    """Every layer in ``layers`` at every rank in ``ranks``; M from ``tokens`` or the device's default."""
    out = []
    for key in layers:
        if key not in LAYERS:
            raise ValueError(f"unknown layer {key!r}; choose from {', '.join(LAYERS)} (e.g. --shapes 768x768,4096x4096)")
        name, K, N = LAYERS[key]
        M = tokens or (TOKENS_GPU if device == "cuda" else TOKENS_CPU)[key]
        for r in ranks:
            if not isinstance(r, int) or r <= 0:
                raise ValueError(f"rank must be a positive integer, got {r!r}; pass e.g. --ranks 8,16,64")
            out.append(Shape(f"{name} {key}", M, K, N, r))
    return out


SHAPES_CPU = shape_grid(device="cpu")
SHAPES_GPU = shape_grid(device="cuda")
SHAPES_QUICK = [Shape("quick 96x80", 64, 96, 80, 4)]

# Dense peaks by card: FLOP/s per dtype (16-bit tensor cores, TF32, plain fp32) and HBM bytes/s.
PEAKS = {
    "H200": ({"float16": 989e12, "bfloat16": 989e12, "tf32": 494e12, "float32": 67e12}, 4.8e12),
    "H100": ({"float16": 989e12, "bfloat16": 989e12, "tf32": 494e12, "float32": 67e12}, 3.35e12),
    "A100": ({"float16": 312e12, "bfloat16": 312e12, "tf32": 156e12, "float32": 19.5e12}, 2.0e12),
}


def flops(shape: Shape, mode: str, lora: bool) -> float:
    M, K, N, r = shape.M, shape.K, shape.N, shape.r
    forward = 2 * M * N * K + (2 * M * K * r + 2 * M * N * r if lora else 0)
    # backward: dx = g W (+ (g B) A), g B, dA = (g B)^T x, dB = g^T u
    backward = 2 * M * N * K + (2 * M * N * r + 2 * M * r * K + 2 * M * r * K + 2 * M * N * r if lora else 0)
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[mode]


def min_bytes(shape: Shape, mode: str, itemsize: int) -> float:
    """Compulsory traffic: each operand read once, each result written once."""
    M, K, N, r = shape.M, shape.K, shape.N, shape.r
    forward = (M * K + N * K + M * N + r * (K + N) + M * r) * itemsize
    backward = (M * N + N * K + M * K + M * K + M * r + r * (K + N) * 2) * itemsize
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[mode]


def _card_family() -> Optional[str]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((family for family in PEAKS if family in name), None)
