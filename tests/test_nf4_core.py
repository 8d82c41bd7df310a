"""lorakern.core.nf4 against bitsandbytes, bit for bit, and its documented edge cases and errors."""
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

from lorakern.core import nf4

# bitsandbytes with its native CPU library refused: its pure-PyTorch backend (backends/default/ops.py).
PURE_TORCH_BNB = r'''
import ctypes, json, sys, warnings
real = ctypes.CDLL.__init__
def refuse(self, name, *args, **kwargs):
    if "bitsandbytes" in str(name):
        raise OSError("native library refused: compare with the pure-PyTorch backend")
    return real(self, name, *args, **kwargs)
ctypes.CDLL.__init__ = refuse
warnings.filterwarnings("ignore")
import numpy as np, torch
torch._dynamo.config.disable = True
import bitsandbytes.functional as F
from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib
assert isinstance(lib, ErrorHandlerMockBNBNativeLibrary)
from lorakern.core import nf4
rng = np.random.default_rng(0)
cases = [(rng.standard_normal(shape).astype(np.float32) * scale, bs)
         for shape, scale in [((64,), 1.0), ((128, 96), 0.02), ((33, 7), 1e4), ((1, 1), 1.0), ((5,), 1.0),
                              ((300, 257), 1.0), ((1000, 1000), 0.1)]
         for bs in (32, 64, 128, 256, 4096)]
adversarial = np.concatenate([nf4.NF4_MIDPOINTS, [1.0], -nf4.NF4_MIDPOINTS, np.zeros(64), [1e30, -1e-30] * 20,
                              np.full(40, 1e-40)]).astype(np.float32)
cases += [(adversarial, 32), (adversarial, 64), (np.zeros(100, np.float32), 64), (np.full(70, 1e-40, np.float32), 64)]
failures = []
for w, bs in cases:
    for dq in (False, True):
        q, st = F.quantize_4bit(torch.from_numpy(w), blocksize=bs, quant_type="nf4", compress_statistics=dq)
        ours = nf4.nf4_quantize(w, bs, dq, offset=float(st.offset) if dq else None)
        checks = {"packed": np.array_equal(ours.packed, q.numpy()),
                  "decoded": np.array_equal(nf4.nf4_dequantize(ours).reshape(-1), F.dequantize_4bit(q, st).numpy().reshape(-1))}
        if dq:
            checks.update(absmax_codes=np.array_equal(ours.absmax_codes, st.absmax.numpy()),
                          nested_absmax=np.array_equal(ours.nested_absmax, st.state2.absmax.numpy()),
                          nested_map=np.array_equal(ours.nested_map, st.state2.code.numpy()))
        else:
            checks["absmax"] = np.array_equal(ours.absmax, st.absmax.numpy())
        bad = [k for k, v in checks.items() if not v]
        if bad:
            failures.append(f"shape {w.shape} blocksize {bs} double_quant {dq}: {bad}")
print(json.dumps({"cases": 2 * len(cases), "failures": failures}))
'''


def test_bit_identical_to_bitsandbytes_pure_torch_backend():
    done = subprocess.run([sys.executable, "-c", PURE_TORCH_BNB], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["cases"] == 78 and not result["failures"], result["failures"]


@pytest.fixture(scope="module")
def bnb():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes.functional as functional
    return functional


@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("shape", [(96, 128), (7, 33), (3,)], ids=["96x128", "7x33", "3"])
def test_four_bit_part_identical_to_bitsandbytes_native(bnb, shape, blocksize):
    """The 4-bit codes and absmaxes never touch the native library: identical in the default install too."""
    import torch

    w = np.random.default_rng(blocksize).standard_normal(shape).astype(np.float32)
    q, st = bnb.quantize_4bit(torch.from_numpy(w), blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    ours = nf4.nf4_quantize(w, blocksize, double_quant=False)
    assert np.array_equal(ours.packed, q.numpy()) and np.array_equal(ours.absmax, st.absmax.numpy())


def test_native_double_quant_state_decodes_exactly(bnb):
    """Whatever 8-bit codes bitsandbytes' native quantizer chose, decoding its state here is exact."""
    import torch

    w = np.random.default_rng(1).standard_normal((256, 384)).astype(np.float32)
    q, st = bnb.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=True)
    state = nf4.NF4State(packed=q.numpy(), shape=(256, 384), dtype="float32", blocksize=64,
                         absmax_codes=st.absmax.numpy(), nested_absmax=st.state2.absmax.numpy(),
                         nested_map=st.state2.code.numpy(), offset=np.float32(st.offset.item()))
    absmax = st.state2.code[st.absmax.long()] * st.state2.absmax.repeat_interleave(256)[: st.absmax.numel()] + st.offset
    codes = torch.from_numpy(nf4.unpack(q.numpy(), w.size).astype(np.int64))
    by_hand = (torch.from_numpy(nf4.NF4_CODE)[codes] * absmax.repeat_interleave(64)).reshape(w.shape)
    assert np.array_equal(nf4.nf4_dequantize(state), by_hand.numpy())
    ours = nf4.nf4_quantize(w, 64, offset=float(st.offset))
    assert np.mean(ours.absmax_codes == st.absmax.numpy()) > 0.99


def test_dynamic_map_is_bitsandbytes(bnb):
    assert np.array_equal(nf4.dynamic_map(signed=True), bnb.create_dynamic_map(signed=True).numpy())
    assert np.array_equal(nf4.dynamic_map(signed=False), bnb.create_dynamic_map(signed=False).numpy())


def test_documented_examples():
    w = np.zeros(64, np.float32)
    w[:4] = [1.0, -1.0, 0.5, 0.1]
    state = nf4.nf4_quantize(w, 64, double_quant=False)
    assert state.packed[:2, 0].tolist() == [0xF0, 0xC8]
    on_midpoint = np.zeros(64, np.float32)
    on_midpoint[0], on_midpoint[1] = 1.0, nf4.NF4_MIDPOINTS[7]
    assert nf4.unpack(nf4.nf4_quantize(on_midpoint, 64, False).packed, 2).tolist() == [15, 7]
    zeros = nf4.nf4_quantize(np.zeros(128, np.float32), 64, False)
    assert zeros.absmax.tolist() == [0.0, 0.0] and set(nf4.unpack(zeros.packed, 128).tolist()) == {7}
    odd = nf4.nf4_quantize(np.ones(5, np.float32), 64, False)
    assert odd.packed.shape == (3, 1) and odd.packed[2, 0] == 0xF7  # padded with the zero code


def test_round_trip_error_and_size():
    w = np.random.default_rng(2).standard_normal((4096, 4096)).astype(np.float32)
    plain, double = nf4.nf4_quantize(w, 64, False), nf4.nf4_quantize(w, 64, True)
    assert plain.nbytes() / w.size == pytest.approx(0.5625)
    assert double.nbytes() / w.size == pytest.approx(0.516, abs=0.001)
    half_gap = 0.5 * np.diff(nf4.NF4_CODE).max()
    true_absmax = np.repeat(plain.absmax, 64).reshape(w.shape)
    for state in (plain, double):
        # |w - c a'| <= |w - c a| + |c| |a - a'| with |c| <= 1: rounding to a code, plus the absmax's own error
        absmax_error = np.abs(np.repeat(state.absmax_values(), 64).reshape(w.shape) - true_absmax)
        error = np.abs(nf4.nf4_dequantize(state) - w)
        assert np.all(error <= half_gap * true_absmax * (1 + 1e-6) + absmax_error + 1e-7)
    assert np.abs(nf4.nf4_dequantize(double) - w).mean() < 1.01 * np.abs(nf4.nf4_dequantize(plain) - w).mean()


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda: nf4.nf4_quantize(np.ones(64, np.float32), blocksize=48), ValueError, "blocksize 48 is not allowed"),
        (lambda: nf4.nf4_quantize(np.ones(64, np.int32)), TypeError, "floating-point weights, got dtype int32"),
        (lambda: nf4.nf4_quantize(np.ones((0, 4), np.float32)), ValueError, "empty weight of shape"),
        (lambda: nf4.nf4_quantize(np.ones(4, np.float32), dtype="int8"), ValueError, "dtype 'int8' cannot be recorded"),
    ],
    ids=["blocksize", "non-float", "empty", "dtype"],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_state_that_does_not_fit_is_refused():
    state = nf4.nf4_quantize(np.ones((8, 64), np.float32), 64)
    state.shape = (8, 128)
    with pytest.raises(ValueError, match=r"does not fit a \(8, 128\) weight at blocksize 64: packed has shape"):
        nf4.nf4_dequantize(state)
    state = nf4.nf4_quantize(np.ones((8, 64), np.float32), 64)
    state.quant_type = "fp4"
    with pytest.raises(ValueError, match="quant_type 'fp4' is not supported"):
        nf4.nf4_dequantize(state)
