"""The 4-bit and kernel cases the property tests do not reach, each by value against lorakern.core:

- LinearNF4 (a frozen 4-bit nn.Linear without adapter): output, dx and the bias gradient;
- a 4-bit layer under autocast (autocast's dtype computes; a set compute_dtype wins over it), with
  non-contiguous input, and under ``lorakern.disable_adapters`` (the base alone, no LoRA gradient);
- the Triton kernels (interpreted on CPU) on GPT-2's Conv1D base (fan_in_fan_out), and their backward
  with only some gradients needed (x only, A and B only) on a dense and a 4-bit base.

The reference decodes the NF4 bytes with lorakern.core and reads a Conv1D weight from the Conv1D itself:
nothing it uses comes from the layer under test but the bytes, the LoRA factors and the bias.
"""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lorakern
from lorakern import LoraLinear
from lorakern.core import lora as core_lora
from lorakern.core import nf4 as core_nf4
from lorakern.nf4 import LinearNF4
from lorakern.testing import bound, magnitudes, rel_error

EPS = {dtype: torch.finfo(dtype).eps for dtype in (torch.float32, torch.float16, torch.bfloat16)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton: compiled on CUDA, else interpreted on CPU
# fp32 operands rounded to a half compute dtype on the way in: at most eps/2 per rounded factor, three
# factors at most per term (x, A, B; or dy, B, A).
CAST_ULPS = 1.5


def f64(t):
    return None if t is None else t.detach().to(torch.float64).numpy()


def core_decode(storage, dtype: torch.dtype) -> np.ndarray:
    """The (out, in) weight decoded by lorakern.core from the storage's bytes, rounded once to ``dtype``."""
    state = core_nf4.NF4State(packed=storage.packed.numpy(), shape=storage.shape, dtype="float32",
                              blocksize=storage.blocksize)
    if storage.double_quant:
        state.absmax_codes, state.nested_absmax = storage.absmax.numpy(), storage.nested_absmax.numpy()
        state.nested_map, state.offset = storage.nested_map.numpy(), np.float32(storage.offset.item())
    else:
        state.absmax = storage.absmax.numpy()
    return f64(torch.from_numpy(core_nf4.nf4_dequantize(state)).to(dtype))


def limit_for(compute: torch.dtype, inputs: torch.dtype, length: int) -> float:
    return bound(compute, length) + (CAST_ULPS * EPS[compute] if compute != inputs else 0.0)


def compare(got: dict, x, W, A, B, b, s, dy, compute: torch.dtype, limit: float) -> None:
    """Each tensor of ``got`` (y, dx, dA, dB, db; None = not computed) against core, and shown able to fail."""
    xs, dys = f64(x), f64(dy)
    A = np.zeros((1, W.shape[1])) if A is None else A
    B = np.zeros((W.shape[0], A.shape[0])) if B is None else B
    expected = {"y": core_lora.forward(xs, W, A, B, b, s), **core_lora.backward(xs, W, A, B, dys, s)}
    scale = magnitudes(xs, W, A, B, b, dys, s, None, torch.finfo(compute).tiny)
    for key, actual in got.items():
        error, where = rel_error(actual, expected[key], scale[key], compute)
        assert error <= limit, f"{key}: {error:.3g} > bound {limit:.3g} ({where})"
        worse = f64(actual).copy()
        worse.reshape(-1)[-1] += 4 * limit * (scale[key].reshape(-1)[-1] + torch.finfo(compute).tiny)
        assert rel_error(torch.from_numpy(worse), expected[key], scale[key], compute)[0] > limit, key


def nf4_layer(K, N, r, compute=None, double_quant=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(K, N)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = LoraLinear.from_linear(linear, quantize="nf4", double_quant=double_quant, compute_dtype=compute,
                                       r=r, alpha=3.0)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(N, r, generator=gen) / r ** 0.5)
        layer.bias.copy_(torch.randn(N, generator=gen))
    layer.bias.requires_grad_(True)
    return layer, linear


def grads_of(layer, x, dy, with_x=True):
    x = x.detach().requires_grad_(with_x)
    y = layer(x)
    names = (["dx"] if with_x else []) + [n for n, p in (("dA", layer.lora_A), ("dB", layer.lora_B),
                                                          ("db", layer.bias)) if p is not None and p.requires_grad]
    tensors = ([x] if with_x else []) + [p for p in (layer.lora_A, layer.lora_B, layer.bias)
                                         if p is not None and p.requires_grad]
    return {"y": y, **dict(zip(names, torch.autograd.grad(y, tensors, dy.to(y.dtype))))}


# ---- LinearNF4 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("compute", [None, torch.bfloat16], ids=["input-dtype", "bf16-compute"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
def test_linear_nf4_backward_by_value(compute, double_quant):
    """The frozen 4-bit layer QLoRA leaves without adapter: y, dx and db (the bias trains), 3-D input."""
    gen = torch.Generator().manual_seed(3)
    linear = nn.Linear(72, 40)
    layer = LinearNF4.from_linear(linear, double_quant=double_quant, compute_dtype=compute)
    layer.bias.requires_grad_(True)
    x = torch.randn(2, 5, 72, generator=gen, requires_grad=True)
    dy = torch.randn(2, 5, 40, generator=gen)
    y = layer(x)
    assert y.dtype == torch.float32  # returned in the input's dtype, as bitsandbytes' Linear4bit
    dx, db = torch.autograd.grad(y, [x, layer.bias], dy)
    dtype = compute or torch.float32
    compare({"y": y, "dx": dx, "db": db}, x, core_decode(layer.nf4, dtype), None, None, f64(linear.bias), 0.0, dy,
            dtype, limit_for(dtype, torch.float32, 72))


# ---- autocast, non-contiguous input, disable_adapters ---------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nf4_under_autocast_computes_in_autocast_dtype_unless_compute_dtype_is_set(backend):
    """Backward inside the autocast block too (where a training loop often calls it)."""
    if backend == "triton":
        pytest.importorskip("triton")
    device = DEVICE if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(9, 64, generator=gen)
    dy = torch.randn(9, 48, generator=gen)
    for compute, expected_dtype in ((None, torch.bfloat16), (torch.float32, torch.float32)):
        layer, _ = nf4_layer(64, 48, 6, compute=compute)
        W = core_decode(layer.nf4, expected_dtype)
        layer = layer.to(device)
        layer.backend = backend
        with torch.autocast(device, dtype=torch.bfloat16):
            got = {k: v.cpu() for k, v in grads_of(layer, x.to(device), dy.to(device)).items()}
        assert got["y"].dtype == expected_dtype and got["dA"].dtype == torch.float32
        compare(got, x, W, f64(layer.lora_A.cpu()), f64(layer.lora_B.cpu()), f64(layer.bias.cpu()),
                core_lora.scaling(6, 3.0), dy, expected_dtype, limit_for(expected_dtype, torch.float32, 64))
        plain = LinearNF4.from_linear(nn.Linear(64, 48), compute_dtype=compute)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert plain(x).dtype == expected_dtype


@pytest.mark.parametrize("layout", ["transposed", "strided", "3-D permuted"])
def test_nf4_non_contiguous_input(layout):
    gen = torch.Generator().manual_seed(5)
    K, N, M = 40, 24, 10
    big = torch.randn(2 * K, 2 * M, generator=gen)
    x = {"transposed": big[:K, :M].t(), "strided": big.t()[::2, ::2],
         "3-D permuted": big[:K, :M].reshape(K, M // 2, 2).permute(2, 1, 0)}[layout]
    assert not x.is_contiguous() and x.shape[-1] == K
    dy = torch.randn(*x.shape[:-1], N, generator=gen)
    layer, _ = nf4_layer(K, N, 3)
    compare(grads_of(layer, x, dy), x, core_decode(layer.nf4, torch.float32), f64(layer.lora_A), f64(layer.lora_B),
            f64(layer.bias), 1.0, dy, torch.float32, bound(torch.float32, max(M, K, N)))
    plain = LinearNF4.from_linear(nn.Linear(K, N))
    y = plain(x)
    compare({"y": y}, x, core_decode(plain.nf4, torch.float32), None, None, f64(plain.bias), 0.0, dy, torch.float32,
            bound(torch.float32, max(M, K, N)))


def test_nf4_under_disable_adapters_is_the_base_alone():
    layer, _ = nf4_layer(32, 20, 4, compute=torch.bfloat16)
    model = nn.Sequential(layer)
    gen = torch.Generator().manual_seed(6)
    x, dy = torch.randn(7, 32, generator=gen), torch.randn(7, 20, generator=gen)
    W = core_decode(layer.nf4, torch.bfloat16)
    with lorakern.disable_adapters(model):
        xg = x.clone().requires_grad_(True)
        y = model(xg)
        dx, db, dA = torch.autograd.grad(y, [xg, layer.bias, layer.lora_A], dy, allow_unused=True)
    assert dA is None  # the LoRA branch is not in the graph at all
    compare({"y": y, "dx": dx, "db": db}, x, W, None, None, f64(layer.bias), 0.0, dy, torch.bfloat16,
            limit_for(torch.bfloat16, torch.float32, 32))
    got = grads_of(layer, x, dy)  # and back on after the block: the LoRA term and its gradients
    compare(got, x, W, f64(layer.lora_A), f64(layer.lora_B), f64(layer.bias), core_lora.scaling(4, 3.0), dy, torch.bfloat16,
            limit_for(torch.bfloat16, torch.float32, 32))


# ---- Triton (interpreted on CPU): Conv1D base, partial gradients -----------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lead", [(5,), (3, 13)], ids=["small-M", "tiled"])
def test_triton_on_gpt2_conv1d(dtype, lead):
    """GPT-2's Conv1D stores W as (in, out): the kernels read it through the transposed view."""
    pytest.importorskip("triton")
    from transformers.pytorch_utils import Conv1D

    gen = torch.Generator().manual_seed(7)
    conv = Conv1D(nf=36, nx=44)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(44, 36, generator=gen) / 44 ** 0.5)
        conv.bias.copy_(torch.randn(36, generator=gen))
    conv = conv.to(device=DEVICE, dtype=dtype)
    layer = LoraLinear.from_linear(conv, r=5, alpha=7.0)
    assert layer.fan_in_fan_out
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(36, 5, generator=gen).to(dtype) / 5 ** 0.5)
    layer.bias.requires_grad_(True)
    layer.backend = "triton"
    x = torch.randn(*lead, 44, generator=gen).to(device=DEVICE, dtype=dtype)
    dy = torch.randn(*lead, 36, generator=gen).to(device=DEVICE, dtype=dtype)
    got = grads_of(layer, x, dy)
    assert "runs: triton" in layer.dispatch_report(x)
    W = f64(conv.weight.cpu()).T  # from the Conv1D itself, (in, out) -> (out, in)
    compare({k: v.cpu() for k, v in got.items()}, x.cpu(), W, f64(layer.lora_A.cpu()), f64(layer.lora_B.cpu()),
            f64(conv.bias.cpu()), core_lora.scaling(5, 7.0), dy.cpu(), dtype, bound(dtype, max(int(np.prod(lead)), 44, 36)))


@pytest.mark.parametrize("needed", ["x only", "A and B only", "B only"])
@pytest.mark.parametrize("base", ["dense", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_backward_with_some_gradients(needed, base, dtype):
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(8)
    K, N, r, M = 40, 28, 6, 21
    if base == "dense":
        linear = nn.Linear(K, N)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(N, K, generator=gen) / K ** 0.5)
        layer = LoraLinear.from_linear(linear.to(dtype), r=r, alpha=2.0)
        W = f64(linear.weight)
    else:
        layer, _ = nf4_layer(K, N, r, compute=dtype)
        layer = layer.to(dtype)  # LoRA factors in the compute dtype; the 4-bit bytes ignore the cast
        W = core_decode(layer.nf4, dtype)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(N, r, generator=gen).to(layer.lora_B.dtype) / r ** 0.5)
    layer = layer.to(DEVICE)
    layer.backend = "triton"
    layer.bias.requires_grad_(False)
    layer.lora_A.requires_grad_(needed == "A and B only")
    layer.lora_B.requires_grad_(needed != "x only")
    x = torch.randn(M, K, generator=gen).to(device=DEVICE, dtype=dtype)
    dy = torch.randn(M, N, generator=gen).to(device=DEVICE, dtype=dtype)
    got = grads_of(layer, x, dy, with_x=needed == "x only")
    assert set(got) == {"y", "dx"} if needed == "x only" else {"y", "dA", "dB"} if needed == "A and B only" \
        else {"y", "dB"}
    s = core_lora.scaling(r, 2.0 if base == "dense" else 3.0)
    compare({k: v.cpu() for k, v in got.items()}, x.cpu(), W, f64(layer.lora_A.cpu()), f64(layer.lora_B.cpu()),
            f64(layer.bias.cpu()), s, dy.cpu(), dtype, bound(dtype, max(M, K, N)))
