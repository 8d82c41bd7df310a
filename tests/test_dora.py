"""DoRA: the torch (and C) paths against lorakern.core.dora, the norm without B A, PEFT both ways, NF4, merging."""
import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

from conftest import tiny_roberta_classifier
from lorakern import LoraConfig, LoraLinear, core, dora, inject, load_adapter, lora_layers, merge_and_unload, save_adapter
from lorakern.core import nf4 as core_nf4
from lorakern.errors import AdapterError, ConfigError, LorakernError
from lorakern.testing import TOLERANCE, Comparison, assert_matches_reference, bound, rel_error

DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def dora_layer(K, N, r, dtype, *, bias=True, dropout=0.0, alpha=None, seed=0, backend="torch"):
    """A DoRA LoraLinear with every tensor random (B and the magnitude too: every gradient is non-trivial)."""
    gen = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # r > min(K, N) is legal
        layer = LoraLinear(K, N, bias=bias, r=r, alpha=alpha, dropout=dropout, dtype=torch.float64, use_dora=True)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(max(p.shape[-1], 1)))
    layer.backend = backend
    return layer.to(dtype)


def f64(t):
    return None if t is None else t.detach().to(torch.float64).cpu().numpy()


def dora_magnitudes(x, W, A, B, m, b, dy, s, mask, tiny):
    """The scale of each element's rounding error (the computation on absolute values). c = m / n carries
    the conditioning of the norm identity: n^2 is a sum of terms whose absolute sum over n^2 is kappa."""
    K, N = W.shape[1], W.shape[0]
    x2, g = abs(x.reshape(-1, K)), abs(dy.reshape(-1, N))
    keep = np.ones_like(x2) if mask is None else abs(mask.reshape(-1, K))
    xl = x2 * keep
    n = core.dora.weight_norm(W, A, B, s)
    terms = (W * W).sum(1) + 2 * abs(s) * (abs(B) * abs(W @ A.T)).sum(1) + s * s * ((abs(B) @ abs(A @ A.T)) * abs(B)).sum(1)
    c = abs(m) / n * (1 + terms / n**2)
    aW, aA, aB, s = abs(W), abs(A), abs(B), abs(s)
    u = xl @ aA.T + tiny
    z = xl @ aW.T + s * (u @ aB.T)
    gc = g * c
    gcB = gc @ aB + tiny
    # with dropout: x W^T + (c - 1) x~ W^T + c s u B^T
    base = c * (xl @ aW.T) if mask is None else x2 @ aW.T + (c + 1) * (xl @ aW.T)
    return {
        "y": (base + c * s * (u @ aB.T) + (0.0 if b is None else abs(b))).reshape(dy.shape),
        "dx": (g @ aW * (mask is not None) + ((gc + g * (mask is not None)) @ aW + s * gcB @ aA) * keep).reshape(x.shape),
        "dA": s * (gcB.T @ xl),
        "dB": s * (gc.T @ u),
        "dm": (g * z).sum(0) / n * (1 + terms / n**2),
        "db": g.sum(0),
    }


def compare_dora(layer, x, seed=0, perturb=None):
    """Run the layer's active DoRA adapter on x (train mode, fixed dropout seed), backprop, compare every
    result (those whose tensors require grad: x, A, B, m, the bias) with lorakern.core.dora in float64.
    ``perturb`` {name: factor} spoils a result by factor x its bound first (the mutation check). A 4-bit
    base's weight is decoded by lorakern.core from its bytes (x in the compute dtype)."""
    from lorakern import dispatch
    from lorakern.testing import reference_nf4_weight
    from lorakern.testing_masks import backend_mask

    dtype = x.dtype
    x = x.detach().requires_grad_(True)
    backend = dispatch.choose(layer._call_for(x), layer.backend)[0].name
    mask = None
    if layer.training and layer.dropout > 0:
        layer.dropout_seed = seed + 1
        # the chosen path's mask for that seed, recomputed from its documented generator (torch / c: torch.rand
        # from a seeded generator; triton: Philox per element), kept entries 1 / (1 - p) as a float32
        mask = backend_mask(backend, seed + 1, tuple(x.shape), layer.dropout, x.device)
    y = layer(x)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    a = layer.adapters[layer.active_adapters[0]]
    wanted = {name: t for name, t in (("dx", x), ("dA", a.lora_A), ("dB", a.lora_B), ("dm", a.lora_magnitude_vector),
                                      ("db", layer.bias)) if t is not None and t.requires_grad}
    grads = dict(zip(wanted, torch.autograd.grad(y, list(wanted.values()), grad_y)))
    # the interpreted kernels convert fp32 to bf16 by truncation (lorakern.testing's note): so does W here
    W = (reference_nf4_weight(layer.nf4, dtype, truncate=backend == "triton" and x.device.type == "cpu")
         if layer.is_quantized else f64(layer.weight_out_in))
    A, B, m, b = f64(a.lora_A), f64(a.lora_B), f64(a.lora_magnitude_vector), f64(layer.bias)
    xs, dy, s = f64(x), f64(grad_y), core.scaling(a.r, a.alpha)  # s recomputed from r and alpha
    ref = {"y": core.dora.forward(xs, W, A, B, m, b, s, dropout_mask=mask),
           **core.dora.backward(xs, W, A, B, m, dy, s, dropout_mask=mask)}
    mag = dora_magnitudes(xs, W, A, B, m, b, dy, s, mask, torch.finfo(dtype).tiny)
    length = max(int(np.prod(x.shape[:-1])), layer.in_features, layer.out_features)
    # two more roundings than plain LoRA: c to the compute dtype, and the product c z
    limit = bound(dtype, length) + 2 * TOLERANCE[dtype][0]
    got = {"y": y, **grads}
    for name, factor in (perturb or {}).items():
        got[name] = got[name].detach().double() + factor * limit * torch.as_tensor(mag[name])
    errors, details = {}, {}
    for name in got:
        errors[name], details[name] = rel_error(got[name], ref[name], mag[name], dtype)
    return Comparison(dtype, tuple(x.shape), errors, details, limit)


@given(lead=st.lists(st.integers(1, 9), max_size=2), K=st.integers(1, 90), N=st.integers(1, 90),
       r=st.integers(1, 20), dtype=st.sampled_from(DTYPES), dropout=st.sampled_from([0.0, 0.0, 0.3]),
       bias=st.booleans(), alpha=st.one_of(st.none(), st.floats(0.5, 32.0)), seed=st.integers(0, 2**16),
       path=st.sampled_from(["torch", "c"]))
@example(lead=[], K=1, N=1, r=1, dtype=torch.float32, dropout=0.0, bias=True, alpha=None, seed=0, path="c")
@example(lead=[3, 5], K=37, N=41, r=20, dtype=torch.float64, dropout=0.3, bias=False, alpha=4.0, seed=1, path="torch")
@example(lead=[6], K=42, N=5, r=7, dtype=torch.bfloat16, dropout=0.3, bias=True, alpha=16.0, seed=2, path="torch")
@example(lead=[1], K=90, N=90, r=1, dtype=torch.float32, dropout=0.0, bias=False, alpha=None, seed=3, path="torch")
@example(lead=[], K=1, N=23, r=2, dtype=torch.bfloat16, dropout=0.0, bias=False, alpha=None, seed=1, path="torch")
@example(lead=[2, 9], K=17, N=33, r=20, dtype=torch.float32, dropout=0.3, bias=True, alpha=2.0, seed=4, path="c")
def test_torch_and_c_paths_match_reference(lead, K, N, r, dtype, dropout, bias, alpha, seed, path):
    from lorakern import native

    # the C kernels take fp32 only (and serve only where they build): other draws run the torch path
    backend = "c" if path == "c" and dtype == torch.float32 and native.lora_library() is not None else "torch"
    layer = dora_layer(K, N, r, dtype, bias=bias, dropout=dropout, alpha=alpha, seed=seed, backend=backend).train()
    x = torch.randn(*lead, K, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64).to(dtype)
    assert_matches_reference(compare_dora(layer, x, seed))


class _Spy:
    """A C library whose calls are recorded by name."""

    def __init__(self, library):
        self.library, self.calls = library, []

    def __getattr__(self, name):
        function = getattr(self.library, name)
        return lambda *args: (self.calls.append(name), function(*args))[1]


def _levels():
    from lorakern import native

    return [level.name for level in native.levels_here()]


@pytest.mark.parametrize("level", _levels())
@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("shape", [(6, 42, 123, 5), (1, 431, 6, 64), (123, 6, 42, 1), (37, 64, 64, 8)],
                         ids=lambda s: "x".join(map(str, s)))
def test_c_path_matches_reference(shape, dropout, level, monkeypatch):
    from lorakern import native

    monkeypatch.setenv("LORAKERN_NATIVE", "1")
    library = native.lora_library(next(lv for lv in native.levels_here() if lv.name == level))
    if library is None:
        pytest.skip(f"the C kernels are not built here: {native.build_status()[1]}")
    spy = _Spy(library)
    monkeypatch.setattr(native, "lora_library", lambda: spy)
    M, K, N, r = shape
    layer = dora_layer(K, N, r, torch.float32, bias=M % 2 == 0, dropout=dropout, seed=M, backend="c").train()
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(K), dtype=torch.float32)
    assert_matches_reference(compare_dora(layer, x, seed=M))
    # the scaled epilogue without dropout (with it, PEFT's x~ W^T term runs in torch), then gc and dm in one pass
    expected = (["dora_forward_f32"] if dropout == 0 else []) + ["dora_scale_grad_f32", "lora_backward_scratch",
                                                                 "lora_backward_f32"]
    assert spy.calls == expected, spy.calls
    # inference: nothing needs z, so y is scaled where the base GEMM wrote it
    layer.eval()
    with torch.no_grad():
        y = layer(x)
    a = layer.adapters["default"]
    ref = core.dora.forward(f64(x), f64(layer.weight), f64(a.lora_A), f64(a.lora_B), f64(a.lora_magnitude_vector),
                            f64(layer.bias), core.scaling(a.r, a.alpha))
    np.testing.assert_allclose(f64(y), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("name", ["y", "dx", "dA", "dB", "dm"])
def test_comparison_fails_on_a_result_spoiled_by_4x_its_bound(name):
    layer = dora_layer(20, 12, 3, torch.float32, dropout=0.2, seed=5).train()
    x = torch.randn(4, 20, generator=torch.Generator().manual_seed(5))
    assert compare_dora(layer, x, seed=5).passed
    spoiled = compare_dora(layer, x, seed=5, perturb={name: 4.0})
    assert not spoiled.passed and spoiled.worst[0] == name


@given(K=st.integers(1, 70), N=st.integers(1, 50), r=st.integers(1, 16), s=st.floats(0.05, 8.0),
       seed=st.integers(0, 2**16))
@example(K=1, N=1, r=1, s=1.0, seed=0)
@example(K=64, N=3, r=16, s=8.0, seed=1)
def test_norm_without_BA_equals_formed_norm(K, N, r, s, seed):
    gen = torch.Generator().manual_seed(seed)
    W, A, B = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((N, K), (r, K), (N, r)))
    formed = core.dora.weight_norm(W.numpy(), A.numpy(), B.numpy(), s)
    np.testing.assert_allclose(dora.weight_norm(W, A, B, s).numpy(), formed, rtol=1e-12, atol=0)
    np.testing.assert_allclose(dora.weight_norm(W.float(), A.float(), B.float(), s).double().numpy(), formed,
                               rtol=64 * TOLERANCE[torch.float32][0] * (1 + s * s), atol=0)


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


# ---- PEFT, both ways ------------------------------------------------------------------------------------
def _peft_dora(**overrides):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = dict(r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense"], use_dora=True)
    return get_peft_model(tiny_roberta_classifier(), PeftLoraConfig(**{**config, **overrides}))


def _perturb(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:  # inactive adapters too
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def _lora_grads(model, peft_names: bool) -> dict:
    """{(module, "A" | "B" | "m"): grad} of every LoRA tensor, keyed alike for PEFT's and lorakern's names."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None or "lora" not in name:
            continue
        name = name.removeprefix("base_model.model.")
        for tag, marks in (("A", (".lora_A.", ".lora_A")), ("B", (".lora_B.", ".lora_B")),
                           ("m", (".lora_magnitude_vector",))):
            if any(k in name for k in marks):
                module = name.split(".lora_")[0] if peft_names else name.split(".adapters.")[0]
                out[(module, tag)] = p.grad
    return out


def _step_grads(model, batch, peft_names):
    model.train()
    model.zero_grad()
    model(**batch, labels=torch.tensor([0, 1, 1])).loss.backward()
    return _lora_grads(model, peft_names)


def test_peft_dora_adapter_loads_here_with_the_same_logits_and_gradients(tmp_path, batch):
    theirs = _peft_dora()
    _perturb(theirs, seed=1)
    theirs.save_pretrained(str(tmp_path))
    ours = load_adapter(tiny_roberta_classifier(), str(tmp_path))
    assert all(layer.adapters["default"].use_dora for layer in lora_layers(ours).values())
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-5, atol=1e-6)
    expected, got = _step_grads(theirs, batch, True), _step_grads(ours, batch, False)
    assert set(got) == set(expected) and len(got) == 3 * 2 * 3  # 2 layers x 3 targets x (A, B, m)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


def test_magnitude_keyed_with_weight_suffix_loads_too(tmp_path, batch):
    from safetensors.torch import load_file, save_file

    ours = inject(tiny_roberta_classifier(), LoraConfig(r=4, target_modules=["query"], use_dora=True))
    _perturb(ours, seed=8)
    save_adapter(ours, str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    renamed = {k + ".weight" if k.endswith("lora_magnitude_vector") else k: v for k, v in load_file(path).items()}
    save_file(renamed, path, metadata={"format": "pt"})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["lorakern"]["weights_sha256"] = None
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    fresh = load_adapter(tiny_roberta_classifier(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, ours(**batch).logits, rtol=0, atol=0)


def test_lorakern_dora_adapter_loads_into_peft(tmp_path, batch):
    from peft import PeftModel

    ours = inject(tiny_roberta_classifier(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                         use_dora=True))
    _perturb(ours, seed=2)
    save_adapter(ours, str(tmp_path))
    theirs = PeftModel.from_pretrained(tiny_roberta_classifier(), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, ours(**batch).logits, rtol=1e-5, atol=1e-6)


def test_fresh_dora_magnitude_equals_peft_init():
    theirs = _peft_dora(init_lora_weights=False)  # B random too: the norm of W + s B A, not just ||W||
    ours = inject(tiny_roberta_classifier(), LoraConfig(r=4, lora_alpha=8, target_modules=["query"], use_dora=True))
    for name, layer in lora_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        a = layer.adapters["default"]
        with torch.no_grad():
            a.lora_A.copy_(peft_layer.lora_A["default"].weight)
            a.lora_B.copy_(peft_layer.lora_B["default"].weight)
        layer.reset_magnitude("default")
        torch.testing.assert_close(a.lora_magnitude_vector, peft_layer.lora_magnitude_vector["default"].weight,
                                   rtol=1e-6, atol=1e-7)


def test_two_active_dora_adapters_compose_as_in_peft(tmp_path, batch):
    theirs = _peft_dora()
    from peft import LoraConfig as PeftLoraConfig

    theirs.add_adapter("b", PeftLoraConfig(r=2, lora_alpha=4, target_modules=["query"], use_dora=True))
    _perturb(theirs, seed=3)
    theirs.save_pretrained(str(tmp_path), selected_adapters=["default", "b"])
    theirs.base_model.set_adapter(["default", "b"])
    ours = load_adapter(tiny_roberta_classifier(), str(tmp_path))
    load_adapter(ours, str(tmp_path / "b"), adapter_name="b")
    from lorakern import set_adapter

    set_adapter(ours, ["default", "b"])
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-5, atol=1e-6)


def test_merge_and_unload_equals_peft(batch):
    theirs = _peft_dora()
    _perturb(theirs, seed=4)
    ours = inject(tiny_roberta_classifier(), LoraConfig(r=4, lora_alpha=8,
                                                         target_modules=["query", "value", "intermediate.dense"],
                                                         use_dora=True))
    ours.load_state_dict({k.replace(".lora_A.default.weight", ".adapters.default.lora_A")
                          .replace(".lora_B.default.weight", ".adapters.default.lora_B")
                          .replace(".lora_magnitude_vector.default.weight", ".adapters.default.lora_magnitude_vector")
                          .replace(".base_layer.", "."): v
                          for k, v in theirs.base_model.model.state_dict().items()})
    theirs.eval()
    with torch.no_grad():
        expected = theirs(**batch).logits
        merged_theirs = theirs.merge_and_unload()
        merged_ours = merge_and_unload(ours)
        torch.testing.assert_close(merged_ours(**batch).logits, expected, rtol=1e-5, atol=1e-6)
    for name, module in merged_theirs.named_modules():
        if isinstance(module, nn.Linear):
            torch.testing.assert_close(merged_ours.get_submodule(name).weight, module.weight, rtol=1e-6, atol=1e-7)


def test_qlora_dora_saves_reloads_and_merges_to_full_precision(tmp_path, batch):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], use_dora=True, quantize="nf4",
                        compute_dtype="float32")
    model = inject(tiny_roberta_classifier(), config)
    assert all(layer.is_quantized and layer.use_dora for layer in lora_layers(model).values())
    _perturb(model, seed=5)
    with torch.no_grad():
        expected = model(**batch).logits
        save_adapter(model, str(tmp_path))
        fresh = load_adapter(tiny_roberta_classifier(), str(tmp_path))
        torch.testing.assert_close(fresh(**batch).logits, expected, rtol=0, atol=0)
        merged = merge_and_unload(model)
        assert not lora_layers(merged)
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-5, atol=1e-6)


def test_gpt2_conv1d_dora_loads_into_peft_and_merges(tmp_path):
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    def base():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)).eval()

    model = inject(base(), LoraConfig(r=2, target_modules=["c_attn", "c_proj"], use_dora=True))
    assert all(layer.fan_in_fan_out and layer.use_dora for layer in lora_layers(model).values())
    _perturb(model, seed=6)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        save_adapter(model, str(tmp_path))
        theirs = PeftModel.from_pretrained(base(), str(tmp_path)).eval()
        torch.testing.assert_close(theirs(ids).logits, expected, rtol=1e-5, atol=1e-5)
        unloaded = merge_and_unload(model)
        assert type(unloaded.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
        torch.testing.assert_close(unloaded(ids).logits, expected, rtol=1e-4, atol=1e-5)


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
