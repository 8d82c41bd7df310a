"""``lorakern glue --task a,b --mixed``: tasks trained at once on one base, batches mixed across tasks, give
each task what training it alone gives (same shared base, dropout off), and save one PEFT multi-adapter folder."""
import os

import pytest
import torch
from safetensors.torch import load_file

from lorakern.cli import main
from lorakern.harness import models
from lorakern.harness.mixed import run_glue_mixed
from lorakern.harness.train import TrainConfig

SHORT = TrainConfig(warmup_epochs=0, decay_epochs=1, batch_size=32, progress=False)


@pytest.fixture
def no_dropout(monkeypatch):
    # dropout masks depend on the whole batch, so with dropout mixed and alone runs differ by design
    monkeypatch.setattr(models, "TINY_SIZES", {**models.TINY_SIZES, "hidden_dropout_prob": 0.0,
                                               "attention_probs_dropout_prob": 0.0})


def test_each_task_trained_mixed_ends_where_training_it_alone_ends(tmp_path, no_dropout):
    tasks = ["sst2", "rte"]
    mixed = run_glue_mixed(tasks, out=str(tmp_path / "mixed"), train=SHORT, head="hf")
    assert sorted(os.listdir(tmp_path / "mixed" / "adapter")) == sorted(tasks)
    for task in tasks:
        alone = run_glue_mixed([task], out=str(tmp_path / task), train=SHORT, head="hf", vocabulary=tasks)
        got, want = mixed["tasks"][task], alone["tasks"][task]
        assert got["reload_agrees"] and want["reload_agrees"]
        assert got["final"].keys() == want["final"].keys()
        for key in want["final"]:
            assert got["final"][key] == pytest.approx(want["final"][key], abs=1e-9), key
        loss = lambda run: run["history"][-1][task]["train_loss"]
        assert loss(mixed) == pytest.approx(loss(alone), rel=1e-4)
        trained = load_file(str(tmp_path / "mixed" / "adapter" / task / "adapter_model.safetensors"))
        reference = load_file(str(tmp_path / task / "adapter" / task / "adapter_model.safetensors"))
        assert trained.keys() == reference.keys()
        for name in reference:
            torch.testing.assert_close(trained[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)


def test_mixed_flag_errors():
    with pytest.raises(SystemExit):
        main(["glue", "--task", "sst2,nope", "--mixed"])
    assert main(["glue", "--task", "sst2,rte", "--no-progress"]) == 2  # several tasks need --mixed
    with pytest.raises(ValueError, match="share one head shape"):
        run_glue_mixed(["sst2", "stsb"])
