"""Mixed-adapter batches: each row runs (and trains) its own adapter. The torch path against the float64
row-by-row reference (lorakern.core.mixed_forward / mixed_backward), outputs and every gradient, dense and
NF4 bases; the benchmark's mixed providers and `lorakern check`'s mixed rows. The model-level API
(lorakern.adapter_rows): tests/test_mixed_models.py."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

import lorakern
import strategies
from lorakern import core, dispatch, native
from lorakern.errors import AdapterError, LorakernError
from lorakern.nf4 import lora as _nf4_lora  # noqa: F401 (registers the NF4 torch implementation; run alone, nothing else does)
from lorakern.nf4.codec import quantize_nf4
from lorakern.nf4.storage import NF4Storage
from lorakern.rows import group_rows
from toy_models import assert_close_scaled


def f64(t):
    return t.detach().double().numpy()


def make_case(rows, ranks, present, K, N, dtype, base, seed):
    """Operands of one mixed call: ``rows`` slot per row, ``ranks`` (r, alpha) per slot, ``present`` per slot
    (False: the layer lacks that adapter)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(rows), K, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    W = torch.randn(N, K, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(N, generator=gen, dtype=torch.float64).to(dtype)
    factors = []
    for (r, alpha), here in zip(ranks, present):
        A = (torch.randn(r, K, generator=gen, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
        B = (torch.randn(N, r, generator=gen, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
        factors.append((A, B, r, alpha) if here else None)
    dy = torch.randn(len(rows), N, generator=gen, dtype=torch.float64).to(dtype)
    if base == "nf4":
        state = core.nf4_quantize(W.float().numpy(), 64, double_quant=False)
        weight, W_ref = NF4Storage(quantize_nf4(W.float(), 64, False)), core.nf4_dequantize(state)
    else:
        weight, W_ref = W, f64(W)
    return x, weight, W_ref, b, factors, dy


def run_mixed(x, weight, b, factors, rows, base, dy, backend="torch"):
    adapters = [None if f is None else (f[0], f[1], f[3] / f[2], 0.0) for f in factors]
    groups = group_rows(torch.tensor(rows, dtype=torch.int64), len(factors))
    y = dispatch.lora_forward_mixed(x, base, weight, b, adapters, groups, requested=backend)
    y.backward(dy)
    grads = {"dx": x.grad}
    for slot, f in enumerate(factors):
        if f is not None:
            grads[f"dA{slot}"], grads[f"dB{slot}"] = f[0].grad, f[1].grad
    return y, grads


def reference(x, W_ref, b, factors, rows, dy):
    # s recomputed from r and alpha, never read from the code under test
    adapters = [None if f is None else (f64(f[0]), f64(f[1]), core.scaling(f[2], f[3])) for f in factors]
    y = core.mixed_forward(f64(x), W_ref, adapters, rows, f64(b))
    back = core.mixed_backward(f64(x), W_ref, adapters, rows, f64(dy))
    grads = {"dx": back["dx"]}
    for slot, f in enumerate(factors):
        if f is not None:
            grads[f"dA{slot}"], grads[f"dB{slot}"] = back["dA"][slot], back["dB"][slot]
    return y, grads


def tolerance(dtype):
    return (1e-10, 1e-10) if dtype == torch.float64 else (2e-5, 2e-5)


def assert_matches(got, want, dtype, what):
    assert_close_scaled(got, want, *tolerance(dtype), what)


# Each axis drawn uniformly from its labels (a label's stated share: 1 / its axis's labels), checked on the
# examples that ran by strategies.assert_shares.
ROWS = ("every row one adapter", "an adapter without rows", "base-only rows among adapters' rows",
        "every row base-only", "every adapter has rows")
KINDS = ("fp32", "fp64", "nf4", "fp32-c")
RANKS = ("r=1 among the ranks", "r=64 among the ranks", "ranks 2..16 only")
PRESENT = ("the layer has every adapter", "the layer lacks one adapter")
AXES = {"rows": list(ROWS), "kind": list(KINDS), "ranks": list(RANKS), "present": list(PRESENT)}


@st.composite
def assignments(draw):
    """A mixed call's operands: n adapters (ranks 1..64 mixed, alphas), which of them the layer has, the rows'
    slots (-1: base only), K and N; ``classes`` names the label drawn on each axis of AXES."""
    rows_label, kind = draw(st.sampled_from(ROWS)), draw(st.sampled_from(KINDS))
    ranks_label, present_label = draw(st.sampled_from(RANKS)), draw(st.sampled_from(PRESENT))
    n = draw(st.integers(2 if rows_label == ROWS[1] else 1, 3))
    ranks = [draw(st.sampled_from([2, 3, 5, 8, 16])) for _ in range(n)]
    if ranks_label != RANKS[2]:
        ranks[draw(st.integers(0, n - 1))] = 1 if ranks_label == RANKS[0] else 64
    alphas = [draw(st.sampled_from([1.0, 4.0, 16.0])) for _ in range(n)]
    present = [True] * n
    if present_label == PRESENT[1]:
        present[draw(st.integers(0, n - 1))] = False
    M = draw(st.integers(1, 9))
    if rows_label == ROWS[0]:
        rows = [draw(st.integers(0, n - 1))] * M
    elif rows_label == ROWS[1]:
        empty = draw(st.integers(0, n - 1))
        others = [a for a in range(n) if a != empty]
        rows = draw(st.permutations(others[:1] + draw(st.lists(st.sampled_from(others + [-1]), max_size=M - 1))))
    elif rows_label == ROWS[2]:
        rows = draw(st.permutations([-1, draw(st.integers(0, n - 1))]
                                    + draw(st.lists(st.integers(-1, n - 1), max_size=M - 1))))
    elif rows_label == ROWS[3]:
        rows = [-1] * M
    else:
        rows = draw(st.permutations(list(range(n)) + draw(st.lists(st.integers(0, n - 1), max_size=M - 1))))
    K = 64 if kind == "nf4" else draw(st.sampled_from([1, 3, 8, 17]))  # NF4 blocks of 64
    return SimpleNamespace(n=n, rows=list(rows), ranks=list(zip(ranks, alphas)), present=present, K=K,
                           N=draw(st.sampled_from([1, 4, 13])), kind=kind, seed=draw(st.integers(0, 2**16)),
                           classes={"rows": rows_label, "kind": kind, "ranks": ranks_label, "present": present_label})


def case_of(n, rows, ranks, present, K, N, kind, seed):
    """An explicit case (no classes: the share count is over drawn examples)."""
    return SimpleNamespace(n=n, rows=rows, ranks=ranks, present=present, K=K, N=N, kind=kind, seed=seed, classes={})


SEEN = []


@given(case=assignments())
@example(case=case_of(2, [0, 0, 0, 0], [(4, 8.0), (2, 4.0)], [True, True], K=8, N=4, kind="fp64", seed=0))  # one adapter only
@example(case=case_of(3, [0, 2, 0, 2], [(1, 1.0), (64, 16.0), (3, 4.0)], [True, True, True], K=17, N=13, kind="fp32",
                      seed=1))  # an adapter with no rows, ranks 1 and 64
@example(case=case_of(2, [-1, 1, -1, 0, -1], [(2, 4.0), (5, 1.0)], [True, True], K=3, N=4, kind="fp64", seed=2))  # base rows
@example(case=case_of(1, [-1, -1, -1], [(8, 16.0)], [True], K=8, N=4, kind="fp32", seed=3))  # every row base-only
@example(case=case_of(1, [0, 0, 0], [(8, 16.0)], [True], K=8, N=4, kind="fp32", seed=6))  # one slot: the single-adapter call
@example(case=case_of(2, [0, 1, 1, 0], [(2, 4.0), (3, 4.0)], [True, False], K=8, N=4, kind="fp64", seed=4))  # layer lacks one
@example(case=case_of(2, [1, 0, -1, 1, 0], [(4, 4.0), (16, 16.0)], [True, True], K=17, N=13, kind="nf4", seed=5))  # NF4 base
@example(case=case_of(3, [2, 0, -1, 2, 0], [(4, 4.0), (64, 16.0), (1, 2.0)], [True, True, False], K=17, N=13,
                      kind="fp32-c", seed=7))  # the C kernels, an adapter with no rows and one the layer lacks
def _paths_match_the_row_by_row_reference(case):
    if case.classes:
        SEEN.append(case)
    dtype = torch.float64 if case.kind == "fp64" else torch.float32
    base = "nf4" if case.kind == "nf4" else "dense"
    K = 64 if base == "nf4" else case.K  # NF4 blocks of 64
    backend = "c" if case.kind == "fp32-c" and native.lora_library() is not None else "torch"
    x, weight, W_ref, b, factors, dy = make_case(case.rows, case.ranks, case.present, K, case.N, dtype, base, case.seed)
    y, grads = run_mixed(x, weight, b, factors, case.rows, base, dy, backend)
    y_ref, grads_ref = reference(x, W_ref, b, factors, case.rows, dy)
    assert_matches(y, y_ref, dtype, "y")
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert_matches(grads[name], grads_ref[name], dtype, name)


def test_torch_and_c_paths_match_the_row_by_row_reference():
    """Every assignment class (one adapter, one without rows, base rows mixed in or alone, every adapter with
    rows), fp32 / fp64 / NF4 torch and fp32 C, ranks 1..64 mixed, a layer lacking an adapter; output and every
    gradient (the stated shares asserted on the drawn examples that ran)."""
    SEEN.clear()
    _paths_match_the_row_by_row_reference()
    strategies.assert_shares(SEEN, AXES)


def test_seeded_dropout_uses_each_adapters_mask_rows_and_matches_the_reference():
    from lorakern.functional import torch_dropout_mask

    rows, ps = [1, 0, -1, 1, 0, 0], [0.25, 0.5]
    x, weight, W_ref, b, factors, dy = make_case(rows, [(3, 6.0), (2, 2.0)], [True, True], 9, 5, torch.float64,
                                                 "dense", 7)
    adapters = [(f[0], f[1], f[3] / f[2], p) for f, p in zip(factors, ps)]
    groups = group_rows(torch.tensor(rows), 2)
    y = dispatch.lora_forward_mixed(x, "dense", weight, b, adapters, groups, seed=11, requested="torch")
    y.backward(dy)
    # the mask a single-adapter call with seed 11 and that adapter's p draws for the whole x
    masks = [f64(torch_dropout_mask(11, x.shape, p, "cpu")) for p in ps]
    ref = [(f64(f[0]), f64(f[1]), core.scaling(f[2], f[3])) for f in factors]
    assert_matches(y, core.mixed_forward(f64(x), W_ref, ref, rows, f64(b), masks), torch.float64, "y")
    back = core.mixed_backward(f64(x), W_ref, ref, rows, f64(dy), masks)
    assert_matches(x.grad, back["dx"], torch.float64, "dx")
    for slot, f in enumerate(factors):
        assert_matches(f[0].grad, back["dA"][slot], torch.float64, f"dA{slot}")
        assert_matches(f[1].grad, back["dB"][slot], torch.float64, f"dB{slot}")
    with pytest.raises(AssertionError):  # the masks matter: without them the reference disagrees
        assert_matches(y, core.mixed_forward(f64(x), W_ref, ref, rows, f64(b)), torch.float64, "y")


def test_the_comparison_fails_when_output_or_gradient_is_off_by_four_bounds():
    rows = [0, 1, -1, 0, 1]
    for dtype in (torch.float32, torch.float64):
        x, weight, W_ref, b, factors, dy = make_case(rows, [(2, 4.0), (3, 1.0)], [True, True], 8, 5, dtype, "dense", 0)
        y, grads = run_mixed(x, weight, b, factors, rows, "dense", dy)
        y_ref, grads_ref = reference(x, W_ref, b, factors, rows, dy)
        rtol, atol = tolerance(dtype)
        for got, want, what in ((y, y_ref, "y"), (grads["dA1"], grads_ref["dA1"], "dA1"), (grads["dx"], grads_ref["dx"], "dx")):
            bump = 4 * (atol * max(1.0, np.abs(want).max()) + rtol * np.abs(want).max())
            off = got.detach().clone()
            off.view(-1)[0] += bump
            with pytest.raises(AssertionError):
                assert_matches(off, want, dtype, what)


def test_all_rows_one_adapter_equals_the_single_adapter_layer_and_dispatch_explains_mixed_calls():
    torch.manual_seed(0)
    layer = lorakern.LoraLinear(12, 7, r=4, alpha=8)
    layer.add_adapter("b", r=2)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 12, requires_grad=True)
    layer.set_adapter(["default", "b"])  # the layer-level form leaves requires_grad to its caller
    y = layer.forward_rows(x, torch.zeros(15, dtype=torch.int64), ["default", "b"])
    y.sum().backward()
    mixed = (y.detach(), x.grad.clone(), layer.lora_A.grad.clone(), layer.adapters["b"].lora_A.grad.clone())
    x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    layer.set_adapter("default")
    single = layer(x)
    single.sum().backward()
    torch.testing.assert_close(mixed[0], single.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed[1], x.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed[2], layer.lora_A.grad, rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(mixed[3]) == 0  # the adapter with no rows: a zero gradient, not None
    call = dispatch.prepare_mixed(x.detach(), "dense", layer.weight, layer.bias,
                                  [(layer.lora_A, layer.lora_B, 2.0, 0.0)], group_rows(torch.zeros(15), 1))
    report = dispatch.explain(call)
    assert "runs: c" in report or "c: not built" in report, report
    assert "torch: takes it too" in report or "runs: torch" in report, report
    with pytest.raises(LorakernError, match="row_adapter holds 2"):
        layer.forward_rows(x, torch.full((15,), 2), ["default", "b"])
    with pytest.raises(AdapterError, match="unknown adapter"):
        layer.forward_rows(x, torch.zeros(15, dtype=torch.int64), ["nope"])


def test_bench_adapters_providers_compute_the_same_mixed_batch():
    """lorakern bench --adapters: every provider computes the same y (the timings compare like with like)."""
    from lorakern.bench import Shape, make_operands
    from lorakern.bench.mixed import _mixed_providers

    shape = Shape("tiny", 24, 16, 12, 4)
    o = make_operands(shape, torch.float32, "cpu")
    x3 = o.x.detach().reshape(6, 4, 16).requires_grad_(True)
    built = {name: make() for name, make in _mixed_providers(o, x3, 3, ("fwd",)).items()}
    outputs = {name: b.forward().detach() for name, b in built.items()}
    mixed = outputs.pop("lorakern mixed")
    frozen = outputs.pop("frozen nn.Linear")
    assert (mixed - frozen).abs().max() > 1e-3  # the adapters do contribute
    assert outputs
    for name, y in outputs.items():
        torch.testing.assert_close(y, mixed, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_lorakern_check_compares_the_mixed_paths_and_fails_on_a_wrong_one(monkeypatch):
    import dataclasses

    from lorakern.check import mixed_rows

    rows = mixed_rows(torch.device("cpu"))
    assert any(r[0] == "mixed: torch" and r[1] == "float32" and r[-1] == "pass" for r in rows), rows
    assert all(r[-1] in ("pass", "n/a") for r in rows), rows
    real = dispatch._REGISTRY[("torch", "dense")]

    def off_by_a_little(call):
        y = real.run_mixed(call)
        return y + 1e-3 * y.detach().abs().amax()

    monkeypatch.setitem(dispatch._REGISTRY, ("torch", "dense"), dataclasses.replace(real, run_mixed=off_by_a_little))
    assert any(r[0] == "mixed: torch" and r[-1] == "FAIL" for r in mixed_rows(torch.device("cpu")))
