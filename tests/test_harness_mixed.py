"""``lorakern glue --task a,b --mixed``: tasks trained at once on one base, batches mixed across tasks, give
each task what training it alone gives (same shared base, dropout off), save one PEFT multi-adapter folder,
and resume from an epoch checkpoint exactly. (Under torchrun: tests/test_harness_distributed.py.)"""
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
    with pytest.raises(ValueError, match=r"--mixed does not take --loraplus-lr-ratio"):
        run_glue_mixed(["sst2", "rte"], train=TrainConfig(loraplus_lr_ratio=16.0))
    with pytest.raises(ValueError, match=r"--mixed takes --grad-accum 1"):
        run_glue_mixed(["sst2", "rte"], train=TrainConfig(grad_accum=2))


RESUME = TrainConfig(warmup_epochs=1, decay_epochs=2, batch_size=32, progress=False)


def _epochs(run: dict) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "train_seconds"} for row in run["history"]]


def _adapters(out) -> dict:
    return {task: load_file(str(out / "adapter" / task / "adapter_model.safetensors"))
            for task in os.listdir(out / "adapter")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """sst2 + rte for 3 epochs with the tiny default's dropout on (so the checkpoint's RNG states matter)."""
    out = tmp_path_factory.mktemp("mixed-full")
    return out, run_glue_mixed(["sst2", "rte"], out=str(out), train=RESUME)


def test_a_resumed_mixed_run_gives_the_uninterrupted_runs_numbers(uninterrupted, tmp_path, monkeypatch):
    out, full = uninterrupted
    assert sorted(os.listdir(out / "checkpoints")) == ["epoch-1.pt", "epoch-2.pt", "epoch-3.pt"]
    assert not [n for _, _, files in os.walk(out) for n in files if n.endswith(".tmp")]
    checkpoint = torch.load(out / "checkpoints" / "epoch-1.pt", weights_only=True)
    assert list(checkpoint["optimizer"]) == list(checkpoint["scheduler"]) == ["sst2", "rte"]
    assert checkpoint["fingerprint"]["mixed"] == ["sst2", "rte"] and checkpoint["epoch"] == 1
    assert {n.split(".modules_to_save.")[-1].split(".")[0] for n in checkpoint["model"] if ".modules_to_save." in n} \
        == {"sst2", "rte"}  # every task's head, LayerNorms and embeddings
    assert len(full["history"][0]["sst2"]["step_losses"]) == 8  # 256 rows in batches of 32

    # Interrupted after epoch 1, resumed: every per-step loss, metric and saved tensor is the same, exactly.
    resumed = run_glue_mixed(["sst2", "rte"], out=str(tmp_path / "resumed"), train=RESUME,
                             resume=str(out / "checkpoints" / "epoch-1.pt"))
    assert _epochs(resumed) == _epochs(full)
    for task in ("sst2", "rte"):
        assert resumed["tasks"][task]["final"] == full["tasks"][task]["final"]
        assert resumed["tasks"][task]["reloaded"] == full["tasks"][task]["reloaded"]
    want, got = _adapters(out), _adapters(tmp_path / "resumed")
    assert got.keys() == want.keys() == {"sst2", "rte"}
    for task in want:
        assert got[task].keys() == want[task].keys()
        assert all(torch.equal(got[task][k], want[task][k]) for k in want[task]), task

    # The check can fail: without the checkpoint's RNG states, dropout draws other masks and the curve differs.
    from lorakern.harness import checkpoint as checkpoints

    monkeypatch.setattr(checkpoints, "_restore_rng", lambda state, context, seed: checkpoints.seed_everything(seed))
    unseeded = run_glue_mixed(["sst2", "rte"], out=str(tmp_path / "unseeded"), train=RESUME,
                              resume=str(out / "checkpoints" / "epoch-2.pt"))
    assert _epochs(unseeded)[:2] == _epochs(full)[:2] and _epochs(unseeded)[2] != _epochs(full)[2]


def test_mixed_resume_refuses_other_checkpoints_naming_the_fix(uninterrupted, tmp_path, capsys):
    from lorakern.harness.glue import run_glue

    out, _ = uninterrupted
    # a mixed checkpoint into a single-task run, and into a mixed run of other tasks (or another order)
    with pytest.raises(ValueError, match=r"is a checkpoint of a --mixed run \(tasks sst2,rte\); resume it with "
                                         r"--task sst2,rte --mixed"):
        run_glue("sst2", out=str(tmp_path / "single"), train=RESUME, resume=str(out))
    for tasks in (["sst2", "mrpc"], ["rte", "sst2"]):
        with pytest.raises(ValueError, match=rf"a --mixed run of tasks sst2,rte, this run trains {','.join(tasks)}; "
                                             r"resume with --task sst2,rte --mixed \(the same tasks in the same "
                                             r"order\)"):
            run_glue_mixed(tasks, out=str(tmp_path / "other"), train=RESUME, resume=str(out))
    with pytest.raises(ValueError, match=r"other settings \(train: checkpoint .*'lr': 0\.005"):
        run_glue_mixed(["sst2", "rte"], out=str(tmp_path / "lr"), train=RESUME, lr=1e-3, resume=str(out))
    # a single-task checkpoint into a mixed run, from the command line: exit 2 and the message
    single = run_glue("rte", out=str(tmp_path / "rte"), train=TrainConfig(warmup_epochs=0, decay_epochs=1,
                                                                          batch_size=64, progress=False))
    assert single["reload_agrees"]
    capsys.readouterr()
    assert main(["glue", "--task", "sst2,rte", "--mixed", "--no-progress", "--out", str(tmp_path / "cli"),
                 "--resume", str(tmp_path / "rte")]) == 2
    err = capsys.readouterr().err
    assert "epoch-1.pt is a checkpoint of a single-task run (glue-rte), not of a --mixed run; resume it without " \
           "--mixed, or run --task sst2,rte --mixed without --resume" in err
    assert not os.path.exists(tmp_path / "cli" / "checkpoints" / "epoch-1.pt")  # refused before any training


def test_keyed_states_load_only_into_the_same_tasks():
    from lorakern.harness.checkpoint import Keyed

    params = {t: torch.nn.Parameter(torch.ones(2)) for t in ("sst2", "rte")}
    optimizers = {t: torch.optim.AdamW([p], lr=0.1) for t, p in params.items()}
    for p in params.values():
        p.grad = torch.ones(2)
    for opt in optimizers.values():
        opt.step()
    saved = Keyed(optimizers).state_dict()
    fresh = Keyed({t: torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=0.1) for t in ("sst2", "rte")})
    fresh.load_state_dict(saved)
    assert fresh.state_dict()["rte"]["state"][0]["step"] == 1
    other = Keyed({t: torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=0.1) for t in ("rte", "sst2")})
    with pytest.raises(ValueError, match=r"holds states for \['sst2', 'rte'\], this run has \['rte', 'sst2'\]"):
        other.load_state_dict(saved)
    with pytest.raises(ValueError, match=r"holds states for one \(a single-task run's\)"):
        other.load_state_dict(optimizers["sst2"].state_dict())
    assert all(not opt.state for opt in other.items.values())  # refused before any state changed


def test_the_issues_command_sst2_mrpc_rte_equals_each_task_alone_and_loads_into_peft(tmp_path, no_dropout):
    """`lorakern glue --task sst2,mrpc,rte --mixed` through the CLI: each task's final metrics equal training it
    alone, and the adapter folder is one PEFT multi-adapter folder: PEFT loads the three adapters (LoRA and
    classifier head each) onto one base and gives lorakern's logits for each."""
    import json

    from peft import PeftModel

    import lorakern
    from lorakern.harness.data import corpus_texts, glue_task, load_glue
    from lorakern.harness.glue import TINY_MAX_LENGTH

    tasks = ["sst2", "mrpc", "rte"]
    out = tmp_path / "mixed"
    assert main(["glue", "--task", ",".join(tasks), "--mixed", "--head", "hf", "--warmup-epochs", "0",
                 "--decay-epochs", "1", "--batch-size", "32", "--no-progress", "--out", str(out)]) == 0
    summaries = json.load(open(out / "metrics.json"))["summaries"]
    for task in tasks:
        alone = run_glue_mixed([task], out=str(tmp_path / task), train=SHORT, head="hf", vocabulary=tasks)
        got, want = summaries[task]["final"], alone["tasks"][task]["final"]
        assert got.keys() == want.keys() and summaries[task]["reload_agrees"]
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=1e-9), (task, key)

    # the base the run trained on, rebuilt as the harness builds it (tiny RoBERTa over the three tasks' texts)
    texts = [t for name in sorted(tasks) for t in corpus_texts(load_glue(glue_task(name), None, False))]
    backbone = models.Backbone(models.TINY, texts, TINY_MAX_LENGTH, seed=TrainConfig().seed)
    base = lambda: backbone.hf_model("classification", 2)
    folder = out / "adapter"
    peft = PeftModel.from_pretrained(base(), str(folder / tasks[0]), adapter_name=tasks[0]).eval()
    ours = lorakern.load_adapter(base(), str(folder / tasks[0]), adapter_name=tasks[0]).eval()
    for task in tasks[1:]:
        peft.load_adapter(str(folder / task), adapter_name=task)
        lorakern.load_adapter(ours, str(folder / task), adapter_name=task)
    ids = torch.randint(3, backbone.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(0))
    logits = {}
    with torch.no_grad():
        for task in tasks:
            peft.set_adapter(task)
            lorakern.set_adapter(ours, task)
            logits[task] = ours(input_ids=ids).logits
            torch.testing.assert_close(peft(input_ids=ids).logits, logits[task], rtol=1e-5, atol=1e-6, msg=task)
    assert not torch.allclose(logits["sst2"], logits["rte"])  # three different adapters, not one loaded thrice
