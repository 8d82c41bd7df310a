"""DoRA: the torch (and C) paths against lorakern.core.dora, the norm without B A, NF4, merging, bad input.
PEFT both ways: tests/test_dora_peft.py."""
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

import strategies
from lorakern import LoraConfig, LoraLinear, core, dora, inject
from lorakern.core import nf4 as core_nf4
from lorakern.errors import AdapterError, ConfigError, LorakernError
from lorakern.testing import TOLERANCE, LibrarySpy, assert_matches_reference
from lorakern.testing_dora import compare_dora, dora_layer, f64

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


PATHS = ("torch", "c")
SEEN = []


def _run_case(case) -> None:
    # the C kernels take fp32 only (and serve only where they build): other draws run the torch path
    from lorakern import native

    wanted = case.extra.get("path", "torch")
    backend = "c" if wanted == "c" and case.dtype == torch.float32 and native.lora_library() is not None else "torch"
    layer = dora_layer(case.K, case.N, case.r, case.dtype, bias=case.bias, dropout=case.dropout, alpha=case.alpha,
                       seed=case.seed, backend=backend).train()
    assert_matches_reference(compare_dora(layer, strategies.make_input(case), case.seed))


@given(case=strategies.lora_cases(DTYPES, scaling=True, path=st.sampled_from(PATHS)))
def _torch_and_c_paths_match_reference(case):
    SEEN.append(case)
    _run_case(case)


def test_torch_and_c_paths_match_reference():
    """DoRA on every tile class, layout, rank class, dtype and dropout of tests/strategies.py, torch and C
    (the stated shares asserted on the examples that ran)."""
    SEEN.clear()
    _torch_and_c_paths_match_reference()
    strategies.assert_shares(SEEN, strategies.axes_for(DTYPES, path=[f"path={p}" for p in PATHS]))


# explicit edge cases: (lead, K, N, r, dtype, dropout, bias, alpha, seed, path)
DORA_EXPLICIT = [((), 1, 1, 1, torch.float32, 0.0, True, None, 0, "c"),
                 ((3, 5), 37, 41, 20, torch.float64, 0.3, False, 4.0, 1, "torch"),
                 ((6,), 42, 5, 7, torch.bfloat16, 0.3, True, 16.0, 2, "torch"),
                 ((1,), 90, 90, 1, torch.float32, 0.0, False, None, 3, "torch"),
                 ((), 1, 23, 2, torch.bfloat16, 0.0, False, None, 1, "torch"),
                 ((2, 9), 17, 33, 20, torch.float32, 0.3, True, 2.0, 4, "c")]


@pytest.mark.parametrize("index", range(len(DORA_EXPLICIT)))
def test_explicit_dora_cases(index):
    lead, K, N, r, dtype, dropout, bias, alpha, seed, path = DORA_EXPLICIT[index]
    layout = "3-D" if len(lead) == 2 else ("1-D" if not lead else "contiguous 2-D")
    _run_case(strategies.Case(lead, K, N, r, dtype, layout, dropout, bias, seed, alpha=alpha, extra={"path": path}))


def _levels():
    from lorakern import native

    return [level.name for level in native.levels_here()]


@pytest.mark.parametrize("level", _levels())
@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("shape", [(6, 42, 123, 5), (1, 431, 6, 64), (123, 6, 42, 1), (37, 64, 64, 8),
                                   (70, 64, 37, 5)], ids=lambda s: "x".join(map(str, s)))
def test_c_path_matches_reference(shape, dropout, level, monkeypatch):
    from lorakern import native

    monkeypatch.setenv("LORAKERN_NATIVE", "1")
    library = native.lora_library(next(lv for lv in native.levels_here() if lv.name == level))
    if library is None:
        pytest.skip(f"the C kernels are not built here: {native.build_status()[1]}")
    spy = LibrarySpy(library)
    monkeypatch.setattr(native, "lora_library", lambda: spy)
    M, K, N, r = shape
    # alpha = 2.5 r (s = 2.5): a scaling dropped from the C epilogue or the merge is seen (alpha None: s = 1)
    layer = dora_layer(K, N, r, torch.float32, bias=M % 2 == 0, dropout=dropout, alpha=2.5 * r, seed=M,
                       backend="c").train()
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(K), dtype=torch.float32)
    assert_matches_reference(compare_dora(layer, x, seed=M))
    # M >= K without dropout: merged with c folded in (the forward is one GEMM on diag(c) W', no C pass; the
    # backward's pass forms u from x and reads y for dm); else the scaled epilogue (with dropout PEFT's x~ W^T term runs in torch) and a gc pass
    folded = M >= K and dropout == 0
    # (the norm always in C: dora_norm_f32, or with the folded forward's weight in one pass: dora_merge_f32)
    if folded:
        # n, c and diag(c) W' in one C pass for the forward's GEMM (dora_merge_f32), diag(c) W' again for dx's
        expected = ["dora_merge_f32", "dora_backward_scratch", "dora_backward_f32", "lora_merge_f32"]
    else:
        expected = ["dora_norm_f32"] + (["dora_forward_f32"] if dropout == 0 else []) + [
            "dora_scale_grad_f32", "lora_backward_scratch", "lora_backward_f32"]
    assert spy.calls == expected, spy.calls
    # inference: nothing needs z, so y is scaled where the base GEMM wrote it, or (M >= K) one GEMM on
    # diag(c) (W + s B A)
    layer.eval()
    spy.calls.clear()
    with torch.no_grad():
        y = layer(x)
    assert spy.calls == (["dora_merge_f32"] if M >= K else ["dora_norm_f32", "dora_forward_f32"]), spy.calls
    a = layer.adapters["default"]
    ref = core.dora.forward(f64(x), f64(layer.weight), f64(a.lora_A), f64(a.lora_B), f64(a.lora_magnitude_vector),
                            f64(layer.bias), core.scaling(a.r, a.alpha))
    np.testing.assert_allclose(f64(y), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("trains", [("x", "lora_A", "lora_B"), ("lora_magnitude_vector",), ("lora_A", "lora_magnitude_vector"),
                                    ("x", "lora_B")], ids=["m-frozen", "only-m", "A-and-m", "x-and-B"])
@pytest.mark.parametrize("shape", [(70, 64, 37, 5), (9, 64, 37, 5)], ids=["folded", "scaled-g"])
def test_c_path_with_any_subset_of_gradients_matches_reference(shape, trains, monkeypatch):
    """Each subset of x, A, B, m needing a gradient (m frozen: no z is kept; A and B frozen: only dm's pass;
    B trains with A frozen: the folded backward still forms u from x) against core.dora."""
    from lorakern import native

    monkeypatch.setenv("LORAKERN_NATIVE", "1")
    if native.lora_library() is None:
        pytest.skip(f"the C kernels are not built here: {native.build_status()[1]}")
    M, K, N, r = shape
    layer = dora_layer(K, N, r, torch.float32, seed=M, backend="c").train()
    a = layer.adapters["default"]
    for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
        getattr(a, name).requires_grad_(name in trains)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(K), dtype=torch.float32, requires_grad="x" in trains)
    y = layer(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(M), dtype=torch.float32)
    got = dict(zip(trains, torch.autograd.grad(y, [x if n == "x" else getattr(a, n) for n in trains], dy)))
    W, A, B, m, b = f64(layer.weight), f64(a.lora_A), f64(a.lora_B), f64(a.lora_magnitude_vector), f64(layer.bias)
    s = core.scaling(a.r, a.alpha)
    ref = {"y": core.dora.forward(f64(x), W, A, B, m, b, s), **core.dora.backward(f64(x), W, A, B, m, f64(dy), s)}
    keys = {"x": "dx", "lora_A": "dA", "lora_B": "dB", "lora_magnitude_vector": "dm"}
    for name, value in [("y", y)] + [(keys[n], got[n]) for n in trains]:
        want = ref[name]
        np.testing.assert_allclose(f64(value), want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=name)


@pytest.mark.parametrize("name", ["y", "dx", "dA", "dB", "dm"])
def test_comparison_fails_on_a_result_spoiled_by_4x_its_bound(name):
    layer = dora_layer(20, 12, 3, torch.float32, dropout=0.2, seed=5).train()
    x = torch.randn(4, 20, generator=torch.Generator().manual_seed(5))
    assert compare_dora(layer, x, seed=5).passed
    spoiled = compare_dora(layer, x, seed=5, perturb={name: 4.0})
    assert not spoiled.passed and spoiled.worst[0] == name


# The norm's stated shares: the shape axes drawn uniformly from their labels and asserted on the examples
# that ran; every example runs every path (torch fp64 and fp32: W A^T and the Gram of A; the C kernel
# dora_norm_f32, dense fp32 W in one pass over its rows, whose K loop has a vector body and a scalar tail;
# an NF4 base decoded chunk by chunk), so each path's share is all of them, counted as they ran.
NORM_PATHS = ("torch fp64", "torch fp32", "C fp32", "NF4 base fp32")
NORM_SHAPES = ("wide (N < K)", "tall (N > K)", "square (N = K)")
NORM_RANKS = ("r < K", "r = K")
NORM_WIDTHS = ("K < 16 (tail only)", "K a multiple of 16", "K > 16 with a tail")
NORM_AXES = {"shape": list(NORM_SHAPES), "r": list(NORM_RANKS), "K": list(NORM_WIDTHS)}
NORM_SEEN = []
NORM_RAN = Counter()  # path -> examples it ran (explicit ones included)


@st.composite
def norm_cases(draw):
    shape, rank, width = (draw(st.sampled_from(labels)) for labels in (NORM_SHAPES, NORM_RANKS, NORM_WIDTHS))
    top = 32 if rank == NORM_RANKS[1] else 70  # r = K: the Gram of A is K x K
    if width == NORM_WIDTHS[0]:
        K = draw(st.integers(2 if shape == NORM_SHAPES[0] or rank == NORM_RANKS[0] else 1, 15))
    elif width == NORM_WIDTHS[1]:
        K = draw(st.sampled_from(range(16, top + 1, 16)))
    else:
        K = draw(st.integers(17, top).filter(lambda k: k % 16 != 0))
    r = K if rank == NORM_RANKS[1] else draw(st.integers(1, min(16, K - 1)))
    N = {NORM_SHAPES[0]: lambda: draw(st.integers(1, K - 1)), NORM_SHAPES[1]: lambda: draw(st.integers(K + 1, K + 40)),
         NORM_SHAPES[2]: lambda: K}[shape]()
    return SimpleNamespace(K=K, N=N, r=r, s=draw(st.floats(0.05, 8.0)), seed=draw(st.integers(0, 2**16)),
                           classes={"shape": shape, "r": rank, "K": width})


def _norm_error(got: np.ndarray, formed: np.ndarray, W: np.ndarray, A: np.ndarray, B: np.ndarray, s: float,
                dtype: torch.dtype) -> tuple[float, np.ndarray]:
    """(max |got - formed| / bound, bound per row): n^2 sums terms of both signs, so its error is eps x (the
    length summed) x the same sum of absolute values, and n's error that over 2 n."""
    Wa, Aa, Ba = abs(W), abs(A), abs(B)
    absolute = (Wa ** 2).sum(1) + 2 * s * (Ba * (Wa @ Aa.T)).sum(1) + s * s * ((Ba @ (Aa @ Aa.T)) * Ba).sum(1)
    bound = 4 * TOLERANCE[dtype][0] * (W.shape[1] + A.shape[0]) * absolute / (2 * np.maximum(formed, 1e-30))
    return float(np.max(np.abs(got - formed) / bound)), bound


@given(case=norm_cases())
@example(case=SimpleNamespace(K=1, N=1, r=1, s=1.0, seed=0, classes={}))
@example(case=SimpleNamespace(K=64, N=3, r=16, s=8.0, seed=1, classes={}))
def _norm_matches_the_formed_norm(case):
    from lorakern import native
    from lorakern.nf4.codec import quantize_nf4
    from lorakern.nf4.storage import NF4Storage
    from lorakern.testing import reference_nf4_weight

    if case.classes:
        NORM_SEEN.append(case)
    library = native.lora_library()
    gen = torch.Generator().manual_seed(case.seed)
    W, A, B = (torch.randn(*shape, generator=gen, dtype=torch.float64)
               for shape in ((case.N, case.K), (case.r, case.K), (case.N, case.r)))
    for path in NORM_PATHS:
        dtype = torch.float64 if path == "torch fp64" else torch.float32
        if path == "C fp32" and library is None:
            continue
        weight, Ad, Bd = W.to(dtype), A.to(dtype), B.to(dtype)
        if path == "NF4 base fp32":
            weight = NF4Storage(quantize_nf4(weight, blocksize=64, double_quant=case.seed % 2 == 0))
            W_ref = reference_nf4_weight(weight, torch.float32)  # decoded by core, not by the storage
        else:
            W_ref = f64(weight)
        formed = core.dora.weight_norm(W_ref, f64(Ad), f64(Bd), case.s)
        got = f64(dora.weight_norm(weight, Ad, Bd, case.s, library=library if path == "C fp32" else None))
        error, bound = _norm_error(got, formed, W_ref, f64(Ad), f64(Bd), case.s, dtype)
        assert error <= 1.0, (path, error)
        # the same check fails on a norm off by 4 bounds at one row
        bad = got.copy()
        bad[case.N // 2] += 4 * bound[case.N // 2]
        assert _norm_error(bad, formed, W_ref, f64(Ad), f64(Bd), case.s, dtype)[0] > 1.0
        NORM_RAN[path] += 1


def test_norm_without_BA_equals_formed_norm(monkeypatch):
    """n_i = ||W_i + s (B A)_i|| without forming B A, on every path (torch fp64 / fp32, the C kernel, an NF4
    base) for each example, over wide, tall and square W, r below and at K, K's vector body and tail,
    against the float64 norm of the formed W + s B A (the stated shares asserted on the examples that ran)."""
    from lorakern import native

    monkeypatch.setenv("LORAKERN_NATIVE", "1")  # the C kernel too, where it builds
    NORM_SEEN.clear()
    NORM_RAN.clear()
    _norm_matches_the_formed_norm()
    strategies.assert_shares(NORM_SEEN, NORM_AXES)
    every = [p for p in NORM_PATHS if p != "C fp32" or native.lora_library() is not None]
    assert all(NORM_RAN[p] >= len(NORM_SEEN) for p in every), (dict(NORM_RAN), len(NORM_SEEN))


def test_gradcheck_float64():
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    x_lora = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    W, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    m = torch.rand(4, dtype=torch.float64, requires_grad=True)
    # the norm is a constant of the gradient (detached), so gradcheck fixes it through base_norm_sq and B A:
    # perturbing A or B moves n, which the Function's gradient ignores by design; check A, B with n frozen
    for xl in (None, x_lora):
        assert torch.autograd.gradcheck(lambda x, xl, b, m: dora.DoraLinearFunction.apply(
            x, xl, W, b, A.detach(), B.detach(), m, 0.7, None, None), (x, xl, b, m))


def test_magnitude_starts_at_the_row_norms_and_the_layer_at_its_base():
    linear = nn.Linear(24, 10)
    layer = LoraLinear.from_linear(linear, r=4, use_dora=True)
    expected = np.linalg.norm(f64(linear.weight), axis=1)  # B = 0 at init
    np.testing.assert_allclose(f64(layer.lora_magnitude_vector), expected, rtol=1e-6)
    x = torch.randn(5, 24)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-6)


def test_named_adapters_have_their_own_magnitude():
    layer = dora_layer(16, 8, 2, torch.float64, seed=1)
    layer.add_adapter("b", r=3, use_dora=True)
    layer.add_adapter("plain", r=2)
    assert layer.adapters["b"].lora_magnitude_vector is not layer.adapters["default"].lora_magnitude_vector
    assert layer.adapters["plain"].lora_magnitude_vector is None
    names = {k for k, _ in layer.named_parameters() if "magnitude" in k}
    assert names == {"adapters.default.lora_magnitude_vector", "adapters.b.lora_magnitude_vector"}
    layer.set_adapter("b")
    assert not layer.adapters["default"].lora_magnitude_vector.requires_grad
    assert layer.adapters["b"].lora_magnitude_vector.requires_grad


@pytest.mark.parametrize("active", [["default"], ["default", "b"], ["plain", "default"]], ids="+".join)
def test_merge_unmerge_to_linear_agree_with_forward(active):
    layer = dora_layer(30, 20, 4, torch.float64, seed=2).eval()
    for name, use_dora in (("b", True), ("plain", False)):
        layer.add_adapter(name, r=3, use_dora=use_dora)
        with torch.no_grad():
            layer.adapters[name].lora_B.normal_(0, 0.3)
    layer.set_adapter(active)
    x = torch.randn(7, 30, dtype=torch.float64)
    expected = layer(x)
    original = layer.weight.detach().clone()
    plain = layer.to_linear()
    torch.testing.assert_close(plain(x), expected, rtol=1e-12, atol=1e-12)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    if active == ["default"]:
        a = layer.adapters["default"]
        W_ref = core.dora.merge(f64(original), f64(a.lora_A), f64(a.lora_B), f64(a.lora_magnitude_vector),
                                core.scaling(a.r, a.alpha))
        np.testing.assert_allclose(f64(layer.weight), W_ref, rtol=1e-12, atol=1e-13)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, original, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_nf4_base_matches_reference_on_the_decoded_weight():
    linear = nn.Linear(128, 48)
    layer = LoraLinear.from_linear(linear, quantize="nf4", double_quant=False, compute_dtype=torch.float32, r=4,
                                   use_dora=True)
    W_ref = core_nf4.nf4_dequantize(core_nf4.nf4_quantize(linear.weight.detach().float().numpy(), 64, False))
    a = layer.adapters["default"]
    np.testing.assert_allclose(f64(a.lora_magnitude_vector), np.linalg.norm(W_ref, axis=1), rtol=1e-6)
    with torch.no_grad():
        a.lora_B.normal_(0, 0.2)
        a.lora_magnitude_vector.mul_(1.5)
    x = torch.randn(9, 128).requires_grad_(True)
    y = layer(x)
    dy = torch.randn_like(y)
    dx, dA, dB, dm = torch.autograd.grad(y, [x, a.lora_A, a.lora_B, a.lora_magnitude_vector], dy)
    args = (f64(x), W_ref, f64(a.lora_A), f64(a.lora_B), f64(a.lora_magnitude_vector))
    s = core.scaling(4, 4.0)
    np.testing.assert_allclose(f64(y), core.dora.forward(*args, f64(layer.bias), s), rtol=1e-4, atol=1e-5)
    ref = core.dora.backward(*args, f64(dy), s)
    for name, got in (("dx", dx), ("dA", dA), ("dB", dB), ("dm", dm)):
        np.testing.assert_allclose(f64(got), ref[name], rtol=1e-4, atol=1e-4, err_msg=name)
    merged = layer.to_linear()
    torch.testing.assert_close(merged(x), y, rtol=1e-4, atol=1e-5)


def test_base_norm_is_cached_until_the_base_changes():
    layer = dora_layer(12, 6, 2, torch.float64, seed=3)
    first = layer._base_norm_sq()
    assert layer._base_norm_sq() is first
    layer.merge()
    assert layer._base_norm_sq() is not first
    torch.testing.assert_close(layer._base_norm_sq(), layer.weight.detach().square().sum(1))
    layer.unmerge()
    with torch.no_grad():
        layer.weight.mul_(2.0)  # any in-place write to the base invalidates it
    torch.testing.assert_close(layer._base_norm_sq(), layer.weight.detach().square().sum(1))


def test_autocast_runs_dora_in_bfloat16_with_fp32_parameters():
    layer = dora_layer(40, 24, 4, torch.float32, seed=7).train()
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    a = layer.adapters["default"]
    assert a.lora_magnitude_vector.grad.dtype == a.lora_A.grad.dtype == torch.float32
    ref = core.dora.forward(f64(x), f64(layer.weight), f64(a.lora_A), f64(a.lora_B), f64(a.lora_magnitude_vector),
                            f64(layer.bias), core.scaling(a.r, a.alpha))
    np.testing.assert_allclose(f64(y), ref, rtol=0, atol=8 * 2.0**-8 * np.abs(ref).max())


# ---- bad input ------------------------------------------------------------------------------------------
def test_bad_input_names_the_fix():
    with pytest.raises(ConfigError, match="use_dora must be True or False"):
        LoraConfig(target_modules=["q"], use_dora="yes")
    layer = LoraLinear(8, 4, r=2)
    with pytest.raises(AdapterError, match="use_dora=True"):
        layer.reset_magnitude("default")
    layer = dora_layer(8, 4, 65, torch.float32)  # a DoRA layer the kernels cannot take: the reason, and the fix
    layer.backend = "triton"
    with pytest.raises(LorakernError, match=r"r=65 \(the kernels take r <= 64\).*LORAKERN_BACKEND=auto"):
        layer(torch.randn(2, 8))
    layer = dora_layer(8, 4, 2, torch.float32)
    layer.add_adapter("plain", r=2)
    layer.merge(adapter_names=["plain"])
    with pytest.raises(LorakernError, match="unmerge\\(\\) first"):
        layer(torch.randn(2, 8))
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 4))
    with pytest.raises(LorakernError, match="use_dora=True on nn.Embedding.*Linear layers only"):
        inject(model, LoraConfig(target_modules=["0", "1"], use_dora=True))


def _cancelling_layer(backend, K=16, N=6, r=3, row=2, left=1e-4, dtype=torch.float32, seed=7):
    """A DoRA layer whose row ``row`` of W + s B A is ``left`` times its parts (W_row set to -s (B A)_row plus a
    small remainder): the norm identity cancels there (n^2 ~ 1e-8 of its terms: below fp32's resolution)."""
    layer = dora_layer(K, N, r, torch.float64, bias=False, seed=seed, backend=backend)
    a = layer.adapters["default"]
    with torch.no_grad():
        delta = a.scaling * (a.lora_B @ a.lora_A)
        remainder = torch.randn(K, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
        layer.weight[row] = -delta[row] + left * delta[row].norm() * remainder / remainder.norm()
        a.lora_magnitude_vector.copy_(torch.rand(N, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
                                      * 1e-3 + 1e-3)  # c = m / n near 1-10 on the cancelled row, not 1e4
    return layer.to(dtype)


@pytest.mark.parametrize("rows", [3, 40], ids=["unfolded", "folded"])
@pytest.mark.parametrize("backend", ["torch", "c", "triton"])
def test_a_row_the_adapter_cancels_is_formed(backend, rows, monkeypatch):
    """Where W_i + s (B A)_i nearly cancels, the identity's n_i^2 rounds to ~0 (c = m / n: inf); that row is
    formed instead (dora._formed_where_cancelled) and the layer matches the reference, on the torch path, the
    C path unfolded (fewer rows than K) and folded (dora_merge_f32), and the Triton kernels (interpreted on CPU);
    with the fallback off it does not."""
    from lorakern import native

    if backend == "c" and native.lora_library() is None:
        pytest.skip(f"no C library: {native.build_status()}")
    if backend == "triton":
        pytest.importorskip("triton")
        if torch.cuda.is_available():
            pytest.skip("the CPU tensors of this test run the Triton kernels interpreted only")
    layer = _cancelling_layer(backend)
    W, a = layer.weight.detach(), layer.adapters["default"]
    exact = core.dora.weight_norm(f64(W), f64(a.lora_A), f64(a.lora_B), a.scaling)
    assert exact[2] < 1e-3 * exact.max()
    library = native.lora_library() if backend == "c" else None
    norm = dora.weight_norm(W, a.lora_A, a.lora_B, a.scaling, library=library).double().numpy()
    others = np.arange(6) != 2
    assert np.allclose(norm[others], exact[others], rtol=1e-5, atol=0)
    # the formed row's elements themselves cancel to 1e-4: fp32 keeps ~eps / 1e-4 of them (PEFT's formed norm too)
    assert abs(norm[2] - exact[2]) <= 5e-3 * exact[2]
    x = torch.randn(rows, 16, generator=torch.Generator().manual_seed(rows))
    assert_matches_reference(compare_dora(layer, x))
    # the bound above scales with the norm's conditioning (~1e8 on that row): the row's own output is held here
    assert _cancelled_output_error(layer, x) <= 1e-2
    # the identity alone (no row formed; the C pass flags by its own copy of the limit): n_2 3.4x off, or c wrong
    monkeypatch.setattr(dora, "CANCELLATION_LIMIT", -1.0)
    monkeypatch.setattr(dora, "_formed_rows", lambda norm, *args: norm)
    assert not _cancelled_output_error(_cancelling_layer(backend), x) <= 1e-2


def _cancelled_output_error(layer, x, row=2) -> float:
    """|y - y_ref| / max |y_ref| over output column ``row`` (the cancelled row of W + s B A), y_ref from core.dora."""
    a = layer.adapters["default"]
    with torch.no_grad():
        y = layer(x).double().numpy()[:, row]
    want = core.dora.forward(f64(x), f64(layer.weight), f64(a.lora_A), f64(a.lora_B), f64(a.lora_magnitude_vector),
                             None, a.scaling)[:, row]
    return float(np.abs(y - want).max() / np.abs(want).max())


def test_a_cancelled_row_of_an_nf4_base_is_decoded_and_formed():
    """_weight_rows decodes the cancelled rows of an NF4 base (chunk by chunk) before forming them."""
    from lorakern.quant import NF4Storage, quantize_nf4

    gen = torch.Generator().manual_seed(3)
    W = torch.randn(70, 64, generator=gen)
    A, B = torch.randn(4, 64, generator=gen), torch.randn(70, 4, generator=gen)
    s = 0.5
    storage = NF4Storage(quantize_nf4(W, blocksize=64))
    decoded = torch.cat([chunk for _, chunk in storage.row_chunks(torch.float32)])
    # rows 5 and 66 of W + s B A cancel to 1e-4 of the decoded rows: A holds them, B_i takes them back
    for j, i in enumerate((5, 66)):
        A[j] = decoded[i]
        B[i] = 0.0
        B[i, j] = -(1 - 1e-4) / s
    exact = torch.linalg.vector_norm(decoded.double() + s * (B.double() @ A.double()), dim=1)
    norm = dora.weight_norm(storage, A, B, s)
    assert exact[[5, 66]].max() < 1e-2 * exact.max()
    assert torch.allclose(norm.double(), exact, rtol=2e-3)
    assert dora._formed_where_cancelled(norm, storage, A, B, dora.row_norms_sq(storage), A @ A.t(), s)[1] is not None


def test_a_cancelled_row_under_torch_compile_stays_finite():
    """Inside a graph the row is not formed (a data-dependent branch would break it): the identity's n_i is
    floored, so c and y stay finite, and the graph has no break."""
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    # K = 4, the row cancelled to fp32's rounding: the identity's n_2^2 comes out <= 0 here (0 after the clamp)
    for limit, finite in ((dora.CANCELLATION_LIMIT, True), (0.0, False)):
        dora.CANCELLATION_LIMIT, saved = limit, dora.CANCELLATION_LIMIT
        try:
            torch._dynamo.reset()
            compiled = torch.compile(_cancelling_layer("torch", K=4, left=0.0).eval(), fullgraph=True, backend="eager")
            with torch.no_grad():
                assert bool(torch.isfinite(compiled(x)).all()) == finite, limit
        finally:
            dora.CANCELLATION_LIMIT = saved
