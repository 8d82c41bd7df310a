"""Inits from the base weight (PiSSA, pissa_niter_K, OLoRA, LoftQ) against float64 NumPy, PEFT 0.21 and an
independent LoftQ loop on bitsandbytes' quantizer; the conversion of a trained PiSSA / OLoRA adapter to a
plain rank-2r LoRA on the original base, against the trained model and PEFT's own conversion. The refusals:
tests/test_inits_refusals.py."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

import lorakern
import strategies
from lorakern import LoraConfig, inject, lora_layers
from lorakern.core.nf4 import NF4_CODE
from lorakern.layer import LoraLinear
from lorakern.nf4.codec import quantize_nf4
from lorakern.nf4.storage import NF4Storage
from toy_models import InitToy

EPS32 = float(np.finfo(np.float32).eps)


def f64(t):
    return t.detach().double().numpy()


def truncated_svd(W: np.ndarray, r: int) -> np.ndarray:
    U, S, Vh = np.linalg.svd(W, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def check_close(actual: np.ndarray, expected: np.ndarray, scale: float, bound: float, what: str) -> None:
    error = np.abs(actual - expected).max() / scale
    assert error <= bound, f"{what}: max error {error:.3g} x scale exceeds {bound:.3g}"


def layer_update(layer, name="default"):
    adapter = layer.adapters[name]
    return f64(adapter.lora_B) @ f64(adapter.lora_A) * adapter.scaling


# ---- PiSSA / OLoRA at init -----------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_6"])
@pytest.mark.parametrize("shape,r,alpha,rslora", [((12, 20), 4, 8, False), ((20, 7), 7, 3, True), ((9, 9), 1, 1, False)],
                         ids=["wide", "tall-full-rank", "square-r1"])
def test_residual_plus_update_is_the_original_weight(init, shape, r, alpha, rslora):
    torch.manual_seed(1)
    linear = nn.Linear(shape[1], shape[0])
    W = f64(linear.weight)
    layer = LoraLinear.from_linear(linear, r=r, alpha=alpha, use_rslora=rslora, init=init)
    s = alpha / (np.sqrt(r) if rslora else r)  # recomputed, not read from the layer
    assert f64(linear.weight).tolist() == W.tolist(), "the wrapped module's own weight must stay untouched"
    bound = 16 * EPS32 * max(shape)
    reconstructed = f64(layer.weight) + s * f64(layer.lora_B) @ f64(layer.lora_A)
    check_close(reconstructed, W, np.abs(W).max(), bound, f"{init}: W_res + s B A vs W")
    with pytest.raises(AssertionError):  # the check fails on an error a few times its bound
        check_close(reconstructed + 4 * bound * np.abs(W).max(), W, np.abs(W).max(), bound, "perturbed")
    update = s * f64(layer.lora_B) @ f64(layer.lora_A)
    if init == "pissa":  # s B A is the best rank-r approximation (float64 NumPy SVD)
        check_close(update, truncated_svd(W, r), np.abs(W).max(), bound, "pissa: s B A vs truncated SVD")
        assert np.allclose(f64(layer.lora_A) @ f64(layer.lora_A).T * s,
                           np.diag(np.linalg.svd(W, compute_uv=False)[:r]), atol=bound * np.abs(W).max() * 10)
    elif init == "olora":  # B has orthonormal columns spanning W's first r columns; s B A = B B^T W
        B = f64(layer.lora_B)
        check_close(B.T @ B, np.eye(r), 1.0, bound, "olora: B^T B vs I")
        check_close(update, s * B @ (B.T @ W), np.abs(W).max(), bound, "olora: s B A vs s B B^T W")


# The property test's axes, each drawn uniformly from its labels (the stated share: 1 / its labels) and
# checked on the examples that ran.
INITS = ("pissa", "olora", "pissa_niter_2")
INIT_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHAPES = ("wide (out < in)", "tall (out > in)", "square")
RANK_CLASSES = ("r below min(out, in)", "r = min(out, in)")
INIT_AXES = {"init": list(INITS), "dtype": list(INIT_DTYPES), "shape": list(SHAPES), "r": list(RANK_CLASSES)}


@st.composite
def init_cases(draw):
    init, dtype, shape, rank = (draw(st.sampled_from(labels)) for labels in INIT_AXES.values())
    if shape == SHAPES[2]:
        out = inp = draw(st.integers(2 if rank == RANK_CLASSES[0] else 1, 24))
    else:
        small = draw(st.integers(2 if rank == RANK_CLASSES[0] else 1, 23))
        large = draw(st.integers(small + 1, 24))
        out, inp = (small, large) if shape == SHAPES[0] else (large, small)
    r = min(out, inp) if rank == RANK_CLASSES[1] else draw(st.integers(1, min(out, inp) - 1))
    return SimpleNamespace(out=out, inp=inp, r=r, init=init, dtype=INIT_DTYPES[dtype],
                           classes={"init": init, "dtype": dtype, "shape": shape, "r": rank})


SEEN = []


@given(case=init_cases())
@example(case=SimpleNamespace(out=1, inp=1, r=1, init="pissa", dtype=torch.float32, classes={}))
@example(case=SimpleNamespace(out=1, inp=17, r=1, init="olora", dtype=torch.float64, classes={}))
@example(case=SimpleNamespace(out=17, inp=1, r=1, init="pissa_niter_2", dtype=torch.bfloat16, classes={}))
def _residual_plus_update_is_w(case):
    if case.classes:
        SEEN.append(case)
    out, inp, r, init, dtype = case.out, case.inp, case.r, case.init, case.dtype
    torch.manual_seed(out * 31 + inp)
    linear = nn.Linear(inp, out).to(dtype)
    W = f64(linear.weight)
    layer = LoraLinear.from_linear(linear, r=r, alpha=2 * r, init=init)
    assert layer.weight.dtype == layer.lora_A.dtype == dtype
    A, B, s = f64(layer.lora_A), f64(layer.lora_B), 2.0
    # each stored value is rounded once to dtype: W_res by eps/2 of |W_res|, A and B by eps/2 of theirs
    # (eps of float32 for float32 and below: the decomposition runs in float32)
    eps = max(torch.finfo(dtype).eps, 0 if dtype == torch.float64 else EPS32)
    rounding = 4 * eps * (np.abs(f64(layer.weight)).max() + s * (np.abs(B) @ np.abs(A)).max())
    bound = rounding + 16 * eps * max(out, inp) * np.abs(W).max()
    error = np.abs(f64(layer.weight) + s * B @ A - W).max()
    assert error <= bound, f"{init} {dtype} ({out}, {inp}) r={r}: max |W_res + s B A - W| {error:.3g} > bound {bound:.3g}"


def test_residual_plus_update_over_shapes_and_dtypes():
    """PiSSA, OLoRA and randomized PiSSA on wide, tall and square weights, r below and at full rank, in
    fp64 / fp32 / bf16 / fp16: W_res + s B A = W to the dtype's rounding (the stated shares asserted on the
    drawn examples that ran)."""
    SEEN.clear()
    _residual_plus_update_is_w()
    strategies.assert_shares(SEEN, INIT_AXES)


def test_pissa_niter_spans_the_full_svd_subspace():
    torch.manual_seed(0)
    # a spectrum that decays (as trained weights' do) so the top-r subspace is well separated
    U, _ = torch.linalg.qr(torch.randn(40, 40))
    V, _ = torch.linalg.qr(torch.randn(30, 30))
    S = torch.cat([torch.tensor([9.0, 7.0, 5.0, 4.0]), 0.1 * torch.rand(26)])
    linear = nn.Linear(30, 40)
    with torch.no_grad():
        linear.weight.copy_((U[:, :30] * S) @ V.t())
    W = f64(linear.weight)
    Uf = np.linalg.svd(W)[0][:, :4]
    gaps = {}
    for niter in (0, 2, 4):
        torch.manual_seed(niter)
        layer = LoraLinear.from_linear(linear, r=4, alpha=8, init=f"pissa_niter_{niter}")
        Ub = np.linalg.qr(f64(layer.lora_B))[0]
        gaps[niter] = np.linalg.norm(Ub @ Ub.T - Uf @ Uf.T, 2)  # distance between the two rank-4 projectors
    # fp32's floor is ~2e-7 here; without subspace iterations the sketch is visibly off (the check can fail)
    assert gaps[2] < 1e-5 and gaps[4] < 1e-5, f"subspace distance to the full SVD's by niter: {gaps}"
    assert gaps[0] > 1e-3, f"niter=0 should be a rough sketch: {gaps}"


def _peft_model(init, seed=0, **extra):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    return get_peft_model(InitToy(seed), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"],
                                                        init_lora_weights=init, **extra))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_init_equals_peft_on_the_same_weights(init):
    extra = {"rank_pattern": {"v": 3}, "alpha_pattern": {"v": 5}}
    theirs = _peft_model(init, **extra)
    ours = inject(InitToy(), LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], init_lora_weights=init, **extra))
    for name, layer in lora_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        for ours_t, theirs_t in [(layer.lora_A, peft_layer.lora_A["default"].weight),
                                 (layer.lora_B, peft_layer.lora_B["default"].weight),
                                 (layer.weight, peft_layer.base_layer.weight)]:
            torch.testing.assert_close(ours_t, theirs_t, rtol=0, atol=8 * EPS32 * float(theirs_t.abs().max()))


# ---- conversion to a plain LoRA on the original base ------------------------------------------------------
def _train(model, steps=2, seed=3):
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    for _ in range(steps):
        x = torch.randn(16, 20, generator=gen)
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("init,rslora", [("pissa", False), ("olora", False), ("pissa", True)],
                         ids=["pissa", "olora", "pissa-rslora"])
def test_converted_adapter_on_the_original_base_gives_the_trained_outputs(tmp_path, init, rslora):
    from peft import PeftModel

    patterns = {} if rslora else {"rank_pattern": {"v": 3}, "alpha_pattern": {"v": 5}}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], init_lora_weights=init, use_rslora=rslora,
                        **patterns)
    model = inject(InitToy(), config)
    lorakern.save_adapter(model, str(tmp_path / "init"))  # right after injection, before training
    _train(model)
    x = torch.randn(5, 20, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        trained = model(x)
    lorakern.save_adapter(model, str(tmp_path / "out"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    saved = json.load(open(tmp_path / "out" / "adapter_config.json"))
    assert saved["init_lora_weights"] is True and saved["r"] == 8
    assert saved["lora_alpha"] == pytest.approx(8 * (np.sqrt(2) if rslora else 2))
    if patterns:
        assert saved["rank_pattern"] == {"v": 6} and saved["alpha_pattern"] == {"v": 10}
    fresh = lorakern.load_adapter(InitToy(), str(tmp_path / "out"))
    assert f64(fresh.q.weight).tolist() == f64(InitToy().q.weight).tolist()  # the original base, untouched
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), trained, rtol=1e-5, atol=1e-5)
        peft = PeftModel.from_pretrained(InitToy(), str(tmp_path / "out"))
        torch.testing.assert_close(peft(x), trained, rtol=1e-5, atol=1e-5)
    # the plain (unconverted) adapter reloads too, here and in PEFT: the load re-runs the init on the fresh base
    lorakern.save_adapter(model, str(tmp_path / "plain"))
    assert json.load(open(tmp_path / "plain" / "adapter_config.json"))["init_lora_weights"] == init
    with torch.no_grad():
        torch.testing.assert_close(lorakern.load_adapter(InitToy(), str(tmp_path / "plain"))(x), trained,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(PeftModel.from_pretrained(InitToy(), str(tmp_path / "plain"))(x), trained,
                                   rtol=1e-5, atol=1e-5)


def test_conversion_equals_peft_conversion(tmp_path):
    from safetensors.torch import load_file

    extra = {"rank_pattern": {"v": 3}, "alpha_pattern": {"v": 5}}
    ours = inject(InitToy(), LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], init_lora_weights="pissa", **extra))
    theirs = _peft_model("pissa", **extra)
    lorakern.save_adapter(ours, str(tmp_path / "ours_init"))
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's documented workflow
    theirs.save_pretrained(str(tmp_path / "peft_init"))
    theirs.peft_config["default"].init_lora_weights = "pissa"
    _train(ours)
    with torch.no_grad():  # the same trained adapter in PEFT's model
        for name, layer in lora_layers(ours).items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
        theirs.base_model.model.head.load_state_dict(ours.head.state_dict())
    lorakern.save_adapter(ours, str(tmp_path / "ours"), path_initial_model_for_weight_conversion=str(tmp_path / "ours_init"))
    theirs.save_pretrained(str(tmp_path / "peft"), path_initial_model_for_weight_conversion=str(tmp_path / "peft_init"))
    ours_w = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    theirs_w = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert sorted(ours_w) == sorted(theirs_w)
    for key in ours_w:
        torch.testing.assert_close(ours_w[key], theirs_w[key], rtol=0, atol=1e-6)
    ours_c = json.load(open(tmp_path / "ours" / "adapter_config.json"))
    theirs_c = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights"):
        assert ours_c[field] == theirs_c[field], field


# ---- LoftQ -------------------------------------------------------------------------------------------------
def bnb_loftq(W: torch.Tensor, r: int, s: float, iters: int):
    """LoftQ written over bitsandbytes' CPU quantizer (compress_statistics=False, blocksize 64), decoded by hand
    (code[q] * absmax: its CPU dequantize_4bit is wrong for some 2-D shapes, see shared/formats.md)."""
    import bitsandbytes.functional as F

    code = torch.from_numpy(NF4_CODE.copy())

    def decode(w):
        packed, state = F.quantize_4bit(w.reshape(-1).contiguous(), blocksize=64, quant_type="nf4",
                                        compress_statistics=False)
        q = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], 1).reshape(-1)[:w.numel()].long()
        return (code[q] * state.absmax.repeat_interleave(64)[:w.numel()]).reshape(w.shape)

    target = W
    for i in range(iters):
        deq = decode(target)
        U, S, Vh = torch.linalg.svd(W - deq, full_matrices=False)
        root = torch.sqrt(S[:r] / s)
        A, B = root[:, None] * Vh[:r], U[:, :r] * root
        target = W - s * B @ A
    return deq, A, B


@pytest.mark.parametrize("alpha,iters", [(4, 1), (4, 3), (8, 2)], ids=["s1-iter1", "s1-iter3", "s2-iter2"])
def test_loftq_nf4_base_plus_update_is_closer_to_w(alpha, iters):
    torch.manual_seed(2)
    linear = nn.Linear(64, 24)
    W = linear.weight.detach().clone()
    layer = LoraLinear.from_linear(linear, quantize="nf4", double_quant=False, r=4, alpha=alpha, init="loftq",
                                   loftq_iter=iters)
    s = alpha / 4
    base = layer.nf4.dequantize(torch.float32)
    plain = NF4Storage(quantize_nf4(W, 64, False)).dequantize(torch.float32)
    error = (base + s * layer.lora_B @ layer.lora_A - W).norm().item()
    plain_error = (plain - W).norm().item()
    ratio = error / plain_error
    assert ratio < 0.9, f"LoftQ ({iters} iterations): ||NF4 + sBA - W|| / ||NF4(W) - W|| = {ratio:.3f}, expected < 0.9"
    # the same algorithm written over bitsandbytes' quantizer (PEFT's loftq_init hard-codes a CUDA device)
    deq, A, B = bnb_loftq(W, 4, s, iters)
    torch.testing.assert_close(base, deq, rtol=0, atol=0)
    torch.testing.assert_close(s * layer.lora_B @ layer.lora_A, s * B @ A, rtol=0, atol=1e-5 * float(W.abs().max()))


def test_nf4_pissa_quantizes_the_residual_and_loftq_model_reloads(tmp_path):
    torch.manual_seed(4)
    linear = nn.Linear(64, 32)
    W = linear.weight.detach().clone()
    layer = LoraLinear.from_linear(linear, quantize="nf4", r=4, alpha=4, init="pissa")
    residual = W.double() - torch.from_numpy(truncated_svd(f64(W), 4))
    expected = NF4Storage(quantize_nf4(residual.float())).dequantize(torch.float32)
    assert (layer.nf4.dequantize(torch.float32) - expected).abs().max() <= 1e-5 * float(W.abs().max())
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["q", "v"], quantize="nf4",
                        init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 2})
    model = inject(InitToy(), config)
    x = torch.randn(3, 20)
    with torch.no_grad():
        expected_out = model(x)
    lorakern.save_adapter(model, str(tmp_path))
    assert json.load(open(tmp_path / "adapter_config.json"))["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    with torch.no_grad():  # the load re-runs LoftQ on the fresh base: the same NF4 base the adapter was fitted to
        torch.testing.assert_close(lorakern.load_adapter(InitToy(), str(tmp_path))(x), expected_out, rtol=0, atol=0)


def test_gpt2_conv1d_base_keeps_its_layout():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(5)
    conv = Conv1D(12, 20)  # weight (in, out) = (20, 12)
    W = f64(conv.weight).T
    layer = LoraLinear.from_linear(conv, r=3, alpha=6, init="pissa")
    assert tuple(layer.weight.shape) == (20, 12) and layer.fan_in_fan_out
    check_close(f64(layer.weight).T + 2.0 * f64(layer.lora_B) @ f64(layer.lora_A), W, np.abs(W).max(),
                16 * EPS32 * 20, "Conv1D: W_res + s B A vs W")
    check_close(2.0 * f64(layer.lora_B) @ f64(layer.lora_A), truncated_svd(W, 3), np.abs(W).max(), 16 * EPS32 * 20,
                "Conv1D: s B A vs truncated SVD")
