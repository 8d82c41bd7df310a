"""DoRA under torch.compile(fullgraph=True): a DoRA LoraLinear (dense and NF4 base) and a model with DoRA
adapters trace as one graph and give eager's outputs and gradients; eager and compiled match lorakern.core.dora
in float64; a compiled layer never runs on a stale ||W_i||^2 of its base (the layer computes it inline under
compile: LoraLinear._base_norm_sq). Compiled with aot_eager, as the other compile tests: dynamo and
AOTAutograd trace what inductor would, without its code generation (minutes on two cores). Under compile
the torch path runs (the C kernels are eager-only), so compiled-vs-eager also compares the torch path with
eager's C path on fp32 CPU."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from lorakern import LoraConfig, LoraLinear, core, inject, lora_layers
from lorakern.testing import assert_matches_reference, reference_nf4_weight
from lorakern.testing_dora import compare_dora, dora_layer, f64
from toy_models import Toy, randomize

K, N, R = 64, 12, 3  # NF4: K a multiple of the blocksize (32), so every row starts on a block


def _layer(base: str, dropout: float, magnitude_trains: bool) -> LoraLinear:
    """A DoRA layer with every tensor random (c = m / n is not 1, every gradient non-trivial), auto backend:
    eager runs the C path on fp32 CPU, compiled the torch path. The bias trains."""
    if base == "dense":
        layer = dora_layer(K, N, R, torch.float32, dropout=dropout, seed=3, backend=None)
    else:
        gen = torch.Generator().manual_seed(3)
        linear = nn.Linear(K, N)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(N, K, generator=gen) / math.sqrt(K))
            linear.bias.copy_(torch.randn(N, generator=gen))
        layer = LoraLinear.from_linear(linear, quantize="nf4", blocksize=32, double_quant=True,
                                       compute_dtype=torch.float32, r=R, dropout=dropout, use_dora=True)
        a = layer.adapters["default"]
        with torch.no_grad():
            for p in (a.lora_A, a.lora_B):
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            a.lora_magnitude_vector.mul_(1 + torch.rand(N, generator=gen))
    layer.bias.requires_grad_(True)
    layer.adapters["default"].lora_magnitude_vector.requires_grad_(magnitude_trains)
    return layer.train()


def _compile(module: nn.Module) -> nn.Module:
    torch._dynamo.reset()
    return torch.compile(module, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises


def _run(module: nn.Module, layer: LoraLinear, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    """y and the gradient of <y, dy> for x and every trainable parameter of ``layer``, the global generator
    seeded first (dropout draws from it, in eager and, under aot_eager, in the compiled graph alike)."""
    x = x.detach().requires_grad_(True)
    torch.manual_seed(11)
    y = module(x)
    params = {"x": x, **{n: p for n, p in layer.named_parameters() if p.requires_grad}}
    return {"y": y.detach(), **dict(zip(params, torch.autograd.grad(y, list(params.values()), dy)))}


def _assert_same(got: dict, want: dict, rtol: float = 1e-5) -> None:
    """Equal within fp32 rounding of results O(max |want|): the C and torch paths sum in other orders."""
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=rtol, atol=rtol * float(value.abs().max()), msg=name)


CASES = [("dense", 0.0, True), ("dense", 0.25, True), ("dense", 0.0, False), ("nf4", 0.0, True),
         ("nf4", 0.25, False)]


@pytest.mark.parametrize("base, dropout, magnitude_trains", CASES,
                         ids=["dense", "dense-dropout", "dense-frozen-m", "nf4", "nf4-dropout-frozen-m"])
def test_compiled_layer_matches_eager_and_reference(base, dropout, magnitude_trains):
    """Training mode (A, B, m, the bias and x get gradients; m frozen where said), then eval under no_grad,
    each one compiled graph: outputs and every gradient equal eager's, and the compiled layer's (with dropout a
    fixed seed's mask) equal lorakern.core.dora."""
    layer = _layer(base, dropout, magnitude_trains)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, K, generator=gen)
    dy = torch.randn(2, 5, N, generator=gen)
    compiled = _compile(layer)
    _assert_same(_run(compiled, layer, x, dy), _run(layer, layer, x, dy))
    # with dropout a fixed seed's mask, which compare_dora redraws (traced: lorakern.masks.seeded_rand)
    assert_matches_reference(compare_dora(compiled, x, seed=4))
    layer.dropout_seed = None
    layer.eval()
    with torch.no_grad():
        got, want = compiled(x), layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    a = layer.adapters["default"]
    W = reference_nf4_weight(layer.nf4, torch.float32) if base == "nf4" else f64(layer.weight)
    ref = core.dora.forward(f64(x), W, f64(a.lora_A), f64(a.lora_B), f64(a.lora_magnitude_vector), f64(layer.bias),
                            core.scaling(R, a.alpha))  # s recomputed from r and alpha
    np.testing.assert_allclose(f64(got), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # the comparison can fail: m moved by 20x its tolerance after compiling reaches the compiled graph (an
    # input, not a constant of the trace), and its output no longer equals eager's from before
    with torch.no_grad():
        a.lora_magnitude_vector.mul_(1 + 20e-5)
        moved = compiled(x)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(moved, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def _new_base_state(layer: LoraLinear, seed: int) -> dict:
    """The layer's state dict with another random base weight (an adapter loaded onto another checkpoint)."""
    state = layer.state_dict()
    state["weight"] = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) / math.sqrt(K)
    return state


def test_compiled_layer_follows_its_base_through_load_write_merge_unmerge():
    """After a state-dict load with another base, an in-place write to W, and merge + unmerge, the compiled
    layer matches lorakern.core.dora on the base it holds now: no stale ||W_i||^2. Merged, it runs the merged
    base alone, as eager does (the guard on merged_adapters retraces), with the unmerged output."""
    layer = _layer("dense", 0.0, True)
    x = torch.randn(7, K, generator=torch.Generator().manual_seed(5))
    compiled = _compile(layer)
    assert_matches_reference(compare_dora(compiled, x, seed=5))
    layer.load_state_dict(_new_base_state(layer, 6))
    assert_matches_reference(compare_dora(compiled, x, seed=5))
    with torch.no_grad():
        layer.weight.mul_(1.5)
    assert_matches_reference(compare_dora(compiled, x, seed=5))
    with torch.no_grad():
        before = layer(x)
        layer.merge()  # the merged base alone runs now, in eager and (retraced) compiled alike
        merged = compiled(x)
    torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-5 * float(before.abs().max()))
    layer.unmerge()
    assert_matches_reference(compare_dora(compiled, x, seed=5))


def test_a_stale_norm_under_compile_fails_the_comparison(monkeypatch):
    """The mutation check of the test above: a layer whose compiled graph keeps the norm of its first base
    (the cache this change leaves out of the trace) passes on that base and fails once the base changes."""
    layer = _layer("dense", 0.0, True)
    x = torch.randn(7, K, generator=torch.Generator().manual_seed(5))
    stale = layer._base_norm_sq().clone()
    monkeypatch.setattr(LoraLinear, "_base_norm_sq", lambda self: stale)
    compiled = _compile(layer)
    assert_matches_reference(compare_dora(compiled, x, seed=5))
    layer.load_state_dict(_new_base_state(layer, 6))
    spoiled = compare_dora(compiled, x, seed=5)
    assert not spoiled.passed and spoiled.errors["y"] > spoiled.bound, spoiled


def test_compiled_model_with_dora_adapters_trains_like_eager():
    """inject(use_dora=True) on the toy model (DoRA on q and v, dropout on), torch.compile(fullgraph=True):
    two training steps (SGD between them moves A, B and m) give eager's loss and every adapter's gradients;
    torch._dynamo.explain sees no graph break."""
    model = inject(Toy(), LoraConfig(r=2, target_modules=["q", "v"], lora_dropout=0.1, use_dora=True))
    randomize(model, 0)
    assert all(layer.use_dora for layer in lora_layers(model).values())
    model.train()
    x = torch.randn(9, 8, generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    compiled_model = copy.deepcopy(model)
    compiled = _compile(compiled_model)
    steps = []
    for module, params in ((model, model), (compiled, compiled_model)):
        optimizer = torch.optim.SGD([p for p in params.parameters() if p.requires_grad], lr=0.5)
        run = []
        for _ in range(2):
            torch.manual_seed(1)
            loss = module(x).pow(2).mean()
            loss.backward()
            run.append({"loss": loss.detach(), **{n: p.grad.clone() for n, p in params.named_parameters()
                                                  if p.requires_grad}})
            optimizer.step()
            optimizer.zero_grad()
        steps.append(run)
    for got, want in zip(steps[1], steps[0]):
        assert any("lora_magnitude_vector" in n for n in want)
        _assert_same(got, want)
