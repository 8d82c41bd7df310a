"""A lorakern layer's output takes in-place writes, as nn.Linear's does: `out += residual` and an inplace ReLU
after the layer (a residual block, torchvision's classifier heads). Autograd forbids in-place writes into a
view that a custom Function returns, so each path returns its output unviewed (dispatch.function_output).
Each path's gradients after the in-place writes equal those of the same layer followed by the out-of-place
ops, which touch no output in place."""
import pytest
import torch
from torch import nn

from lorakern import LoraLinear
from lorakern.testing_dora import dora_layer
from lorakern.testing import random_layer


def _layer(kind: str, backend: str) -> LoraLinear:
    if kind == "dora":
        layer = dora_layer(24, 16, 3, torch.float32, bias=True, seed=1, backend=backend)
    elif kind == "nf4":
        torch.manual_seed(1)
        layer = LoraLinear.from_linear(nn.Linear(24, 16), quantize="nf4", r=3)
        nn.init.normal_(layer.lora_B)
        layer.backend = backend
    else:
        layer = random_layer(24, 16, 3, torch.float32, seed=1)
        layer.backend = backend
    if kind == "mixed":
        layer.add_adapter("b", r=2)
        nn.init.normal_(layer.adapters["b"].lora_B)
        layer.set_adapter(["default", "b"])
    return layer.train()


def _grads(layer, x, residual, g, in_place: bool, mixed: bool):
    x = x.detach().requires_grad_(True)
    params = [p for p in layer.parameters() if p.requires_grad]
    if mixed:  # rows 0, 2 on "default", 1 on "b", 3 on the base alone
        tokens_per_row = x.numel() // (x.shape[0] * x.shape[-1])
        out = layer.forward_rows(x, torch.tensor([0, 1, 0, -1]).repeat_interleave(tokens_per_row), ["default", "b"])
    else:
        out = layer(x)
    if in_place:
        out += residual
        out = nn.ReLU(inplace=True)(out)
    else:
        out = torch.relu(out + residual)
    return torch.autograd.grad((out * g).sum(), [x, *params])


CASES = [("dense", "torch"), ("dense", "c"), ("nf4", "torch"), ("dora", "torch"), ("dora", "c"), ("mixed", "torch"),
         ("mixed", "c"), ("dense", "triton"), ("dora", "triton"), ("mixed", "triton")]


@pytest.mark.parametrize("lead", [(4,), (4, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("kind, backend", CASES, ids=[f"{k}-{b}" for k, b in CASES])
def test_in_place_writes_after_the_layer_give_the_out_of_place_gradients(kind, backend, lead, monkeypatch):
    from lorakern import dispatch

    layer = _layer(kind, backend)
    gen = torch.Generator().manual_seed(7)
    x, residual, g = (torch.randn(*lead, n, generator=gen) for n in (24, 16, 16))
    chosen, choose = [], dispatch.choose
    monkeypatch.setattr(dispatch, "choose", lambda *a, **k: (lambda out: (chosen.append(out[0].name), out)[1])(
        choose(*a, **k)))
    want = _grads(layer, x, residual, g, in_place=False, mixed=kind == "mixed")
    if set(chosen) != {backend}:  # the path asked for must be the one that ran (the C kernels may not build here)
        pytest.skip(f"{backend} did not run here: {chosen}")
    got = _grads(layer, x, residual, g, in_place=True, mixed=kind == "mixed")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the comparison notices a wrong gradient: a tenth of one entry of dx changed
    spoiled = got[0].clone()
    spoiled.view(-1)[0] += 0.1 * spoiled.abs().max()
    with pytest.raises(AssertionError):
        torch.testing.assert_close(spoiled, want[0], rtol=1e-5, atol=1e-6)
