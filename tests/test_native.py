"""The compiled NF4 codec (lorakern.native) gives the same bits as the torch path it replaces."""
import numpy as np
import pytest
import torch

from lorakern import native, quant
from lorakern.core import nf4


@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setenv("LORAKERN_NATIVE", "0")


def test_library_builds_here():
    assert native.library() is not None, "cc could not build lorakern/native/nf4_cpu.c on this machine"


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("shape,blocksize", [((96, 130), 64), ((7, 33), 32), ((301, 257), 128), ((5,), 4096),
                                             ((1, 1), 64), ((64, 4096), 4096)])
def test_native_quantize_and_decode_match_the_torch_path(monkeypatch, shape, blocksize, double_quant):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(blocksize))
    w.view(-1)[:4] = torch.tensor([0.0, float(nf4.NF4_MIDPOINTS[7]), -1.0, 1e-40])[: w.numel()]
    fast = quant.quantize_nf4(w, blocksize, double_quant)
    monkeypatch.setenv("LORAKERN_NATIVE", "0")
    slow = quant.quantize_nf4(w, blocksize, double_quant)
    for key in ("packed", "absmax", "nested_absmax"):
        if key in slow:
            assert torch.equal(fast[key], slow[key]), key
    slow_decoded = quant.NF4Storage(slow).dequantize(torch.float32)
    monkeypatch.setenv("LORAKERN_NATIVE", "1")
    storage = quant.NF4Storage(fast)
    assert torch.equal(storage.dequantize(torch.float32), slow_decoded)
    ref = nf4.nf4_quantize(w.numpy(), blocksize, double_quant, offset=float(fast["offset"]) if double_quant else None)
    assert np.array_equal(storage.dequantize(torch.float32).numpy(), nf4.nf4_dequantize(ref))
    n = w.numel()
    if n > 6:
        # an unaligned range (odd start falls back to torch; even start anywhere takes the library)
        for start, stop in [(2, n - 1), (3, n)]:
            part = storage.dequantize_flat(start, stop, torch.float32)
            assert torch.equal(part, slow_decoded.reshape(-1)[start:stop])


def test_switch_off(torch_path):
    assert native.library() is None
