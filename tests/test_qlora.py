"""QLoRA: NF4 base weights in torch, against lorakern.core and bitsandbytes, and a training run."""
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from conftest import tiny_roberta_classifier
from lorakern import LoraConfig, LoraLinear, inject, lora_layers, merge_and_unload
from lorakern import quant
from lorakern.core import nf4
from lorakern.testing import assert_matches_reference, compare_layer

import strategies


def bnb_module():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes

    return bitsandbytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
def test_torch_quantizer_is_bit_identical_to_core(dtype, double_quant):
    gen = torch.Generator().manual_seed(0)
    for shape, blocksize in [((96, 130), 64), ((7, 33), 32), ((300, 257), 128), ((5,), 4096)]:
        w = torch.randn(shape, generator=gen).to(dtype)
        w.view(-1)[:3] = torch.tensor([0.0, float(nf4.NF4_MIDPOINTS[7]), -1.0]).to(dtype)
        state = quant.quantize_nf4(w, blocksize, double_quant)
        ref = nf4.nf4_quantize(w.float().numpy(), blocksize, double_quant,
                               offset=float(state["offset"]) if double_quant else None)
        assert np.array_equal(state["packed"].numpy(), ref.packed)
        if double_quant:
            assert np.array_equal(state["absmax"].numpy(), ref.absmax_codes)
            assert np.array_equal(state["nested_absmax"].numpy(), ref.nested_absmax)
        else:
            assert np.array_equal(state["absmax"].numpy(), ref.absmax)
        decoded = quant.NF4Storage(state).dequantize(torch.float32)
        assert np.array_equal(decoded.numpy(), nf4.nf4_dequantize(ref))


NF4_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NF4_SEEN = []


def torch_nf4_layer(case):
    """A LoRA layer on an NF4 base (torch path) quantized from a random nn.Linear, B and bias random."""
    gen = torch.Generator().manual_seed(case.seed)
    linear = nn.Linear(case.K, case.N, bias=case.bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = LoraLinear.from_linear(linear, quantize="nf4", compute_dtype=case.dtype, lora_dtype=case.dtype, r=case.r,
                                       dropout=case.dropout, blocksize=case.extra["blocksize"],
                                       double_quant=case.extra["double_quant"])
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) / case.r ** 0.5)
        if case.bias:
            layer.bias.copy_(torch.randn(case.N, generator=gen))
    if case.bias:
        layer.bias.requires_grad_(True)
    layer.backend = "torch"
    return layer.train()


@given(case=strategies.lora_cases(NF4_DTYPES, blocksize=st.sampled_from([32, 64, 256]), double_quant=st.booleans(),
                                  chunk=st.sampled_from([None, 37])))
def _torch_nf4_matches_reference(case):
    NF4_SEEN.append(case)
    layer = torch_nf4_layer(case)
    old_chunk = quant.CHUNK_ELEMENTS
    quant.CHUNK_ELEMENTS = case.extra["chunk"] or old_chunk
    try:
        comparison = compare_layer(layer, strategies.make_input(case), seed=case.seed)
    finally:
        quant.CHUNK_ELEMENTS = old_chunk
    assert_matches_reference(comparison)


def test_lora_on_nf4_base_matches_reference():
    """Output and every gradient against lorakern.core on the weight core decodes from the packed bytes
    (chunked decoding too): every tile class, layout, rank class, dtype, blocksize and double quantization."""
    NF4_SEEN.clear()
    _torch_nf4_matches_reference()
    strategies.assert_shares(NF4_SEEN, strategies.axes_for(
        NF4_DTYPES, blocksize=[f"blocksize={b}" for b in (32, 64, 256)],
        double_quant=["double_quant=False", "double_quant=True"], chunk=["chunk=None", "chunk=37"]))


@pytest.mark.parametrize("index", range(len(strategies.EXPLICIT)), ids=strategies.explicit_id)
def test_lora_on_nf4_base_explicit_tile_classes(index):
    case = strategies.explicit_case(index, NF4_DTYPES[index % 3], blocksize=64, double_quant=index % 2 == 0)
    assert_matches_reference(compare_layer(torch_nf4_layer(case), strategies.make_input(case), seed=index))


def test_buffers_move_with_to_and_ignore_dtype_casts():
    layer = LoraLinear.from_linear(nn.Linear(64, 32), quantize="nf4", r=4)
    before = {k: v.clone() for k, v in layer.state_dict().items() if k.startswith("weight")}
    layer.to(torch.float16)
    after = layer.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert layer.lora_A.dtype == torch.float16
    layer.to("meta")
    assert layer.nf4.packed.is_meta and layer.nf4.absmax.is_meta


# fp32 words whose bytes read as signalling / quiet NaNs, -NaN, inf and subnormals in fp32, and as such in
# their bf16 / fp16 halves: any value conversion of the storage (a cast, a NaN-canonicalising copy) changes them.
SPECIAL_WORDS = [0x7F817F81, 0xFF80FF81, 0x7FC07C01, 0x7F800001, 0x00010001, 0x7C017F80]


def nf4_pair(quant_storage, shape=(63, 37), blocksize=64, double_quant=True, seed=0):
    """The same LoRA layer on an NF4 base twice, uint8 storage and ``quant_storage``, with packed bytes
    that are random (every byte is a valid pair of codes) and led by SPECIAL_WORDS."""
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(shape[1], shape[0])
    layers = [LoraLinear.from_linear(linear, quantize="nf4", blocksize=blocksize, double_quant=double_quant, r=3,
                                     quant_storage=storage) for storage in ("uint8", quant_storage)]
    special = torch.tensor(SPECIAL_WORDS, dtype=torch.int64).to(torch.int32).view(torch.uint8)
    codes = torch.randint(0, 256, (layers[0].nf4.packed.numel(),), generator=gen, dtype=torch.uint8)
    codes[: special.numel()] = special[: codes.numel()]
    lora_B = torch.randn(layers[0].lora_B.shape, generator=gen)
    for layer in layers:
        layer.nf4.packed.copy_(codes.reshape(-1, 1))  # through the uint8 view: writes the storage's bytes
        with torch.no_grad():
            layer.lora_B.copy_(lora_B)
            layer.lora_A.copy_(layers[0].lora_A)
        layer.bias.requires_grad_(True)
    return layers[0], layers[1], codes.reshape(-1, 1)


def _output_and_grads(layer, x):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.pow(2).sum().backward()
    grads = [x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.bias.grad]
    layer.zero_grad()
    return y.detach(), grads


@pytest.mark.parametrize("quant_storage", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape,blocksize,double_quant", [((63, 37), 64, True), ((5, 13), 32, False)],
                         ids=["63x37-double", "5x13-plain"])
def test_float_quant_storage_holds_the_same_bytes(quant_storage, shape, blocksize, double_quant):
    """A float quant_storage is a frozen Parameter holding the uint8 bytes bit for bit: outputs and every
    gradient are identical, the state dict is the uint8 one, and dtype casts leave the bytes alone."""
    plain, stored, codes = nf4_pair(quant_storage, shape, blocksize, double_quant)
    dtype = getattr(torch, quant_storage)
    param = stored.nf4.packed_storage
    itemsize = dtype.itemsize
    assert isinstance(param, nn.Parameter) and not param.requires_grad and param.dtype == dtype
    assert param.shape == (-(-codes.numel() // itemsize), 1)
    assert "nf4.packed_storage" in dict(stored.named_parameters())
    assert torch.equal(stored.nf4.packed, codes) and stored.nf4.packed.dtype == torch.uint8
    assert torch.isnan(param).any() or quant_storage == "float16" and torch.isinf(param).any()

    x = torch.randn(4, shape[1], generator=torch.Generator().manual_seed(1))
    expected, expected_grads = _output_and_grads(plain, x)
    got, grads = _output_and_grads(stored, x)
    assert torch.equal(got, expected)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads))

    state = stored.state_dict()
    assert state["weight"].dtype == torch.uint8 and torch.equal(state["weight"], codes)
    assert set(state) == set(plain.state_dict()) and all(torch.equal(v, plain.state_dict()[k]) for k, v in state.items())
    fresh = LoraLinear.from_linear(nn.Linear(shape[1], shape[0]), quantize="nf4", blocksize=blocksize,
                                   double_quant=double_quant, r=3, quant_storage=quant_storage)
    fresh.load_state_dict(state)
    assert fresh.nf4.packed_storage.dtype == dtype and torch.equal(fresh.nf4.packed, codes)
    assert torch.equal(fresh(x), expected)

    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double(), lambda m: m.float()):
        cast(stored)
        assert stored.nf4.packed_storage.dtype == dtype and torch.equal(stored.nf4.packed, codes)
    assert stored.lora_A.dtype == torch.float32
    stored.to("meta")
    assert stored.nf4.packed_storage.is_meta and stored.nf4.packed_storage.dtype == dtype


def test_float_quant_storage_reads_bitsandbytes_float_storage():
    """bitsandbytes' own quant_storage=torch.float32 state dict loads bit for bit; ours writes the bytes as uint8."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    bnb = bnb_module()
    theirs = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4", quant_storage=torch.float32)
    theirs.load_state_dict(linear.state_dict())
    state = theirs.to("cpu").state_dict()
    assert state["weight"].dtype == torch.float32
    ours = quant.LinearNF4.from_linear(nn.Linear(128, 64), quant_storage="float32")
    ours.load_state_dict(state)
    assert torch.equal(ours.nf4.packed_storage.view(torch.int32), state["weight"].view(torch.int32))  # NaNs too
    assert torch.equal(ours.state_dict()["weight"], state["weight"].reshape(-1).view(torch.uint8).reshape(-1, 1))
    x = torch.randn(3, 128)
    plain = quant.LinearNF4.from_linear(nn.Linear(128, 64))
    plain.load_state_dict(state)
    assert torch.equal(ours(x), plain(x))


def test_float_quant_storage_through_inject_merge_and_requantize(batch):
    """LoraConfig(quant_storage=...) reaches every NF4 layer; merging gives what the uint8 model gives,
    and requantizing keeps the storage."""
    import copy

    models = {}
    for storage in ("uint8", "bfloat16"):
        model = inject(tiny_roberta_classifier(), LoraConfig(**QLORA, quant_storage=storage)).eval()
        for i, layer in enumerate(lora_layers(model).values()):
            nn.init.normal_(layer.lora_B, std=0.05, generator=torch.Generator().manual_seed(i))
        models[storage] = model
    storages = [m for m in models["bfloat16"].modules() if isinstance(m, quant.NF4Storage)]
    assert len(storages) == sum(isinstance(m, quant.NF4Storage) for m in models["uint8"].modules()) >= 12
    assert all(s.quant_storage == "bfloat16" and s.packed_storage.dtype == torch.bfloat16 for s in storages)
    assert quant.quantized_bytes_per_weight(models["bfloat16"]) == quant.quantized_bytes_per_weight(models["uint8"])
    assert torch.equal(models["bfloat16"](**batch).logits, models["uint8"](**batch).logits)
    merged = {k: merge_and_unload(copy.deepcopy(m))(**batch).logits for k, m in models.items()}
    assert torch.equal(merged["bfloat16"], merged["uint8"])
    with pytest.warns(UserWarning, match="requantizing 12 merged layers"):
        requantized = merge_and_unload(models["bfloat16"], requantize=True)
    query = requantized.roberta.encoder.layer[0].attention.self.query
    assert isinstance(query, quant.LinearNF4) and query.nf4.quant_storage == "bfloat16"


def test_a_cast_float_quant_storage_is_refused():
    """FSDP2's MixedPrecisionPolicy(param_dtype=...) would cast the storage by value on all-gather."""
    _, layer, _ = nf4_pair("float32")
    layer.nf4.packed_storage = nn.Parameter(layer.nf4.packed_storage.to(torch.bfloat16), requires_grad=False)
    with pytest.raises(ValueError, match=r"cast from torch.float32 to torch.bfloat16 .*quant_storage='bfloat16'"):
        layer(torch.randn(2, 37))


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
def test_bytes_per_weight(double_quant):
    layer = LoraLinear.from_linear(nn.Linear(1024, 1024), quantize="nf4", double_quant=double_quant, r=8)
    expected = 0.516 if double_quant else 0.5625
    assert quant.quantized_bytes_per_weight(layer) == pytest.approx(expected, abs=0.0005)
    stored = sum(v.numel() * v.element_size() for k, v in layer.state_dict().items()
                 if k in ("weight", "weight.absmax", "weight.nested_absmax"))
    assert stored / (1024 * 1024) == pytest.approx(expected, abs=0.0005)


def bnb_linear4bit(linear, blocksize=64, quant_type="nf4", double_quant=True):
    bnb = bnb_module()
    module = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                               compute_dtype=torch.float32, quant_type=quant_type, compress_statistics=double_quant)
    module.load_state_dict(linear.state_dict())
    module.weight.blocksize = blocksize  # Params4bit quantizes on the move to a device, at this blocksize
    return module.to("cpu")


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
def test_bitsandbytes_state_dict_loads_and_is_written_back(double_quant):
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    theirs = bnb_linear4bit(linear, double_quant=double_quant)
    state = theirs.state_dict()
    ours = quant.LinearNF4.from_linear(nn.Linear(128, 64), double_quant=double_quant)
    ours.load_state_dict(state)
    x = torch.randn(5, 128)
    packed = theirs.weight.data.numpy()
    qs = theirs.weight.quant_state
    absmax = qs.absmax.float() if not double_quant else \
        qs.state2.code[qs.absmax.long()] * qs.state2.absmax.repeat_interleave(256)[: qs.absmax.numel()] + qs.offset
    by_hand = torch.from_numpy(nf4.NF4_CODE)[torch.from_numpy(nf4.unpack(packed, 64 * 128).astype(np.int64))]
    by_hand = (by_hand * absmax.repeat_interleave(64)).reshape(64, 128)
    assert torch.equal(ours.nf4.dequantize(torch.float32), by_hand)
    torch.testing.assert_close(ours(x), x @ by_hand.t() + linear.bias)
    written = ours.state_dict()
    assert set(written) == set(state) and all(torch.equal(written[k], state[k]) for k in state)
    # ... and bitsandbytes loads what lorakern wrote the way transformers does (Params4bit.from_prequantized).
    bnb = bnb_module()
    back = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4")
    stats = {k[len("weight."):]: v for k, v in written.items() if k.startswith("weight.")}
    back.weight = bnb.nn.Params4bit.from_prequantized(written["weight"], stats, device="cpu", module=back)
    back.bias = nn.Parameter(written["bias"])
    torch.testing.assert_close(back(x), ours(x))


def test_lora_layer_state_dict_has_bitsandbytes_keys():
    layer = LoraLinear.from_linear(nn.Linear(64, 32), quantize="nf4", r=2)
    assert set(layer.state_dict()) == {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4",
                                       "bias", "adapters.default.lora_A", "adapters.default.lora_B"}


def test_fp4_or_other_blocksize_state_is_refused():
    linear = nn.Linear(128, 64)
    fp4 = bnb_linear4bit(linear, quant_type="fp4").state_dict()
    ours = quant.LinearNF4.from_linear(nn.Linear(128, 64))
    with pytest.raises(RuntimeError, match="found quant_type 'fp4' where NF4 was asked for"):
        ours.load_state_dict(fp4)
    other = bnb_linear4bit(linear, blocksize=128).state_dict()
    with pytest.raises(RuntimeError, match=r"found blocksize 128 and shape \(64, 128\), the layer holds blocksize 64"):
        ours.load_state_dict(other)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda: quant.quantize_nf4(torch.ones(64), blocksize=100), ValueError, "blocksize 100 is not allowed"),
        (lambda: quant.quantize_nf4(torch.ones(64, dtype=torch.int32)), TypeError, "floating-point weights, got"),
        (lambda: LoraLinear.from_linear(nn.Linear(4, 4), quantize="fp4"), ValueError, "quantize='fp4' is not a known"),
        (lambda: LoraConfig(target_modules=["q"], quantize="int8"), ValueError, "quantize='int8' is not a known quant"),
        (lambda: LoraConfig(target_modules=["q"], quantize="nf4", quantize_blocksize=48), ValueError,
         "quantize_blocksize=48 is not allowed"),
        (lambda: LoraLinear.from_linear(nn.Linear(4, 4), blocksize=64), ValueError, "applies to a quantized base only"),
        (lambda: LoraConfig(target_modules=["q"], quantize="nf4", quant_storage="int4"), ValueError,
         r"quant_storage='int4' is not supported; use 'uint8' .* or 'bfloat16', 'float16', 'float32'"),
        (lambda: LoraConfig(target_modules=["q"], quant_storage="bfloat16"), ValueError,
         "quant_storage='bfloat16' applies to quantized base weights only; pass quantize='nf4'"),
        (lambda: LoraLinear.from_linear(nn.Linear(4, 4), quantize="nf4", quant_storage=torch.int8), ValueError,
         "quant_storage=torch.int8 is not supported"),
        (lambda: LoraLinear.from_linear(nn.Linear(4, 4), quant_storage="float32"), ValueError,
         "quant_storage= applies to a quantized base only"),
    ],
    ids=["blocksize", "non-float", "layer-type", "config-type", "config-blocksize", "blocksize-without-quantize",
         "config-storage", "config-storage-without-quantize", "layer-storage", "layer-storage-without-quantize"],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


def _weight_with(values: dict, shape=(6, 70), dtype=torch.float32) -> torch.Tensor:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    for index, value in values.items():
        w[index] = value
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_non_finite_weights_are_refused_naming_count_and_first_index(dtype):
    """NaN or inf would make a block's absmax NaN: the torch codec, core and quantize="nf4" refuse them."""
    w = _weight_with({(4, 1): float("inf"), (2, 5): float("nan"), (5, 69): float("-inf")}, dtype=dtype)
    message = r"shape \(6, 70\) holding NaN or inf: 3 non-finite elements, the first at index \(2, 5\) \(nan\)"
    with pytest.raises(ValueError, match=message):
        quant.quantize_nf4(w)
    with pytest.raises(ValueError, match=message):
        nf4.nf4_quantize(w.float().numpy())
    linear = nn.Linear(70, 6)
    with torch.no_grad():
        linear.weight.copy_(w.float())
    with pytest.raises(ValueError, match=message):
        LoraLinear.from_linear(linear, quantize="nf4", r=2)
    one = _weight_with({(0, 3): float("-inf")}, dtype=dtype)
    with pytest.raises(ValueError, match=r"1 non-finite element, the first at index \(0, 3\) \(-inf\)"):
        quant.quantize_nf4(one)
    with pytest.raises(ValueError, match=r"1 non-finite element, the first at index \(0, 3\) \(-inf\)"):
        nf4.nf4_quantize(one.float().numpy())


def test_4bit_layer_refuses_in_place_merge():
    layer = LoraLinear.from_linear(nn.Linear(8, 8), quantize="nf4", r=2)
    with pytest.raises(ValueError, match="cannot absorb the update exactly: merge\\(requantize=True\\)"):
        layer.merge()


QLORA = dict(r=4, alpha=8, target_modules=["query", "key", "value", "intermediate.dense", "output.dense"],
             bias="all", modules_to_save=["LayerNorm", "classifier"], quantize="nf4", quantize_skip=["classifier"])


def test_inject_quantizes_frozen_linears_but_the_head():
    model = inject(tiny_roberta_classifier(), LoraConfig(**QLORA))
    layers = lora_layers(model)
    assert len(layers) == 2 * 6 and all(l.is_quantized for l in layers.values())
    assert type(model.classifier.dense) is nn.Linear and type(model.classifier.out_proj) is nn.Linear
    assert model.roberta.encoder.layer[0].attention.output.dense.is_quantized


def test_qlora_training_run(batch):
    torch.manual_seed(0)
    model = inject(tiny_roberta_classifier(num_labels=2), LoraConfig(**QLORA)).train()
    packed = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("weight") and v.dtype == torch.uint8}
    assert packed
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    labels = torch.tensor([0, 1, 1])
    bnb = bnb_module()
    losses = []
    for optimizer in (torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3),
                      bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=3e-3)):
        for _ in range(12):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(**batch).logits, labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < losses[-12], losses
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in packed.items()), "the packed NF4 weights changed"
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    # exactly the parameters the config makes trainable: every LoRA A and B, every bias (bias="all"), the
    # LayerNorms' and the classifier's trainable copies (modules_to_save; their originals stay frozen), and
    # each of them moved
    expected = {n for n, p in model.named_parameters() if "original_module" not in n and (
                "lora_" in n or n.endswith(".bias") or "LayerNorm" in n or n.startswith("classifier."))}
    assert set(trainable) == expected, sorted(set(trainable) ^ expected)
    unchanged = [n for n, p in model.named_parameters() if n in trainable and torch.equal(p, trainable[n])]
    assert not unchanged, f"trainable parameters that did not move: {unchanged}"


def test_merge_and_unload_gives_full_precision_and_requantize_reports(batch):
    model = inject(tiny_roberta_classifier(), LoraConfig(**QLORA)).eval()
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B, std=0.05)
    expected = model(**batch).logits.detach()
    merged = merge_and_unload(model)
    assert not lora_layers(merged)
    query = merged.roberta.encoder.layer[0].attention.self.query
    assert type(query) is nn.Linear and query.weight.dtype == torch.float32
    torch.testing.assert_close(merged(**batch).logits.detach(), expected, rtol=1e-4, atol=1e-4)

    model = inject(tiny_roberta_classifier(), LoraConfig(**QLORA)).eval()
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B, std=0.05)
    with pytest.warns(UserWarning, match=r"requantizing 12 merged layers to NF4 changed their weights: worst"):
        requantized = merge_and_unload(model, requantize=True)
    assert isinstance(requantized.roberta.encoder.layer[0].attention.self.query, quant.LinearNF4)
    errors = requantized.requantize_errors
    assert len(errors) == 12 and all(0 < e["max_abs"] and 0 < e["max_rel"] < 0.2 for e in errors.values())


def test_qlora_benchmark_quick_mode_runs(tmp_path):
    """The QLoRA benchmark end to end on tiny shapes (no timing assertions: ratios live in the benchmark)."""
    import json
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "bench_qlora.py")
    done = subprocess.run([sys.executable, script, "--quick", "--device", "cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "qlora.json").read_text())["rows"]
    references = {r["reference"] for r in rows}
    assert {"dequantize + matmul", "bitsandbytes Linear4bit", "PEFT + bitsandbytes"} <= references
    assert all(r["lorakern_ms"] > 0 and r["reference_ms"] > 0 for r in rows)
