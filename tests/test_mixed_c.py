"""The C kernels of a mixed-adapter batch (lorakern/mixed_c.py, ``lora_mixed_*`` in lorakern/native/lora_cpu.c)
against a float64 NumPy reference written here, per row: the row's adapter, or none. Every ISA level this CPU
executes; the output and every gradient; rows grouped across the four-row blocks and 64-row chunks of the
kernels, base-only rows, adapters with no rows, a layer without one of the adapters, ranks 1..64 mixed,
dropout with a seed (mask recomputed here), partial gradients; a perturbed result fails the comparison."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import strategies
from lorakern import mixed_c, native
from lorakern.testing import bound, magnitudes, rel_error

LEVELS = [level.name for level in native.levels_here()]


@pytest.fixture(params=LEVELS)
def library(request, monkeypatch):
    """The library built for one ISA level this CPU executes, each in turn, as the one the kernels use."""
    level = next(level for level in native.levels_here() if level.name == request.param)
    built = native.lora_library(level)
    if built is None:
        pytest.skip(f"no C library for {level.name}: {native.build_status()}")
    monkeypatch.setattr(native, "lora_library", lambda: built)
    return built


def grouped(slot: torch.Tensor, n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """order (rows sorted by slot, stable, base-only rows last) and offsets (n_slots + 1), built here."""
    key = [n_slots if s < 0 else s for s in slot.tolist()]
    order = sorted(range(len(key)), key=lambda i: key[i])
    offsets = [sum(1 for k in key if k < a) for a in range(n_slots + 1)]
    return torch.tensor(order, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64)


def make_call(M, K, N, ranks, slots, present, bias, dropout, seed, generator):
    rand = lambda *shape: torch.randn(*shape, generator=generator)
    x = rand(M, K).requires_grad_()
    adapters = []
    for a, r in enumerate(ranks):
        if not present[a]:
            adapters.append(None)
            continue
        A, B = (rand(r, K) / K ** 0.5).requires_grad_(), rand(N, r).requires_grad_()
        adapters.append((A, B, 0.5 + a, dropout[a]))
    slot = torch.tensor(slots, dtype=torch.int64)
    order, offsets = grouped(slot, len(ranks))
    return SimpleNamespace(x=x, base="dense", weight=rand(N, K) / K ** 0.5, bias=rand(N) if bias else None,
                           adapters=adapters, slot=slot, order=order, offsets=offsets,
                           counts=tuple(int(c) for c in offsets.diff()), seed=seed)


def reference(call, ranks, grad_y: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(expected, magnitude) of y and every gradient in float64, row by row; the dropout mask recomputed from the
    seed (torch.rand of the input's shape from a generator seeded with it; a row keeps an element where the draw
    is >= its p). The magnitude is the same computation on absolute values (lorakern.testing.magnitudes): the
    scale of each element's rounding error, which a slot's u = x~ A^T cancelling to ~1/1000 of its terms leaves
    large beside the result."""
    x = call.x.detach().double().numpy()
    W = call.weight.double().numpy()
    b = None if call.bias is None else call.bias.double().numpy()
    M, K = x.shape
    keep_draw = torch.rand((M, K), generator=torch.Generator().manual_seed(call.seed)).double().numpy() \
        if call.seed is not None else None
    y = x @ W.T + (0.0 if b is None else b)
    dx = grad_y @ W
    y_mag = np.abs(x) @ np.abs(W).T + (0.0 if b is None else np.abs(b))
    dx_mag = np.abs(grad_y) @ np.abs(W)
    grads, mags = {}, {}
    tiny = torch.finfo(torch.float32).tiny
    for a, adapter in enumerate(call.adapters):
        if adapter is None:
            continue
        A, B = adapter[0].detach().double().numpy(), adapter[1].detach().double().numpy()
        s, p = 0.5 + a, adapter[3]  # the scaling this test gave adapter a, recomputed
        rows = [i for i in range(M) if call.slot[i] == a]
        mask = (keep_draw[rows] >= p) / (1.0 - p) if p > 0 else None
        xl = x[rows] if mask is None else x[rows] * mask
        g = grad_y[rows]
        u = xl @ A.T
        y[rows] += s * u @ B.T
        gB = g @ B
        dx[rows] += s * (gB @ A) * (1.0 if mask is None else mask)
        grads[f"A{a}"] = s * gB.T @ xl
        grads[f"B{a}"] = s * g.T @ u
        part = magnitudes(x[rows], W, A, B, b, g, s, mask, tiny)
        y_mag[rows], dx_mag[rows] = part["y"], part["dx"]
        mags[f"A{a}"], mags[f"B{a}"] = part["dA"], part["dB"]
    return {"y": y, "x": dx, **grads}, {"y": y_mag, "x": dx_mag, **mags}


def errors(call, expected, magnitude, y) -> dict[str, float]:
    """Each result's worst |got - expected| over its magnitude (rel_error), y and every gradient computed."""
    out = {"y": y.detach(), "x": call.x.grad}
    for a, adapter in enumerate(call.adapters):
        if adapter is not None:
            out[f"A{a}"], out[f"B{a}"] = adapter[0].grad, adapter[1].grad
    return {key: rel_error(value, expected[key], magnitude[key], torch.float32)[0] if value.numel() else 0.0
            for key, value in out.items()}


def run_and_compare(call, ranks, perturb: float = 0.0) -> dict[str, float]:
    """The errors of one mixed run; ``perturb`` adds that many times each element's magnitude to y."""
    y = mixed_c.run_mixed(call)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    (y * grad_y).sum().backward()
    expected, magnitude = reference(call, ranks, grad_y.double().numpy())
    if perturb:
        y = y + perturb * torch.from_numpy(magnitude["y"]).float()
    return errors(call, expected, magnitude, y)


def assert_within(rel: dict[str, float], M: int, K: int, N: int) -> None:
    """Every error within the fp32 bound for the longest reduction, max(M, K, N) (lorakern.testing.bound)."""
    limit = bound(torch.float32, max(M, K, N))
    worst = max(rel, key=rel.get)
    assert rel[worst] <= limit, f"{worst}: error {rel[worst]:.3g} of its magnitude > {limit:.3g} ({rel})"


# The property test's axes, each drawn uniformly from its labels (the stated share: 1 / its labels) and checked
# on the examples that ran. M: rows around the kernels' units, four-row blocks and 64-row chunks; K and N:
# whole vectors at every ISA level (a multiple of 16 floats) or a lane tail.
M_UNITS = {"M=1": [1], "a four-row tail (3, 5)": [3, 5], "one whole four-row block (4)": [4],
           "at a 64-row chunk's edge (63..65)": [63, 64, 65], "over two chunks (131)": [131]}
LANE_WIDTHS = strategies.LANE_WIDTHS
ROW_CLASSES, RANK_CLASSES = strategies.MIXED_ROWS, strategies.MIXED_RANKS
AXES = {"M": list(M_UNITS), "K": list(LANE_WIDTHS), "N": list(LANE_WIDTHS), "rows": list(ROW_CLASSES),
        "ranks": list(RANK_CLASSES)}


@st.composite
def mixed_cases(draw):
    m_label = draw(st.sampled_from(list(M_UNITS)))
    M = draw(st.sampled_from(M_UNITS[m_label]))
    widths = strategies.draw_lane_widths(draw, [16, 32, 48, 64], 70)
    rows_label, ranks_label = draw(st.sampled_from(ROW_CLASSES)), draw(st.sampled_from(RANK_CLASSES))
    ranks = strategies.draw_ranks(draw, rows_label, ranks_label)
    slots = strategies.draw_slots(draw, M, len(ranks), rows_label)
    present = draw(st.lists(st.booleans(), min_size=len(ranks), max_size=len(ranks)))
    classes = {"M": m_label, "K": widths[0][0], "N": widths[1][0], "rows": rows_label, "ranks": ranks_label}
    return SimpleNamespace(case=(M, widths[0][1], widths[1][1], ranks, slots, present, draw(st.booleans())),
                           classes=classes)


SEEN = []


@given(drawn=mixed_cases())
@example(drawn=SimpleNamespace(case=(131, 37, 41, [3, 8, 5], [0] * 65 + [1] * 3 + [-1] * 3 + [2] * 60,
                                     [True, True, True], True), classes={}))
@example(drawn=SimpleNamespace(case=(64, 33, 17, [64, 1], [1] * 64, [True, True], False), classes={}))  # slot 0: no rows
@example(drawn=SimpleNamespace(case=(9, 16, 48, [7, 2], [0, -1, 1, 0, -1, 1, 0, 0, 1], [True, False], True),
                               classes={}))  # a layer lacks slot 1
@example(drawn=SimpleNamespace(case=(5, 1, 1, [1], [-1] * 5, [True], False), classes={}))  # base-only rows only
# wide rows: the backward's chunks shrink to 16 rows (lora_cpu.c, chunk_blocks), slot 0's 40 rows span three of them
@example(drawn=SimpleNamespace(case=(47, 4100, 4000, [5, 3], [0] * 40 + [1] * 5 + [-1] * 2, [True, True], True),
                               classes={}))
# a slot ending 2 rows short of a 64-row chunk, the next slot's rows right after: the chunk must stop at the slot's
# last row (a chunk that ran on to 64 rows summed slot 1's rows into slot 0's dA and dB)
@example(drawn=SimpleNamespace(case=(65, 20, 19, [4, 6], [0] * 62 + [1] * 3, [True, True], False), classes={}))
# the same with wide rows (16-row chunks): slot 0 (31 rows) ends 1 row short of its second chunk
@example(drawn=SimpleNamespace(case=(33, 4100, 4000, [3, 2], [0] * 31 + [1] * 2, [True, True], True), classes={}))
# slot 0's last four-row block holds 3 rows and the next row is slot 1's, whose adapter the layer lacks (filled
# with the bias only): the block must stop at 3 rows (one that took 4 gave that row slot 0's term)
@example(drawn=SimpleNamespace(case=(7, 24, 20, [3, 2], [0, -1, 0, 0, -1, 1, 1], [True, False], True), classes={}))
# slot 2's one row has u = x A^T = -0.0038 from terms summing to 3.9 in absolute value: its dB is u times g, so an
# error relative to dB's largest element (this test's first measure) read ~1e-5 from u's own fp32 rounding, where
# the error over each element's magnitude is within the bound (found by the thorough profile)
@example(drawn=SimpleNamespace(case=(5, 21, 48, [2, 55, 1], [2, 0, 0, 0, 0], [True, True, True], False), classes={}))
def _mixed_c_matches_the_reference(drawn):
    if drawn.classes:
        SEEN.append(drawn)
    M, K, N, ranks, slots, present, bias = drawn.case
    call = make_call(M, K, N, ranks, slots, present, bias, [0.0] * len(ranks), None, torch.Generator().manual_seed(M))
    assert_within(run_and_compare(call, ranks), M, K, N)
    for a, adapter in enumerate(call.adapters):
        if adapter is not None and not any(s == a for s in slots):
            assert not adapter[0].grad.any() and not adapter[1].grad.any(), f"adapter {a} has no rows"


def test_mixed_c_matches_the_reference(library):
    """Rows around the kernels' four-row blocks and 64-row chunks, whole vectors and lane tails, every
    assignment class, ranks 1..64 mixed, absent adapters, bias on and off, at each ISA level (the stated shares
    asserted on the drawn examples that ran)."""
    SEEN.clear()
    _mixed_c_matches_the_reference()
    strategies.assert_shares(SEEN, AXES)


@pytest.mark.parametrize("threads", [1, 2])
def test_dropout_with_a_seed_on_one_thread_and_two(library, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ranks = [4, 6]
        slots = [0, 1, -1, 1, 0, 0, 1] * 11
        call = make_call(len(slots), 40, 24, ranks, slots, [True, True], True, [0.3, 0.1], 1234,
                         torch.Generator().manual_seed(3))
        assert_within(run_and_compare(call, ranks), len(slots), 40, 24)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("frozen", ["x", "A", "B", "one adapter"])
def test_partial_gradients(library, frozen):
    ranks, slots = [5, 3], [0, 1, 1, -1, 0] * 9
    call = make_call(len(slots), 21, 30, ranks, slots, [True, True], True, [0.0, 0.0], None,
                     torch.Generator().manual_seed(5))
    if frozen == "x":
        call.x.requires_grad_(False)
    for a, (A, B, _, _) in enumerate(call.adapters):
        if frozen == "A" or (frozen == "one adapter" and a == 1):
            A.requires_grad_(False)
        if frozen == "B" or (frozen == "one adapter" and a == 1):
            B.requires_grad_(False)
    y = mixed_c.run_mixed(call)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    (y * grad_y).sum().backward()
    expected, magnitude = reference(call, ranks, grad_y.double().numpy())
    limit = bound(torch.float32, len(slots))
    got = {"y": y.detach(), "x": call.x.grad}
    for a, (A, B, _, _) in enumerate(call.adapters):
        got[f"A{a}"], got[f"B{a}"] = A.grad, B.grad
    for key, value in got.items():
        needed = key == "y" or {"x": call.x, **{f"A{a}": ad[0] for a, ad in enumerate(call.adapters)},
                                **{f"B{a}": ad[1] for a, ad in enumerate(call.adapters)}}[key].requires_grad
        if not needed:
            assert value is None, f"{key} needs no gradient but got one"
            continue
        rel = rel_error(value, expected[key], magnitude[key], torch.float32)[0]
        assert rel <= limit, f"{key}: {rel:.3g} > {limit:.3g}"


def test_one_adapter_for_every_row_equals_the_single_adapter_path(library):
    from lorakern.functional import LoraLinearFunction

    ranks, M = [6], 70
    call = make_call(M, 31, 29, ranks, [0] * M, [True], True, [0.0], None, torch.Generator().manual_seed(9))
    A, B, s, _ = call.adapters[0]
    single = LoraLinearFunction.apply(call.x, None, call.weight, call.bias, A, B, s, library)
    mixed = mixed_c.run_mixed(call)
    limit = 4 * bound(torch.float32, 31)
    assert float((mixed - single).detach().abs().max() / single.detach().abs().max()) <= limit


def test_a_perturbed_result_fails_the_comparison(library):
    """4x the bound added to y must fail the check the other tests use: the comparison can fail."""
    ranks, slots = [8, 3], [0, 1, -1] * 30
    call = make_call(len(slots), 48, 40, ranks, slots, [True, True], True, [0.0, 0.0], None,
                     torch.Generator().manual_seed(11))
    rel = run_and_compare(call, ranks, perturb=4 * bound(torch.float32, len(slots)))
    with pytest.raises(AssertionError):
        assert_within(rel, len(slots), 48, 40)


def test_declines_what_it_cannot_run():
    from lorakern.functional import _c_mixed_unsupported

    x = torch.randn(4, 8, dtype=torch.float64)
    call = SimpleNamespace(x=x, base="dense", adapters=[(torch.randn(2, 8), torch.randn(3, 2), 1.0, 0.0)])
    assert "fp32 only" in _c_mixed_unsupported(call)
    call.base = "nf4"
    assert "dense bases only" in _c_mixed_unsupported(call)
    call.base, call.x = "dense", x.float()
    call.adapters = [(torch.randn(300, 8), torch.randn(3, 300), 1.0, 0.0)]
    assert "r=300 > 256" in _c_mixed_unsupported(call)
