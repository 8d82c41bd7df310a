"""A fixed ``dropout_seed`` under torch.compile(fullgraph=True): the seeded draw is the custom op
lorakern::seeded_rand (lorakern/masks.py), so the graph does not break, and the compiled layer draws eager's
mask. Dense LoRA, DoRA, an NF4 base and a mixed-adapter batch: the compiled run's output and gradients equal
eager's and the float64 reference (lorakern.core) with the mask recomputed from the seed in NumPy
(lorakern.testing_masks: torch's CPU generator, MT19937). A new seed reaches the compiled layer.

Compiled with aot_eager (dynamo and AOTAutograd trace what inductor would, without its code generation,
which takes minutes on two cores), one dense case with inductor. Under compile the torch path runs (the C
kernels are eager-only), so eager-vs-compiled on fp32 also compares eager's C path with the torch path."""
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import lorakern
from lorakern import LoraConfig, LoraLinear, core
from lorakern.errors import LorakernError
from lorakern.masks import seeded_rand
from lorakern.testing import assert_matches_reference, compare_layer, random_layer
from lorakern.testing_dora import compare_dora, dora_layer
from lorakern.testing_masks import mt19937_uniform, torch_mask

K, N, R, P = 64, 12, 4, 0.3  # NF4: K a multiple of the blocksize (32)


def _compiled_in_place(layer: nn.Module, backend: str = "aot_eager") -> nn.Module:
    """``layer`` itself compiled (nn.Module.compile), so lorakern.testing's comparisons, which take a
    LoraLinear, run the compiled forward. fullgraph: a graph break raises."""
    torch._dynamo.reset()
    layer.compile(backend=backend, fullgraph=True)
    return layer


def _nf4_layer(seed: int) -> LoraLinear:
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(K, N)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(N, K, generator=gen) / math.sqrt(K))
        linear.bias.copy_(torch.randn(N, generator=gen))
    layer = LoraLinear.from_linear(linear, quantize="nf4", blocksize=32, double_quant=True,
                                   compute_dtype=torch.float32, r=R, dropout=P)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B):
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
    return layer.train()


LAYERS = {
    "dense-fp64": lambda: random_layer(K, N, R, torch.float64, dropout=P, seed=1),
    "dense-fp32": lambda: random_layer(K, N, R, torch.float32, dropout=P, seed=1),
    "nf4": lambda: _nf4_layer(2),
}


def _y_and_grads(layer: LoraLinear, x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """y and the gradients of <y, dy> (x, A, B, the magnitude and bias where they train) with dropout_seed."""
    layer.dropout_seed = seed
    x = x.detach().requires_grad_(True)
    y = layer(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    params = {"x": x, **{n: p for n, p in layer.named_parameters() if p.requires_grad}}
    return {"y": y.detach(), **dict(zip(params, torch.autograd.grad(y, list(params.values()), dy)))}


def _assert_same(got: dict, want: dict, rtol: float) -> None:
    """Equal within rounding of results O(max |want|) (eager's C path and the torch path sum in other orders)."""
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=rtol, atol=rtol * float(value.abs().max()), msg=name)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_compiled_layer_with_a_fixed_seed_matches_eager_and_reference(kind):
    """Training mode, dropout p > 0, a fixed seed, one graph: the compiled layer's output and every gradient
    (x, A, B, bias) equal eager's and lorakern.core's with the seed's mask recomputed in NumPy."""
    dtype = torch.float64 if kind.endswith("fp64") else torch.float32
    x = torch.randn(2, 5, K, generator=torch.Generator().manual_seed(3), dtype=dtype)
    eager = _y_and_grads(LAYERS[kind](), x, seed=21)
    compiled = _compiled_in_place(LAYERS[kind]())
    _assert_same(_y_and_grads(compiled, x, seed=21), eager, 1e-12 if x.dtype == torch.float64 else 1e-5)
    assert_matches_reference(compare_layer(compiled, x, seed=20))  # runs with dropout_seed = 21
    # the comparison can fail: an output off by 4x its bound is seen
    assert not compare_layer(compiled, x, seed=20, perturb={"y": 4.0}).passed


def test_compiled_dora_with_a_fixed_seed_matches_eager_and_reference():
    """DoRA (x, A, B, m and the bias train), fp64: compiled == eager == lorakern.core.dora with the mask."""
    x = torch.randn(2, 5, K, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def build():
        layer = dora_layer(K, N, R, torch.float64, dropout=P, seed=3).train()
        layer.bias.requires_grad_(True)
        return layer

    eager = _y_and_grads(build(), x, seed=13)
    compiled = _compiled_in_place(build())
    got = _y_and_grads(compiled, x, seed=13)
    assert "adapters.default.lora_magnitude_vector" in got
    _assert_same(got, eager, 1e-12)
    assert_matches_reference(compare_dora(compiled, x, seed=12))  # runs with dropout_seed = 13
    assert not compare_dora(compiled, x, seed=12, perturb={"dm": 4.0}).passed


@pytest.mark.parametrize("unspecialized", [False, True], ids=["seed-guarded", "seed-symbolic"])
def test_a_new_seed_reaches_the_compiled_layer(unspecialized):
    """dropout_seed changed between calls: the compiled layer draws the new seed's mask (eager's output
    with that seed), not the traced one's; and back. Dynamo guards the int attribute (a new seed
    recompiles), or with allow_unspec_int_on_nn_module traces it as a SymInt, which the op takes (then
    seeds 23 and 24 reuse the symbolic graph: fewer graphs than seeds)."""
    x = torch.randn(6, K, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    eager = LAYERS["dense-fp64"]()
    outputs = {}
    seeds = (21, 22, 23, 2**63 + 21, 21, 24)
    with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=unspecialized):
        compiled = _compiled_in_place(LAYERS["dense-fp64"]())
        counters.clear()
        for seed in seeds:
            eager.dropout_seed = compiled.dropout_seed = seed
            with torch.no_grad():
                outputs[seed] = compiled(x)
                torch.testing.assert_close(outputs[seed], eager(x), rtol=1e-12, atol=1e-12)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs < len(set(seeds)) if unspecialized else graphs == len(set(seeds)), graphs
    assert not torch.allclose(outputs[21], outputs[22], rtol=1e-3, atol=1e-3)
    # the masks differ: each compiled output is the reference with its own seed's mask
    a = compiled.adapters["default"]
    s = core.scaling(R, a.alpha)
    for seed in (21, 22):
        ref = core.forward(x.numpy(), compiled.weight.detach().numpy(), a.lora_A.detach().numpy(),
                           a.lora_B.detach().numpy(), compiled.bias.detach().numpy(), s,
                           dropout_mask=torch_mask(seed, x.shape, P))
        np.testing.assert_allclose(outputs[seed].numpy(), ref, rtol=1e-12, atol=1e-12)


def test_inductor_compiles_a_fixed_seed():
    """The same under inductor (the op runs as an extern call in the generated code), forward only."""
    x = torch.randn(6, K, generator=torch.Generator().manual_seed(6))
    eager, compiled = LAYERS["dense-fp32"](), _compiled_in_place(LAYERS["dense-fp32"](), backend="inductor")
    for seed in (31, 32):
        eager.dropout_seed = compiled.dropout_seed = seed
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)


def _mixed_model(dtype: torch.dtype) -> nn.Module:
    """nn.Sequential(Linear(K, N)) with adapters a (r = 4, p = 0.3) and b (r = 2, p = 0.5) on it, every LoRA
    tensor random."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(K, N, dtype=dtype))
    lorakern.inject(model, LoraConfig(r=R, lora_alpha=R, lora_dropout=P, target_modules=["0"]), "a")
    lorakern.add_adapter(model, "b", LoraConfig(r=2, lora_alpha=5, lora_dropout=0.5, target_modules=["0"]))
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.3)
    return model.to(dtype).train()


def _mixed_run(model: nn.Module, x: torch.Tensor, rows: list, seed: int) -> dict[str, torch.Tensor]:
    layer = model[0]
    layer.dropout_seed = seed
    x = x.detach().requires_grad_(True)
    with lorakern.adapter_rows(model, rows):
        y = model(x)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=y.dtype)
        params = {"x": x, **{f"{n}.{k}": getattr(layer.adapters[n], k) for n in ("a", "b") for k in ("lora_A", "lora_B")}}
        grads = torch.autograd.grad(y, list(params.values()), dy)
    return {"y": y.detach(), **dict(zip(params, grads)), "dy": dy}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_compiled_mixed_batch_with_a_fixed_seed_matches_eager_and_reference(dtype):
    """Rows of adapters a, b and the base: compiled (each adapter's term masked to its rows) == eager
    (gathered rows; the C mixed path on fp32) == core.mixed_forward / mixed_backward with each adapter's
    mask the rows of torch_mask(seed, (M, K), p_a)."""
    rows = ["b", None, "a", "b"]
    x = torch.randn(4, 3, K, generator=torch.Generator().manual_seed(10), dtype=dtype)
    eager = _mixed_run(_mixed_model(dtype), x, rows, seed=41)
    compiled_model = _mixed_model(dtype)
    torch._dynamo.reset()
    compiled_model.compile(backend="aot_eager", fullgraph=True)
    got = _mixed_run(compiled_model, x, rows, seed=41)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    _assert_same(got, eager, rtol)

    layer = compiled_model[0]
    M = x.shape[0] * x.shape[1]
    row_adapter = np.repeat([{"a": 0, "b": 1, None: -1}[r] for r in rows], x.shape[1])

    def f64(t):
        return t.detach().to(torch.float64).numpy()

    adapters = [(f64(layer.adapters[n].lora_A), f64(layer.adapters[n].lora_B), core.scaling(r, alpha))
                for n, r, alpha in (("a", R, R), ("b", 2, 5))]  # s recomputed from r and alpha
    masks = [torch_mask(41, (M, K), P), torch_mask(41, (M, K), 0.5)]
    xs, W, b, dy = f64(x).reshape(M, K), f64(layer.weight), f64(layer.bias), f64(got["dy"]).reshape(M, N)
    ref = {"y": core.mixed_forward(xs, W, adapters, row_adapter, b, dropout_masks=masks)}
    back = core.mixed_backward(xs, W, adapters, row_adapter, dy, dropout_masks=masks)
    ref.update({"x": back["dx"], "a.lora_A": back["dA"][0], "a.lora_B": back["dB"][0], "b.lora_A": back["dA"][1],
                "b.lora_B": back["dB"][1]})
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for name, want in ref.items():
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(f64(got[name]).reshape(want.shape), want, rtol=tol, atol=tol * scale,
                                   err_msg=name)
    # the comparison can fail: another seed's masks give another reference
    other = core.mixed_forward(xs, W, adapters, row_adapter, b,
                               dropout_masks=[torch_mask(42, (M, K), P), torch_mask(42, (M, K), 0.5)])
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(f64(got["y"]).reshape(M, N), other, rtol=tol, atol=tol)


@pytest.mark.parametrize("seed", [0, 5, 2**31 - 1, 2**32 + 7])
def test_seeded_rand_is_torchs_cpu_generator(seed):
    """The op's draw is torch.rand from a generator seeded with the seed: MT19937 (seeded by its low 32
    bits on the CPU) recomputed in NumPy; the op passes torch.library's checks (schema, fake tensor,
    AOT dispatch)."""
    got = seeded_rand((3, 7), seed, "cpu")
    assert got.dtype == torch.float32 and got.shape == (3, 7)
    np.testing.assert_array_equal(got.numpy().ravel(), mt19937_uniform(seed % 2**32, 21))
    torch.library.opcheck(torch.ops.lorakern.seeded_rand.default, ([3, 7], seed, torch.device("cpu")))


def test_seeded_rand_takes_what_manual_seed_takes():
    """Seeds beyond int64 (up to 2^64) and negative ones draw what manual_seed draws for them; others fail
    with the range in the message."""
    for seed in (2**63 + 5, 2**64 - 1, -3, -(2**63)):
        want = torch.rand(8, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(seeded_rand((8,), seed, "cpu"), want, rtol=0, atol=0)
    with pytest.raises(LorakernError, match=r"outside \[-2\*\*63, 2\*\*64\)"):
        seeded_rand((8,), 2**64, "cpu")
    for bad in (1.5, True, "3"):
        with pytest.raises(LorakernError, match="must be an int"):
            seeded_rand((8,), bad, "cpu")
