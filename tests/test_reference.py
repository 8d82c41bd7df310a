"""The comparison itself: its reference is independent of the layer under test, and it can fail.

lorakern.testing recomputes the scaling from (r, alpha, use_rslora), the dropout mask from the seed through
each backend's documented generator (lorakern.testing_masks: triton's Philox and torch's MT19937 rewritten in
NumPy) and a 4-bit base's weight from its packed bytes (lorakern.core). Here: those recomputations agree with
the backends bit for bit; a wrong scaling, mask or decoder in the layer fails the comparison; and on every
path and dtype, the output and each gradient shifted by 4x its allowed error fail it too.
"""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lorakern import LoraLinear, native
from lorakern.functional import torch_dropout_mask
from lorakern.testing import assert_matches_reference, compare_layer, random_layer, reference_scaling
from lorakern.testing_masks import torch_mask, triton_mask

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
RESULTS = ("y", "dx", "dA", "dB", "db")


@pytest.mark.parametrize("seed, shape, p", [(5, (3, 40, 50), 0.25), (2**31 + 7, (7, 33), 0.1), (123, (200, 300), 0.5),
                                            (0, (1,), 0.9)])
def test_masks_are_the_backends_bit_for_bit(seed, shape, p):
    assert np.array_equal(torch_mask(seed, shape, p), torch_dropout_mask(seed, shape, p, "cpu").double().numpy())
    kernels = pytest.importorskip("lorakern.kernels.lora_linear")
    assert np.array_equal(triton_mask(seed, shape, p), kernels.dropout_mask(seed, shape, p, "cpu").double().numpy())


def test_scaling_is_recomputed():
    assert reference_scaling(16, 8.0, False) == 0.5 and reference_scaling(16, 8.0, True) == 2.0


def test_a_wrong_scaling_fails():
    layer = random_layer(40, 24, 4, torch.float32, alpha=8.0)
    x = torch.randn(9, 40)
    assert_matches_reference(compare_layer(layer, x))
    layer.scaling *= 1.001  # what a wrong alpha / r (or rsLoRA) formula in the layer would do
    assert not compare_layer(layer, x).passed


def test_a_wrong_mask_fails(monkeypatch):
    """The torch path drawing its mask from another seed: the reference redraws its own and sees it."""
    from lorakern import functional

    layer = random_layer(40, 24, 4, torch.float32, dropout=0.25).train()
    layer.backend = "torch"
    x = torch.randn(9, 40)
    assert_matches_reference(compare_layer(layer, x, seed=3))
    monkeypatch.setattr(functional, "torch_dropout_mask", lambda seed, *args: torch_dropout_mask(seed + 1, *args))
    assert not compare_layer(layer, x, seed=3).passed


def test_a_wrong_nf4_decoder_fails():
    """A layer whose code table is off in one entry decodes wrongly; the reference decodes with core's table."""
    layer = LoraLinear.from_linear(nn.Linear(64, 24), quantize="nf4", r=4)
    nn.init.normal_(layer.lora_B)
    layer.backend = "torch"
    x = torch.randn(9, 64)
    assert_matches_reference(compare_layer(layer, x))
    with torch.no_grad():
        layer.nf4.quant_map[12] *= 1.01
    assert not compare_layer(layer, x).passed


def _dense(backend, dtype):
    layer = random_layer(40, 24, 5, dtype, dropout=0.1, seed=1).train()
    layer.backend = backend
    return layer


def _nf4(backend, dtype):
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = LoraLinear.from_linear(nn.Linear(40, 24), quantize="nf4", compute_dtype=dtype, lora_dtype=dtype, r=5,
                                       dropout=0.1, blocksize=32)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen))
    layer.bias.requires_grad_(True)
    layer.backend = backend
    return layer.train()


PATHS = ([("torch", dtype, _dense) for dtype in DTYPES] + [("c", torch.float32, _dense)]
         + [("triton", dtype, _dense) for dtype in DTYPES]
         + [(backend, dtype, _nf4) for backend in ("torch", "triton") for dtype in DTYPES[1:]])


@pytest.mark.parametrize("backend, dtype, make", PATHS,
                         ids=[f"{'nf4-' if m is _nf4 else ''}{b}-{str(d)[6:]}" for b, d, m in PATHS])
@pytest.mark.parametrize("M", [20, 3], ids=["tiled", "small-M"])
def test_each_result_shifted_by_four_bounds_fails(backend, dtype, make, M):
    if backend == "c" and native.lora_library() is None:
        pytest.skip("the C kernels are not built here (no C compiler): the torch path serves")
    if backend == "triton":
        pytest.importorskip("triton")
    layer = make(backend, dtype)
    x = torch.randn(M, 40, generator=torch.Generator().manual_seed(M), dtype=torch.float64).to(dtype)
    clean = compare_layer(layer, x, seed=M)
    assert_matches_reference(clean)
    assert set(clean.errors) == set(RESULTS)
    shifted = compare_layer(layer, x, seed=M, perturb={name: 4.0 for name in RESULTS})
    assert all(shifted.errors[name] > 1.0 for name in RESULTS), shifted.report()
