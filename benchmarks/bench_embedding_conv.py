"""LoRA on nn.Embedding and nn.Conv1d/Conv2d: a step's time as a multiple of the frozen base layer's, side by
side with PEFT's layers in the same run (the plain-torch path these layers always take; docs/layer.md).

    python benchmarks/bench_embedding_conv.py [--device cpu] [--rounds 7] [--quick] [--out DIR]

Shapes (CPU defaults): roberta-base's word embeddings (50265 x 768, 4096 tokens, r = 8); a ResNet 3 x 3
conv (64 -> 64 channels, 8 x 56 x 56, r = 8); a Whisper-style conv1d (384 -> 384, k = 3, 8 x 1500, r = 8).
Ratios are paired: each round's lorakern (or PEFT) time over the same round's base time, median over rounds.
"""
import argparse
import copy
import statistics

import torch
from torch import nn

from lorakern import bench
from lorakern.conv import LoraConv
from lorakern.embedding import LoraEmbedding

# name: (base layer factory, input factory)
SHAPES = {
    "embedding 50265x768 M=4096 r=8": (lambda: nn.Embedding(50265, 768, padding_idx=1),
                                       lambda: torch.randint(0, 50265, (8, 512)), 8),
    "conv2d 64->64 k3 8x56x56 r=8": (lambda: nn.Conv2d(64, 64, 3, padding=1), lambda: torch.randn(8, 64, 56, 56), 8),
    "conv1d 384->384 k3 8x1500 r=8": (lambda: nn.Conv1d(384, 384, 3, padding=1), lambda: torch.randn(8, 384, 1500), 8),
}
SHAPES_QUICK = {
    "embedding 97x16 M=24 r=4": (lambda: nn.Embedding(97, 16), lambda: torch.randint(0, 97, (2, 12)), 4),
    "conv2d 4->6 k3 2x9x9 r=2": (lambda: nn.Conv2d(4, 6, 3, padding=1), lambda: torch.randn(2, 4, 9, 9), 2),
    "conv1d 4->6 k3 2x17 r=2": (lambda: nn.Conv1d(4, 6, 3), lambda: torch.randn(2, 4, 17), 2),
}


def _peft(base: nn.Module, r: int) -> nn.Module:
    from peft import LoraConfig
    from peft.tuners.lora import layer as peft_layers

    cls = {nn.Embedding: peft_layers.Embedding, nn.Conv1d: peft_layers.Conv1d, nn.Conv2d: peft_layers.Conv2d}[type(base)]
    return cls(base, "default", config=LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False), r=r,
               lora_alpha=2 * r)


def _candidates(base: nn.Module, x: torch.Tensor, r: int, mode: str, device: str) -> dict:
    base = base.to(device).requires_grad_(False)
    x = x.to(device)
    wrap = LoraEmbedding.from_embedding if isinstance(base, nn.Embedding) else LoraConv.from_conv
    layers = {"base": base, "lorakern": wrap(copy.deepcopy(base), r=r, alpha=2 * r, init=False)}
    if bench._importable("peft"):
        layers["peft"] = _peft(copy.deepcopy(base), r)
    grad = torch.randn_like(base(x))
    candidates = {}
    for name, layer in layers.items():
        params = [p for p in layer.parameters() if p.requires_grad]
        if mode == "fwd" or not params:  # the frozen base has nothing to differentiate: its step is its forward
            candidates[name] = lambda layer=layer: layer(x)
        else:
            candidates[name] = lambda layer=layer, params=params: torch.autograd.grad(layer(x), params, grad)
    return candidates


def measure(shapes: dict, device: str, rounds: int) -> list[dict]:
    rows = []
    for name, (make_base, make_x, r) in shapes.items():
        torch.manual_seed(0)
        base, x = make_base(), make_x()
        for mode in ("fwd", "fwd+bwd"):
            samples = bench.interleaved(_candidates(base, x, r, mode, device), rounds, device)
            row = {"shape": name, "mode": mode, "base_ms": statistics.median(samples["base"])}
            for provider in samples:
                if provider != "base":
                    ratios = [t / b for t, b in zip(samples[provider], samples["base"])]
                    row[f"{provider}_ratio"] = statistics.median(ratios)
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| layer | mode | base ms | lorakern / base | PEFT / base |", "|---|---|---:|---:|---:|"]
    for row in rows:
        peft = f"{row['peft_ratio']:.2f}" if "peft_ratio" in row else "n/a"
        lines.append(f"| {row['shape']} | {row['mode']} | {row['base_ms']:.3f} | {row['lorakern_ratio']:.2f} | {peft} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds: proves the script end to end")
    parser.add_argument("--out", default=None, help="folder for embedding_conv.{json,md}")
    args = parser.parse_args(argv)
    rows = measure(SHAPES_QUICK if args.quick else SHAPES, args.device, 2 if args.quick else args.rounds)
    table = markdown(rows)
    bench.report(table, args.out, "embedding_conv", device=args.device, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
