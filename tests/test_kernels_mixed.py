"""The segmented (mixed-adapter) Triton kernels against a float64 reference per row: each row's own adapter
through lorakern.core (x W^T + b alone for base-only rows and absent adapters), outputs and the gradients
of x and every adapter's A and B. Interpreted on CPU (TRITON_INTERPRET=1, set by conftest), compiled on
CUDA. The interpreter runs one config, BLOCK_M = BLOCK_N = BLOCK_K = 32 with two tiles per program, so the
shapes below (M 1..70, K and N off multiples of 32, up to 70) reach every tile class: segments shorter
than, equal to and longer than a tile, starting mid-tile, a second column group, partial edge tiles.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import example, given

import strategies
from lorakern import core
from lorakern.dispatch import MixedCall
from lorakern.core import nf4 as nf4_core
from lorakern.kernels import lora_linear as kl
from lorakern.kernels.mixed_ops import mixed_lora_triton, run_mixed, unsupported_mixed
from lorakern.testing import bound, magnitudes, rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def grouping(slot: torch.Tensor, n_slots: int) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """(order, offsets, counts) as the model API builds them: a stable sort by slot, base-only rows last."""
    key = torch.where(slot < 0, n_slots, slot)
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=n_slots + 1)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])[: n_slots + 1]
    return order, offsets, tuple(counts.tolist())


def nf4_reference_weight(storage) -> np.ndarray:
    """The storage decoded by lorakern.core (not by the kernels nor by lorakern.nf4)."""
    state = nf4_core.NF4State(packed=storage.packed.cpu().numpy(), shape=tuple(storage.shape), dtype="float32",
                              blocksize=storage.blocksize)
    if storage.double_quant:
        state.absmax_codes = storage.absmax.cpu().numpy()
        state.nested_absmax = storage.nested_absmax.cpu().numpy()
        state.nested_map = storage.nested_map.cpu().numpy()
        state.offset = np.float32(storage.offset.cpu().item())
    else:
        state.absmax = storage.absmax.cpu().numpy()
    return nf4_core.nf4_dequantize(state).astype(np.float64)


def build(M, K, N, ranks, slots, dtype, base="dense", dropouts=None, bias=True, seed=0, blocksize=64,
          double_quant=True):
    """A MixedCall with random operands (B too, so every gradient is non-trivial) and the float64 weight W."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    W = rand(N, K) / K ** 0.5
    if base == "nf4":
        from lorakern.quant import NF4Storage, quantize_nf4

        weight = NF4Storage(quantize_nf4(W.float(), blocksize=blocksize, double_quant=double_quant)).to(DEVICE)
        W_ref = nf4_reference_weight(weight)
    else:
        weight = W.to(device=DEVICE, dtype=dtype)
        W_ref = weight.double().cpu().numpy()
    adapters, alphas = [], []
    for i, r in enumerate(ranks):
        if r is None:
            adapters.append(None)
            continue
        A = (rand(r, K) / K ** 0.5).to(device=DEVICE, dtype=dtype).requires_grad_(True)
        B = (rand(N, r) / r ** 0.5).to(device=DEVICE, dtype=dtype).requires_grad_(True)
        alpha = 2.0 * r + i  # each slot its own scaling, recomputed by the reference
        p = 0.0 if dropouts is None else dropouts[i]
        adapters.append((A, B, core.scaling(r, alpha), p))
        alphas.append(alpha)
    slot = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    order, offsets, counts = grouping(slot, len(ranks))
    x = rand(M, K).to(device=DEVICE, dtype=dtype).requires_grad_(True)
    b = (rand(N) / 4).to(device=DEVICE, dtype=dtype) if bias else None
    call = MixedCall(x, base, weight, b, adapters, slot, order, offsets, counts, seed=seed + 1)
    return call, W_ref


def f64(t):
    return None if t is None else t.detach().to(torch.float64).cpu().numpy()


def masks(call, K) -> dict[int, np.ndarray]:
    """Per slot with dropout: the (M, K) mask (kept / (1 - p)) the kernels draw for the call's seed and that p."""
    M = call.x.shape[0]
    return {a: kl.dropout_mask(call.seed, (M, K), adapter[3], call.x.device).double().cpu().numpy()
            for a, adapter in enumerate(call.adapters) if adapter is not None and adapter[3] > 0}


def reference(call, W, grad_y: np.ndarray) -> tuple[dict, dict]:
    """(expected, magnitude) for y, dx and each slot's dA<a> / dB<a>: per row, its adapter through core."""
    x, b, g = f64(call.x), f64(call.bias), grad_y
    slot = call.slot.cpu().numpy()
    tiny = torch.finfo(call.x.dtype).tiny
    y = x @ W.T + (0.0 if b is None else b)
    dx = g @ W
    y_mag = abs(x) @ abs(W).T + (0.0 if b is None else abs(b))
    dx_mag = abs(g) @ abs(W)
    expected, mag = {}, {}
    drop = masks(call, W.shape[1])
    for a, adapter in enumerate(call.adapters):
        if adapter is None:
            continue
        A, B, s = f64(adapter[0]), f64(adapter[1]), float(adapter[2])
        rows = np.flatnonzero(slot == a)
        m = drop[a][rows] if a in drop else None
        expected[f"dA{a}"], expected[f"dB{a}"] = np.zeros_like(A), np.zeros_like(B)
        mag[f"dA{a}"], mag[f"dB{a}"] = np.zeros_like(A), np.zeros_like(B)
        if rows.size == 0:
            continue
        y[rows] = core.forward(x[rows], W, A, B, b, s, dropout_mask=m)
        grads = core.backward(x[rows], W, A, B, g[rows], s, dropout_mask=m)
        dx[rows] = grads["dx"]
        expected[f"dA{a}"], expected[f"dB{a}"] = grads["dA"], grads["dB"]
        part = magnitudes(x[rows], W, A, B, b, g[rows], s, m, tiny)
        y_mag[rows], dx_mag[rows] = part["y"], part["dx"]
        mag[f"dA{a}"], mag[f"dB{a}"] = part["dA"], part["dB"]
    expected.update(y=y, dx=dx, db=g.sum(axis=0), dW=g.T @ x)
    mag.update(y=y_mag, dx=dx_mag, db=abs(g).sum(axis=0), dW=abs(g).T @ abs(x))
    return expected, mag


def run_with_grads(call, N) -> tuple[torch.Tensor, dict, np.ndarray]:
    """(y, {name: gradient} of x (dx) and each slot's A and B (dA<a>, dB<a>) that require grad, grad_y)."""
    M = call.x.shape[0]
    y = run_mixed(call)
    gen = torch.Generator().manual_seed(M + 7)
    grad_y = torch.randn(M, N, generator=gen, dtype=torch.float64).to(call.x.dtype)
    wanted = {"dx": call.x} if call.x.requires_grad else {}
    for a, adapter in enumerate(call.adapters):
        if adapter is not None:
            wanted.update({f"dA{a}": adapter[0], f"dB{a}": adapter[1]})
    if call.bias is not None:
        wanted["db"] = call.bias
    if isinstance(call.weight, torch.Tensor):
        wanted["dW"] = call.weight
    wanted = {k: t for k, t in wanted.items() if t.requires_grad}
    grads = dict(zip(wanted, torch.autograd.grad(y, list(wanted.values()), grad_y.to(DEVICE)))) if wanted else {}
    return y, grads, f64(grad_y)


def errors(call, W, y, grads, grad_y) -> tuple[dict, dict, float]:
    """({name: relative error}, {name: worst element}, bound) of y and ``grads`` against the reference."""
    M, K = call.x.shape
    N = W.shape[0]
    expected, mag = reference(call, W, grad_y)
    out, details = {}, {}
    for name, actual in {"y": y, **grads}.items():
        out[name], details[name] = rel_error(actual, expected[name], mag[name], call.x.dtype)
    return out, details, bound(call.x.dtype, max(M, K, N))


def assert_matches(call, W) -> dict:
    errs, details, limit = errors(call, W, *run_with_grads(call, W.shape[0]))
    bad = {k: f"{v:.3g} ({details[k]})" for k, v in errs.items() if not v <= limit}
    assert not bad, f"bound {limit:.3g}: {bad}"
    return errs


# (M, K, N, ranks per slot (None: the layer lacks that adapter), slot per row as a rule, dtype)
CASES = {
    "spread+base+absent": (70, 70, 45, [3, 1, None, 5], "random", "fp32"),
    "one-adapter": (40, 37, 29, [4], "all0", "fp32"),
    "no-rows-for-one": (45, 33, 70, [2, 7, 3], "skip1", "fp32"),
    "base-only": (33, 29, 37, [6, 2], "base", "fp32"),
    "ranks-1-to-64": (66, 33, 29, [1, 64, 17, 2], "random", "fp32"),
    "M-below-block": (5, 29, 37, [3, 9], "random", "fp32"),
    "M-one": (1, 40, 33, [5], "all0", "fp32"),
    "bf16": (50, 45, 37, [5, 12, None], "random", "bf16"),
    "fp16": (50, 37, 45, [3, 33], "random", "fp16"),
    "fp64": (35, 33, 35, [1, 8, 4], "random", "fp64"),
}


def slots_for(rule: str, M: int, n: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed + M)
    if rule == "all0":
        return [0] * M
    if rule == "base":
        return [-1] * M
    if rule == "skip1":
        return [[0, 2, -1][i] for i in torch.randint(0, 3, (M,), generator=gen).tolist()]
    return torch.randint(-1, n, (M,), generator=gen).tolist()


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_dense_matches_reference(case):
    M, K, N, ranks, rule, dtype = CASES[case]
    if dtype == "fp64" and not kl.INTERPRETED:
        pytest.skip("fp64 runs on the interpreted kernels only (the compiled ones take fp32 / fp16 / bf16)")
    call, W = build(M, K, N, ranks, slots_for(rule, M, len(ranks)), DTYPES[dtype])
    assert_matches(call, W)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["nested", "flat"])
def test_nf4_matches_reference(dtype, double_quant):
    """W decoded tile by tile inside the segmented kernels, against core's decode of the same bytes."""
    M, K, N, ranks = 45, 70, 37, [2, None, 9]
    call, W = build(M, K, N, ranks, slots_for("random", M, 3, seed=3), DTYPES[dtype], base="nf4",
                    blocksize=32 if double_quant else 64, double_quant=double_quant)
    assert_matches(call, W)


def test_per_slot_dropout_uses_each_slots_p():
    """Slot a's rows see the mask the single-adapter kernels draw for the call's seed at p_a (p = 0: none)."""
    M, K, N = 40, 37, 29
    call, W = build(M, K, N, [3, 5, 2], slots_for("random", M, 3, seed=5), torch.float32, dropouts=[0.0, 0.3, 0.6])
    y, grads, grad_y = run_with_grads(call, N)
    errs, details, limit = errors(call, W, y, grads, grad_y)
    assert max(errs.values()) <= limit, details
    # against a reference without the masks it fails: the masks are really applied
    call_nodrop = MixedCall(**{**call.__dict__, "adapters": [(A, B, s, 0.0) for A, B, s, _ in call.adapters]})
    errs, _, limit = errors(call_nodrop, W, y, grads, grad_y)
    assert errs["y"] > 100 * limit and errs["dA1"] > 100 * limit


@pytest.mark.parametrize("wanted", ["x", "A", "B", "one-adapter", "bias+W"])
def test_partial_gradients(wanted):
    """Only the gradients asked for; the bias's (in the kernel) and a trainable dense W's (by torch) too."""
    M, K, N = 40, 33, 35
    call, W = build(M, K, N, [3, 6], slots_for("random", M, 2, seed=9), torch.float32)
    call.x.requires_grad_(wanted == "x")
    call.bias.requires_grad_(wanted == "bias+W")
    call.weight.requires_grad_(wanted == "bias+W")
    for a, (A, B, _, _) in enumerate(call.adapters):
        A.requires_grad_(wanted == "A" or (wanted == "one-adapter" and a == 1))
        B.requires_grad_(wanted == "B" or (wanted == "one-adapter" and a == 1))
    compared = {"x": {"y", "dx"}, "A": {"y", "dA0", "dA1"}, "B": {"y", "dB0", "dB1"},
                "one-adapter": {"y", "dA1", "dB1"}, "bias+W": {"y", "db", "dW"}}[wanted]
    assert set(assert_matches(call, W)) == compared


def test_mutation_is_caught():
    """Every comparison above can fail: a result off by 4x its bound at one element is rejected."""
    M, K, N = 40, 37, 29
    call, W = build(M, K, N, [3, 5], slots_for("random", M, 2), torch.float32)
    y, grads, grad_y = run_with_grads(call, N)
    errs, _, limit = errors(call, W, y, grads, grad_y)
    assert max(errs.values()) <= limit
    _, scale = reference(call, W, grad_y)
    for name in ("y", "dx", "dA1", "dB0"):
        results = {"y": y.detach(), **grads}
        bad = results[name].detach().clone()
        i = int(np.argmax(scale[name].reshape(-1)))
        bad.view(-1)[i] += 4 * limit * float(scale[name].reshape(-1)[i])
        results[name] = bad
        errs, _, _ = errors(call, W, results.pop("y"), results, grad_y)
        assert errs[name] > limit, f"a perturbation of 4x the bound in {name} went unnoticed"


def test_base_only_rows_get_exactly_the_base_output():
    M, K, N = 40, 33, 29
    call, _ = build(M, K, N, [4, None], [i % 3 - 1 for i in range(M)], torch.float32)
    y = run_mixed(call)
    plain = mixed_lora_triton(call.x, call.weight, call.bias, [None, None], call.order, call.offsets)
    rows = (call.slot < 0) | (call.slot == 1)
    assert torch.equal(y[rows], plain[rows])
    assert not torch.equal(y[~rows], plain[~rows])


def test_unsupported_and_errors():
    call, _ = build(8, 16, 16, [2, 3], [0, 1] * 4, torch.float32)
    assert unsupported_mixed(call) is None
    big = torch.zeros(65, 16, device=DEVICE)
    wide = MixedCall(**{**call.__dict__, "adapters": [(big, torch.zeros(16, 65, device=DEVICE), 1.0, 0.0), None]})
    assert "r=65" in unsupported_mixed(wide)
    with pytest.raises(ValueError, match="r=65"):
        run_mixed(wide)
    ints = MixedCall(**{**call.__dict__, "x": call.x.detach().to(torch.int32)})
    assert "dtype torch.int32" in unsupported_mixed(ints)
    wrong = MixedCall(**{**call.__dict__, "adapters": [(torch.zeros(2, 15, device=DEVICE), torch.zeros(16, 2), 1.0,
                                                        0.0), None]})
    with pytest.raises(ValueError, match=r"A \(2, 15\)"):
        run_mixed(wrong)
    short = MixedCall(**{**call.__dict__, "offsets": call.offsets[:2]})
    with pytest.raises(ValueError, match="shapes do not fit"):
        run_mixed(short)
    with pytest.raises(ValueError, match=r"dropout_p=.*must be in \[0, 1\)"):
        run_mixed(MixedCall(**{**call.__dict__, "adapters": [call.adapters[0][:3] + (1.0,), None]}))


def test_empty_batch():
    call, _ = build(0, 16, 8, [2], [], torch.float32)
    y = run_mixed(call)
    assert y.shape == (0, 8)
    (dx,) = torch.autograd.grad(y.sum(), [call.x])
    assert dx.shape == (0, 16)


def test_compiles_without_graph_break():
    """torch.compile(fullgraph=True) with AOTAutograd traces the forward and backward through the custom ops'
    fake implementations, and the compiled run gives the eager numbers (same seed: same dropout masks)."""
    call, _ = build(20, 16, 24, [2, 5, None], slots_for("random", 20, 3), torch.float32, dropouts=[0.1, 0.0, 0.0])
    params = [call.x] + [t for adapter in call.adapters if adapter for t in adapter[:2]]
    compiled = torch.compile(run_mixed, backend="aot_eager", fullgraph=True)
    y = compiled(call)
    grad = torch.randn_like(y)
    expected = run_mixed(call)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    # gradients accumulate atomically: on a GPU their order, and so their last bits, may differ run to run
    for got, want in zip(torch.autograd.grad(y, params, grad), torch.autograd.grad(expected, params, grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# the strategy and its stated shares: strategies.mixed_kernel_cases, strategies.MIXED_AXES
SEEN = []


@given(case=strategies.mixed_kernel_cases())
@example(case=dict(M=33, K=45, N=70, ranks=[1, None, 64], slots=None, dtype="fp32", base="dense", seed=0, classes={}))
@example(case=dict(M=32, K=32, N=32, ranks=[16, 16], slots=None, dtype="bf16", base="nf4", seed=1, classes={}))
def _assignments_match_reference(case):
    if case["classes"]:
        SEEN.append(SimpleNamespace(classes=case["classes"]))
    M, n = case["M"], len(case["ranks"])
    slots = case["slots"] if case["slots"] is not None else slots_for("random", M, n, case["seed"])
    call, W = build(M, case["K"], case["N"], case["ranks"], slots, DTYPES[case["dtype"]], base=case["base"],
                    seed=case["seed"], blocksize=64, bias=case["seed"] % 2 == 0)
    assert_matches(call, W)


def test_assignments():
    """Assignments of rows to slots (spread with base rows, one slot, a slot without rows, all base) over M's
    tile classes, ragged and whole widths, ranks 1..64 mixed, an absent adapter, fp32 / bf16 / fp16, dense
    and NF4 bases (the stated shares asserted on the drawn examples that ran)."""
    SEEN.clear()
    _assignments_match_reference()
    strategies.assert_shares(SEEN, strategies.MIXED_AXES)


def test_gradcheck_float64():
    """The hand-written backward against finite differences, float64, with and without per-slot dropout
    (the mask is fixed by the seed, so the function is smooth in its inputs). fast_mode: random projections
    of the Jacobian (a few interpreted launches, not one per input element)."""
    if not kl.INTERPRETED:
        pytest.skip("fp64 runs on the interpreted kernels only (the compiled ones take fp32 / fp16 / bf16)")
    gen = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    M, K, N = 6, 5, 4
    x, W, b = make(M, K), make(N, K).detach(), make(N).detach()
    A0, B0, A1, B1 = make(2, K), make(N, 2), make(1, K), make(N, 1)
    slot = torch.tensor([1, -1, 0, 1, 0, 1], device=DEVICE)
    order, offsets, _ = grouping(slot, 3)
    for p in (0.0, 0.4):
        def f(x, A0, B0, A1, B1, p=p):
            adapters = [(A0, B0, 0.7, p), (A1, B1, 1.9, 0.0), None]
            return mixed_lora_triton(x, W, b, adapters, order, offsets, seed=11)
        assert torch.autograd.gradcheck(f, (x, A0, B0, A1, B1), fast_mode=True)


def test_never_forms_BA():
    """No N x K tensor, in the ops' implementations included; one (M, N) tensor forward (y), none backward."""
    from test_layer import allocations, recorder_inside

    from lorakern.kernels import mixed_ops

    RecordShapesInsideOps = recorder_inside({torch.ops.lorakern.mixed_lora_fwd.default: mixed_ops._mixed_fwd_impl,
                                             torch.ops.lorakern.mixed_lora_bwd.default: mixed_ops._mixed_bwd_impl})

    M, K, N = 40, 13, 17
    call, _ = build(M, K, N, [3, 2, None], slots_for("random", M, 3), torch.float32)
    forward, backward = allocations(lambda x: run_mixed(call), call.x, torch.randn(M, N, device=DEVICE),
                                    RecordShapesInsideOps)
    assert forward.count((M, N)) == 1 and (M, N) not in backward


def test_the_dispatch_sends_a_mixed_call_to_the_segmented_kernels():
    """lorakern.dispatch finds triton's run_mixed (a pinned backend, CPU tensors under the interpreter)."""
    from lorakern import dispatch
    from lorakern.rows import group_rows

    rand = lambda *shape: torch.randn(*shape, device=DEVICE)  # compiled: CUDA tensors; interpreted: CPU ones
    x = rand(6, 8)
    adapters = [(rand(2, 8), rand(5, 2), 0.5, 0.0), (rand(3, 8), rand(5, 3), 2.0, 0.0)]
    groups = group_rows(torch.tensor([0, 1, -1, 1, 0, 0], device=DEVICE), 2)
    W = rand(5, 8)
    call = dispatch.prepare_mixed(x, "dense", W, None, adapters, groups)
    assert dispatch.verdict("triton", call) is None
    y = dispatch.lora_forward_mixed(x, "dense", W, None, adapters, groups, requested="triton")
    expected = x @ W.t()
    for row, slot in enumerate([0, 1, -1, 1, 0, 0]):
        if slot >= 0:
            A, B, s, _ = adapters[slot]
            expected[row] += s * (x[row] @ A.t()) @ B.t()
    assert float((y - expected).abs().max()) <= 4 * bound(torch.float32, 8) * float(expected.abs().max())
