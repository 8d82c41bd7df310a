"""DoRA's folded C path keeps its output y for dm (z = (y - b) / c) instead of a second M x N tensor z.

y - b keeps fewer of z's bits where c_j is near 0 or b_j dwarfs c_j z_j: those columns are recomputed from z
(lorakern.dora._magnitude_grad_from_output), and a y written in place after the forward (an inplace ReLU) makes
every column recomputed. Each case against lorakern.core.dora in float64, and each shown to fail without its
safeguard."""
import numpy as np
import pytest
import torch
from torch import nn

from lorakern import core, dora
from lorakern.testing import assert_matches_reference
from lorakern.testing_dora import compare_dora, dora_layer, f64

M, K, N, R = 96, 40, 24, 3  # M >= K, no dropout: the folded path


@pytest.fixture
def c_library(monkeypatch):
    from lorakern import native

    monkeypatch.setenv("LORAKERN_NATIVE", "1")
    if native.lora_library() is None:
        pytest.skip(f"the C kernels are not built here: {native.build_status()[1]}")


def _hard_layer():
    """Columns 0-3 with c = 0, c = 1e-6 and c = 1e-3; columns 4-6 with a bias 1e4 x their output; the rest plain."""
    layer = dora_layer(K, N, R, torch.float32, bias=True, seed=5, backend="c").train()
    adapter = layer.adapters["default"]
    with torch.no_grad():
        adapter.lora_magnitude_vector[:4] *= torch.tensor([0.0, 0.0, 1e-6, 1e-3])
        layer.bias[4:7] = 1e4 * torch.tensor([1.0, -3.0, 2.0])
    return layer


def _x():
    return torch.randn(M, K, generator=torch.Generator().manual_seed(11))


def test_columns_where_y_keeps_too_few_bits_are_recomputed(c_library, monkeypatch):
    layer = _hard_layer()
    recomputed = []
    original = dora._magnitude_grad_from_output

    def spy(g, x, weight, A, B, s, scale, norm, sums):
        signed, bound, size = sums
        recomputed.append(((bound > dora.RECOMPUTE_RATIO * size) | (scale == 0)).nonzero().squeeze(1).tolist())
        return original(g, x, weight, A, B, s, scale, norm, sums)

    monkeypatch.setattr(dora, "_magnitude_grad_from_output", spy)
    assert_matches_reference(compare_dora(layer, _x()))
    assert recomputed and set(recomputed[0]) >= {0, 1, 2, 4, 5, 6}, recomputed  # c = 0, tiny c, huge b
    assert len(recomputed[0]) < N // 2  # the plain columns come from y
    # without the recomputation those columns of dm are far off
    monkeypatch.setattr(dora, "RECOMPUTE_RATIO", float("inf"))
    with pytest.raises(AssertionError):
        assert_matches_reference(compare_dora(_hard_layer(), _x()))


def _grads_after_inplace(layer, x, g, residual):
    """Gradients of sum(g * relu_(layer(x) += residual)) with respect to x, A, B, m: two in-place writes into the
    layer's output, as a residual block with an inplace ReLU makes."""
    x = x.detach().requires_grad_(True)
    a = layer.adapters["default"]
    wanted = [x, a.lora_A, a.lora_B, a.lora_magnitude_vector]
    out = layer(x)
    out += residual
    return torch.autograd.grad((nn.ReLU(inplace=True)(out) * g).sum(), wanted)


def test_an_output_written_in_place_is_not_read_for_dm(c_library, monkeypatch):
    layer = dora_layer(K, N, R, torch.float32, bias=True, seed=3, backend="c").train()
    a = layer.adapters["default"]
    gen = torch.Generator().manual_seed(2)
    x, g, residual = _x(), torch.randn(M, N, generator=gen), torch.randn(M, N, generator=gen)
    got = dict(zip(["dx", "dA", "dB", "dm"], _grads_after_inplace(layer, x, g, residual)))
    W, A, B, m, b, s = (f64(layer.weight), f64(a.lora_A), f64(a.lora_B), f64(a.lora_magnitude_vector), f64(layer.bias),
                        core.scaling(a.r, a.alpha))
    y = core.dora.forward(f64(x), W, A, B, m, b, s)
    ref = core.dora.backward(f64(x), W, A, B, m, f64(g) * (y + f64(residual) > 0), s)
    for name, value in got.items():
        np.testing.assert_allclose(f64(value), ref[name], rtol=2e-4, atol=2e-4 * np.abs(ref[name]).max(), err_msg=name)
    # reading the written-over y as if it were the forward's output gives another dm
    monkeypatch.setattr(dora, "_output_intact", lambda y, version: True)
    spoiled = _grads_after_inplace(layer, x, g, residual)[3]
    assert not np.allclose(f64(spoiled), ref["dm"], rtol=2e-4, atol=2e-4 * np.abs(ref["dm"]).max())
