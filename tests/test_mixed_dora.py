"""DoRA adapters in mixed-adapter batches (the torch path, and the C path where auto takes it: fp32 dense
eager; tests/test_mixed_dora_c.py tests that one on its own, tests/test_kernels_mixed_dora.py the Triton
kernels): each row's output and every gradient (x, each A, B and magnitude, the bias when trained) against a
float64 reference computed row by row (lorakern.core.dora for DoRA rows, core LoRA for plain rows, x W^T + b for
base-only rows), dense and NF4 bases, dropout with the mask recomputed from the torch generator; two DoRA
adapters trained in one mixed run against each trained alone; torch.compile; which implementations take them;
the GLUE harness's --mixed with --lora-use-dora."""
import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

import lorakern
import strategies
from lorakern import LoraConfig, LoraLinear, core, dispatch, dora, inject, mixed, mixed_dora_c, native
from lorakern.errors import LorakernError
from lorakern.testing import TOLERANCE, bound, magnitudes, reference_nf4_weight, rel_error
from lorakern.testing_dora import dora_magnitudes
from lorakern.testing_masks import torch_mask
from toy_models import Toy, check_compiled_mixed_batch, randomize, check_mixed_training_equals_alone

DROPOUT_SEED = 11
ROWS = ("every row one DoRA adapter, alone (the single-adapter call)",
        "every row one DoRA adapter, the others handed in without rows",
        "DoRA, plain-LoRA and base-only rows",
        "DoRA adapters without rows (plain and base rows only)")
BASES = ("fp64 dense", "fp32 dense", "fp32 NF4")
DROPOUTS = ("dropout off", "seeded dropout")
BIASES = ("no bias", "frozen bias", "trained bias")
AXES = {"rows": list(ROWS), "base": list(BASES), "dropout": list(DROPOUTS), "bias": list(BIASES)}


def f64(t):
    return None if t is None else t.detach().double().numpy()


@st.composite
def mixed_dora_cases(draw):
    """A layer's adapters (slot 0 DoRA, slot 1 plain LoRA, slot 2 either), the rows' slots and the operands'
    sizes, each axis of AXES drawn uniformly from its labels (``classes``, for strategies.assert_shares)."""
    rows_label, base = draw(st.sampled_from(ROWS)), draw(st.sampled_from(BASES))
    dropout, bias = draw(st.sampled_from(DROPOUTS)), draw(st.sampled_from(BIASES))
    n = 1 if rows_label == ROWS[0] else draw(st.integers(2, 3))
    specs = []
    for slot in range(n):
        use_dora = slot == 0 or (slot == 2 and draw(st.booleans()))
        p = draw(st.sampled_from([0.1, 0.5])) if dropout == DROPOUTS[1] else 0.0
        specs.append((use_dora, draw(st.sampled_from([1, 2, 3, 5, 8, 16])), draw(st.sampled_from([1.0, 4.0, 16.0])), p))
    M = draw(st.integers(1, 9))
    if rows_label in ROWS[:2]:
        rows = [0] * M
    elif rows_label == ROWS[2]:
        rows = draw(st.permutations([0, 1, -1] + draw(st.lists(st.integers(-1, n - 1), max_size=M))))
    else:
        plain = [slot for slot, spec in enumerate(specs) if not spec[0]]
        rows = draw(st.permutations(plain[:1] + draw(st.lists(st.sampled_from([-1] + plain), max_size=M))))
    K = 64 if base == BASES[2] else draw(st.sampled_from([1, 3, 8, 17]))  # NF4 blocks of 64
    return SimpleNamespace(specs=specs, rows=list(rows), K=K, N=draw(st.sampled_from([1, 4, 13])), base=base,
                           bias=bias, seed=draw(st.integers(0, 2**16)),
                           classes={"rows": rows_label, "base": base, "dropout": dropout, "bias": bias})


def build_layer(case) -> LoraLinear:
    """A LoraLinear with adapters a0, a1, ... per ``case.specs`` (use_dora, r, alpha, p), every tensor random
    (B and the magnitude too, so every gradient is non-trivial), in train mode with a fixed dropout seed."""
    gen = torch.Generator().manual_seed(case.seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    dtype = torch.float64 if case.base == BASES[0] else torch.float32
    linear = nn.Linear(case.K, case.N, bias=case.bias != BIASES[0], dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(rand(case.N, case.K) / case.K ** 0.5)
        if linear.bias is not None:
            linear.bias.copy_(rand(case.N))
    use_dora, r, alpha, p = case.specs[0]
    options = dict(quantize="nf4", compute_dtype=torch.float32, double_quant=case.seed % 2 == 0) \
        if case.base == BASES[2] else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # r above min(in, out) is legal
        layer = LoraLinear.from_linear(linear, adapter_name="a0", r=r, alpha=alpha, dropout=p, use_dora=use_dora,
                                       **options)
        for slot, (use_dora, r, alpha, p) in enumerate(case.specs[1:], start=1):
            layer.add_adapter(f"a{slot}", r=r, alpha=alpha, dropout=p, use_dora=use_dora, dtype=dtype)
    with torch.no_grad():
        for adapter in layer.adapters.values():
            r = adapter.r
            adapter.lora_A.copy_(rand(r, case.K) / case.K ** 0.5)
            adapter.lora_B.copy_(rand(case.N, r) / r ** 0.5)
            if adapter.use_dora:  # around the norm PEFT initialises it to, so c = m / n stays near 1
                adapter.lora_magnitude_vector.copy_(rand(case.N).abs() + 0.5)
    layer.set_adapter(list(layer.adapters))
    if case.bias == BIASES[2]:
        layer.bias.requires_grad_(True)
    layer.dropout_seed = DROPOUT_SEED
    return layer.train()


def run_layer(layer, case):
    """(y, {name: gradient}) of the mixed forward over the layer's adapters, for a random dy (also returned)."""
    gen = torch.Generator().manual_seed(case.seed + 1)
    dtype = torch.float64 if case.base == BASES[0] else torch.float32
    x = torch.randn(len(case.rows), case.K, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    names = list(layer.adapters)
    y = layer.forward_rows(x, torch.tensor(case.rows, dtype=torch.int64), names)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
    wanted = {"dx": x}
    for slot, name in enumerate(names):
        a = layer.adapters[name]
        wanted[f"dA{slot}"], wanted[f"dB{slot}"] = a.lora_A, a.lora_B
        if a.use_dora:
            wanted[f"dm{slot}"] = a.lora_magnitude_vector
    if layer.bias is not None and layer.bias.requires_grad:
        wanted["db"] = layer.bias
    grads = dict(zip(wanted, torch.autograd.grad(y, list(wanted.values()), dy)))
    return x, y, grads, dy


def reference(layer, case, x, dy):
    """(y and every gradient in float64, row by row: each row through its own adapter's core function (the
    scaling recomputed from r and alpha, the dropout mask from the torch generator's rule), summed per adapter;
    the magnitude of each element: the same computation on absolute values (lorakern.testing.magnitudes, and for
    a DoRA row testing_dora.dora_magnitudes, which carries the norm's conditioning: a row of W + s B A that
    nearly cancels makes c = m / n large and n's own rounding count))."""
    W = reference_nf4_weight(layer.nf4, torch.float32).astype(np.float64) if layer.is_quantized \
        else f64(layer.weight)
    b = f64(layer.bias)
    xs, g = f64(x), f64(dy)
    tiny = torch.finfo(x.dtype).tiny
    y, want = xs @ W.T + (0.0 if b is None else b), {"dx": g @ W}
    mag = {"y": abs(xs) @ abs(W).T + (0.0 if b is None else abs(b)), "dx": abs(g) @ abs(W), "db": abs(g).sum(0)}
    adapters = []
    for slot, name in enumerate(layer.adapters):
        use_dora, r, alpha, p = case.specs[slot]
        a = layer.adapters[name]
        mask = torch_mask(DROPOUT_SEED, xs.shape, p) if p > 0 else None
        adapters.append((use_dora, f64(a.lora_A), f64(a.lora_B), core.scaling(r, alpha), f64(a.lora_magnitude_vector),
                         mask))
        names = ["dA", "dB"] + (["dm"] if use_dora else [])
        for grad, shape in zip(names, (adapters[-1][1].shape, adapters[-1][2].shape, (W.shape[0],))):
            want[f"{grad}{slot}"], mag[f"{grad}{slot}"] = np.zeros(shape), np.zeros(shape)
    for i, slot in enumerate(case.rows):
        if slot < 0:
            continue
        use_dora, A, B, s, m, mask = adapters[slot]
        xi, gi, mi = xs[i:i + 1], g[i:i + 1], None if mask is None else mask[i:i + 1]
        if use_dora:
            y[i] = core.dora.forward(xi, W, A, B, m, b, s, dropout_mask=mi)[0]
            back = core.dora.backward(xi, W, A, B, m, gi, s, dropout_mask=mi)
            part = dora_magnitudes(xi, W, A, B, m, b, gi, s, mi, tiny)
            want[f"dm{slot}"] = want[f"dm{slot}"] + back["dm"]
            mag[f"dm{slot}"] = mag[f"dm{slot}"] + part["dm"]
            # the torch path's row term (c - 1) (y - b) takes b back out of y: db = g - (c - 1) g + (c - 1) g, so its
            # rounding scales with |c - 1| |g| (an fp64 case at K = 1 read 8 units where |g| alone allowed 6)
            c = m / core.dora.weight_norm(W, A, B, s)
            mag["db"] = mag["db"] + 2 * np.abs(c - 1) * np.abs(gi[0])
        else:
            y[i] = core.forward(xi, W, A, B, b, s, dropout_mask=mi)[0]
            back = core.backward(xi, W, A, B, gi, s, dropout_mask=mi)
            part = magnitudes(xi, W, A, B, b, gi, s, mi, tiny)
        want["dx"][i], mag["y"][i], mag["dx"][i] = back["dx"][0], part["y"][0], part["dx"][0]
        for grad in ("dA", "dB"):
            want[f"{grad}{slot}"] = want[f"{grad}{slot}"] + back[grad]
            mag[f"{grad}{slot}"] = mag[f"{grad}{slot}"] + part[grad]
    want["db"] = g.sum(axis=0)
    return y, want, mag


def limit(dtype, case) -> float:
    """The bound on |got - want| / magnitude: the dtype's for the longest reduction, plus two units of its storage
    for the DoRA scale c rounded once more (tests/test_kernels_mixed_dora.py's, the single DoRA call's)."""
    return bound(dtype, max(len(case.rows), case.K, case.N)) + 2 * TOLERANCE[dtype][0]


def assert_matches(got, want, mag, dtype, case, what):
    err, worst = rel_error(got, want, mag, dtype)
    assert err <= limit(dtype, case), f"{what}: {err / limit(dtype, case):.3g} x its bound ({worst})"


def check(case, backend=None):
    layer = build_layer(case)
    layer.backend = backend
    x, y, grads, dy = run_layer(layer, case)
    y_ref, want, mag = reference(layer, case, x, dy)
    assert_matches(y, y_ref, mag["y"], x.dtype, case, "y")
    for name, got in grads.items():
        assert_matches(got, want[name], mag[name], x.dtype, case, name)
    return grads


def scales_off(monkeypatch, factor: float, slots=None) -> None:
    """Every DoRA slot's c = m / n (those in ``slots`` when given) times ``factor``, on both paths that run a mixed
    batch with DoRA adapters on the CPU: torch (lorakern.mixed._dora_scales) and c (lorakern.mixed_dora_c.slot_scales,
    whose n, which dm divides by, goes off by 1 / factor with it)."""
    hit = lambda a: slots is None or a in slots
    off = lambda values, f: [v if v is None or not hit(a) else v * f for a, v in enumerate(values)]
    real_torch, real_c = mixed._dora_scales, mixed_dora_c.slot_scales
    monkeypatch.setattr(mixed, "_dora_scales", lambda call, norm: off(real_torch(call, norm), factor))

    def c_path(call, norm):
        norms, scales = real_c(call, norm)
        return off(norms, 1 / factor), off(scales, factor)

    monkeypatch.setattr(mixed_dora_c, "slot_scales", c_path)


SEEN = []


@given(case=mixed_dora_cases())
@example(case=SimpleNamespace(specs=[(True, 3, 4.0, 0.0)], rows=[0, 0, 0], K=8, N=4, base=BASES[1],
                              bias=BIASES[1], seed=0, classes={}))  # every row one DoRA adapter, alone
@example(case=SimpleNamespace(specs=[(True, 2, 4.0, 0.0), (False, 5, 1.0, 0.0), (True, 16, 16.0, 0.0)],
                              rows=[2, 1, -1, 0, 2, 1, -1], K=17, N=13, base=BASES[0], bias=BIASES[2], seed=1,
                              classes={}))  # two DoRA adapters and a plain one, base rows, trained bias
@example(case=SimpleNamespace(specs=[(True, 1, 1.0, 0.0), (False, 8, 16.0, 0.0)], rows=[1, -1, 1], K=3, N=4,
                              base=BASES[0], bias=BIASES[0], seed=2, classes={}))  # the DoRA adapter has no rows
@example(case=SimpleNamespace(specs=[(True, 4, 4.0, 0.5), (False, 2, 4.0, 0.1), (True, 3, 16.0, 0.1)],
                              rows=[0, 2, -1, 1, 0, 2], K=64, N=13, base=BASES[2], bias=BIASES[1], seed=3,
                              classes={}))  # NF4 base, seeded dropout, each adapter its own p
@example(case=SimpleNamespace(specs=[(True, 2, 4.0, 0.5), (False, 3, 4.0, 0.1)], rows=[0, 0, 0, 0], K=8, N=4,
                              base=BASES[0], bias=BIASES[2], seed=4, classes={}))  # all rows DoRA, one handed in empty
# K = 1: row 7 of W + s B A cancels to 1/835 of its terms, so c = m / n is ~2100 and n's fp32 rounding shows in y
# at ~1e-4 relative: within the bound over each element's magnitude (which carries the norm's conditioning), not
# within a flat rtol (found by the thorough profile)
@example(case=SimpleNamespace(specs=[(True, 5, 1.0, 0.1), (False, 1, 1.0, 0.1)], rows=[0, 1, -1], K=1, N=13,
                              base=BASES[1], bias=BIASES[1], seed=1, classes={}))
# K = 1, N = 4: row 2 of W + s B A is 5e-5 of its parts; the norm identity rounded n_2^2 to 0 and c to inf
# (dora._formed_where_cancelled forms that row now; found by the thorough profile)
@example(case=SimpleNamespace(specs=[(True, 2, 1.0, 0.0), (False, 1, 1.0, 0.0), (False, 1, 1.0, 0.0)], rows=[0], K=1,
                              N=4, base=BASES[1], bias=BIASES[0], seed=2, classes={}))
# fp64, K = 1: db's rounding on the torch path scales with |c - 1| |g| (reference's magnitude for db; thorough profile)
@example(case=SimpleNamespace(specs=[(True, 1, 1.0, 0.0), (False, 1, 1.0, 0.0)], rows=[0, 1, 0, -1, 0, 0], K=1, N=4,
                              base=BASES[0], bias=BIASES[2], seed=0, classes={}))
def _mixed_dora_matches_reference(case):
    if case.classes:
        SEEN.append(case)
    check(case)


def test_mixed_dora_matches_the_row_by_row_reference():
    """Every assignment class, dense (fp64, fp32) and NF4 bases, dropout off and seeded, no / frozen / trained
    bias; outputs and every gradient (the stated shares asserted on the drawn examples that ran)."""
    SEEN.clear()
    _mixed_dora_matches_reference()
    strategies.assert_shares(SEEN, AXES)


MUTATION_CASE = SimpleNamespace(specs=[(True, 3, 4.0, 0.0), (False, 2, 8.0, 0.0), (True, 2, 2.0, 0.0)],
                                rows=[0, 1, 2, -1, 0, 2], K=9, N=7, base=BASES[0], bias=BIASES[2], seed=5, classes={})


@pytest.mark.parametrize("base", BASES[:2])
def test_the_comparison_fails_when_the_magnitude_scale_is_off(base, monkeypatch):
    case = SimpleNamespace(**{**vars(MUTATION_CASE), "base": base})
    check(case)  # passes as it is
    dtype = torch.float64 if base == BASES[0] else torch.float32
    scales_off(monkeypatch, 1 + 4 * limit(dtype, case), slots=[2])  # slot 2's c off by 4 times the bound
    layer = build_layer(case)
    x, y, grads, dy = run_layer(layer, case)
    y_ref, want, mag = reference(layer, case, x, dy)
    for got, name in ((y, "y"), (grads["dm2"], "dm2"), (grads["dA2"], "dA2")):
        with pytest.raises(AssertionError):
            assert_matches(got, y_ref if name == "y" else want[name], mag[name], x.dtype, case, name)
    assert_matches(grads["dA0"], want["dA0"], mag["dA0"], x.dtype, case, "dA0")  # the other adapters are untouched


def test_the_comparison_fails_when_the_norm_is_not_detached(monkeypatch):
    """PEFT's norm is a constant for the gradient: a differentiable one leaves y but changes dA and dB."""
    def attached(weight, lora_A, lora_B, scaling, base_norm_sq=None, library=None):
        return torch.linalg.vector_norm(weight + scaling * (lora_B @ lora_A), dim=1)

    monkeypatch.setattr(dora, "weight_norm", attached)
    layer = build_layer(MUTATION_CASE)
    x, y, grads, dy = run_layer(layer, MUTATION_CASE)
    y_ref, want, mag = reference(layer, MUTATION_CASE, x, dy)
    assert_matches(y, y_ref, mag["y"], x.dtype, MUTATION_CASE, "y")
    with pytest.raises(AssertionError):
        assert_matches(grads["dA0"], want["dA0"], mag["dA0"], x.dtype, MUTATION_CASE, "dA0")


def toy_two_dora_adapters(quantize=None):
    model = inject(Toy(), LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], modules_to_save=["head"],
                                     use_dora=True, quantize=quantize), "a")
    lorakern.add_adapter(model, "b", LoraConfig(r=3, lora_alpha=3, target_modules=["q"], modules_to_save=["head"],
                                                use_dora=True, quantize=quantize))
    randomize(model, 1)
    with torch.no_grad():  # magnitudes near 1 (randomize draws 0.3 N(0, 1) for every adapter tensor)
        for name, p in model.named_parameters():
            if name.endswith("lora_magnitude_vector"):
                p.abs_().add_(0.5)
    return model


def test_training_two_dora_adapters_mixed_equals_training_each_alone_on_its_rows():
    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(6, 4, 8, generator=gen), torch.randn(6, 4, 3, generator=gen)) for _ in range(3)]
    trained = check_mixed_training_equals_alone(toy_two_dora_adapters, ["a", "b", "b", None, "a", "b"], data)
    initial = dict(toy_two_dora_adapters().named_parameters())
    for name, params in trained.items():
        magnitudes = [n for n in params if n.endswith("lora_magnitude_vector")]
        assert magnitudes and all(not torch.equal(params[n], initial[n]) for n in magnitudes), name  # they trained


@pytest.mark.parametrize("scale_off", [False, True], ids=["as-is", "magnitude-scale-off"])
def test_mixed_dora_batch_matches_peft_run_per_adapter_on_its_rows(tmp_path, monkeypatch, scale_off):
    """PEFT refuses DoRA with ``adapter_names``, so its peer answer is each adapter's DoRA forward on that
    adapter's rows alone (and the base model on base-only rows): the same outputs, dx and every adapter's
    A, B and magnitude gradients as one mixed batch here (PEFT's adapters saved, loaded by lorakern). With
    every c off by 1e-4 (a few times the comparison's tolerance) the comparison fails."""
    if scale_off:
        scales_off(monkeypatch, 1 + 1e-4)
        with pytest.raises(AssertionError):
            compare_with_peft(tmp_path)
    else:
        compare_with_peft(tmp_path)


def compare_with_peft(tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from lorakern import load_adapter

    theirs = get_peft_model(Toy(), PeftLoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], use_dora=True),
                            adapter_name="one")
    theirs.add_adapter("two", PeftLoraConfig(r=3, lora_alpha=6, target_modules=["q"], use_dora=True))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora" in name:  # B and the magnitude too: every gradient non-trivial
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    theirs.save_pretrained(str(tmp_path))
    ours = Toy()
    for name in ("one", "two"):
        load_adapter(ours, str(tmp_path / name), adapter_name=name)
    rows = ["one", "two", None, "two", "one", "two"]
    x = torch.randn(6, 5, 8, generator=gen, requires_grad=True)
    dy = torch.randn(6, 5, 3, generator=gen)
    with lorakern.adapter_rows(ours, rows):
        y = ours(x)
    tensors = {n: p for n, p in ours.named_parameters() if ".adapters." in n}
    got = dict(zip(["x", *tensors], torch.autograd.grad(y, [x, *tensors.values()], dy)))
    want_x = torch.zeros_like(x)
    for name in ("one", "two", None):
        mine = [i for i, r in enumerate(rows) if r == name]
        x_rows = x.detach()[mine].requires_grad_(True)
        if name is None:
            with theirs.disable_adapter():
                out = theirs(x_rows)
            peers = {}
        else:
            theirs.set_adapter(name)
            out = theirs(x_rows)
            peers = {n.removeprefix("base_model.model."): p for n, p in theirs.named_parameters()
                     if f".{name}." in n and "lora" in n}
        torch.testing.assert_close(y[mine].detach(), out.detach(), rtol=1e-5, atol=1e-6, msg=f"y of {name}'s rows")
        grads = torch.autograd.grad(out, [x_rows, *peers.values()], dy[mine])
        want_x[mine] = grads[0]
        for key, grad in zip(peers, grads[1:]):
            # PEFT's q.lora_A.one.weight / q.lora_magnitude_vector.one.weight: lorakern's q.adapters.one.lora_A / ...
            module, kind = key.split(".lora_")[0], key.split(".lora_")[1].split(".")[0]
            ours_key = f"{module}.adapters.{name}.lora_{kind}"
            torch.testing.assert_close(got[ours_key], grad, rtol=1e-5, atol=1e-6, msg=ours_key)
            tensors.pop(ours_key)
    assert not tensors  # every tensor of ours was compared
    torch.testing.assert_close(got["x"], want_x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["dense", "nf4"])
def test_compiled_mixed_dora_batch_has_no_graph_breaks_and_matches_eager(quantize):
    _, eager_grads = check_compiled_mixed_batch(toy_two_dora_adapters(quantize), torch.randn(4, 3, 8),
                                                ["b", None, "a", "b"])
    assert any(n.endswith("lora_magnitude_vector") for n in eager_grads)


def test_c_and_triton_take_dora_mixed_batches_and_match_the_reference():
    """Every implementation runs DoRA mixed batches: auto takes c for fp32 dense eager calls (dropout on a DoRA
    adapter included; tests/test_mixed_dora_c.py tests it), and triton pinned (interpreted here) matches the
    row-by-row reference (its segmented kernels with DoRA slots, tests/test_kernels_mixed_dora.py)."""
    case = SimpleNamespace(**{**vars(MUTATION_CASE), "base": BASES[1], "bias": BIASES[1]})
    dropped = SimpleNamespace(**{**vars(case), "specs": [(True, 3, 4.0, 0.1)] + case.specs[1:]})
    layer = build_layer(case)
    x = torch.randn(6, case.K)
    slots = torch.tensor(case.rows)
    try:
        import triton  # noqa: F401
    except ImportError:
        layer.backend = "triton"
        with pytest.raises(LorakernError, match=r"the triton backend cannot run this layer: triton is not installed"):
            layer.forward_rows(x, slots, list(layer.adapters))
    else:
        check(case, backend="triton")
    if native.lora_library() is None:
        return
    for spec in (case, dropped):
        layer = build_layer(spec)
        adapters = mixed._adapters_for(layer, list(layer.adapters))
        call = dispatch.prepare_mixed(x, "dense", layer.weight, layer.bias, adapters,
                                      lorakern.rows.group_rows(slots, len(adapters)))
        report = dispatch.explain(call)
        assert report.startswith("runs: c"), report
        assert "triton:" in report and "torch: takes it too" in report and "no DoRA" not in report, report
        check(spec, backend="c")


def test_lorakern_check_runs_mixed_dora_on_torch_and_fails_on_a_wrong_scale(monkeypatch):
    """``lorakern check``'s "mixed DoRA" rows: torch passes in every dtype (fp16 and bf16 too, against the
    single DoRA call's bound), c in fp32 (and says why not in the others), triton where installed; with every c
    off by 1e-5 (several times the fp32 bound) the torch fp64 and fp32 rows and the c row fail, and
    compare_mixed_dora sees a gradient off by 4 bounds."""
    from lorakern.check import mixed_dora_rows
    from lorakern.testing_dora import compare_mixed_dora, dora_layer

    rows = mixed_dora_rows(torch.device("cpu"))
    torch_rows = [r for r in rows if r[0] == "mixed DoRA: torch"]
    assert [r[1] for r in torch_rows] == ["float64", "float32", "float16", "bfloat16"]
    assert all(r[-1] == "pass" for r in torch_rows), torch_rows
    c_rows = [r for r in rows if r[0].startswith("mixed DoRA: C kernels")]
    built = native.lora_library() is not None
    assert [r[1] for r in c_rows if r[-1] == "pass"] == (["float32"] if built else []), c_rows
    assert all(r[-1] == "n/a" and ("fp32 only" in r[3] or "not built" in r[3]) for r in c_rows if r[1] != "float32")
    triton_rows = [r for r in rows if r[0].startswith("mixed DoRA: triton")]
    assert triton_rows and all(r[-1] == "pass" or "triton is not installed" in r[3] for r in triton_rows), triton_rows
    assert {r[0].split(" (")[0] for r in rows} == {"mixed DoRA: torch", "mixed DoRA: C kernels", "mixed DoRA: triton"}
    scales_off(monkeypatch, 1 + 1e-5)
    failed = {(r[0].split(" (")[0], r[1]) for r in mixed_dora_rows(torch.device("cpu")) if r[-1] == "FAIL"}
    assert {("mixed DoRA: torch", "float64"), ("mixed DoRA: torch", "float32")} <= failed, failed
    assert not built or ("mixed DoRA: C kernels", "float32") in failed, failed
    monkeypatch.undo()
    layer = dora_layer(9, 7, 3, torch.float32, seed=3)
    layer.add_adapter("plain", r=2)
    nn.init.normal_(layer.adapters["plain"].lora_B)
    layer.set_adapter(["default", "plain"])
    x = torch.randn(5, 9, generator=torch.Generator().manual_seed(1))
    assert compare_mixed_dora(layer, x, [0, 1, -1, 0, 1], ["default", "plain"]).passed
    for name in ("y", "dm0", "dA1", "dx"):
        assert not compare_mixed_dora(layer, x, [0, 1, -1, 0, 1], ["default", "plain"], perturb={name: 4.0}).passed


def test_glue_mixed_trains_dora_adapters(tmp_path):
    """``lorakern glue --task sst2,rte --mixed --lora-use-dora true``: each task's DoRA adapter trains and is
    saved with its magnitude (PEFT's keys), and the reloaded adapters score what the trained ones did."""
    from safetensors.torch import load_file

    from lorakern.cli import main

    out = tmp_path / "run"
    assert main(["glue", "--task", "sst2,rte", "--mixed", "--lora-use-dora", "true", "--decay-epochs", "1",
                 "--warmup-epochs", "0", "--batch-size", "32", "--no-progress", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["lora"]["use_dora"] is True
    for task in ("sst2", "rte"):
        assert metrics["summaries"][task]["reload_agrees"], metrics["summaries"][task]
        tensors = load_file(str(out / "adapter" / task / "adapter_model.safetensors"))
        assert any(k.endswith("lora_magnitude_vector") for k in tensors), sorted(tensors)
