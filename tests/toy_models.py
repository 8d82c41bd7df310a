"""A small model and an adapter randomizer that several test files share (no pytest here: the DDP worker
script of test_mixed_models.py imports it in its own processes)."""
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


class InitToy(nn.Module):
    """q (20 -> 12), v (12 -> 14) and head (14 -> 3) with ReLUs between, seeded: layers wide enough for the
    inits that decompose the base weight (PiSSA, OLoRA, LoftQ) at r up to 12."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.q = nn.Linear(20, 12)
        self.v = nn.Linear(12, 14)
        self.head = nn.Linear(14, 3)

    def forward(self, x):
        return self.head(torch.relu(self.v(torch.relu(self.q(x)))))


def randomize(model: nn.Module, seed: int) -> None:
    """Every adapter parameter drawn from 0.3 N(0, 1) (B too, so no adapter starts as a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)


def check_mixed_training_equals_alone(build, rows, steps, lr=0.005):
    """SGD on ``build()`` in one mixed batch (``rows``: an adapter name or None per batch row), and on a fresh
    ``build()`` per adapter trained alone on its own rows, over the same ``steps`` ((x, target) pairs; the loss
    summed over rows, so each adapter's share is its rows' sum): every parameter of an adapter ends where
    training it alone ends. Returns {adapter name: {parameter name: its tensor in the mixed model}}."""
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
    trained_by_name = {}
    for name in sorted({r for r in rows if r is not None}):
        alone = build()
        lorakern.set_adapter(alone, name)
        mine = [i for i, r in enumerate(rows) if r == name]
        optimizer = torch.optim.SGD([p for p in alone.parameters() if p.requires_grad], lr=lr)
        for x, y in steps:
            optimizer.zero_grad()
            ((alone(x[mine]) - y[mine]) ** 2).sum().backward()
            optimizer.step()
        trained = trained_by_name[name] = {n: p for n, p in mixed.named_parameters() if f".{name}." in n}
        assert trained
        for n, p in alone.named_parameters():
            if n in trained:
                torch.testing.assert_close(trained[n], p, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    return trained_by_name


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


def assert_close_scaled(got, want, rtol: float, atol: float, what: str) -> None:
    """``got`` (a tensor) against ``want`` (float64 NumPy) with atol scaled by the larger of 1 and want's largest
    magnitude: the bound the mixed-batch tests put on every output and gradient."""
    import numpy as np

    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got.detach().double().cpu().numpy(), want, rtol=rtol, atol=atol * scale, err_msg=what)
