"""DoRA on the Triton kernels (HAS_MAGNITUDE) against lorakern.core.dora in float64: y, dx, dA, dB, dm (and
the bias's gradient) on dense and NF4 bases, the magnitude trained or frozen, with and without dropout.
Interpreted on CPU (TRITON_INTERPRET=1, set by conftest), compiled on CUDA. The interpreter runs one config
(BLOCK_M = BLOCK_N = BLOCK_K = 32, split-K below SMALL_M = 16), so tests/strategies.py's tile classes reach
every path: the split-K kernel's DoRA share, the tiled epilogue on whole and ragged tiles, a second column
group. The comparison (tests/test_dora.py: compare_dora) recomputes s, the mask (Philox, lorakern.testing_masks)
and the NF4 decode (lorakern.core) independently of the kernels.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import strategies
from lorakern import LoraLinear, dispatch
from lorakern.errors import LorakernError
from lorakern.kernels import lora_linear as kl
from lorakern.kernels import dora_ops
from lorakern.kernels.launchers import dora_forward
from lorakern.testing import assert_matches_reference
from lorakern.testing_dora import compare_dora, dora_layer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BASES = ("dense", "nf4")
MAGNITUDES = ("trained", "frozen")


def triton_dora_layer(K, N, r, dtype, *, base="dense", bias=True, dropout=0.0, seed=0, magnitude="trained",
                      blocksize=64, double_quant=True):
    """A DoRA layer pinned to the triton backend, every tensor random (B and m too: c = m / n is not 1); the
    bias trains. An NF4 base is quantized from a random nn.Linear and computes in ``dtype``."""
    if base == "dense":
        layer = dora_layer(K, N, r, dtype, bias=bias, dropout=dropout, seed=seed, backend="triton")
    else:
        gen = torch.Generator().manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # r > min(K, N) is legal
            linear = nn.Linear(K, N, bias=bias)
            with torch.no_grad():
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) / math.sqrt(K))
                if bias:  # nn.Linear's init draws from the global generator: a case must be the same every run
                    linear.bias.copy_(torch.randn(N, generator=gen) / math.sqrt(K))
            layer = LoraLinear.from_linear(linear, quantize="nf4", compute_dtype=dtype, lora_dtype=dtype, r=r,
                                           dropout=dropout, use_dora=True, blocksize=blocksize,
                                           double_quant=double_quant)
        a = layer.adapters["default"]
        with torch.no_grad():  # A drawn here too: from_linear's init draws from the global generator
            a.lora_A.copy_(torch.randn(a.lora_A.shape, generator=gen) / math.sqrt(K))
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=gen) / math.sqrt(r))
            a.lora_magnitude_vector.mul_(0.5 + torch.rand(N, generator=gen).to(dtype))
        layer.backend = "triton"
    if bias:
        layer.bias.requires_grad_(True)
    layer.adapters["default"].lora_magnitude_vector.requires_grad_(magnitude == "trained")
    return layer.to(DEVICE).train()


def check(case, base, magnitude, blocksize=64, double_quant=True, perturb=None):
    layer = triton_dora_layer(case.K, case.N, case.r, case.dtype, base=base, bias=case.bias, dropout=case.dropout,
                              seed=case.seed, magnitude=magnitude, blocksize=blocksize, double_quant=double_quant)
    assert dispatch.choose(layer._call_for(strategies.make_input(case, DEVICE)), layer.backend)[0].name == "triton"
    return compare_dora(layer, strategies.make_input(case, DEVICE), case.seed, perturb)


SEEN = []


@given(case=strategies.lora_cases(DTYPES, base=st.sampled_from(BASES), magnitude=st.sampled_from(MAGNITUDES)))
def _dora_matches_reference(case):
    SEEN.append(case)
    comparison = check(case, case.extra["base"], case.extra["magnitude"])
    assert ("dm" in comparison.errors) == (case.extra["magnitude"] == "trained")
    assert_matches_reference(comparison)


def test_matches_reference():
    """Every tile class, layout, rank class, dtype and dropout rate, dense and NF4 bases, the magnitude trained
    or frozen (the stated shares asserted on the examples that ran)."""
    SEEN.clear()
    _dora_matches_reference()
    strategies.assert_shares(SEEN, strategies.axes_for(
        DTYPES, base=[f"base={b}" for b in BASES], magnitude=[f"magnitude={m}" for m in MAGNITUDES]))


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("index", range(len(strategies.EXPLICIT)), ids=strategies.explicit_id)
def test_explicit_tile_classes(index, base):
    """One case per tile class (M = 1, below, at and above SMALL_M, whole and ragged tiles, r = 1 .. 64),
    fp32 / bf16 / fp16 in turn, with and without dropout."""
    case = strategies.explicit_case(index, DTYPES[index % 3])
    assert_matches_reference(check(case, base, "trained", blocksize=32 if index % 2 else 64,
                                   double_quant=index % 2 == 0))


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("M", [5, 40], ids=["split-K", "tiled"])
def test_float64_kernels_are_exact_to_float64(M, dropout):
    """fp64 operands (interpreted only): the kernels' algebra to the last bits, dropout's form included."""
    if not kl.INTERPRETED:
        pytest.skip("fp64 runs on the interpreted kernels only")
    case = strategies.Case((M,), 45, 37, 5, torch.float64, "contiguous 2-D", dropout, bias=True, seed=M)
    comparison = check(case, "dense", "trained")
    assert_matches_reference(comparison)
    assert max(comparison.errors.values()) < 1e-12


def test_comparison_fails_on_a_result_spoiled_by_4x_its_bound():
    """Every comparison above can fail: each result spoiled by 4x its bound is rejected, and named."""
    case = strategies.Case((40,), 37, 45, 3, torch.float32, "contiguous 2-D", 0.3, bias=True, seed=3)
    assert check(case, "dense", "trained").passed
    for name in ("y", "dx", "dA", "dB", "dm", "db"):
        spoiled = check(case, "dense", "trained", perturb={name: 4.0})
        assert not spoiled.passed and spoiled.worst[0] == name


def _record(fn):
    """(result, shapes of the tensors allocated inside the DoRA ops' implementations)."""
    from test_layer import recorder_inside

    RecordShapesInsideOps = recorder_inside({torch.ops.lorakern.dora_linear_fwd.default: dora_ops._dora_fwd_impl,
                                             torch.ops.lorakern.dora_linear_bwd.default: dora_ops._dora_bwd_impl})
    with RecordShapesInsideOps() as recorder:
        out = fn()
    return out, recorder.shapes


@pytest.mark.parametrize("M", [7, 40], ids=["split-K", "tiled"])
@pytest.mark.parametrize("magnitude", MAGNITUDES)
def test_z_is_kept_only_when_the_magnitude_trains_and_BA_never_formed(magnitude, M):
    K, N = 13, 17
    layer = triton_dora_layer(K, N, 3, torch.float32, magnitude=magnitude, seed=M)
    x = torch.randn(M, K, device=DEVICE, requires_grad=True)
    grad = torch.randn(M, N, device=DEVICE)
    with torch.no_grad():
        layer(x)  # the layer computes and caches ||W_i||^2 (an (N, K) square) once, on its first DoRA call
    y, forward = _record(lambda: layer(x))
    _, backward = _record(lambda: y.backward(grad))
    for shapes in (forward, backward):
        assert (N, K) not in shapes and (K, N) not in shapes, "B @ A (or its transpose) was formed"
    # y, and z for dm when m trains (fp32: the split-K kernel's fp32 accumulators are the results)
    assert forward.count((M, N)) == (2 if magnitude == "trained" else 1), forward
    assert (M, N) not in backward, "the backward materialised an (M, N) tensor (gc, or g z)"
    assert (layer.adapters["default"].lora_magnitude_vector.grad is not None) == (magnitude == "trained")


def test_inference_keeps_no_z():
    layer = triton_dora_layer(13, 17, 3, torch.float32).eval()
    x = torch.randn(40, 13, device=DEVICE)
    with torch.no_grad():
        layer(x)
        _, shapes = _record(lambda: layer(x))
    assert shapes.count((40, 17)) == 1


def test_dispatch_runs_dora_on_triton_and_reports_what_it_declines(monkeypatch):
    """A pinned triton backend takes a DoRA call (interpreted here; auto takes it for CUDA tensors) and runs
    the DoRA ops; what the kernels cannot take is declined with the launcher's exact reason."""
    layer = triton_dora_layer(16, 8, 2, torch.float32)
    x = torch.randn(4, 16, device=DEVICE)
    call = layer._call_for(x)
    assert call.magnitude is not None and dispatch.verdict("triton", call) is None
    assert layer.dispatch_report(x).splitlines()[0] == "runs: triton"
    calls = []
    original = dora_ops.dora_forward
    monkeypatch.setattr(dora_ops, "dora_forward",
                        lambda *args, **kwargs: (calls.append(tuple(args[0].shape)), original(*args, **kwargs))[1])
    layer(x)
    assert calls == [(4, 16)]
    if DEVICE == "cuda":
        layer.backend = None
        assert layer.dispatch_report(x).splitlines()[0] == "runs: triton"
    wide = triton_dora_layer(16, 8, 65, torch.float32)
    report = wide.dispatch_report(x)
    assert "triton: r=65 (the kernels take r <= 64)" in report.splitlines(), report
    with pytest.raises(LorakernError,
                       match=r"the triton backend cannot run this layer: r=65 \(the kernels take r <= 64\)"):
        wide(x)
    wide.backend = None
    assert wide(x).shape == (4, 8)  # auto: the torch path serves


def test_a_rank_without_compiled_dora_configs_is_declined_with_the_reason(monkeypatch):
    """Compiled, a (dtype, rank, base) whose DoRA configs all spilled (configs.py's _DORA_FAILED) has none to
    autotune: the dispatch declines it, saying which, and auto falls back (dropout and not, separately)."""
    monkeypatch.setattr(dora_ops, "INTERPRETED", False)
    monkeypatch.setattr(dora_ops, "get_autotune_config",
                        lambda kind, *args: [] if kind == "dora_drop_fwd" else kl.get_autotune_config(kind, *args))
    layer = triton_dora_layer(16, 8, 2, torch.float32, dropout=0.1)
    x = torch.randn(4, 16, device=DEVICE)
    reason = ("DoRA with dropout on a dense base in torch.float32 at r=2 (no DoRA kernel config for it has passed "
              "the sm_80/sm_90 compile checks yet)")
    assert f"triton: {reason}" in layer.dispatch_report(x).splitlines()
    layer.eval()  # no dropout: the dora_fwd configs
    assert layer.dispatch_report(x).splitlines()[0] == "runs: triton"


def test_second_active_dora_adapter_composes_on_the_kernel_output():
    """Two active DoRA adapters: the first runs in the kernels, the second composes in torch (as on every
    implementation); the result equals the torch path's."""
    layer = triton_dora_layer(20, 12, 3, torch.float64 if kl.INTERPRETED else torch.float32, bias=True, seed=4)
    layer.add_adapter("b", r=2, use_dora=True)
    with torch.no_grad():
        layer.adapters["b"].lora_B.normal_(0, 0.3)
        layer.adapters["b"].lora_magnitude_vector.mul_(1.2)
    layer.set_adapter(["default", "b"])
    x = torch.randn(9, 20, device=DEVICE, dtype=layer.weight.dtype)
    y = layer(x)
    layer.backend = "torch"
    expected = layer(x)
    tolerance = 1e-10 if kl.INTERPRETED else 1e-5  # fp64 interpreted; fp32 compiled
    torch.testing.assert_close(y, expected, rtol=tolerance, atol=tolerance)


def test_a_trainable_base_is_refused_like_the_torch_path():
    layer = triton_dora_layer(8, 4, 2, torch.float32)
    layer.weight.requires_grad_(True)
    with pytest.raises(LorakernError, match="base weight requires grad.*freeze it"):
        layer(torch.randn(3, 8, device=DEVICE))


def test_scale_must_be_the_accumulation_dtype():
    x, W = torch.randn(20, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE)
    A, B = torch.randn(2, 8, device=DEVICE), torch.randn(4, 2, device=DEVICE)
    with pytest.raises(ValueError, match=r"scale must be a contiguous \(4,\) torch.float32 tensor, got \(4,\) "
                                         r"torch.float16"):
        dora_forward(x, W, None, A, B, torch.ones(4, device=DEVICE, dtype=torch.float16), 1.0)


@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_gradcheck_float64(dropout):
    """The hand-written backward against finite differences (the norm detached: A and B enter through
    the kernels only, n fixed by passing them detached to the norm). fast_mode: random projections."""
    if not kl.INTERPRETED:
        pytest.skip("fp64 runs on the interpreted kernels only")
    gen = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(True)
    M, K, N, r = 20, 7, 6, 3
    x, b, A, B = make(M, K), make(N), make(r, K), make(N, r)
    W = torch.randn(N, K, generator=gen, dtype=torch.float64)
    m = (torch.rand(N, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True)
    norm = dora_ops.weight_norm(W, A, B, 0.7)

    def f(x, b, A, B, m):
        scale = m / norm
        y, _, _ = torch.ops.lorakern.dora_linear_fwd(x, W, b, A, B, scale, 0.7, dropout, torch.tensor(5), [], 0, True)
        return y

    assert torch.autograd.gradcheck(f, (x, b, A, B, m), fast_mode=True)


@pytest.mark.parametrize("M", [3, 40], ids=["split-K", "tiled"])
def test_compiles_without_graph_break(M):
    """torch.compile(fullgraph=True) traces dora_linear_triton on a dense base (the norm, then the ops through
    their fake implementations); the compiled run gives the eager numbers (the same seed: the same dropout
    mask). The whole layer compiles too: test_layer_on_triton_compiles_whole."""
    layer = triton_dora_layer(16, 24, 2, torch.float32, dropout=0.1, seed=M)
    a = layer.adapters["default"]
    weight = layer.weight
    norm_sq = layer._base_norm_sq()
    x = torch.randn(M, 16, device=DEVICE, requires_grad=True)

    def f(x):
        return kl.dora_linear_triton(x, weight, layer.bias, a.lora_A, a.lora_B, a.lora_magnitude_vector, a.scaling,
                                     0.1, 3, norm_sq)

    y = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    expected = f(x)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    params = [x, a.lora_A, a.lora_B, a.lora_magnitude_vector, layer.bias]
    grad = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, params, grad), torch.autograd.grad(expected, params, grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base", BASES)
def test_layer_on_triton_compiles_whole(base):
    """torch.compile(fullgraph=True) of a DoRA layer pinned to triton (its ||W_i||^2 computed inline under
    compile, an NF4 base decoded in torch there): dropout from the global generator, m trained; the output
    and every gradient equal eager's bit for bit (the same kernels, the same mask from the same seed)."""
    torch._dynamo.reset()
    layer = triton_dora_layer(32, 24, 2, torch.float32, base=base, dropout=0.1, seed=1).train()
    layer.dropout_seed = None
    x = torch.randn(3, 32, device=DEVICE)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    params = [p for p in layer.parameters() if p.requires_grad]
    results = []
    for module in (compiled, layer):
        xg = x.clone().requires_grad_(True)
        torch.manual_seed(2)
        y = module(xg)
        results.append([y] + list(torch.autograd.grad(y, [xg] + params, torch.ones_like(y))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
