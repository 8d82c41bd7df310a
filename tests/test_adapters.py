"""Adapters in PEFT's format: round trips, both directions against the real peft package, and errors."""
import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import tiny_roberta_classifier
from lorakern import LoraConfig, LoraLinear, inject, load_adapter, lora_layers, merge_and_unload, save_adapter

CONFIG = dict(r=4, alpha=8, target_modules=["query", "value", "intermediate.dense"], bias="all",
              modules_to_save=["LayerNorm", "classifier"])


def perturb_trainable(model, seed=0):
    """Stand-in for training: every trainable tensor (lora_B included) gets random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def trained_model(num_labels=2, **overrides):
    model = inject(tiny_roberta_classifier(num_labels), LoraConfig(**{**CONFIG, **overrides}))
    perturb_trainable(model)
    return model


def test_unmerged_merged_unloaded_and_reloaded_agree(tmp_path, batch):
    model = trained_model()
    expected = logits(model, batch)
    assert not torch.allclose(expected, logits(tiny_roberta_classifier(), batch)), "the adapter must matter"
    save_adapter(model, str(tmp_path))

    for layer in lora_layers(model).values():
        layer.merge()
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)
    for layer in lora_layers(model).values():
        layer.unmerge()
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)

    unloaded = merge_and_unload(copy.deepcopy(model))
    assert not lora_layers(unloaded)
    assert type(unloaded.roberta.encoder.layer[0].attention.self.query) is nn.Linear
    torch.testing.assert_close(logits(unloaded, batch), expected, rtol=1e-5, atol=1e-5)

    reloaded = load_adapter(tiny_roberta_classifier(), str(tmp_path))
    torch.testing.assert_close(logits(reloaded, batch), expected, rtol=0, atol=0)
    assert {n for n, p in reloaded.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


def test_files_follow_peft_layout(tmp_path):
    save_adapter(trained_model(), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["lorakern"]["num_labels"] == 2
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    prefix = "base_model.model.roberta.encoder.layer.0."
    assert {prefix + "attention.self.query.lora_A.weight", prefix + "attention.self.query.lora_B.weight",
            prefix + "attention.self.query.base_layer.bias", prefix + "attention.self.key.bias",
            prefix + "output.LayerNorm.weight", "base_model.model.classifier.out_proj.weight"} <= keys
    assert not any(k.endswith("query.weight") or k.endswith("key.weight") for k in keys), "frozen weights leaked"


def test_peft_saved_adapter_loads_into_lorakern(tmp_path, batch):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_model = get_peft_model(tiny_roberta_classifier(), PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], bias="all", task_type="SEQ_CLS",
        modules_to_save=["LayerNorm", "classifier"]))
    perturb_trainable(peft_model, seed=3)
    peft_model.eval()
    expected = logits(peft_model, batch)
    peft_model.save_pretrained(str(tmp_path))

    ours = load_adapter(tiny_roberta_classifier(), str(tmp_path))
    assert len(lora_layers(ours)) == 2 * 2
    torch.testing.assert_close(logits(ours, batch), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_labels", [2, 3])
def test_lorakern_saved_adapter_loads_into_peft(tmp_path, batch, num_labels):
    from peft import PeftModel

    model = trained_model(num_labels, rank_pattern={"value": 2}, use_rslora=True, alpha=None)
    expected = logits(model, batch)
    save_adapter(model, str(tmp_path))
    peft_model = PeftModel.from_pretrained(tiny_roberta_classifier(num_labels), str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model, batch), expected, rtol=1e-5, atol=1e-6)


def test_reload_restores_the_label_count_peft_forgets(tmp_path, batch):
    model = trained_model(num_labels=3)
    expected = logits(model, batch)
    save_adapter(model, str(tmp_path))
    reloaded = load_adapter(tiny_roberta_classifier(num_labels=2), str(tmp_path))
    assert reloaded.config.num_labels == 3 and reloaded.classifier.out_proj.out_features == 3
    torch.testing.assert_close(logits(reloaded, batch), expected, rtol=0, atol=0)


def test_gpt2_conv1d_adapter_loads_into_peft(tmp_path):
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    def base():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)).eval()

    model = inject(base(), LoraConfig(r=2, target_modules=["c_attn", "c_proj"]))
    assert all(layer.fan_in_fan_out for layer in lora_layers(model).values())
    perturb_trainable(model)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = model(ids).logits.detach()
    save_adapter(model, str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    peft_model = PeftModel.from_pretrained(base(), str(tmp_path)).eval()
    torch.testing.assert_close(peft_model(ids).logits.detach(), expected, rtol=1e-5, atol=1e-5)
    unloaded = merge_and_unload(model)
    assert type(unloaded.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(unloaded(ids).logits.detach(), expected, rtol=1e-4, atol=1e-5)


def test_adapter_for_another_model_is_refused(tmp_path):
    from transformers import RobertaForSequenceClassification

    from conftest import tiny_roberta_config

    save_adapter(trained_model(), str(tmp_path))
    wider = RobertaForSequenceClassification(tiny_roberta_config(hidden_size=32))
    with pytest.raises(ValueError, match=r"does not fit this RobertaForSequenceClassification: shape mismatch: "
                                         r"base_model\.model\.classifier\.dense\.bias: file \(24,\) vs model \(32,\)"):
        load_adapter(wider, str(tmp_path))


def _drop_checksum(directory):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    del config["lorakern"]["weights_sha256"]
    path.write_text(json.dumps(config))


def test_missing_keys_are_refused(tmp_path):
    save_adapter(trained_model(), str(tmp_path))
    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    dropped = sorted(k for k in weights if "lora_B" in k)[0]
    del weights[dropped]
    save_file(weights, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    _drop_checksum(tmp_path)
    with pytest.raises(ValueError, match="1 tensors missing from the file, e.g. " + dropped.replace(".", r"\.")):
        load_adapter(tiny_roberta_classifier(), str(tmp_path))


def test_corrupt_safetensors_is_refused(tmp_path):
    save_adapter(trained_model(), str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="does not match the checksum"):
        load_adapter(tiny_roberta_classifier(), str(tmp_path))
    _drop_checksum(tmp_path)
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        load_adapter(tiny_roberta_classifier(), str(tmp_path))


def test_missing_or_foreign_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no adapter_config.json in"):
        load_adapter(tiny_roberta_classifier(), str(tmp_path))
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "IA3", "target_modules": ["key"]}')
    with pytest.raises(ValueError, match="peft_type='IA3'|peft_type=IA3"):
        load_adapter(tiny_roberta_classifier(), str(tmp_path))
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", ')
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_adapter(tiny_roberta_classifier(), str(tmp_path))


def test_save_without_lora_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has no LoRA layers; call lorakern.inject"):
        save_adapter(tiny_roberta_classifier(), str(tmp_path))


def test_interrupted_save_loses_nothing(tmp_path, monkeypatch, batch):
    import lorakern._io

    first = trained_model()
    save_adapter(first, str(tmp_path))
    (tmp_path / "README.md").write_text("user notes")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def killed(fd):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(lorakern._io.os, "fsync", killed)
    second = trained_model()
    perturb_trainable(second, seed=9)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(second, str(tmp_path))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before, "files changed or temp files left"
    monkeypatch.undo()
    torch.testing.assert_close(logits(load_adapter(tiny_roberta_classifier(), str(tmp_path)), batch),
                               logits(first, batch), rtol=0, atol=0)


def test_save_stopped_between_the_two_files_is_detected(tmp_path, monkeypatch):
    import lorakern.adapters

    save_adapter(trained_model(), str(tmp_path))
    second = trained_model()
    perturb_trainable(second, seed=9)
    real_write = lorakern.adapters.atomic_write_bytes

    def write_weights_only(path, data):
        if path.endswith("adapter_config.json"):
            raise KeyboardInterrupt("killed before the config")
        real_write(path, data)

    monkeypatch.setattr(lorakern.adapters, "atomic_write_bytes", write_weights_only)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(second, str(tmp_path))
    with pytest.raises(ValueError, match="does not match the checksum in adapter_config.json"):
        load_adapter(tiny_roberta_classifier(), str(tmp_path))


def test_merge_and_unload_safe_refuses_nan_and_changes_nothing(batch):
    model = trained_model()
    layers = lora_layers(model)
    first, last = list(layers.values())[0], list(layers.values())[-1]
    weights = {n: l.weight.detach().clone() for n, l in layers.items()}
    with torch.no_grad():
        last.lora_A[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs or infs detected in the merged weight of"):
        merge_and_unload(model)
    assert all(isinstance(l, LoraLinear) and not l.merged for l in lora_layers(model).values())
    assert all(torch.equal(l.weight, weights[n]) for n, l in lora_layers(model).items())
    assert first is lora_layers(model)[list(layers)[0]]
