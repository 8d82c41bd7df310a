"""DoRA slots in the segmented (mixed-adapter) Triton kernels (kernels/mixed_dora_*.py) against a float64
reference per row: a DoRA slot's rows through lorakern.core.dora (its norm formed from W + s B A there, s
recomputed from r and alpha), a plain slot's through core LoRA, base-only rows and absent adapters as x W^T + b;
y and the gradients of x, each A, B and magnitude, and the bias. Interpreted on CPU (TRITON_INTERPRET=1, set by
conftest), compiled on CUDA. The interpreter runs one config (BLOCK_M = BLOCK_N = BLOCK_K = 32, two tiles per
program), so the fixed cases reach the tile classes tests/test_kernels_mixed.py reaches: segments shorter than,
equal to and longer than a tile, starting mid-tile, a program's second N (K) tile, a second column group,
ragged edges, a DoRA slot without rows, base-only rows, an absent adapter; dropout on and off, dense and NF4.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from lorakern import core, dispatch
from lorakern.dispatch import MixedCall
from lorakern.kernels import lora_linear as kl
from lorakern.kernels import mixed_dora_ops
from lorakern.kernels.mixed_dora_ops import mixed_dora_triton, run_mixed_dora
from lorakern.kernels.mixed_ops import mixed_lora_triton
from lorakern.testing import TOLERANCE, bound, magnitudes, rel_error
from lorakern.testing_dora import dora_magnitudes
from test_kernels_mixed import DEVICE, DTYPES, build, f64, masks, slots_for


def build_dora(M, K, N, ranks, dora, slots, dtype, base="dense", dropouts=None, seed=0, blocksize=64,
               double_quant=True):
    """test_kernels_mixed.build's MixedCall plus a random magnitude (trained) for each slot in ``dora``, the
    bias trained too."""
    call, W = build(M, K, N, ranks, slots, dtype, base=base, dropouts=dropouts, seed=seed, blocksize=blocksize,
                    double_quant=double_quant)
    gen = torch.Generator().manual_seed(seed + 100)
    call.magnitudes = [(torch.rand(N, generator=gen, dtype=torch.float64) + 0.5).to(DEVICE, dtype).requires_grad_()
                       if a in dora and ranks[a] is not None else None for a in range(len(ranks))]
    call.bias.requires_grad_(True)
    return call, W


def run_with_grads(call, perturb=None):
    """(y, {name: gradient}, grad_y) for x (dx), each slot's A, B (dA<a>, dB<a>) and magnitude (dm<a>), the bias."""
    y = run_mixed_dora(call)
    gen = torch.Generator().manual_seed(call.x.shape[0] + 7)
    grad_y = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(call.x.dtype)
    wanted = {"dx": call.x, "db": call.bias}
    for a, adapter in enumerate(call.adapters):
        if adapter is not None:
            wanted.update({f"dA{a}": adapter[0], f"dB{a}": adapter[1]})
        if call.magnitudes[a] is not None:
            wanted[f"dm{a}"] = call.magnitudes[a]
    wanted = {k: t for k, t in wanted.items() if t.requires_grad}
    grads = dict(zip(wanted, torch.autograd.grad(y, list(wanted.values()), grad_y.to(DEVICE))))
    return y, grads, f64(grad_y)


def reference(call, W, g, ranks):
    """(expected, scale) per result: row by row through each row's own adapter in float64 (s = r / alpha as
    test_kernels_mixed.build draws it: alpha = 2 r + slot, recomputed here, not read from the call)."""
    x, b = f64(call.x), f64(call.bias)
    slot = call.slot.cpu().numpy()
    tiny = torch.finfo(call.x.dtype).tiny
    exp = {"y": x @ W.T + b, "dx": g @ W, "db": g.sum(0)}
    mag = {"y": abs(x) @ abs(W).T + abs(b), "dx": abs(g) @ abs(W), "db": abs(g).sum(0)}
    drop = masks(call, W.shape[1])
    for a, adapter in enumerate(call.adapters):
        if adapter is None:
            continue
        A, B, m = f64(adapter[0]), f64(adapter[1]), f64(call.magnitudes[a])
        s = core.scaling(ranks[a], 2.0 * ranks[a] + a)
        names = ["dA", "dB"] + (["dm"] if m is not None else [])
        for name in names:
            shape = {"dA": A.shape, "dB": B.shape, "dm": (W.shape[0],)}[name]
            exp[f"{name}{a}"], mag[f"{name}{a}"] = np.zeros(shape), np.zeros(shape)
        rows = np.flatnonzero(slot == a)
        if rows.size == 0:
            continue
        mask = drop[a][rows] if a in drop else None
        xr, gr = x[rows], g[rows]
        if m is not None:
            out = {"y": core.dora.forward(xr, W, A, B, m, b, s, dropout_mask=mask),
                   **core.dora.backward(xr, W, A, B, m, gr, s, dropout_mask=mask)}
            part = dora_magnitudes(xr, W, A, B, m, b, gr, s, mask, tiny)
        else:
            out = {"y": core.forward(xr, W, A, B, b, s, dropout_mask=mask),
                   **core.backward(xr, W, A, B, gr, s, dropout_mask=mask)}
            part = magnitudes(xr, W, A, B, b, gr, s, mask, tiny)
        for key in ("y", "dx"):
            exp[key][rows], mag[key][rows] = out[key], part[key]
        for name in names:
            exp[f"{name}{a}"], mag[f"{name}{a}"] = out[name], part[name]
    return exp, mag


def errors(call, W, ranks, y, grads, grad_y):
    """({name: error / its bound}, details): the bound of compare_mixed_dora (the single DoRA call's)."""
    M, K = call.x.shape
    exp, mag = reference(call, W, grad_y, ranks)
    limit = bound(call.x.dtype, max(M, K, W.shape[0])) + 2 * TOLERANCE[call.x.dtype][0]
    out, details = {}, {}
    for name, got in {"y": y, **grads}.items():
        err, details[name] = rel_error(got, exp[name], mag[name], call.x.dtype)
        out[name] = err / limit
    return out, details


def assert_matches(call, W, ranks):
    errs, details = errors(call, W, ranks, *run_with_grads(call))
    bad = {k: f"{v:.3g} x bound ({details[k]})" for k, v in errs.items() if not v <= 1.0}
    assert not bad, bad
    return errs


# (M, K, N, ranks per slot (None: the layer lacks that adapter), DoRA slots, rows rule, dtype, dropout per slot)
CASES = {
    # N = 70: a program's second N tile and a second column group; K = 45: the backward's second K tile
    "spread+base+absent": (70, 45, 70, [3, 1, None, 5], {0, 3}, "random", "fp32", None),
    # dropout: x~ W^T beside x W^T, the mask redrawn for the other N tile (N = 37) and K tiles (K = 70)
    "dropout-per-slot": (40, 70, 37, [3, 5, 2], {0, 2}, "random", "fp32", [0.3, 0.2, 0.0]),
    "dora-slot-without-rows": (45, 33, 40, [2, 7, 3], {1, 2}, "skip1", "fp32", [0.0, 0.4, 0.1]),
    "one-dora-slot-every-row": (33, 29, 37, [4], {0}, "all0", "fp32", None),
    "base-only-rows": (20, 29, 37, [6, 2], {0}, "base", "fp32", None),
    "M-below-block": (5, 29, 37, [3, 9], {1}, "random", "fp32", [0.5, 0.5]),
    "ranks-1-to-64": (40, 33, 29, [1, 64, 17], {1, 2}, "random", "fp32", None),
    "bf16-dropout": (36, 45, 37, [5, 12, None], {0}, "random", "bf16", [0.2, 0.0, 0.0]),
    "fp64": (30, 33, 35, [1, 8, 4], {0, 2}, "random", "fp64", [0.0, 0.3, 0.3]),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_dense_matches_reference(case):
    M, K, N, ranks, dora, rule, dtype, dropouts = CASES[case]
    if dtype == "fp64" and not kl.INTERPRETED:
        pytest.skip("fp64 runs on the interpreted kernels only")
    call, W = build_dora(M, K, N, ranks, dora, slots_for(rule, M, len(ranks)), DTYPES[dtype], dropouts=dropouts)
    assert_matches(call, W, ranks)


@pytest.mark.parametrize("dropouts", [None, [0.3, 0.0, 0.2]], ids=["no-dropout", "dropout"])
def test_nf4_matches_reference(dropouts):
    """W decoded tile by tile inside the kernels (and by weight_norm for n), against core's decode of the bytes."""
    M, K, N, ranks = 45, 70, 37, [2, None, 9]
    call, W = build_dora(M, K, N, ranks, {0, 2}, slots_for("random", M, 3, seed=3), torch.float32, base="nf4",
                         dropouts=dropouts, blocksize=32 if dropouts else 64, double_quant=dropouts is None)
    assert_matches(call, W, ranks)


def test_frozen_magnitude_keeps_no_z_and_eval_runs_without_grad(monkeypatch):
    """A frozen m: no z kept (need_z off) and the other gradients still match; under no_grad none either."""
    M, K, N, ranks = 30, 29, 37, [3, 4]
    call, W = build_dora(M, K, N, ranks, {0}, slots_for("random", M, 2), torch.float32)
    call.magnitudes[0].requires_grad_(False)
    kept = []
    real = mixed_dora_ops.mixed_dora_forward

    def spy(*args):
        kept.append(args[-1])  # need_z
        return real(*args)
    monkeypatch.setattr(mixed_dora_ops, "mixed_dora_forward", spy)
    errs = assert_matches(call, W, ranks)
    with torch.no_grad():
        y = run_mixed_dora(call)
    assert "dm0" not in errs and kept == [False, False]
    assert torch.isfinite(y).all()


def test_plain_slots_and_base_rows_are_the_plain_kernels_numbers():
    """In a launch with DoRA slots the plain slots' and base-only rows' y are bit for bit the plain launch's,
    dropout included (same seed: same masks); the DoRA slot's rows differ (c is really applied)."""
    M, K, N, ranks = 40, 37, 45, [3, 5, None]
    call, _ = build_dora(M, K, N, ranks, {0}, slots_for("random", M, 3, seed=2), torch.float32,
                         dropouts=[0.3, 0.4, 0.0])
    y = run_mixed_dora(call)
    plain = mixed_lora_triton(call.x, call.weight, call.bias, call.adapters, call.order, call.offsets, call.seed)
    rows = call.slot != 0
    assert torch.equal(y[rows], plain[rows])
    assert not torch.equal(y[~rows], plain[~rows])


@pytest.mark.parametrize("mutation", ["wrong slot's c", "c on a plain slot", "c on the base rows"])
def test_a_misrouted_scale_fails_the_comparison(mutation, monkeypatch):
    """The comparison catches a kernel that reads another segment's c: the rows of the C stack swapped between
    two DoRA slots, a plain slot flagged DoRA and given a DoRA slot's c, the base-only row scaled."""
    M, K, N, ranks = 40, 29, 37, [3, 5, 2]
    call, W = build_dora(M, K, N, ranks, {0, 2}, slots_for("random", M, 3, seed=4), torch.float32)
    assert max(errors(call, W, ranks, *run_with_grads(call))[0].values()) <= 1.0
    real = mixed_dora_ops._slot_scales

    def spoiled(*args):
        scales, flags = real(*args)
        if mutation == "wrong slot's c":
            scales = scales[[2, 1, 0, 3]]
        elif mutation == "c on a plain slot":
            scales, flags = scales[[0, 0, 2, 3]], torch.ones_like(flags)
        else:
            scales = scales[[0, 1, 2, 0]]
        return scales, flags
    monkeypatch.setattr(mixed_dora_ops, "_slot_scales", spoiled)
    errs, _ = errors(call, W, ranks, *run_with_grads(call))
    assert errs["y"] > 10, errs


def test_each_comparison_fails_on_a_result_spoiled_by_4x_its_bound():
    M, K, N, ranks = 40, 37, 29, [3, 5]
    call, W = build_dora(M, K, N, ranks, {0}, slots_for("random", M, 2), torch.float32, dropouts=[0.3, 0.1])
    y, grads, grad_y = run_with_grads(call)
    assert max(errors(call, W, ranks, y, grads, grad_y)[0].values()) <= 1.0
    _, mag = reference(call, W, grad_y, ranks)
    limit = bound(torch.float32, max(M, K, N)) + 2 * TOLERANCE[torch.float32][0]
    for name in ("y", "dx", "dA0", "dB0", "dm0", "dA1", "db"):
        results = {"y": y.detach(), **{k: v.detach() for k, v in grads.items()}}
        bad = results[name].clone()
        i = int(np.argmax(mag[name].reshape(-1)))
        bad.view(-1)[i] += 4 * limit * float(mag[name].reshape(-1)[i])
        results[name] = bad
        errs, _ = errors(call, W, ranks, results.pop("y"), results, grad_y)
        assert errs[name] > 1.0, f"a perturbation of 4x the bound in {name} went unnoticed"


def test_gradcheck_float64():
    """The hand-written backward against finite differences, with and without dropout, in what does not move the
    detached norm n_0 (x, the bias, m_0, the plain slot's A and B); the DoRA slot's A and B (whose finite
    differences would move n_0) are checked against core.dora above."""
    if not kl.INTERPRETED:
        pytest.skip("fp64 runs on the interpreted kernels only")
    gen = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    M, K, N = 6, 5, 4
    x, W, b = make(M, K), make(N, K).detach(), make(N)
    A0, B0, A1, B1, m0 = make(2, K).detach(), make(N, 2).detach(), make(1, K), make(N, 1), make(N)
    slot = torch.tensor([1, -1, 0, 1, 0, 0], device=DEVICE)
    order = torch.sort(torch.where(slot < 0, 2, slot), stable=True).indices
    offsets = torch.tensor([0, 3, 5], device=DEVICE)
    for p in (0.0, 0.4):
        def f(x, b, m0, A1, B1, p=p):
            adapters = [(A0, B0, 0.7, p), (A1, B1, 1.9, p)]
            return mixed_dora_triton(x, W, b, adapters, [m0, None], order, offsets, seed=11)
        assert torch.autograd.gradcheck(f, (x, b, m0, A1, B1), fast_mode=True)


def test_never_forms_BA():
    """No N x K tensor (weight_norm included, given the layer's cached ||W_i||^2), one (M, N) tensor forward beside
    y (z, the magnitudes training), none backward."""
    from test_layer import allocations, recorder_inside

    Recorder = recorder_inside({torch.ops.lorakern.mixed_dora_fwd.default: mixed_dora_ops._fwd_impl,
                                torch.ops.lorakern.mixed_dora_bwd.default: mixed_dora_ops._bwd_impl})
    M, K, N = 40, 13, 17
    call, _ = build_dora(M, K, N, [3, 2, None], {0, 1}, slots_for("random", M, 3), torch.float32)
    call.base_norm_sq = (call.weight.double() ** 2).sum(1).float()  # the layer's cached ||W_i||^2
    forward, backward = allocations(lambda x: run_mixed_dora(call), call.x, torch.randn(M, N, device=DEVICE), Recorder)
    assert forward.count((M, N)) == 2 and (M, N) not in backward


def test_compiles_without_graph_break():
    """torch.compile(fullgraph=True) traces the DoRA ops' fake implementations (the norms and the C stack in the
    graph), forward and backward, and gives the eager numbers (same seed: same masks)."""
    call, _ = build_dora(20, 16, 24, [2, 5, None], {0}, slots_for("random", 20, 3), torch.float32,
                         dropouts=[0.1, 0.0, 0.0])
    params = [call.x, call.bias, call.magnitudes[0]] + [t for adapter in call.adapters if adapter for t in adapter[:2]]
    y = torch.compile(run_mixed_dora, backend="aot_eager", fullgraph=True)(call)
    expected = run_mixed_dora(call)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    grad = torch.randn_like(y)
    # gradients accumulate atomically: on a GPU their order, and so their last bits, may differ run to run
    for got, want in zip(torch.autograd.grad(y, params, grad), torch.autograd.grad(expected, params, grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_dispatch_takes_the_triton_path_for_dora_slots(monkeypatch):
    """backend="triton" (interpreted on CPU) runs a mixed call with DoRA slots on the segmented kernels; c still
    declines it, saying so."""
    from lorakern.rows import group_rows

    M, K, N, ranks = 9, 16, 12, [2, 3]
    call, _ = build_dora(M, K, N, ranks, {0}, [0, 1, -1, 0, 1, 0, -1, 0, 1], torch.float32)
    adapters = [tuple(a) + ((m,) if m is not None else ()) for a, m in zip(call.adapters, call.magnitudes)]
    groups = group_rows(call.slot, 2)
    prepared = dispatch.prepare_mixed(call.x, "dense", call.weight, call.bias, adapters, groups)
    assert dispatch.verdict("triton", prepared) is None
    assert "no DoRA in the triton" not in dispatch.explain(prepared)
    calls = []
    key = ("triton", "dense")
    real = dispatch._REGISTRY[key].run_mixed_dora
    monkeypatch.setitem(dispatch._REGISTRY, key, dataclasses.replace(dispatch._REGISTRY[key],
                                                                      run_mixed_dora=lambda c: calls.append(c) or real(c)))
    y = dispatch.lora_forward_mixed(call.x, "dense", call.weight, call.bias, adapters, groups, seed=call.seed,
                                    requested="triton")
    assert len(calls) == 1
    torch.testing.assert_close(y, run_mixed_dora(call), rtol=0, atol=0)


def test_unsupported_names_the_missing_dora_config(monkeypatch):
    """A (dtype, rank, base) without a segmented DoRA config is declined with the reason (torch then serves)."""
    from lorakern.kernels import mixed_launchers

    call, _ = build_dora(8, 16, 16, [2, 3], {1}, [0, 1] * 4, torch.float32)
    assert mixed_launchers.unsupported_mixed(call) is None
    real = mixed_launchers.get_autotune_config
    monkeypatch.setattr(mixed_launchers, "get_autotune_config",
                        lambda kind, *args: [] if kind.startswith("mixed_dora") else real(kind, *args))
    assert "no segmented DoRA kernel config" in mixed_launchers.unsupported_mixed(call)
    plain = MixedCall(**{**call.__dict__, "magnitudes": None})
    assert mixed_launchers.unsupported_mixed(plain) is None
