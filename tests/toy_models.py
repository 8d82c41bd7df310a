"""A small model and an adapter randomizer that several test files share (no pytest here: the DDP worker
script of test_mixed_batches.py imports it in its own processes)."""
import torch
from torch import nn


class Toy(nn.Module):
    """q (8 -> 6), v (6 -> 6) and head (6 -> 3) with ReLUs between; every Toy() has the same weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(8, 6)
        self.v = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.v(torch.relu(self.q(x)))))


def randomize(model: nn.Module, seed: int) -> None:
    """Every adapter parameter drawn from 0.3 N(0, 1) (B too, so no adapter starts as a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
