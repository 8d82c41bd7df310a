"""QLoRA against its peer, PEFT + bitsandbytes, on the CPU.

- The same weights quantized by bitsandbytes (``bnb.nn.Linear4bit``, NF4, blocksize 64, double quantization
  on and off) and by lorakern: the packed bytes and absmaxes are equal.
- A PEFT LoRA on ``bnb.nn.Linear4bit`` and lorakern's 4-bit LoRA layer: outputs and every gradient (x, A, B)
  within the compute dtype's bound of each other and of the float64 reference ``lorakern.core``, whose
  NF4 decode is done by ``lorakern.core`` from the bytes: fp32 and bf16 compute, and fp32 LoRA parameters
  on a bf16 base (the usual set-up).
- A tiny RoBERTa QLoRA training run: the same losses step by step as PEFT + bitsandbytes.

bitsandbytes 0.50.2's native CPU decoder (``dequantize_4bit`` on an AVX-512 machine) is wrong when the
blocks do not start at the weight's rows (in_features not a multiple of the blocksize): its kernel decodes
row by row. Every bitsandbytes layer here has in_features a multiple of 64, where it is right; lorakern's
decode of any shape is tested against bitsandbytes' pure-PyTorch backend in test_nf4_core.py.
"""
import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lorakern import LoraConfig, LoraLinear, inject, lora_layers
from lorakern.core import lora as core_lora
from lorakern.core import nf4 as core_nf4
from lorakern.testing import bound, magnitudes, rel_error

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes as bnb
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

BLOCKSIZE = 64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices gain nothing from intra-op threads, and on shared cores their spin-waits cost ~10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.bfloat16: torch.finfo(torch.bfloat16).eps}
# With a bf16 compute dtype the fp32 operands are rounded to it on the way in (x and dy for the base GEMMs;
# x, dy, A and B for lorakern's LoRA terms): each rounded factor of a product perturbs it by at most eps/2
# of its magnitude, three factors at most per term.
CAST_ULPS = 1.5


def bnb_linear4bit(linear: nn.Linear, compute_dtype: torch.dtype, double_quant: bool) -> nn.Module:
    """bitsandbytes' Linear4bit holding ``linear``'s weight (in its own dtype) in NF4 at BLOCKSIZE."""
    module = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                               compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=double_quant,
                               device="meta")
    module.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                      blocksize=BLOCKSIZE, compress_statistics=double_quant)
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return module.to("cpu")  # Params4bit quantizes on its move to a device


def core_state(module: nn.Module) -> core_nf4.NF4State:
    """bitsandbytes' quantization state of ``module`` as lorakern.core's NF4State (decoded by core alone)."""
    qs = module.weight.quant_state
    state = core_nf4.NF4State(packed=module.weight.data.numpy(), shape=tuple(qs.shape), dtype="float32",
                              blocksize=qs.blocksize)
    if qs.nested:
        state.absmax_codes, state.nested_absmax = qs.absmax.numpy(), qs.state2.absmax.numpy()
        state.nested_map, state.offset = qs.state2.code.numpy(), np.float32(qs.offset.item())
    else:
        state.absmax = qs.absmax.numpy()
    return state


def storage_state(nf4) -> core_nf4.NF4State:
    """lorakern's NF4Storage as lorakern.core's NF4State: the bytes and statistics, nothing decoded."""
    state = core_nf4.NF4State(packed=nf4.packed.numpy(), shape=nf4.shape, dtype="float32", blocksize=nf4.blocksize)
    if nf4.double_quant:
        state.absmax_codes, state.nested_absmax = nf4.absmax.numpy(), nf4.nested_absmax.numpy()
        state.nested_map, state.offset = nf4.nested_map.numpy(), np.float32(nf4.offset.item())
    else:
        state.absmax = nf4.absmax.numpy()
    return state


def assert_same_quantization(ours: LoraLinear, theirs: nn.Module, weight: torch.Tensor) -> None:
    """Packed bytes and absmaxes equal. With double quantization bitsandbytes' native 8-bit quantizer
    occasionally picks the second-nearest code of an absmax (its pure-PyTorch backend does not, and
    lorakern matches that one bit for bit: test_nf4_core.py); every such block is checked to be one where
    lorakern's code is the nearer one."""
    qs = theirs.weight.quant_state
    assert torch.equal(ours.nf4.packed, theirs.weight.data)
    if not qs.nested:
        assert torch.equal(ours.nf4.absmax, qs.absmax)
        return
    assert torch.equal(ours.nf4.nested_absmax, qs.state2.absmax) and torch.equal(ours.nf4.offset, qs.offset)
    differ = (ours.nf4.absmax != qs.absmax).nonzero().flatten()
    assert differ.numel() <= max(1, qs.absmax.numel() // 50), f"{differ.numel()} of {qs.absmax.numel()} codes differ"
    absmax = torch.from_numpy(core_nf4.nf4_quantize(weight.float().numpy(), BLOCKSIZE, double_quant=False).absmax)
    nested = qs.state2.absmax.repeat_interleave(core_nf4.NESTED_BLOCKSIZE)[: absmax.numel()]
    target = ((absmax - qs.offset) / nested)[differ]
    code = qs.state2.code
    ours_gap = (code[ours.nf4.absmax[differ].long()] - target).abs()
    theirs_gap = (code[qs.absmax[differ].long()] - target).abs()
    assert bool((ours_gap < theirs_gap).all()), (ours_gap, theirs_gap)


class Holder(nn.Module):
    """A one-layer model for PEFT; ``is_loaded_in_4bit`` is what makes PEFT pick its bitsandbytes LoRA layer."""

    is_loaded_in_4bit = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(x)


def peft_on(base: nn.Module, ours: LoraLinear):
    """PEFT's LoRA on ``base`` with ``ours``'s rank, alpha and (copied) A and B."""
    model = get_peft_model(Holder(base), PeftLoraConfig(r=ours.r, lora_alpha=ours.alpha, lora_dropout=0.0,
                                                        target_modules=["base"]))
    layer = model.base_model.model.base
    assert isinstance(layer, PeftLinear4bit) and layer.scaling["default"] == ours.alpha / ours.r
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
    return model.train(), layer  # train(): bitsandbytes repacks its weight for inference in eval mode


def run(module: nn.Module, x: torch.Tensor, grad_y: torch.Tensor, params: list) -> dict:
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    grads = torch.autograd.grad(y, [x, *params], grad_y.to(y.dtype))
    return dict(zip(["y", "dx", "dA", "dB"], [y.detach(), *grads]))


def check(name: str, actual: torch.Tensor, expected: np.ndarray, magnitude: np.ndarray, limit: float, dtype) -> None:
    error, where = rel_error(actual, expected, magnitude, dtype)
    assert error <= limit, f"{name}: {error:.3g} > bound {limit:.3g} ({where})"
    # The check can fail: the same tensor off by 4x the bound (relative to its terms) at one element.
    worse = actual.detach().to(torch.float64).clone()
    worse.view(-1)[0] += 4 * limit * (float(magnitude.reshape(-1)[0]) + torch.finfo(dtype).tiny)
    assert rel_error(worse, expected, magnitude, dtype)[0] > limit, name


SETUPS = {  # name: (base weight dtype, compute dtype, input dtype); LoRA parameters are fp32 in all
    "fp32": (torch.float32, torch.float32, torch.float32),
    "bf16-compute": (torch.float32, torch.bfloat16, torch.float32),
    "bf16-base": (torch.bfloat16, torch.bfloat16, torch.bfloat16),  # the usual QLoRA set-up
}


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("lead,K,N,r", [((3, 7), 128, 80, 8), ((33,), 192, 64, 5)], ids=["3x7x128-80-r8", "33x192-64-r5"])
def test_lora_on_4bit_base_matches_peft_bitsandbytes_and_core(lead, K, N, r, setup, double_quant):
    base_dtype, compute, x_dtype = SETUPS[setup]
    gen = torch.Generator().manual_seed(K + r)
    linear = nn.Linear(K, N).to(base_dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(N, K, generator=gen) / K ** 0.5)
        linear.bias.copy_(torch.randn(N, generator=gen))
    ours = LoraLinear.from_linear(linear, quantize="nf4", blocksize=BLOCKSIZE, double_quant=double_quant,
                                  compute_dtype=compute, lora_dtype=torch.float32, r=r, alpha=2 * r)
    with torch.no_grad():
        ours.lora_B.copy_(torch.randn(N, r, generator=gen) / r ** 0.5)
    theirs = bnb_linear4bit(linear, compute, double_quant)
    assert_same_quantization(ours, theirs, linear.weight.detach())
    _, peft_layer = peft_on(theirs, ours)
    # lorakern's layer on bitsandbytes' own state (as transformers + bitsandbytes would hand it over)
    ours_on_bnb = copy.deepcopy(ours)
    ours_on_bnb.load_state_dict({**ours.state_dict(), **theirs.state_dict()})
    assert torch.equal(ours_on_bnb.nf4.absmax, theirs.weight.quant_state.absmax)

    x = torch.randn(*lead, K, generator=gen).to(x_dtype)
    grad_y = torch.randn(*lead, N, generator=gen, dtype=torch.float64)
    lora = lambda layer: [layer.lora_A, layer.lora_B]
    results = {"lorakern": run(ours, x, grad_y, lora(ours)),
               "lorakern on bitsandbytes' state": run(ours_on_bnb, x, grad_y, lora(ours_on_bnb)),
               "PEFT + bitsandbytes": run(peft_layer, x, grad_y, [peft_layer.lora_A["default"].weight,
                                                                  peft_layer.lora_B["default"].weight])}
    for result in results.values():
        assert result["y"].dtype == x_dtype and result["dx"].dtype == x_dtype
        assert result["dA"].dtype == result["dB"].dtype == torch.float32

    # The reference: W decoded by lorakern.core from each implementation's bytes, rounded once to the
    # compute dtype (as both decoders do); x, A, B, b as given; everything else in float64.
    f64 = lambda t: t.detach().to(torch.float64).numpy()
    A, B, b, xs, dy = f64(ours.lora_A), f64(ours.lora_B), f64(linear.bias), f64(x), f64(grad_y.to(x_dtype))
    s = core_lora.scaling(r, 2 * r)
    length = max(int(np.prod(lead)), K, N)
    limit = bound(compute, length) + (CAST_ULPS * EPS[compute] if compute != torch.float32 else 0.0)
    for name, result in results.items():
        state = storage_state(ours.nf4) if name == "lorakern" else core_state(theirs)
        W = f64(torch.from_numpy(core_nf4.nf4_dequantize(state)).to(compute))
        expected = {"y": core_lora.forward(xs, W, A, B, b, s), **core_lora.backward(xs, W, A, B, dy, s)}
        scale = magnitudes(xs, W, A, B, b, dy, s, None, torch.finfo(compute).tiny)
        for key in ("y", "dx", "dA", "dB"):
            check(f"{name} {key}", result[key], expected[key], scale[key], limit, compute)
    # lorakern and PEFT on the very same bytes (``scale`` is theirs): each within the bound of the reference,
    # so within twice the bound of each other, element by element.
    same = results["lorakern on bitsandbytes' state"]
    for key in ("y", "dx", "dA", "dB"):
        check(f"lorakern vs PEFT {key}", same[key], f64(results["PEFT + bitsandbytes"][key]), scale[key], 2 * limit,
              compute)


QLORA_TARGETS = ["query", "key", "value", "intermediate.dense", "output.dense"]


def tiny_roberta(seed: int = 0):
    """A RoBERTa classifier from a config (random init, dropout 0); every Linear's in_features is a
    multiple of 64, where bitsandbytes' native CPU decoder is right."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=128, max_position_embeddings=40, type_vocab_size=1, num_labels=2,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return RobertaForSequenceClassification(config)


def bnb_quantized(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """Every Linear of the encoder replaced by bitsandbytes' Linear4bit (NF4, double quantization), as
    transformers' load_in_4bit does; the classification head stays in full precision."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.startswith("roberta.encoder."):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, bnb_linear4bit(module, compute_dtype, double_quant=True))
    model.is_loaded_in_4bit = True
    return model


def test_roberta_qlora_training_run_matches_peft_bitsandbytes():
    """Same base, same quantized bytes, same initial LoRA weights, same batches, AdamW: the same loss at
    every step (fp32 compute; the two differ only in the order of fp32 roundings)."""
    base = tiny_roberta()
    ours = inject(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=QLORA_TARGETS, modules_to_save=["classifier"],
        quantize="nf4", quantize_skip=["classifier"], quantize_blocksize=BLOCKSIZE, compute_dtype="float32"))
    theirs = get_peft_model(bnb_quantized(copy.deepcopy(base), torch.float32), PeftLoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=QLORA_TARGETS, modules_to_save=["classifier"]))
    ours_layers = lora_layers(ours)
    peft_layers = {n[len("base_model.model."):]: m for n, m in theirs.named_modules() if isinstance(m, PeftLinear4bit)}
    assert set(ours_layers) == set(peft_layers) and len(peft_layers) == 12
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, layer in ours_layers.items():
            nn.init.normal_(layer.lora_B, std=0.02, generator=gen)
            assert torch.equal(layer.nf4.packed, peft_layers[name].base_layer.weight.data)
            # bitsandbytes' own state, so that both compute with the very same 4-bit weights
            layer.load_state_dict({**layer.state_dict(), **peft_layers[name].base_layer.state_dict()})
            peft_layers[name].lora_A["default"].weight.copy_(layer.lora_A)
            peft_layers[name].lora_B["default"].weight.copy_(layer.lora_B)
    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable(ours)) == sum(p.numel() for p in trainable(theirs))

    input_ids = torch.randint(3, 64, (8, 12), generator=gen)
    input_ids[:, 0] = 0
    mask = torch.ones_like(input_ids)
    mask[1, 9:] = 0
    labels = torch.randint(0, 2, (8,), generator=gen)
    loss_of = lambda model: nn.functional.cross_entropy(model(input_ids=input_ids, attention_mask=mask).logits, labels)
    with torch.no_grad():
        first = loss_of(theirs).item()
        for layer in ours_layers.values():  # a wrong scaling is seen at once, far beyond the tolerance below
            layer.scaling *= 1.5
        assert abs(loss_of(ours).item() / first - 1) > 1e-4
        for layer in ours_layers.values():
            layer.scaling /= 1.5
    losses = {}
    for name, model in (("lorakern", ours), ("PEFT + bitsandbytes", theirs)):
        model.train()
        optimizer = torch.optim.AdamW(trainable(model), lr=2e-3)
        losses[name] = []
        for _ in range(8):
            optimizer.zero_grad()
            loss = loss_of(model)
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    ours_losses, peft_losses = np.array(losses["lorakern"]), np.array(losses["PEFT + bitsandbytes"])
    assert ours_losses[-1] < ours_losses[0]
    # fp32 roundings in another order, grown through 8 Adam steps (measured: 1e-7 relative): far below
    # what a wrong scaling does (checked above: > 1e-4 at the first step).
    np.testing.assert_allclose(ours_losses, peft_losses, rtol=1e-5, atol=0)
    for name, layer in ours_layers.items():
        torch.testing.assert_close(layer.lora_B, peft_layers[name].lora_B["default"].weight, rtol=1e-4, atol=1e-6)
