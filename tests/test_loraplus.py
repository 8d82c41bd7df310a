"""LoRA+: the parameter groups, learning rates and weight decays of PEFT 0.21's create_loraplus_optimizer on
the same tiny model, one AdamW step to the same parameters, its grouping rules, bad input, and the harness flag."""
import json

import pytest
import torch
from torch import nn

import lorakern
from conftest import tiny_roberta_classifier
from lorakern import LoraConfig, inject
from lorakern.errors import LorakernError
from lorakern.loraplus import loraplus_param_groups

CONFIG = dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier", "LayerNorm"],
              bias="lora_only")


def _peft_name(name: str) -> str:
    """PEFT's parameter name -> lorakern's (LoRA factors live in adapters.<name> here)."""
    name = name.removeprefix("base_model.model.")
    for factor in ("lora_A", "lora_B"):
        name = name.replace(f".{factor}.default.weight", f".adapters.default.{factor}")
    return name.replace(".base_layer.", ".")


def _pair():
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    theirs = get_peft_model(tiny_roberta_classifier(), PeftLoraConfig(**CONFIG))
    ours = inject(tiny_roberta_classifier(), LoraConfig(**CONFIG))
    gen = torch.Generator().manual_seed(0)
    ours_params = dict(ours.named_parameters())
    with torch.no_grad():  # the same values everywhere, B nonzero so every factor gets a gradient
        for name, param in theirs.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
                ours_params[_peft_name(name)].copy_(param)
    return ours, theirs


def test_groups_and_one_step_equal_peft():
    from peft.optimizers import create_loraplus_optimizer

    ours, theirs = _pair()
    kwargs = dict(lr=1e-3, loraplus_lr_ratio=8.0, loraplus_weight_decay=0.05, betas=(0.9, 0.98), eps=1e-6)
    ours_opt = lorakern.loraplus_optimizer(ours, torch.optim.AdamW, **kwargs)
    theirs_opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, **kwargs)
    ours_names = {id(p): n for n, p in ours.named_parameters()}
    theirs_names = {id(p): _peft_name(n) for n, p in theirs.named_parameters()}
    assert len(ours_opt.param_groups) == len(theirs_opt.param_groups) == 4
    for mine, peft in zip(ours_opt.param_groups, theirs_opt.param_groups):
        assert (mine["lr"], mine["weight_decay"]) == (peft["lr"], peft["weight_decay"])
        assert sorted(ours_names[id(p)] for p in mine["params"]) == sorted(theirs_names[id(p)] for p in peft["params"])
    a, _, b, b_no_decay = (sorted(ours_names[id(p)] for p in g["params"]) for g in ours_opt.param_groups)
    assert any("lora_A" in n for n in a) and all("lora_B" in n for n in b)
    assert any("LayerNorm" in n for n in b_no_decay) and any(n.endswith("query.bias") for n in b_no_decay)
    assert ours_opt.param_groups[2]["lr"] == pytest.approx(8e-3)
    batch = {"input_ids": torch.randint(3, 64, (3, 7), generator=torch.Generator().manual_seed(1)),
             "labels": torch.tensor([0, 1, 1])}
    for model, optimizer in ((ours, ours_opt), (theirs, theirs_opt)):
        model.train()
        torch.manual_seed(0)
        model(**batch).loss.backward()
        optimizer.step()
    theirs_after = {_peft_name(n): p for n, p in theirs.named_parameters() if p.requires_grad}
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, theirs_after[name], rtol=1e-5, atol=1e-6, msg=name)


def test_grouping_rules_embedding_and_bad_ratio():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Module()
            self.emb.lora_embedding_A = nn.Parameter(torch.zeros(2, 5))
            self.emb.lora_embedding_B = nn.Parameter(torch.zeros(3, 2))
            self.norm = nn.LayerNorm(3)
            self.scale = nn.Parameter(torch.ones(3))  # 1-D, outside a LayerNorm, not a bias: B's lr, decayed
            self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)

    model = Holder()
    a, embedding, b, b_no_decay = loraplus_param_groups(model, lr=0.1, loraplus_lr_ratio=4, loraplus_weight_decay=0.01)
    assert {id(p) for p in embedding["params"]} == {id(model.emb.lora_embedding_A), id(model.emb.lora_embedding_B)}
    assert embedding["lr"] == 1e-6 and a["params"] == []
    assert b["params"] == [model.scale] and (b["lr"], b["weight_decay"]) == (0.4, 0.01)
    assert {id(p) for p in b_no_decay["params"]} == {id(model.norm.weight), id(model.norm.bias)}
    assert b_no_decay["weight_decay"] == 0.0
    for ratio in (0, -1.0, float("nan"), float("inf"), True):  # inf would train B to NaN; True is not a ratio
        with pytest.raises(LorakernError, match="loraplus_lr_ratio must be a positive number.*suggests 16"):
            lorakern.loraplus_optimizer(model, torch.optim.AdamW, lr=0.1, loraplus_lr_ratio=ratio)
    for lr in (0.0, float("inf")):
        with pytest.raises(LorakernError, match=f"lr must be a positive number.*got {lr}"):
            lorakern.loraplus_optimizer(model, torch.optim.AdamW, lr=lr)
    with pytest.raises(LorakernError, match="no trainable parameters; inject LoRA"):
        lorakern.loraplus_optimizer(nn.Linear(2, 2).requires_grad_(False), torch.optim.SGD, lr=0.1)


def test_harness_flag_runs_end_to_end(tmp_path, capsys):
    from lorakern.cli import main
    from lorakern.harness.train import TrainConfig

    code = main(["glue", "--task", "sst2", "--warmup-epochs", "0", "--decay-epochs", "1", "--loraplus-lr-ratio", "16",
                 "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "LoRA+ (B's lr x 16)" in open(tmp_path / "report.md").read()
    checkpoint = torch.load(tmp_path / "checkpoints" / "epoch-1.pt", weights_only=False)
    lrs = [group["initial_lr"] for group in checkpoint["optimizer"]["param_groups"]]
    assert len(lrs) == 4 and lrs[2] == pytest.approx(16 * lrs[0])
    assert json.load(open(tmp_path / "metrics.json"))["epochs"]
    for ratio in (0, float("inf"), True):  # the library's one check: the same error as loraplus_optimizer's
        with pytest.raises(ValueError, match="loraplus_lr_ratio must be a positive number.*suggests 16"):
            TrainConfig(loraplus_lr_ratio=ratio)
    with pytest.raises(ValueError, match="lr must be positive and finite, got inf"):
        TrainConfig(lr=float("inf"))
    # through the command line: refused before any training
    assert main(["glue", "--task", "sst2", "--loraplus-lr-ratio", "inf", "--out", str(tmp_path / "inf"),
                 "--no-progress"]) != 0
    assert "loraplus_lr_ratio must be a positive number" in capsys.readouterr().err
    assert not (tmp_path / "inf" / "metrics.json").exists()
