"""LoraConfig validation, injection by name, freezing rules and parameter counts."""
import re

import pytest
import torch

import lorakern
from torch import nn

from conftest import tiny_roberta_classifier, tiny_roberta_config
from lorakern import LoraConfig, count_parameters, inject, lora_layers, parameter_table
from lorakern.heads import SeedClassifier
from lorakern.injection import find_targets


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleDict({
            "q_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 8), "norm": nn.LayerNorm(8),
            "mlp": nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)),
        })
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        e = self.encoder
        h = e["norm"](e["q_proj"](x) + e["v_proj"](x))
        return self.head(e["mlp"](h))


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"r": 0}, ValueError, "r must be a positive integer, got r=0"),
        ({"alpha": -2}, ValueError, "alpha must be a positive number"),
        ({"dropout": 1.5}, ValueError, r"dropout must be in \[0, 1\)"),
        ({"target_modules": []}, ValueError, "target_modules is empty"),
        ({"target_modules": None}, ValueError, "target_modules is empty"),
        ({"target_modules": ["q", 3]}, TypeError, "target_modules must be a list of non-empty module names"),
        ({"target_modules": "query(("}, ValueError, r"target_modules='query\(\(' is not a valid regex"),
        ({"bias": "some"}, ValueError, r"bias must be one of \('none', 'all', 'lora_only'\), got bias='some'"),
        ({"modules_to_save": "classifier"}, TypeError, "modules_to_save must be a list"),
        ({"rank_pattern": {"query": 0}}, ValueError, r"rank_pattern\['query'\] must be a positive int"),
        ({"alpha_pattern": {"query": -1}}, ValueError, r"alpha_pattern\['query'\] must be a positive number"),
        ({"init": "eva"}, ValueError, "init must be one of"),
    ],
    ids=["r", "alpha", "dropout", "empty-targets", "no-targets", "target-type", "bad-regex", "bias", "mts-type",
         "rank-pattern", "alpha-pattern", "init"],
)
def test_config_errors_name_the_value_and_fix(kwargs, error, message):
    fields = {"target_modules": ["q_proj"], **kwargs}
    with pytest.raises(error, match=message):
        LoraConfig(**fields)


def test_list_targets_match_exact_name_or_dot_suffix():
    model = Toy()
    config = LoraConfig(target_modules=["q_proj", "encoder.v_proj", "proj"])
    assert find_targets(model, config) == ["encoder.q_proj", "encoder.v_proj"]  # "proj" is no component


def test_regex_targets_match_the_full_name():
    model = Toy()
    assert find_targets(model, LoraConfig(target_modules=r".*mlp\.[02]")) == ["encoder.mlp.0", "encoder.mlp.2"]
    assert find_targets(model, LoraConfig(target_modules=r"mlp\.[02]", exclude_modules=None)) == []


def test_all_linear_skips_output_layer_and_modules_to_save():
    model = tiny_roberta_classifier()
    config = LoraConfig(target_modules="all-linear", modules_to_save=["classifier"])
    targets = find_targets(model, config)
    assert len(targets) == 2 * 6 and not any(t.startswith("classifier") for t in targets)
    toy = find_targets(Toy(), LoraConfig(target_modules="all-linear", exclude_modules=["head"]))
    assert toy == ["encoder.q_proj", "encoder.v_proj", "encoder.mlp.0", "encoder.mlp.2"]


def test_exclude_modules():
    model = Toy()
    config = LoraConfig(target_modules=r".*(proj|mlp\.[02])", exclude_modules=r".*v_proj")
    assert find_targets(model, config) == ["encoder.q_proj", "encoder.mlp.0", "encoder.mlp.2"]


def test_target_that_matches_nothing_lists_the_linear_layers():
    with pytest.raises(ValueError, match=re.escape("matched no module of Toy. Its linear layers are: encoder.q_proj")):
        inject(Toy(), LoraConfig(target_modules=["query"]))


def test_target_that_is_not_linear_is_refused():
    with pytest.raises(ValueError, match="target module 'encoder.norm' is a LayerNorm"):
        inject(Toy(), LoraConfig(target_modules=["norm"]))


def test_rank_and_alpha_patterns_first_match_wins():
    model = inject(Toy(), LoraConfig(r=4, alpha=8, target_modules=r".*(proj|mlp\.[02])",
                                     rank_pattern={"v_proj": 2, r"mlp\.[02]": 6}, alpha_pattern={"mlp.2": 3}))
    layers = lora_layers(model)
    assert {n: l.r for n, l in layers.items()} == {
        "encoder.q_proj": 4, "encoder.v_proj": 2, "encoder.mlp.0": 6, "encoder.mlp.2": 6}
    assert layers["encoder.mlp.2"].scaling == 3 / 6 and layers["encoder.q_proj"].scaling == 2.0


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_freezing_rules(bias):
    model = inject(Toy(), LoraConfig(target_modules=["q_proj"], bias=bias, modules_to_save=["norm"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # modules_to_save train a copy per adapter (PEFT's wrapper); the original stays frozen for the base model
    expected = {"encoder.q_proj.adapters.default.lora_A", "encoder.q_proj.adapters.default.lora_B",
                "encoder.norm.modules_to_save.default.weight", "encoder.norm.modules_to_save.default.bias"}
    if bias == "all":
        expected |= {"encoder.q_proj.bias", "encoder.v_proj.bias", "encoder.mlp.0.bias", "encoder.mlp.2.bias",
                     "head.bias"}
    if bias == "lora_only":
        expected |= {"encoder.q_proj.bias"}
    assert trainable == expected


def test_injected_model_starts_equal_to_base_and_trains_only_lora():
    model = Toy()
    x = torch.randn(5, 8)
    before = model(x)
    inject(model, LoraConfig(target_modules="all-linear", exclude_modules=["head"]))
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert not torch.equal(model(x), before)


def test_count_parameters_and_table():
    model = inject(Toy(), LoraConfig(r=2, target_modules=["q_proj"]))
    trainable, total = count_parameters(model)
    assert trainable == 2 * 8 + 8 * 2
    assert total == sum(p.numel() for p in model.parameters())
    table = parameter_table(model)
    assert "| encoder.q_proj.adapters.default.lora_A | (2, 8) | 16 | yes |" in table
    assert f"{trainable:,} / {total:,}" in table


def test_seed_parity_on_roberta_base_sized_config(tmp_path):
    """shared/seed.md: r=8 on query/value, all biases and LayerNorms, the seed head: 420,098 trainable."""
    from transformers import RobertaModel

    config = tiny_roberta_config(
        vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=514)
    encoder = RobertaModel(config, add_pooling_layer=True)
    assert sum(p.numel() for p in encoder.parameters()) == 124_645_632
    model = SeedClassifier(encoder, num_labels=2)
    inject(model, LoraConfig(r=8, target_modules=["query", "value"], bias="all",
                             modules_to_save=["LayerNorm", "classifier"]))
    trainable, _ = count_parameters(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert (lora, trainable) == (294_912, 420_098)

    from lorakern import save_adapter

    save_adapter(model, str(tmp_path))
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert 420_098 * 4 <= size < 420_098 * 4 + 60_000, size  # ~1.7 MB of fp32 plus the safetensors header


def test_disable_adapters_runs_the_base_model():
    model = Toy()
    x = torch.randn(4, 8)
    base = model(x)
    inject(model, LoraConfig(target_modules=["q_proj", "v_proj"]))
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B)
    adapted = model(x)
    from lorakern import disable_adapters

    with disable_adapters(model):
        torch.testing.assert_close(model(x), base)
    torch.testing.assert_close(model(x), adapted)
    lora_layers(model)["encoder.q_proj"].merge()
    with disable_adapters(model):
        torch.testing.assert_close(model(x), base)
    assert lora_layers(model)["encoder.q_proj"].merged
    torch.testing.assert_close(model(x), adapted)


def test_second_inject_under_a_taken_name_is_refused_and_under_a_new_one_adds_an_adapter():
    model = inject(Toy(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has an adapter named 'default'.*pick another adapter_name"):
        inject(model, LoraConfig(target_modules=["v_proj"]))
    inject(model, LoraConfig(target_modules=["v_proj"]), adapter_name="second")
    assert lorakern.active_adapters(model) == ["default"]
    assert sorted(model.lorakern_configs) == ["default", "second"]
