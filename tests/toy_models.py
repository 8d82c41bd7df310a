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


def train_mixed_and_alone(build, rows, steps, lr=0.005):
    """SGD on ``build()`` in one mixed batch (``rows``: an adapter name or None per batch row), and on a fresh
    ``build()`` per adapter trained alone on its own rows, over the same ``steps`` ((x, target) pairs; the loss
    summed over rows, so each adapter's share is its rows' sum). Returns (mixed model, {name: alone model})."""
    import lorakern

    mixed = build()
    params = [p for n, p in mixed.named_parameters() if ".adapters." in n or ".modules_to_save." in n]
    optimizer = torch.optim.SGD(params, lr=lr)
    for x, y in steps:
        optimizer.zero_grad()
        with lorakern.adapter_rows(mixed, rows):
            loss = ((mixed(x) - y) ** 2).sum()
        loss.backward()
        optimizer.step()
    alone = {}
    for name in sorted({r for r in rows if r is not None}):
        model = alone[name] = build()
        lorakern.set_adapter(model, name)
        mine = [i for i, r in enumerate(rows) if r == name]
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
        for x, y in steps:
            optimizer.zero_grad()
            ((model(x[mine]) - y[mine]) ** 2).sum().backward()
            optimizer.step()
    return mixed, alone


def check_compiled_mixed_batch(model, x, rows):
    """``model`` in a mixed batch (``rows``): no graph breaks under torch.compile, and the compiled model's
    output and every gradient equal eager's. Returns (the compiled model, eager's gradients by name)."""
    import lorakern

    def loss_and_grads(fn):
        for p in model.parameters():
            p.grad = None
        with lorakern.adapter_rows(model, rows):
            out = fn(x)
            out.square().sum().backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    eager_out, eager_grads = loss_and_grads(model)
    with lorakern.adapter_rows(model, rows):
        explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, backend="aot_eager")
    compiled_out, compiled_grads = loss_and_grads(compiled)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys()
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    return compiled, eager_grads
