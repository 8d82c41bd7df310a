"""``lorakern bench --adapters N``: a mixed-adapter batch, its rows spread evenly over N adapters, timed
side by side (interleaved rounds, as lorakern.bench does) against the frozen ``nn.Linear``.

Providers, all holding the same W, b and the N adapters' A, B (rank r, scale s):
- ``frozen nn.Linear``: the floor;
- ``lorakern mixed``: a LoraLinear with N adapters inside a mixed batch (the rows grouped once, as
  lorakern.adapter_rows does for a model; the layer derives its token grouping from that);
- ``lorakern loop``: lorakern's single-adapter layer run once per adapter on its rows' slice, the
  outputs scattered back (what a user without mixed batches writes);
- ``PEFT mixed``: PEFT's ``lora.Linear`` with ``adapter_names=`` (its mixed-batch forward). Forward
  only: PEFT refuses ``adapter_names`` in training mode.

``use_dora`` (``lorakern bench --adapters N --use-dora``): every adapter DoRA (magnitudes 10% above the row norms
of W + s B A, so m / n is not 1); ``lorakern mixed`` then runs the C path on fp32 CPU tensors, ``lorakern mixed
(torch path)`` the same layer pinned to the torch path beside it, the loop lorakern's single-adapter DoRA
call per slice; no PEFT row (PEFT refuses DoRA with ``adapter_names``).

The input is (rows, tokens per row, K) with M = rows x tokens tokens (128 per row, fewer when that would
leave an adapter under two rows); row b uses adapter b mod N.
"""
from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from lorakern.bench.measure import Row, timed_row
from lorakern.bench.providers import FROZEN, Built, _base_linear, _importable, make_operands
from lorakern.bench.report import markdown, summary, write_results
from lorakern.bench.shapes import Shape
from lorakern.bench.timing import MODES, _step, _timer, calls_per_sample

TOKENS_PER_ROW = 128


def _adapters(o, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """N (A, B) pairs: the operands' own and N - 1 perturbed copies, each a leaf that trains."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for a in range(n):
        noise = lambda t: (torch.randn(t.shape, generator=gen) * 0.1 * a).to(t.device, t.dtype)
        out.append(((o.A.detach() + noise(o.A)).requires_grad_(True), (o.B.detach() + noise(o.B)).requires_grad_(True)))
    return out


def _mixed_providers(o, x3: torch.Tensor, n: int, modes, use_dora: bool = False) -> dict[str, Callable[[], Built]]:
    from lorakern import dispatch
    from lorakern.dora import row_norms_sq, weight_norm
    from lorakern.layer import LoraLinear
    from lorakern.rows import RowGroups

    pairs = _adapters(o, n)
    # DoRA: each adapter's magnitude 10% above its row norms (as lorakern.bench._magnitude)
    magnitudes = [(1.1 * weight_norm(o.W, A, B, o.s)).to(o.W.dtype).requires_grad_(True) for A, B in pairs] \
        if use_dora else [None] * n
    rows = x3.shape[0]
    names = [f"a{i}" for i in range(n)]
    row_names = [names[b % n] for b in range(rows)]
    r = o.A.shape[0]
    N, K = o.W.shape
    flat = lambda: x3.reshape(-1, K)

    def frozen() -> Built:
        return Built(lambda: F.linear(x3, o.W, o.b), [x3])

    def lorakern_mixed(backend: Optional[str] = None) -> Built:
        layer = LoraLinear(K, N, r=r, alpha=o.s * r, device=o.W.device, dtype=o.W.dtype, adapter_name=names[0],
                           use_dora=use_dora)
        for name in names[1:]:
            layer.add_adapter(name, r=r, alpha=o.s * r, use_dora=use_dora)
        with torch.no_grad():
            layer.weight.copy_(o.W)
            layer.bias.copy_(o.b)
            for name, (A, B), m in zip(names, pairs, magnitudes):
                layer.adapters[name].lora_A = torch.nn.Parameter(A.detach().clone())
                layer.adapters[name].lora_B = torch.nn.Parameter(B.detach().clone())
                if m is not None:
                    layer.adapters[name].lora_magnitude_vector.copy_(m)
                    layer.adapters[name].lora_magnitude_vector.requires_grad_(True)  # every adapter trains, as in a block
        layer.row_groups = RowGroups(row_names, names)  # what adapter_rows sets, once per batch
        layer.backend = backend
        params = [x3] + [p for name in names for p in layer.adapters[name].parameters()]
        return Built(lambda: layer(x3), params)

    def lorakern_loop() -> Built:
        from lorakern.functional import lora_linear

        slot = torch.tensor([b % n for b in range(rows)])
        token_rows = [torch.nonzero(slot == a).flatten() for a in range(n)]
        token_rows = [((t[:, None] * x3.shape[1]) + torch.arange(x3.shape[1])).reshape(-1).to(x3.device)
                      for t in token_rows]
        every = torch.cat(token_rows)

        norm_sq = row_norms_sq(o.W) if use_dora else None  # a layer's cached ||W_i||^2

        def one(x_rows, A, B, m) -> torch.Tensor:
            if m is None:
                return lora_linear(x_rows, o.W, o.b, A, B, o.s)
            return dispatch.lora_forward(x_rows, "dense", o.W, o.b, [(A, B, o.s, 0.0, m)], base_norm_sq=norm_sq)

        def forward() -> torch.Tensor:
            x2 = flat()
            outs = [one(x2.index_select(0, idx), A, B, m) for idx, (A, B), m in zip(token_rows, pairs, magnitudes)]
            y = x2.new_empty(x2.shape[0], N).index_copy(0, every, torch.cat(outs))
            return y.reshape(*x3.shape[:-1], N)

        return Built(forward, [x3] + [p for pair, m in zip(pairs, magnitudes) for p in (*pair, m) if p is not None])

    def peft_mixed() -> Built:
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear

        layer = Linear(_base_linear(o), names[0], config=LoraConfig(r=r, lora_alpha=o.s * r), r=r,
                       lora_alpha=o.s * r)
        for name in names[1:]:
            layer.update_layer(name, r=r, lora_alpha=o.s * r, config=LoraConfig(r=r, lora_alpha=o.s * r))
        with torch.no_grad():
            for name, (A, B) in zip(names, pairs):
                layer.lora_A[name].weight.copy_(A)
                layer.lora_B[name].weight.copy_(B)
                layer.scaling[name] = o.s
        layer.to(device=o.W.device, dtype=o.W.dtype).eval()
        return Built(lambda: layer(x3, adapter_names=row_names), [x3])

    out = {FROZEN: frozen, "lorakern mixed": lorakern_mixed, "lorakern loop": lorakern_loop}
    if use_dora:
        out["lorakern mixed (torch path)"] = lambda: lorakern_mixed("torch")
        return out  # PEFT refuses DoRA with adapter_names
    if _importable("peft"):
        out["PEFT mixed (fwd only)"] = peft_mixed
    return out


def measure_mixed(shape: Shape, n_adapters: int, dtype: torch.dtype, device: str, rounds: int = 7,
                  modes=MODES, calls: int = 0, use_dora: bool = False) -> list[Row]:
    """Time every provider on ``shape`` with its rows spread over ``n_adapters`` adapters (DoRA ones with
    ``use_dora``), interleaved."""
    if n_adapters < 1:
        raise ValueError(f"--adapters must be at least 1, got {n_adapters}")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    per_row = min(TOKENS_PER_ROW, shape.M)
    while per_row > 1 and shape.M // per_row < 2 * n_adapters:  # at least two rows per adapter
        per_row //= 2
    if shape.M % per_row:
        raise ValueError(f"tokens M={shape.M} must be a multiple of {per_row} tokens per row")
    o = make_operands(shape, dtype, device)
    x3 = o.x.detach().reshape(shape.M // per_row, per_row, shape.K).requires_grad_(True)
    grad = o.grad.reshape(shape.M // per_row, per_row, shape.N)
    built = {name: make() for name, make in _mixed_providers(o, x3, n_adapters, modes, use_dora).items()}
    timed = _timer(device)
    rows = []
    for mode in modes:
        steps = {name: _step(b, grad, mode) for name, b in built.items() if mode == "fwd" or "PEFT" not in name}
        for step in steps.values():
            timed(step.run, 1, step.setup)
        n_calls = calls if calls > 0 else calls_per_sample(timed, steps[FROZEN])
        samples: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(rounds):
            for name, step in steps.items():
                if step.setup is not None:
                    step.setup()
                samples[name].append(timed(step.run, n_calls))
        base = samples[FROZEN]
        label = f"{shape.name}, {n_adapters} {'DoRA ' if use_dora else ''}adapters"
        for name, values in samples.items():
            rows.append(timed_row(label, shape, dtype, mode, name, values, base))
    return rows


def run_mixed(shapes: list[Shape], n_adapters: int, dtype: torch.dtype, device: str, rounds: int = 7,
              modes=MODES, out_dir: Optional[str] = None, use_dora: bool = False) -> list[Row]:
    """Measure and print (and write mixed.{json,md} into ``out_dir``)."""
    rows = []
    for i, shape in enumerate(shapes):
        print(f"[{i + 1}/{len(shapes)}] {shape.name} M={shape.M} r={shape.r}, {n_adapters} "
              f"{'DoRA ' if use_dora else ''}adapters", file=sys.stderr, flush=True)
        rows.extend(measure_mixed(shape, n_adapters, dtype, device, rounds, modes, use_dora=use_dora))
    text = markdown(rows) + "\n\n" + summary(rows)
    print(text)
    if out_dir:
        write_results(out_dir, "mixed_dora" if use_dora else "mixed",
                      {"adapters": n_adapters, "use_dora": use_dora, "rows": [asdict(r) for r in rows]}, text)
    return rows


__all__ = ["measure_mixed", "run_mixed"]
