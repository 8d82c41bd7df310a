"""The plain LoRA Linear against its peers with the same weights: PEFT's lora.Linear and loralib's Linear
(Hu et al.'s reference code), outputs and every gradient, on each implementation (C, torch, the Triton
kernels interpreted), with LoRA dropout drawn by the same generator; loralib's merge-on-eval and Embedding
too. Each comparison allows twice the float64-reference bound (both sides are within one bound of the exact
value) and is shown to fail at a few times that."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from lorakern.embedding import LoraEmbedding
from lorakern.layer import LoraLinear
from lorakern.testing import bound, rel_error

loralib = pytest.importorskip("loralib")

SHAPES = [(1, 8, 12, 1), (5, 33, 17, 3), (70, 40, 24, 5)]  # M, K, N, r: one row, odd widths, r not a power of 2


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def peft_linear(base: nn.Linear, r: int, alpha: float, dropout: float):
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.lora.layer import Linear

    return Linear(base, "default", config=PeftLoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout), r=r,
                  lora_alpha=alpha, lora_dropout=dropout)


def layers(K: int, N: int, r: int, alpha: float, dropout: float, bias: bool, backend: str):
    """(ours, PEFT's, loralib's), one frozen weight and one random adapter (B too, so every gradient counts)."""
    gen = torch.Generator().manual_seed(K * N + r)
    ours = LoraLinear(K, N, bias=bias, r=r, alpha=alpha, dropout=dropout)
    ours.backend = backend
    with torch.no_grad():
        ours.weight.copy_(torch.randn(N, K, generator=gen) / K ** 0.5)
        if bias:
            ours.bias.copy_(torch.randn(N, generator=gen))
        ours.lora_A.copy_(torch.randn(r, K, generator=gen) / K ** 0.5)
        ours.lora_B.copy_(torch.randn(N, r, generator=gen) / r ** 0.5)
    base = nn.Linear(K, N, bias=bias)
    base.load_state_dict({"weight": ours.weight.detach().clone(), **({"bias": ours.bias.detach().clone()} if bias else {})})
    peft = peft_linear(copy.deepcopy(base), r, alpha, dropout)
    mine = loralib.Linear(K, N, r=r, lora_alpha=alpha, lora_dropout=dropout, bias=bias, merge_weights=False)
    with torch.no_grad():
        peft.lora_A["default"].weight.copy_(ours.lora_A)
        peft.lora_B["default"].weight.copy_(ours.lora_B)
        mine.weight.copy_(ours.weight)
        if bias:
            mine.bias.copy_(ours.bias)
        mine.lora_A.copy_(ours.lora_A)
        mine.lora_B.copy_(ours.lora_B)
    return ours, peft, mine


def factors(module) -> list[torch.Tensor]:
    if isinstance(module, LoraLinear):
        return [module.lora_A, module.lora_B]
    if hasattr(module, "lora_A") and isinstance(module.lora_A, nn.ModuleDict):
        return [module.lora_A["default"].weight, module.lora_B["default"].weight]
    return [module.lora_A, module.lora_B]


def step(module, x: torch.Tensor, upstream: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """y, dx, dA, dB of one training forward and backward; ``seed`` fixes the dropout draw (the global generator)."""
    module.train()
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = module(x)
    dx, dA, dB = torch.autograd.grad(y, [x, *factors(module)], upstream)
    return {"y": y, "dx": dx, "dA": dA, "dB": dB}


def magnitudes(ours: LoraLinear, x: torch.Tensor, upstream: torch.Tensor) -> dict[str, np.ndarray]:
    """The computations on absolute values (float64, from the weights, not from either layer's outputs): the
    scale each result's rounding error is measured against."""
    s = ours.alpha / ours.r
    X, W, A, B, G = (np.abs(f64(t)) for t in (x, ours.weight, ours.lora_A, ours.lora_B, upstream))
    b = np.abs(f64(ours.bias)) if ours.bias is not None else 0.0
    return {"y": X @ W.T + b + s * (X @ A.T) @ B.T, "dx": G @ W + s * (G @ B) @ A,
            "dA": s * (G @ B).T @ X, "dB": s * G.T @ (X @ A.T)}


def assert_close_to(actual: dict, expected: dict, magnitude: dict, limit: float, who: str) -> None:
    for name in expected:
        error, where = rel_error(actual[name], f64(expected[name]), magnitude[name], torch.float32)
        assert error <= limit, f"{name} against {who}: {error:.3g} > {limit:.3g} ({where})"


@pytest.mark.parametrize("M,K,N,r", SHAPES, ids=[f"M{m}-K{k}-N{n}-r{r}" for m, k, n, r in SHAPES])
@pytest.mark.parametrize("backend,dropout", [("c", 0.0), ("c", 0.3), ("torch", 0.0), ("torch", 0.3),
                                             ("triton", 0.0)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_outputs_and_gradients_equal_peft_and_loralib(M, K, N, r, backend, dropout, bias):
    if backend == "triton":
        pytest.importorskip("triton")
    ours, peft, mine = layers(K, N, r, 1.5 * r + 1, dropout, bias, backend)
    gen = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=gen)
    upstream = torch.randn(M, N, generator=gen)
    got = step(ours, x, upstream, seed=11)
    magnitude = magnitudes(ours, x, upstream)
    # two results each within one bound of the exact value: within two of each other
    limit = 2 * bound(torch.float32, max(K, N, M))
    for who, peer in (("PEFT", peft), ("loralib", mine)):
        expected = step(peer, x, upstream, seed=11)
        assert_close_to(got, expected, magnitude, limit, who)
    # the comparison fails when ours is off by 4x what it allows (an error the size of a wrong rounding mode)
    for name in got:
        off = {**got, name: got[name].detach().double() + torch.from_numpy(4 * limit * magnitude[name])}
        with pytest.raises(AssertionError, match=name):
            assert_close_to(off, expected, magnitude, limit, "loralib")


@pytest.mark.parametrize("backend", ["c", "torch"])
def test_a_wrong_scaling_is_caught_by_the_peers(backend):
    """loralib and PEFT scale by alpha / r: a layer that scaled by alpha / sqrt(r) (rsLoRA) fails against both."""
    ours, peft, mine = layers(33, 17, 4, 6.0, 0.0, True, backend)
    rslora = LoraLinear(33, 17, r=4, alpha=6.0, use_rslora=True)
    rslora.backend = backend
    rslora.load_state_dict(ours.state_dict())
    x, upstream = torch.randn(5, 33), torch.randn(5, 17)
    magnitude = magnitudes(ours, x, upstream)
    limit = 2 * bound(torch.float32, 33)
    for peer in (peft, mine):
        with pytest.raises(AssertionError):
            assert_close_to(step(rslora, x, upstream, 0), step(peer, x, upstream, 0), magnitude, limit, "peer")


def test_merge_equals_loralibs_merge_on_eval():
    """loralib folds s B A into the weight when the layer goes to eval(); lorakern's merge() gives the same
    weight and outputs, and unmerge() restores the original weight as loralib's train() does."""
    ours, _, mine = layers(40, 24, 5, 8.0, 0.0, True, "c")
    mine.merge_weights = True
    original = ours.weight.detach().clone()
    ours.merge()
    mine.eval()
    assert mine.merged
    torch.testing.assert_close(ours.weight, mine.weight, rtol=1e-6, atol=1e-6)
    x = torch.randn(7, 40)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), mine(x), rtol=1e-5, atol=1e-5)
    ours.unmerge()
    mine.train()
    torch.testing.assert_close(ours.weight, original, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mine.weight, original, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_equals_loralibs(padding_idx):
    """loralib's Embedding (A: r x num_embeddings, B: dim x r, the same layout and rule as PEFT's): outputs and
    the gradients of A and B, exactly in float64 (the same gather and one product); padding_idx's row gets no
    gradient in either."""
    torch.manual_seed(0)
    base = nn.Embedding(10, 6, padding_idx=padding_idx, dtype=torch.float64)
    ours = LoraEmbedding.from_embedding(copy.deepcopy(base), r=3, alpha=5)
    mine = loralib.Embedding(10, 6, r=3, lora_alpha=5, padding_idx=padding_idx, merge_weights=False,
                             dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        mine.weight.copy_(base.weight)
        ours.lora_embedding_A.copy_(torch.randn(3, 10, generator=gen, dtype=torch.float64))
        ours.lora_embedding_B.copy_(torch.randn(6, 3, generator=gen, dtype=torch.float64))
        mine.lora_A.copy_(ours.lora_embedding_A)
        mine.lora_B.copy_(ours.lora_embedding_B)
    ids = torch.tensor([[2, 1, 7, 7, 9], [0, 2, 3, 4, 9]])
    upstream = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    results = []
    for module, params in ((ours, [ours.lora_embedding_A, ours.lora_embedding_B]), (mine, [mine.lora_A, mine.lora_B])):
        y = module(ids)
        results.append([y, *torch.autograd.grad(y, params, upstream)])
    for name, a, b in zip(["y", "dA", "dB"], *results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    if padding_idx is not None:
        assert torch.all(results[0][1][:, padding_idx] == 0)
    # a wrong scale in ours (alpha / sqrt(r)) would differ from loralib's y by far more than the tolerance
    with pytest.raises(AssertionError):
        torch.testing.assert_close(results[0][0] * (3 ** 0.5), results[1][0], rtol=1e-12, atol=1e-12)
