"""Named adapters as PEFT users know them: add/set/delete, several active at once, weighted combinations
(linear, cat, svd) against a NumPy reference of PEFT's definitions, modules_to_save copies and
disable_adapters, PEFT's multi-adapter folders both ways, PEFT's LoraConfig fields, QLoRA adapters that
record their base, and the errors that leave the model untouched."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import lorakern
from conftest import tiny_roberta_classifier
from lorakern import LoraConfig, core, inject, lora_layers
from lorakern.errors import AdapterError, ConfigError
from toy_models import Toy, randomize


def f64(t):
    return t.detach().double().numpy()


def two_adapters(**extra_b):
    model = inject(Toy(), LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"]))
    lorakern.add_adapter(model, "b", LoraConfig(r=3, lora_alpha=6, target_modules=["q"], **extra_b))
    randomize(model, 1)
    return model


def reference_layer_output(layer, x, names):
    """x W^T + b + sum over names of s (x A^T) B^T, in float64 from the layer's own tensors, with s from r and alpha."""
    y = f64(x) @ f64(layer.weight).T + f64(layer.bias)
    for name in names:
        adapter = layer.adapters[name]
        s = core.scaling(adapter.r, adapter.alpha, adapter.use_rslora)
        y = y + s * (f64(x) @ f64(adapter.lora_A).T) @ f64(adapter.lora_B).T
    return y


@pytest.mark.parametrize("active", [["default"], ["b"], ["default", "b"]], ids=["default", "b", "both"])
def test_outputs_and_gradients_per_active_set_match_the_reference(active):
    model = two_adapters()
    lorakern.set_adapter(model, active[0] if len(active) == 1 else active)
    assert lorakern.active_adapters(model) == active
    layer = model.q
    assert layer.lora_A is layer.adapters[active[0]].lora_A  # lora_A / scaling are the active adapter's
    x = torch.randn(5, 8, dtype=torch.float32)
    y = layer(x)
    np.testing.assert_allclose(f64(y), reference_layer_output(layer, x, active), rtol=1e-5, atol=1e-5)
    y.pow(2).sum().backward()
    for name, adapter in layer.adapters.items():
        if name in active:
            g = 2 * reference_layer_output(layer, x, active)
            s = core.scaling(adapter.r, adapter.alpha, False)
            dB = s * g.T @ (f64(x) @ f64(adapter.lora_A).T)
            dA = s * (g @ f64(adapter.lora_B)).T @ f64(x)
            np.testing.assert_allclose(f64(adapter.lora_B.grad), dB, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(f64(adapter.lora_A.grad), dA, rtol=1e-4, atol=1e-5)
        else:
            assert not adapter.lora_A.requires_grad and adapter.lora_A.grad is None  # inactive: frozen


def test_set_adapter_with_an_unknown_name_lists_the_known_ones_and_changes_nothing():
    model = two_adapters()
    with pytest.raises(AdapterError, match=r"unknown adapter\(s\) \['c'\]; this model has \['default', 'b'\]"):
        lorakern.set_adapter(model, ["b", "c"])
    assert lorakern.active_adapters(model) == ["default"]


def test_delete_adapter():
    model = two_adapters()
    lorakern.set_adapter(model, "b")
    lorakern.delete_adapter(model, "b")
    assert "b" not in model.q.adapters and lorakern.active_adapters(model) == ["default"]
    assert model.q.lora_A.requires_grad
    with pytest.raises(AdapterError, match="unknown adapter 'b'; this model has \\['default'\\]"):
        lorakern.delete_adapter(model, "b")
    with pytest.raises(AdapterError, match="only adapter; use lorakern.merge_and_unload.*lorakern.unload"):
        lorakern.delete_adapter(model, "default")


def _delta(layer, name):
    adapter = layer.adapters[name]
    return core.scaling(adapter.r, adapter.alpha, adapter.use_rslora) * f64(adapter.lora_B) @ f64(adapter.lora_A)


def test_weighted_combinations_follow_peft_definitions():
    model = inject(Toy(), LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"]))
    lorakern.add_adapter(model, "b", LoraConfig(r=2, lora_alpha=2, target_modules=["q", "v"]))
    randomize(model, 2)
    w = [0.7, -0.3]
    lorakern.add_weighted_adapter(model, ["default", "b"], w, adapter_name="lin", combination_type="linear")
    lorakern.add_weighted_adapter(model, ["default", "b"], w, adapter_name="cat", combination_type="cat")
    lorakern.add_weighted_adapter(model, ["default", "b"], w, adapter_name="svd", combination_type="svd", svd_rank=4)
    for layer in (model.q, model.v):
        weighted = w[0] * _delta(layer, "default") + w[1] * _delta(layer, "b")
        # cat is exact; svd at rank 4 >= 2 + 2 reproduces the weighted sum too
        np.testing.assert_allclose(_delta(layer, "cat"), weighted, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_delta(layer, "svd"), weighted, rtol=1e-4, atol=1e-5)
        # linear, PEFT's definition: c_i = w_i s_i, A = sum sign(c_i) sqrt|c_i| A_i, B = sum sqrt|c_i| B_i
        c = [w[i] * layer.adapters[n].scaling for i, n in enumerate(["default", "b"])]
        A = sum(math.copysign(math.sqrt(abs(ci)), ci) * f64(layer.adapters[n].lora_A) for ci, n in zip(c, ["default", "b"]))
        B = sum(math.sqrt(abs(ci)) * f64(layer.adapters[n].lora_B) for ci, n in zip(c, ["default", "b"]))
        np.testing.assert_allclose(_delta(layer, "lin"), B @ A, rtol=1e-5, atol=1e-6)
        assert layer.adapters["cat"].r == 4 and layer.adapters["cat"].scaling == 1.0
    # svd at a lower rank: the best rank-1 approximation of the weighted sum
    lorakern.add_weighted_adapter(model, ["default", "b"], w, adapter_name="svd1", combination_type="svd", svd_rank=1)
    weighted = w[0] * _delta(model.q, "default") + w[1] * _delta(model.q, "b")
    u, s, vt = np.linalg.svd(weighted)
    np.testing.assert_allclose(_delta(model.q, "svd1"), s[0] * np.outer(u[:, 0], vt[0]), rtol=1e-4, atol=1e-5)


def test_linear_combination_of_different_targets_is_refused_with_the_alternatives():
    model = two_adapters()  # "b" targets q only, and has another rank
    with pytest.raises(AdapterError, match="same target modules.*'cat' or 'svd'"):
        lorakern.add_weighted_adapter(model, ["default", "b"], [0.5, 0.5], "mix", combination_type="linear")
    assert "mix" not in model.lorakern_configs and "mix" not in model.q.adapters
    lorakern.add_weighted_adapter(model, ["default", "b"], [0.5, 0.5], "mix", combination_type="cat")
    np.testing.assert_allclose(_delta(model.v, "mix"), 0.5 * _delta(model.v, "default"), rtol=1e-5, atol=1e-7)


def test_modules_to_save_train_a_copy_and_disable_adapters_gives_the_base_model_bit_for_bit(batch):
    base = tiny_roberta_classifier()
    untouched = copy.deepcopy(base)
    model = inject(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                    modules_to_save=["classifier"]))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # a real training step changes B and the head's copy
        optimizer.zero_grad()
        model(**batch).logits.pow(2).sum().backward()
        optimizer.step()
    with torch.no_grad():
        expected = untouched(**batch).logits
        trained = model(**batch).logits
        with lorakern.disable_adapters(model):
            disabled = model(**batch).logits
    assert not torch.equal(trained, expected)
    assert torch.equal(disabled, expected)
    assert torch.equal(model.classifier.original_module.dense.weight, untouched.classifier.dense.weight)


def test_several_adapters_save_in_peft_layout_and_load_both_ways(tmp_path, batch):
    from peft import PeftModel

    model = inject(tiny_roberta_classifier(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                         modules_to_save=["classifier"]))
    lorakern.add_adapter(model, "b", LoraConfig(r=2, lora_alpha=2, target_modules=["query"],
                                                modules_to_save=["classifier"]))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name or ".modules_to_save." in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    expected = {}
    for name in ("default", "b"):
        lorakern.set_adapter(model, name)
        with torch.no_grad():
            expected[name] = model(**batch).logits
    lorakern.save_adapter(model, str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "b" / "adapter_config.json").exists()

    ours = lorakern.load_adapter(tiny_roberta_classifier(), str(tmp_path))
    lorakern.load_adapter(ours, str(tmp_path / "b"), adapter_name="b")
    peft_model = PeftModel.from_pretrained(tiny_roberta_classifier(), str(tmp_path)).eval()
    peft_model.load_adapter(str(tmp_path / "b"), adapter_name="b")
    for name in ("default", "b"):
        lorakern.set_adapter(ours, name)
        peft_model.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(ours(**batch).logits, expected[name], rtol=0, atol=0)
            torch.testing.assert_close(peft_model(**batch).logits, expected[name], rtol=1e-5, atol=1e-6)

    # and PEFT's own multi-adapter folder loads here
    peft_dir = tmp_path / "from_peft"
    peft_model.save_pretrained(str(peft_dir))
    back = lorakern.load_adapter(tiny_roberta_classifier(), str(peft_dir))
    lorakern.load_adapter(back, str(peft_dir / "b"), adapter_name="b")
    for name in ("default", "b"):
        lorakern.set_adapter(back, name)
        with torch.no_grad():
            torch.testing.assert_close(back(**batch).logits, expected[name], rtol=1e-5, atol=1e-6)


def test_loading_under_a_taken_name_is_refused_and_changes_nothing(tmp_path):
    model = two_adapters()
    lorakern.save_adapter(model, str(tmp_path))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match="already has an adapter named 'b'.*load it under another adapter_name"):
        lorakern.load_adapter(model, str(tmp_path / "b"), adapter_name="b")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_an_adapter_that_does_not_fit_leaves_a_fresh_model_untouched(tmp_path):
    model = two_adapters()
    lorakern.save_adapter(model, str(tmp_path))
    other = nn.Sequential()
    other.q, other.v, other.head = nn.Linear(8, 5), nn.Linear(5, 6), nn.Linear(6, 3)  # q is 5 wide, not 6
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(lorakern.LorakernError, match="does not fit.*the model was left unchanged"):
        lorakern.load_adapter(other, str(tmp_path))
    assert not lora_layers(other) and not hasattr(other, "lorakern_configs")
    assert type(other.q) is nn.Linear and set(other.state_dict()) == set(before)
    assert all(p.requires_grad for p in other.parameters())


def test_peft_config_fields_are_accepted_and_unsupported_ones_refused_by_name():
    from peft import LoraConfig as PeftLoraConfig

    peft_config = PeftLoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q", "v"], bias="lora_only",
                                 use_rslora=True, init_lora_weights="gaussian", modules_to_save=["head"],
                                 rank_pattern={"v": 4}, alpha_pattern={"v": 8}, layers_to_transform=None,
                                 task_type="SEQ_CLS")
    ours = LoraConfig(**peft_config.to_dict())
    assert (ours.r, ours.lora_alpha, ours.lora_dropout, ours.bias, ours.use_rslora, ours.init_lora_weights) == \
        (16, 32, 0.05, "lora_only", True, "gaussian")
    assert sorted(ours.target_modules) == ["q", "v"] and ours.rank_pattern == {"v": 4} and ours.task_type == "SEQ_CLS"
    assert LoraConfig(target_modules=["q"]).lora_alpha == PeftLoraConfig().lora_alpha == 8  # PEFT's default
    for field, value in [("lora_bias", True), ("layer_replication", [(0, 2)]),
                         ("init_lora_weights", "corda")]:
        with pytest.raises(ConfigError, match=field if field != "init_lora_weights" else "init_lora_weights='corda'"):
            LoraConfig(**{**peft_config.to_dict(), field: value})
    with pytest.raises(ConfigError, match="both alpha= and lora_alpha="):
        LoraConfig(target_modules=["q"], alpha=4, lora_alpha=8)


def test_layers_to_transform_follows_peft():
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = dict(r=2, target_modules=["query"], layers_to_transform=[1], layers_pattern="layer")
    ours = inject(tiny_roberta_classifier(), LoraConfig(**config))
    theirs = get_peft_model(tiny_roberta_classifier(), PeftLoraConfig(**config))
    ours_names = sorted(lora_layers(ours))
    theirs_names = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                          if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    assert ours_names == theirs_names == ["roberta.encoder.layer.1.attention.self.query"]


def test_qlora_adapter_records_its_base_and_reloads_4bit(tmp_path, batch):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"],
                        quantize="nf4", quantize_skip=["classifier"], quantize_blocksize=32)
    model = inject(tiny_roberta_classifier(), config)
    randomize(model, 4)
    with torch.no_grad():
        expected = model(**batch).logits
    lorakern.save_adapter(model, str(tmp_path))
    fresh = lorakern.load_adapter(tiny_roberta_classifier(), str(tmp_path))
    layers = lora_layers(fresh)
    assert layers and all(layer.is_quantized and layer.nf4.blocksize == 32 for layer in layers.values())
    assert type(fresh.roberta.encoder.layer[0].attention.self.key).__name__ == "LinearNF4"
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, expected, rtol=0, atol=0)
    plain = inject(tiny_roberta_classifier(), LoraConfig(r=4, target_modules=["query"]))
    with pytest.raises(AdapterError, match="quantize='nf4'.*build a fresh model and load it there"):
        lorakern.load_adapter(plain, str(tmp_path), adapter_name="q")


NON_DEFAULT = {False: True, None: {"enabled": True}, "megatron.core": "another.core", 16: 32}


@pytest.mark.parametrize("field", sorted(__import__("lorakern.config", fromlist=["x"]).PEFT_UNSUPPORTED))
def test_every_unsupported_peft_field_is_refused_by_name_off_its_default(field):
    from lorakern.config import PEFT_UNSUPPORTED

    default = PEFT_UNSUPPORTED[field]
    LoraConfig(target_modules=["q"], **{field: default})  # at PEFT's default: accepted
    value = {"loftq_bits": 4} if default == {} else NON_DEFAULT[default]
    with pytest.raises(ConfigError, match=f"{field}=.*PEFT option lorakern does not support"):
        LoraConfig(target_modules=["q"], **{field: value})
