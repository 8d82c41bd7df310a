"""The C path of a mixed-adapter batch with DoRA slots (lorakern/mixed_dora_c.py, ``dora_mixed_*`` in
lorakern/native/lora_cpu.c) against a float64 reference computed here row by row with lorakern.core (the
scaling recomputed from r and alpha, the norm from W, A and B by forming W + s B A, the dropout mask from the
seed's generator): the output and every gradient (x, each A, B and magnitude, the bias), at every ISA level
this CPU executes; mixes of DoRA and plain slots, base-only rows, adapters without rows, a layer without one
of the adapters, ranks 1..64, rows around the kernels' four-row blocks, 16-row blocks and 64-row chunks,
seeded dropout on the plain slots or on every slot (a DoRA slot's second base product x~ W^T); that auto
really takes this path (a spy on the library, the torch path switched off), and that a corrupted scale fails."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import lorakern
import strategies
from lorakern import core, dispatch, mixed, mixed_dora_c, native
from lorakern import dora as _dora  # noqa: F401 (attaches the DoRA runs to the implementations)
from lorakern.testing import LibrarySpy
from lorakern.testing_masks import torch_mask
from toy_models import assert_close_scaled

LEVELS = [level.name for level in native.levels_here()]
SEED = 11  # the dropout seed
RTOL = ATOL = 5e-5  # fp32 against float64, as tests/test_mixed_dora.py (atol scaled by the largest |value|)


@pytest.fixture(params=LEVELS)
def library(request, monkeypatch):
    """The library built for one ISA level this CPU executes, each in turn, behind a spy, as the one every C
    path uses; the torch mixed path switched off, so that a call the C path declined fails loudly."""
    level = next(level for level in native.levels_here() if level.name == request.param)
    built = native.lora_library(level)
    if built is None:
        pytest.skip(f"no C library for {level.name}: {native.build_status()}")
    spy = LibrarySpy(built)
    monkeypatch.setattr(native, "lora_library", lambda: spy)

    def torch_ran(*args, **kwargs):
        raise AssertionError("the torch mixed path ran")

    monkeypatch.setattr(mixed, "run_torch", torch_ran)
    return spy


def make_case(M, K, N, specs, slots, bias, seed):
    """Operands in fp32: per slot a spec (use_dora, r, alpha, p) or None (the layer lacks that adapter)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)
    W = rand(N, K) / K ** 0.5
    adapters = []
    for spec in specs:
        if spec is None:
            adapters.append(None)
            continue
        use_dora, r, alpha, p = spec
        A, B = (rand(r, K) / K ** 0.5).requires_grad_(), (rand(N, r) / r ** 0.5).requires_grad_()
        entry = (A, B, alpha / r, p)
        if use_dora:  # around the norm PEFT initialises m to, so c = m / n stays near 1
            with torch.no_grad():
                n = torch.linalg.vector_norm(W + (alpha / r) * B @ A, dim=1)
            entry += ((n * (0.5 + torch.rand(N, generator=gen))).requires_grad_(),)
        adapters.append(entry)
    b = None if bias == "no bias" else rand(N).requires_grad_(bias == "trained bias")
    return SimpleNamespace(x=rand(M, K).requires_grad_(), W=W, b=b, specs=specs, adapters=adapters, slots=slots)


def run(case, requested="c"):
    """y and {name: gradient} of every tensor that trains, for a random dy (also returned)."""
    groups = lorakern.rows.group_rows(torch.tensor(case.slots, dtype=torch.int64), len(case.adapters))
    y = dispatch.lora_forward_mixed(case.x, "dense", case.W, case.b, case.adapters, groups, seed=SEED,
                                    requested=requested)
    wanted = {"dx": case.x}
    for a, entry in enumerate(case.adapters):
        if entry is not None:
            wanted.update({f"dA{a}": entry[0], f"dB{a}": entry[1], **({f"dm{a}": entry[4]} if len(entry) > 4 else {})})
    if case.b is not None and case.b.requires_grad:
        wanted["db"] = case.b
    wanted = {k: v for k, v in wanted.items() if v.requires_grad}
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    return y, dict(zip(wanted, torch.autograd.grad(y, list(wanted.values()), dy))), dy


def reference(case, dy) -> dict:
    """y and every gradient in float64, row by row: a DoRA row through core.dora, a plain row through core
    LoRA (its mask: torch.rand of x's shape from a generator seeded with SEED, kept where >= p), a base-only
    row (or one whose adapter the layer lacks) x W^T + b; each adapter's gradients summed over its rows."""
    f = lambda t: t.detach().double().numpy()
    x, W, g = f(case.x), f(case.W), dy.double().numpy()
    b = None if case.b is None else f(case.b)
    want = {"y": x @ W.T + (0.0 if b is None else b), "dx": g @ W, "db": g.sum(axis=0)}
    for a, spec in enumerate(case.specs):
        if spec is not None:
            A, B = f(case.adapters[a][0]), f(case.adapters[a][1])
            want[f"dA{a}"], want[f"dB{a}"] = np.zeros_like(A), np.zeros_like(B)
            if spec[0]:
                want[f"dm{a}"] = np.zeros(W.shape[0])
    for i, a in enumerate(case.slots):
        if a < 0 or case.specs[a] is None:
            continue
        use_dora, r, alpha, p = case.specs[a]
        s = alpha / r  # recomputed from r and alpha
        A, B = f(case.adapters[a][0]), f(case.adapters[a][1])
        xi, gi = x[i:i + 1], g[i:i + 1]
        mask = torch_mask(SEED, x.shape, p)[i:i + 1] if p > 0 else None
        if use_dora:
            m = f(case.adapters[a][4])
            want["y"][i] = core.dora.forward(xi, W, A, B, m, b, s, dropout_mask=mask)[0]
            back = core.dora.backward(xi, W, A, B, m, gi, s, dropout_mask=mask)
            want[f"dm{a}"] = want[f"dm{a}"] + back["dm"]
        else:
            want["y"][i] = core.forward(xi, W, A, B, b, s, dropout_mask=mask)[0]
            back = core.backward(xi, W, A, B, gi, s, dropout_mask=mask)
        want["dx"][i] = back["dx"][0]
        want[f"dA{a}"] = want[f"dA{a}"] + back["dA"]
        want[f"dB{a}"] = want[f"dB{a}"] + back["dB"]
    return want


def conditioning(case) -> float:
    """The largest over the DoRA slots with rows, and their output rows i, of (the sum of the absolute terms of
    n_i^2 = ||W_i||^2 + 2 s <B_i, (W A^T)_i> + s^2 B_i (A A^T) B_i^T) / n_i^2, at least 1: the fast paths'
    norm identity has a relative error of eps times it (docs/dora.md), where W + s B A is much smaller than W
    (K = 1 draws reach it), and every result inherits it through c."""
    f = lambda t: t.detach().double().numpy()
    W, worst = f(case.W), 1.0
    for a, spec in enumerate(case.specs):
        if spec is None or not spec[0] or a not in case.slots:
            continue
        A, B, s = f(case.adapters[a][0]), f(case.adapters[a][1]), spec[2] / spec[1]
        n2 = np.linalg.norm(W + s * B @ A, axis=1) ** 2
        terms = (W * W).sum(1) + 2 * abs(s) * (abs(B) * abs(W @ A.T)).sum(1) \
            + s * s * ((abs(B) @ abs(A @ A.T)) * abs(B)).sum(1)
        worst = max(worst, float((terms / np.maximum(n2, np.finfo(np.float64).tiny)).max()))
    return worst


def assert_close(case, got, want, name: str) -> None:
    """The comparison every test here makes: RTOL and ATOL times the case's norm conditioning."""
    kappa = conditioning(case)
    assert_close_scaled(got, want, RTOL * kappa, ATOL * kappa, name)


def check(case, factor: float = 1.0) -> None:
    y, grads, dy = run(case)
    want = reference(case, dy)
    for name, got in {"y": y, **grads}.items():
        assert_close(case, got * factor if name == "y" else got, want[name], name)


# The property test's axes, each drawn uniformly from its labels (the stated share: 1 / its labels), checked on
# the examples that ran. M: rows around the forward's four-row blocks, the scale pass's 16-row blocks and the
# backward's 64-row chunks; K and N: whole vectors at every ISA level (a multiple of 16 floats) or a lane tail.
M_UNITS = {"M=1": [1], "a four-row tail (3, 5, 7)": [3, 5, 7], "at a 16-row block's edge (15..17)": [15, 16, 17],
           "over a 64-row chunk (63..70)": [63, 65, 70]}
LANE_WIDTHS = strategies.LANE_WIDTHS
MIXES = ("every adapter DoRA", "DoRA and plain adapters")
BIASES = ("no bias", "frozen bias", "trained bias")
DROPOUTS = ("dropout off", "seeded dropout on the plain adapters", "seeded dropout on every adapter")
AXES = {"M": list(M_UNITS), "K": list(LANE_WIDTHS), "N": list(LANE_WIDTHS), "rows": list(strategies.MIXED_ROWS),
        "ranks": list(strategies.MIXED_RANKS), "absent": list(strategies.ABSENT), "mix": list(MIXES),
        "bias": list(BIASES), "dropout": list(DROPOUTS)}


@st.composite
def mixed_dora_cases(draw):
    m_label = draw(st.sampled_from(list(M_UNITS)))
    M = draw(st.sampled_from(M_UNITS[m_label]))
    widths = strategies.draw_lane_widths(draw, [16, 32, 48], 50)
    rows_label = draw(st.sampled_from(strategies.MIXED_ROWS))
    ranks_label = draw(st.sampled_from(strategies.MIXED_RANKS))
    absent, mix = draw(st.sampled_from(strategies.ABSENT)), draw(st.sampled_from(MIXES))
    bias, dropout = draw(st.sampled_from(BIASES)), draw(st.sampled_from(DROPOUTS))
    ranks = strategies.draw_ranks(draw, rows_label, ranks_label)
    slots = strategies.draw_slots(draw, M, len(ranks), rows_label)
    # slot 0 DoRA and present; the others DoRA or plain as the mix says; one of them absent (a second slot
    # without rows when there is only one)
    uses_dora = [True] + [mix == MIXES[0] or draw(st.booleans()) for _ in ranks[1:]]
    drops = lambda d: dropout == DROPOUTS[2] or (dropout == DROPOUTS[1] and not d)
    specs = [(d, r, draw(st.sampled_from([1.0, 4.0, 16.0])), draw(st.sampled_from([0.1, 0.5])) if drops(d) else 0.0)
             for d, r in zip(uses_dora, ranks)]
    if absent == strategies.ABSENT[1]:
        if len(specs) == 1:
            specs.append(None)
        else:
            specs[draw(st.integers(1, len(specs) - 1))] = None
    case = make_case(M, widths[0][1], widths[1][1], specs, slots, bias, draw(st.integers(0, 2**16)))
    case.classes = {"M": m_label, "K": widths[0][0], "N": widths[1][0], "rows": rows_label, "ranks": ranks_label,
                    "absent": absent, "mix": mix, "bias": bias, "dropout": dropout}
    return case


def explicit(M, K, N, specs, slots, bias="frozen bias", seed=0):
    return make_case(M, K, N, specs, slots, bias, seed)


SEEN = []


@given(case=mixed_dora_cases())
# two DoRA adapters and a plain one, base rows, a trained bias, rows over two 16-row blocks and a 64-row chunk
@example(case=explicit(70, 37, 41, [(True, 3, 4.0, 0.0), (False, 8, 16.0, 0.0), (True, 5, 1.0, 0.0)],
                       [0] * 33 + [1] * 3 + [-1] * 3 + [2] * 31, "trained bias"))
@example(case=explicit(9, 16, 48, [(True, 64, 16.0, 0.0), (True, 1, 1.0, 0.0)], [1] * 9))  # DoRA slot 0: no rows
@example(case=explicit(9, 16, 17, [(True, 7, 4.0, 0.0), None, (False, 2, 4.0, 0.5)],
                       [0, -1, 1, 0, 2, 1, 0, 2, 2], "no bias"))  # the layer lacks slot 1; the plain slot drops out
# DoRA slots with and without dropout beside a plain one that drops out, a trained bias, 4-row tails
@example(case=explicit(23, 33, 19,
                       [(True, 4, 8.0, 0.5), (True, 3, 3.0, 0.0), (False, 5, 5.0, 0.1), (True, 2, 4.0, 0.1)],
                       [0, 1, 2, -1, 0, 0, 3, 1, 2] * 2 + [3, 0, 0, -1, 1], "trained bias"))
@example(case=explicit(5, 1, 1, [(True, 1, 1.0, 0.0), (False, 1, 1.0, 0.0)], [-1] * 5))  # base-only rows only
# wide rows: the backward's chunks shrink to 16 rows (lora_cpu.c, chunk_blocks), slot 0's 40 rows span three
@example(case=explicit(47, 1100, 1030, [(True, 20, 16.0, 0.0), (False, 3, 4.0, 0.0)], [0] * 40 + [1] * 5 + [-1] * 2))
def _mixed_dora_c_matches_the_reference(case):
    if hasattr(case, "classes"):
        SEEN.append(case)
    check(case)


def test_mixed_dora_c_matches_the_reference(library):
    """Every axis of AXES at each ISA level: the output and every gradient against core row by row (the stated
    shares asserted on the drawn examples that ran); the C kernels ran for every call with a DoRA slot."""
    SEEN.clear()
    library.calls.clear()
    _mixed_dora_c_matches_the_reference()
    strategies.assert_shares(SEEN, AXES)
    assert "dora_mixed_forward_f32" in library.calls and "dora_mixed_scale_grad_f32" in library.calls


@pytest.mark.parametrize("threads", [1, 2])
def test_auto_takes_the_c_path_once_per_call(library, threads):
    """auto runs a DoRA mixed batch (slot 0 dropping out) through one C forward pass and one C scale pass, the
    norm once per DoRA slot with rows (none for slot 3, which has none); the torch mixed path never runs (the
    fixture)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        case = explicit(30, 24, 20, [(True, 4, 8.0, 0.2), (False, 3, 3.0, 0.1), (True, 6, 6.0, 0.0),
                                     (True, 2, 2.0, 0.0)], [0, 1, 2, -1, 2, 1] * 5, "trained bias")
        library.calls.clear()
        y, grads, dy = run(case, requested=None)
        assert library.calls.count("dora_mixed_forward_f32") == 1, library.calls
        assert library.calls.count("dora_mixed_scale_grad_f32") == 1, library.calls
        assert library.calls.count("dora_norm_f32") == 2, library.calls
        assert library.calls.count("lora_mixed_backward_f32") == 1, library.calls
        want = reference(case, dy)
        for name, got in {"y": y, **grads}.items():
            assert_close(case, got, want[name], name)
        assert not want["dm3"].any() and not grads["dm3"].any()  # an adapter without rows: a zero gradient
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("frozen", ["x", "m", "A and B", "one adapter", "everything (no_grad)"])
def test_partial_gradients(library, frozen):
    case = explicit(21, 19, 23, [(True, 5, 10.0, 0.0), (True, 3, 3.0, 0.3), (False, 2, 4.0, 0.0)],
                    [0, 1, 2, -1, 0, 1, 1] * 3, "trained bias", seed=5)
    if frozen == "everything (no_grad)":
        with torch.no_grad():
            y = dispatch.lora_forward_mixed(case.x, "dense", case.W, case.b, case.adapters,
                                            lorakern.rows.group_rows(torch.tensor(case.slots), 3), seed=SEED,
                                            requested="c")
        assert y.grad_fn is None
        assert_close(case, y, reference(case, torch.zeros(y.shape))["y"], "y")
        return
    for a, entry in enumerate(case.adapters):
        for t, what in zip(entry, ("A and B", "A and B", None, None, "m")):
            if isinstance(t, torch.Tensor) and (frozen == what or (frozen == "one adapter" and a == 1)):
                t.requires_grad_(False)
    if frozen == "x":
        case.x.requires_grad_(False)
    check(case)


def perturbed_scales(monkeypatch, slot: int, factor: float) -> None:
    """c_slot = m / n off by ``factor`` on the C path (its n, which dm divides by, off by 1 / factor)."""
    real = mixed_dora_c.slot_scales

    def off(call, norm):
        norms, scales = real(call, norm)
        norms[slot], scales[slot] = norms[slot] / factor, scales[slot] * factor
        return norms, scales

    monkeypatch.setattr(mixed_dora_c, "slot_scales", off)


# slot 0 DoRA, slot 1 plain, slot 2 DoRA dropping out
PERTURBED = {"M": 12, "K": 17, "N": 13, "specs": [(True, 3, 4.0, 0.0), (False, 2, 8.0, 0.1), (True, 2, 2.0, 0.3)],
             "slots": [0, 1, 2, -1, 0, 2] * 2, "bias": "trained bias"}


@pytest.mark.parametrize("slot", [0, 2], ids=["DoRA slot", "DoRA slot with dropout"])
def test_a_corrupted_scale_on_one_slot_fails_the_comparison(library, monkeypatch, slot):
    """c of one slot off by 4x the comparison's bound: y, dx and its dA, dB, dm fail, the other slots pass."""
    case = explicit(**PERTURBED)
    check(case)  # passes as it is
    perturbed_scales(monkeypatch, slot, 1 + 4 * (RTOL + ATOL) * conditioning(case))
    y, grads, dy = run(case)
    want = reference(case, dy)
    for name, got in {"y": y, **grads}.items():
        if name in ("y", "dx", f"dA{slot}", f"dB{slot}", f"dm{slot}"):
            with pytest.raises(AssertionError):
                assert_close(case, got, want[name], name)
        else:
            assert_close(case, got, want[name], name)


def test_a_wrong_output_fails_the_comparison(library):
    """y 4x the bound off fails check's comparison (its comparisons can fail)."""
    with pytest.raises(AssertionError, match="y"):
        check(explicit(**PERTURBED), factor=1 + 4 * (RTOL + ATOL) * conditioning(explicit(**PERTURBED)))


def test_bench_use_dora_providers_compute_the_same_mixed_batch():
    """``lorakern bench --adapters N --use-dora``: every provider computes the same y, and the mixed layer on
    the C path the same gradients as pinned to the torch path (the timings compare like with like); no PEFT
    row (PEFT refuses DoRA with adapter_names)."""
    from lorakern.bench import Shape, make_operands
    from lorakern.bench.mixed import _mixed_providers

    o = make_operands(Shape("tiny", 24, 16, 12, 4), torch.float32, "cpu")
    x3 = o.x.detach().reshape(6, 4, 16).requires_grad_(True)
    built = {name: make() for name, make in _mixed_providers(o, x3, 3, ("fwd",), use_dora=True).items()}
    assert not any("PEFT" in name for name in built) and "lorakern mixed (torch path)" in built, list(built)
    outputs = {name: b.forward() for name, b in built.items()}
    assert (outputs["lorakern mixed"] - outputs["frozen nn.Linear"]).abs().max() > 1e-3  # the adapters contribute
    for name in ("lorakern loop", "lorakern mixed (torch path)"):
        torch.testing.assert_close(outputs[name], outputs["lorakern mixed"], rtol=1e-5, atol=1e-5, msg=name)
    dy = torch.randn(outputs["lorakern mixed"].shape, generator=torch.Generator().manual_seed(3))
    c_path, torch_path = (torch.autograd.grad(outputs[n], built[n].params, dy)
                          for n in ("lorakern mixed", "lorakern mixed (torch path)"))
    assert len(c_path) == 1 + 3 * 3  # x, then each adapter's A, B and magnitude
    for got, want in zip(c_path, torch_path):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bench_use_dora_needs_adapters(capsys):
    from lorakern.cli import main

    assert main(["bench", "--use-dora", "--device", "cpu"]) == 2
    assert "--use-dora applies to a mixed batch: pass --adapters N" in capsys.readouterr().err
