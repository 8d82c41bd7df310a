"""The harness's one model builder: seed parity, heads, tokenizer, backbones, and the LoRA flags."""
import argparse

import pytest
import torch

from lorakern import count_parameters, save_adapter
from lorakern.harness.cli import add_run_flags, run_options
from lorakern.harness.models import Backbone, build_model, build_tiny_tokenizer, forward_logits, recipe_config

TEXTS = ["The film is wonderful .", "the plot is dull !", "Who led the survey ?", "Amara Ashdown led it ."]


def test_seed_recipe_parity_on_a_roberta_base_sized_config(tmp_path):
    """shared/seed.md: 420,098 trainable parameters for 2 classes, an adapter of about 1.7 MB."""
    from transformers import RobertaConfig

    config = RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1)
    model = build_model(Backbone(config), "classification", 2, "seed", recipe_config("seed", "classification"))
    trainable, total = count_parameters(model)
    # total: roberta-base 124,645,632 + the seed head (LayerNorm 1,536 + Linear 1,538) + LoRA 294,912, plus the
    # adapter's trained copies of the modules_to_save (25 LayerNorms, the head's LayerNorm and Linear), whose
    # originals stay for the base model as in PEFT
    copies = 25 * 1_536 + 1_536 + 1_538
    assert (trainable, total) == (420_098, 124_645_632 + 1_536 + 1_538 + 294_912 + copies)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == 294_912
    save_adapter(model, str(tmp_path))
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert 420_098 * 4 <= size < 420_098 * 4 + 60_000  # ~1.7 MB of fp32


def test_seed_recipe_is_the_published_setup():
    config = recipe_config("seed", "qa_v2", {"r": 16})
    assert (config.r, config.alpha, config.dropout, config.init, config.bias) == (16, 8, 0.0, "normal", "all")
    assert config.target_modules == ["query", "value"] and config.modules_to_save == ["LayerNorm", "qa_outputs"]
    with pytest.raises(ValueError, match="unknown recipe 'lora'"):
        recipe_config("lora", "classification")


@pytest.fixture(scope="module")
def backbone():
    return Backbone("tiny", TEXTS, max_length=32, seed=3)


@pytest.mark.parametrize("head", ["seed", "hf"])
@pytest.mark.parametrize("kind,shape", [("classification", (2, 3)), ("regression", (2,)), ("qa", (2, 9, 2)),
                                        ("qa_v2", (2, 9, 3))])
def test_heads_give_the_documented_shapes(backbone, head, kind, shape):
    if head == "hf" and kind == "qa_v2":
        shape = (2, 9, 2)  # transformers' QA head has no no-answer channel: <s> plays that role
    model = build_model(backbone, kind, 3, head, recipe_config("seed", kind)).eval()
    batch = backbone.tokenizer(["the film is wonderful .", "who led ?"], padding="max_length", max_length=9,
                               return_tensors="pt")
    logits = forward_logits(model, batch)
    assert tuple(logits.shape) == shape
    if kind == "regression" and head == "seed":
        assert bool(((logits >= 0) & (logits <= 5)).all())  # sigmoid * 5


def test_rebuilds_are_identical_and_leave_the_global_rng_alone(backbone):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = build_model(backbone, "classification", 2, "seed")
    second = build_model(backbone, "classification", 2, "seed")
    assert torch.equal(torch.rand(3), expected)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_tiny_tokenizer_is_deterministic_with_roberta_ids_and_offsets():
    first, second = build_tiny_tokenizer(TEXTS, 32), build_tiny_tokenizer(list(TEXTS), 32)
    assert first.get_vocab() == second.get_vocab()
    assert (first.bos_token_id, first.pad_token_id, first.eos_token_id, first.unk_token_id) == (0, 1, 2, 3)
    encoded = first("Who led?", "Amara Ashdown led it.", return_offsets_mapping=True)
    tokens = first.convert_ids_to_tokens(encoded["input_ids"])
    assert tokens == ["<s>", "who", "led", "?", "</s>", "</s>", "amara", "ashdown", "led", "it", ".", "</s>"]
    assert encoded.sequence_ids()[6] == 1 and encoded["offset_mapping"][7] == (6, 13)


def test_a_local_model_folder_loads_offline(tmp_path, backbone):
    encoder = backbone.encoder()
    encoder.save_pretrained(tmp_path)
    backbone.tokenizer.save_pretrained(tmp_path)
    local = Backbone(str(tmp_path))
    model = build_model(local, "classification", 2, "seed")
    assert torch.equal(model.roberta.embeddings.word_embeddings.weight, encoder.embeddings.word_embeddings.weight)
    assert local.tokenizer("who led ?")["input_ids"] == backbone.tokenizer("who led ?")["input_ids"]
    with pytest.raises(ValueError, match="--model '.*nowhere' could not be loaded .no such folder"):
        Backbone(str(tmp_path / "nowhere"))


def _parse(*flags):
    parser = argparse.ArgumentParser()
    add_run_flags(parser)
    return run_options(parser.parse_args(list(flags)))


def test_every_lora_config_field_is_a_flag():
    options = _parse("--lora-r", "4", "--lora-alpha", "16", "--lora-dropout", "0.1",
                     "--lora-target-modules", "query,key", "--lora-exclude-modules", "re:.*layer\\.0\\..*",
                     "--lora-bias", "none", "--lora-modules-to-save", "classifier",
                     "--lora-rank-pattern", "key=2", "--lora-alpha-pattern", "key=4.5", "--lora-use-rslora", "true",
                     "--lora-init", "gaussian", "--lora-task-type", "none", "--lr", "5e-4", "--adam-betas", "0.9", "0.99")
    assert options.lora == {"r": 4, "lora_alpha": 16.0, "lora_dropout": 0.1, "target_modules": ["query", "key"],
                            "exclude_modules": ".*layer\\.0\\..*", "bias": "none", "modules_to_save": ["classifier"],
                            "rank_pattern": {"key": 2}, "alpha_pattern": {"key": 4.5}, "use_rslora": True,
                            "init_lora_weights": "gaussian", "task_type": None}
    assert options.lr == 5e-4 and options.train.betas == (0.9, 0.99)
    config = options.lora_config("classification")  # tiny: the user named modules_to_save, so no embeddings
    assert config.modules_to_save == ["classifier"] and config.rank_and_alpha("x.key") == (2, 4.5)
    assert _parse().lora_config("qa").modules_to_save == ["LayerNorm", "qa_outputs", "word_embeddings"]
    assert _parse("--model", "some/folder").lora_config("qa").modules_to_save == ["LayerNorm", "qa_outputs"]


@pytest.mark.parametrize("flags", [["--lora-r", "eight"], ["--lora-rank-pattern", "value"],
                                   ["--lora-use-rslora", "maybe"]], ids=["int", "dict", "bool"])
def test_bad_lora_flags_are_refused(flags, capsys):
    with pytest.raises(SystemExit):
        _parse(*flags)
    assert f"{flags[0]} {flags[1]!r}" in capsys.readouterr().err
