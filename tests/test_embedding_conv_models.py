"""LoRA on nn.Embedding, nn.Conv1d and nn.Conv2d inside a model: injection by name, merging, named adapters,
PEFT's format both ways (a tiny model with every layer type, RoBERTa's word_embeddings), and the refusals.
The layers themselves against the reference and PEFT: tests/test_embedding_conv.py."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakern
from conftest import tiny_roberta_classifier
from lorakern import LoraConfig
from lorakern.adapters import adapter_names, adapter_tensors
from lorakern.conv import LoraConv
from lorakern.embedding import LoraEmbedding
from lorakern.errors import AdapterError, ConfigError, LorakernError
from test_embedding_conv import randomize_adapters


class Tiny(nn.Module):
    """An Embedding, a Conv2d, a Conv1d and a Linear, so one adapter covers every layer type."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 6, padding_idx=0)
        self.conv = nn.Conv2d(6, 4, 3, padding=1)
        self.conv1 = nn.Conv1d(6, 4, 3, stride=2)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        e = self.emb(ids).transpose(1, 2)  # (N, 6, L)
        h = self.conv(e[..., None] * e[:, :, None, :])  # (N, 4, L, L)
        return self.head(h.mean((2, 3)) + self.conv1(e).mean(2))


def tiny(seed=0):
    torch.manual_seed(seed)
    return Tiny().double()


IDS = torch.tensor([[0, 3, 11, 5, 3, 7], [2, 0, 0, 9, 1, 4]])
TARGETS = ["emb", "conv", "conv1", "head"]


def test_merge_unmerge_merge_and_unload_and_unload_keep_the_outputs():
    model = lorakern.inject(tiny(), LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS))
    assert set(tiny().state_dict()) <= set(model.state_dict())  # the base keys are unchanged by injection
    for layer in lorakern.lora_layers(model).values():
        randomize_adapters(layer, 3)
    base_out = tiny()(IDS)
    out = model(IDS)
    assert (out - base_out).abs().max() > 1e-3  # the adapters change the output
    weights = {n: l.weight.detach().clone() for n, l in lorakern.lora_layers(model).items()}
    for layer in lorakern.lora_layers(model).values():
        layer.merge()
    torch.testing.assert_close(model(IDS), out, rtol=1e-12, atol=1e-12)
    with lorakern.disable_adapters(model):
        torch.testing.assert_close(model(IDS), base_out, rtol=1e-12, atol=1e-12)
    for name, layer in lorakern.lora_layers(model).items():
        layer.unmerge()
        torch.testing.assert_close(layer.weight, weights[name], rtol=0, atol=1e-14)
    merged = lorakern.merge_and_unload(copy.deepcopy(model))
    assert [type(m) for m in (merged.emb, merged.conv, merged.conv1)] == [nn.Embedding, nn.Conv2d, nn.Conv1d]
    torch.testing.assert_close(merged(IDS), out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lorakern.unload(model)(IDS), base_out, rtol=1e-12, atol=1e-12)  # W merged, unmerged


def test_named_adapters_add_up_train_alone_and_delete():
    model = lorakern.inject(tiny(), LoraConfig(r=2, target_modules=["emb", "conv"]))
    lorakern.add_adapter(model, "b", LoraConfig(r=4, lora_alpha=2, target_modules=["emb", "conv"]))
    for layer in lorakern.lora_layers(model).values():
        randomize_adapters(layer, 5)
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    outs = {}
    for active in (["default"], ["b"], ["default", "b"]):
        lorakern.set_adapter(model, active)
        outs[tuple(active)] = (model.emb(IDS), model.conv(x))
        trainable = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == set(active)
    with lorakern.disable_adapters(model):
        base = (model.emb(IDS), model.conv(x))
    for i in range(2):  # each layer adds the active adapters' terms
        torch.testing.assert_close(outs[("default", "b")][i] - base[i],
                                   (outs[("default",)][i] - base[i]) + (outs[("b",)][i] - base[i]),
                                   rtol=1e-12, atol=1e-12)
    lorakern.delete_adapter(model, "b")
    assert list(model.emb.adapters) == list(model.conv.adapters) == ["default"]


def test_all_linear_is_unchanged_and_a_layer_type_without_lora_is_refused_by_name():
    model = lorakern.inject(tiny(), LoraConfig(target_modules="all-linear"))
    assert set(lorakern.lora_layers(model)) == {"head"}

    class WithNorm(Tiny):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(4)

    fresh = WithNorm()
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(LorakernError, match=r"'norm' is a LayerNorm; LoRA applies to nn.Linear, transformers' Conv1D, "
                                            r"nn.Embedding, nn.Conv1d and nn.Conv2d"):
        lorakern.inject(fresh, LoraConfig(target_modules=["emb", "norm"]))
    assert type(fresh.emb) is nn.Embedding and all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())


def test_dora_inits_and_unmergeable_convolutions_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="use_dora=True on nn.Embedding: lorakern's DoRA applies to Linear layers"):
        LoraEmbedding.from_embedding(nn.Embedding(5, 3), use_dora=True)
    with pytest.raises(ConfigError, match="use_dora=True on nn.Conv2d"):
        LoraConv.from_conv(nn.Conv2d(2, 3, 1), use_dora=True)
    with pytest.raises(ConfigError, match=r"init_lora_weights='pissa' is not available for LoRA on nn.Conv1d"):
        LoraConv.from_conv(nn.Conv1d(2, 3, 1), init="pissa")
    with pytest.raises(ConfigError, match=r"r=3 on a convolution with groups=2: .* use r=2"):
        LoraConv.from_conv(nn.Conv2d(4, 4, 3, groups=2), r=3)
    grouped = LoraConv.from_conv(nn.Conv2d(4, 4, 3, groups=2), r=2)
    with pytest.raises(LorakernError, match="cannot merge LoRA into a convolution with groups=2"):
        grouped.merge()
    reflect = LoraConv.from_conv(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), r=2)
    weight = reflect.weight.detach().clone()
    with pytest.raises(LorakernError, match="padding_mode='reflect'"):
        reflect.merge()
    assert torch.equal(reflect.weight, weight) and not reflect.merged
    model = lorakern.inject(tiny(), LoraConfig(r=2, target_modules=["emb", "conv"]))
    model.conv = LoraConv.from_conv(nn.Conv2d(6, 4, 3, padding=1, groups=2, dtype=torch.float64), r=2)
    with pytest.raises(LorakernError, match="groups=2"):
        lorakern.merge_and_unload(model, safe=False)
    assert isinstance(model.emb, LoraEmbedding) and not model.emb.merged  # refused before any layer changed
    combined = lorakern.inject(tiny(), LoraConfig(r=2, target_modules=["emb", "head"]))
    lorakern.add_adapter(combined, "b", LoraConfig(r=2, target_modules=["emb"]))
    with pytest.raises(AdapterError, match=r"combines adapters on Linear layers only; .* \['emb'\] \(LoraEmbedding\)"):
        lorakern.add_weighted_adapter(combined, ["default", "b"], [1.0, 1.0], "c")
    assert adapter_names(combined) == ["default", "b"]
    with pytest.raises(TypeError, match="from_embedding takes an nn.Embedding, got Sub"):
        LoraEmbedding.from_embedding(type("Sub", (nn.Embedding,), {})(4, 2))



# ---- PEFT's format, both ways ----------------------------------------------------------------------------
def test_adapters_load_both_ways_with_peft_on_a_model_with_every_layer_type(tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    ours = lorakern.inject(tiny(), LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS))
    lorakern.add_adapter(ours, "other", LoraConfig(r=4, lora_alpha=4, target_modules=["emb", "conv1"]))
    for layer in lorakern.lora_layers(ours).values():
        randomize_adapters(layer, 1)
    keys = set(adapter_tensors(ours))
    assert {"base_model.model.emb.lora_embedding_A", "base_model.model.conv.lora_B.weight"} <= keys
    assert adapter_tensors(ours)["base_model.model.conv.lora_A.weight"].shape == (2, 6, 3, 3)
    lorakern.save_adapter(ours, tmp_path / "ours")
    peft = PeftModel.from_pretrained(tiny(), tmp_path / "ours")
    peft.load_adapter(tmp_path / "ours" / "other", adapter_name="other")
    for name in ("default", "other"):
        lorakern.set_adapter(ours, name)
        peft.set_adapter(name)
        torch.testing.assert_close(peft(IDS), ours(IDS), rtol=1e-12, atol=1e-12)

    theirs = get_peft_model(tiny(), PeftLoraConfig(r=3, lora_alpha=5, target_modules=TARGETS, init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    loaded = lorakern.load_adapter(tiny(), tmp_path / "peft")
    assert isinstance(loaded.emb, LoraEmbedding) and isinstance(loaded.conv, LoraConv)
    torch.testing.assert_close(loaded(IDS), theirs(IDS), rtol=1e-12, atol=1e-12)


def test_roberta_word_embeddings_targeted_by_name_load_both_ways(tmp_path, batch):
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    model = lorakern.inject(tiny_roberta_classifier(), LoraConfig(r=4, target_modules=["word_embeddings", "query"]))
    assert isinstance(model.roberta.embeddings.word_embeddings, LoraEmbedding)
    for layer in lorakern.lora_layers(model).values():
        randomize_adapters(layer, 2)
    lorakern.save_adapter(model, tmp_path / "ours")
    peft = PeftModel.from_pretrained(tiny_roberta_classifier(), tmp_path / "ours").eval()
    torch.testing.assert_close(peft(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-6)

    theirs = get_peft_model(tiny_roberta_classifier(), PeftLoraConfig(r=2, target_modules=["word_embeddings"],
                                                                      init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    loaded = lorakern.load_adapter(tiny_roberta_classifier(), tmp_path / "peft")
    torch.testing.assert_close(loaded(**batch).logits, theirs(**batch).logits, rtol=1e-5, atol=1e-6)
