"""The harness under torchrun: `torchrun --nproc_per_node 2 -m lorakern glue|squad ...` on CPU (gloo).

Two ranks with the global batch of one process follow its loss curve (to fp32 rounding, with dropout off),
score exactly what one process scores with the same weights, write every file once, and resume exactly.
Every subprocess runs from a scratch folder: the repository root holds a folder named kernels/ that
transformers would import (see conftest.py).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import save_no_dropout_roberta
from lorakern.cli import main
from lorakern.harness import distributed
from lorakern.harness.checkpoint import _restore_rng, _rng_state

EPOCHS = ["--warmup-epochs", "1", "--decay-epochs", "2", "--no-progress"]


def torchrun(args: list[str], cwd, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` through its entry point, torch.distributed.run."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in distributed.ENV_KEYS:
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def curve(out) -> list[dict]:
    with open(os.path.join(out, "metrics.json")) as handle:
        return [{k: v for k, v in row.items() if k != "train_seconds"} for row in json.load(handle)["epochs"]]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process runs (OMP_NUM_THREADS=1): the same kernels
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory):
    """A local model folder: the tiny RoBERTa with dropout 0 (with dropout, ranks draw other masks than one
    process, so curves could only agree statistically). With --head hf nothing in the model drops out."""
    from lorakern.harness.data import corpus_texts, glue_task, load_glue

    texts = corpus_texts(load_glue(glue_task("sst2"), None))
    return save_no_dropout_roberta(str(tmp_path_factory.mktemp("no-dropout-model")), texts, 64)


def test_glue_on_two_ranks_follows_one_process_and_scores_the_same(no_dropout_model, tmp_path, one_thread):
    flags = ["glue", "--task", "sst2", "--model", no_dropout_model, "--head", "hf", "--lr", "5e-3",
             "--max-length", "64", "--lora-modules-to-save", "LayerNorm,classifier,word_embeddings", *EPOCHS]
    assert main([*flags, "--out", str(tmp_path / "one")]) == 0
    ran = torchrun(["-m", "lorakern", *flags, "--out", "two"], cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.count("reload check: same metrics") == 1  # rank 0 prints for both
    assert "find_unused_parameters" not in ran.stdout  # transformers' head reaches every trainable tensor

    one, two = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert one[-1]["train_loss"] < 0.2 * one[0]["train_loss"]  # it learns: the comparison is not of flat lines
    torch.testing.assert_close(torch.tensor([r["train_loss"] for r in two]),
                               torch.tensor([r["train_loss"] for r in one]), rtol=1e-5, atol=1e-7)
    assert [{k: v for k, v in r.items() if k != "train_loss"} for r in two] == \
           [{k: v for k, v in r.items() if k != "train_loss"} for r in one]

    # Rank 0 alone wrote the folder: the same files as one process, nothing beside it, no temp files.
    assert sorted(os.listdir(tmp_path)) == ["one", "two"]
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))
    assert not [n for _, _, files in os.walk(tmp_path / "two") for n in files if n.endswith(".tmp")]
    report = (tmp_path / "two" / "report.md").read_text()
    assert "- processes: 2 (gloo, DDP)" in report and "global: 2 processes take about 8 each" in report
    checkpoint = torch.load(tmp_path / "two" / "checkpoints" / "epoch-3.pt", weights_only=True)
    assert len(checkpoint["rng_ranks"]) == 2

    # The sharded evaluation is one process's: the 2-rank adapter scored here gives its metrics exactly.
    from lorakern import load_adapter
    from lorakern.harness.data import glue_task, load_glue
    from lorakern.harness.glue import make_plan
    from lorakern.harness.models import Backbone, build_model
    from lorakern.harness.train import TrainConfig

    splits = load_glue(glue_task("sst2"), None)
    plan = make_plan(glue_task("sst2"), splits, Backbone(no_dropout_model, max_length=64), 64)
    fresh = build_model(Backbone(no_dropout_model, max_length=64), plan.kind, plan.num_labels, "hf")
    load_adapter(fresh, str(tmp_path / "two" / "adapter"))
    scored = plan.evaluate(fresh, TrainConfig(progress=False, device="cpu"))
    final = json.loads((tmp_path / "two" / "metrics.json").read_text())["final"]
    assert scored == final


def test_squad_on_two_ranks_scores_what_one_process_scores(tmp_path, one_thread):
    """The tiny default (the seed head, dropout on) on SQuAD v2.0: the run completes on 2 ranks, the pooler
    bias turns find_unused_parameters on, predictions.json is written once, and the adapter scored here
    gives the run's metrics exactly (the QA evaluation is sharded and gathered)."""
    ran = torchrun(["-m", "lorakern", "squad", "--version", "2.0", "--max-length", "96", "--warmup-epochs", "1",
                    "--decay-epochs", "1", "--no-progress", "--out", "two"], cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    # the seed head reads <s> itself, so the encoder's pooler bias (trainable in the seed recipe) gets no gradient
    assert "DDP: find_unused_parameters=True; 1 trainable tensor(s) get no gradient: roberta.pooler.dense.bias" \
        in ran.stdout
    assert ran.stdout.count("reload check: same metrics") == 1
    assert len(json.loads((tmp_path / "two" / "predictions.json").read_text())) == 96
    assert sorted(os.listdir(tmp_path)) == ["two"]

    from lorakern import load_adapter
    from lorakern.harness.data import corpus_texts, load_squad
    from lorakern.harness.models import Backbone, build_model
    from lorakern.harness.squad import SquadOptions, make_plan
    from lorakern.harness.train import TrainConfig

    splits = load_squad("2.0", None)
    backbone = Backbone("tiny", corpus_texts(splits), 96, seed=0)
    plan = make_plan("2.0", splits, backbone, 96, SquadOptions(), "seed")
    fresh = build_model(backbone, plan.kind, plan.num_labels, "seed")
    load_adapter(fresh, str(tmp_path / "two" / "adapter"))
    final = json.loads((tmp_path / "two" / "metrics.json").read_text())["final"]
    assert plan.evaluate(fresh, TrainConfig(progress=False, device="cpu")) == final


def test_mixed_on_two_ranks_follows_one_process(no_dropout_model, tmp_path, one_thread):
    """`--mixed` under torchrun: each task's batch dealt out to 2 ranks gives one process's per-step losses
    (to fp32 rounding), metrics and adapters; rank 0 writes the folder; its checkpoint resumes on 2 ranks and
    in one process.
    RTE is cut to 100 training rows so it runs out before SST-2 (its tensors then get zero gradients under DDP
    and its optimiser rests), and batch 15 leaves SST-2 a last batch of 1 row: rank 1 then has no row at all."""
    from safetensors.torch import load_file

    from lorakern.harness.data import FIXTURES
    from lorakern.harness.mixed import run_glue_mixed
    from lorakern.harness.run import RunOptions
    from lorakern.harness.train import TrainConfig

    data = tmp_path / "data"
    for folder in ("SST-2", "RTE"):
        (data / folder).mkdir(parents=True)
        for split in ("train", "dev"):
            lines = open(os.path.join(FIXTURES, "glue", folder, f"{split}.tsv")).read().splitlines(keepends=True)
            (data / folder / f"{split}.tsv").write_text("".join(lines[:101] if folder == "RTE" and split == "train"
                                                                else lines))
    flags = ["glue", "--task", "sst2,rte", "--mixed", "--model", no_dropout_model, "--head", "hf", "--lr", "5e-3",
             "--max-length", "64", "--batch-size", "15", "--data", str(data),
             "--lora-modules-to-save", "LayerNorm,classifier,word_embeddings",
             "--warmup-epochs", "1", "--decay-epochs", "1", "--no-progress"]
    assert main([*flags, "--out", str(tmp_path / "one")]) == 0
    ran = torchrun(["-m", "lorakern", *flags, "--out", "two"], cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.count("sst2 (mixed):") == 1 and ran.stdout.count("rte (mixed):") == 1  # rank 0 prints

    def tasks_of(out):
        return {task: [row[task] for row in curve(out)] for task in ("sst2", "rte")}

    one, two = tasks_of(tmp_path / "one"), tasks_of(tmp_path / "two")
    assert [len(row["step_losses"]) for row in one["rte"]] == [7, 7]  # 100 rows: 7 steps of the 18
    assert one["sst2"][-1]["dev/accuracy"] >= 0.85  # it learns (chance: 0.5): the curves are not flat lines
    for task in one:
        torch.testing.assert_close(torch.tensor([row["step_losses"] for row in two[task]]),
                                   torch.tensor([row["step_losses"] for row in one[task]]), rtol=1e-5, atol=1e-7)
        assert [{k: v for k, v in row.items() if "/" in k} for row in two[task]] == \
               [{k: v for k, v in row.items() if "/" in k} for row in one[task]]
        trained = load_file(str(tmp_path / "two" / "adapter" / task / "adapter_model.safetensors"))
        reference = load_file(str(tmp_path / "one" / "adapter" / task / "adapter_model.safetensors"))
        assert trained.keys() == reference.keys()
        for name in reference:
            torch.testing.assert_close(trained[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(AssertionError):  # the bound notices a few times itself on one step
        losses = torch.tensor([row["step_losses"] for row in one["sst2"]])
        torch.testing.assert_close(losses * (1 + 5e-5 * (torch.arange(losses.numel()) == 3).view_as(losses)),
                                   losses, rtol=1e-5, atol=1e-7)

    assert sorted(os.listdir(tmp_path)) == ["data", "one", "two"]  # rank 0 alone wrote; nothing beside it
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))
    assert not [n for _, _, files in os.walk(tmp_path / "two") for n in files if n.endswith(".tmp")]
    checkpoint = torch.load(tmp_path / "two" / "checkpoints" / "epoch-1.pt", weights_only=True)
    assert len(checkpoint["rng_ranks"]) == 2 and list(checkpoint["optimizer"]) == ["sst2", "rte"]

    # Resumed under torchrun too: the 2 ranks continue from the checkpoint of epoch 1 to the same end.
    ran = torchrun(["-m", "lorakern", *flags, "--out", "again", "--resume", "two/checkpoints/epoch-1.pt"],
                   cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    again = tasks_of(tmp_path / "again")
    for task in one:
        assert [len(row["step_losses"]) for row in again[task]] == [len(row["step_losses"]) for row in one[task]]
        torch.testing.assert_close(torch.tensor(again[task][-1]["step_losses"]),
                                   torch.tensor(one[task][-1]["step_losses"]), rtol=1e-5, atol=1e-7)
        assert {k: v for k, v in again[task][-1].items() if "/" in k} == \
               {k: v for k, v in one[task][-1].items() if "/" in k}
        trained = load_file(str(tmp_path / "again" / "adapter" / task / "adapter_model.safetensors"))
        reference = load_file(str(tmp_path / "one" / "adapter" / task / "adapter_model.safetensors"))
        for name in reference:
            torch.testing.assert_close(trained[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)

    # Without dropout the RNG does not matter: the 2-rank checkpoint continues in one process to the same end.
    options = RunOptions(model=no_dropout_model, head="hf", lr=5e-3, max_length=64, data=str(data),
                         lora={"modules_to_save": ["LayerNorm", "classifier", "word_embeddings"]},
                         train=TrainConfig(warmup_epochs=1, decay_epochs=1, batch_size=15, progress=False))
    resumed = run_glue_mixed(["sst2", "rte"], options, out=str(tmp_path / "resumed"),
                             resume=str(tmp_path / "two" / "checkpoints" / "epoch-1.pt"))
    for task in one:
        assert resumed["tasks"][task]["final"] == {k: v for k, v in one[task][-1].items() if "/" in k}
        torch.testing.assert_close(torch.tensor(resumed["history"][-1][task]["step_losses"]),
                                   torch.tensor(one[task][-1]["step_losses"]), rtol=1e-5, atol=1e-7)


HELPERS = r'''
# `helpers.py OUT`: under torchrun, distributed.py's helpers on 2 gloo ranks, then the training loop; alone
# (no WORLD_SIZE), the training loop in one process. Rank 0 writes what every rank saw.
import json, os, sys
import torch
from torch import nn
from lorakern import LoraConfig, inject
from lorakern.harness import distributed
from lorakern.harness.train import TrainConfig, predict, train

def training_loop(out_dir, dropout=0.0, resume=None):
    # 9 examples, batch 4 in 2 micro-batches of 2: the last step's one example leaves rank 1 an empty share
    torch.manual_seed(0)
    model = inject(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 1)),
                   LoraConfig(r=2, target_modules=["0", "3"], bias="lora_only"))
    gen = torch.Generator().manual_seed(1)
    features = [{"x": torch.randn(4, generator=gen).tolist(), "y": float(i % 3)} for i in range(9)]
    collate = lambda rows: {k: torch.tensor([r[k] for r in rows]) for k in ("x", "y")}
    loss_fn = lambda net, batch: nn.functional.mse_loss(net(batch["x"]).squeeze(-1), batch["y"])
    config = TrainConfig(lr=1e-2, warmup_epochs=1, decay_epochs=2, batch_size=4, grad_accum=2, eval_batch_size=2,
                         progress=False, device="cpu")
    def evaluate(m):  # 5 evaluation batches: ranks 0 and 1 compute 3 and 2 of them
        forward = lambda net, batch: net(batch["x"]).squeeze(-1)
        outputs = torch.cat(predict(m, features, collate, forward, config, torch.device("cpu")))
        return {"dev/outputs": outputs.tolist()}
    return train(model, features, collate, loss_fn, evaluate, config, out_dir, {"dropout": dropout}, resume)

out = sys.argv[1]
with distributed.session(torch.device("cpu")) as context:
    result = {"context": [context.rank, context.world_size, context.backend]}
    if context.enabled:
        result["gathered"] = distributed.all_gather_objects(context.rank * 10)
        try:  # a bad input found on rank 0 reaches every rank as a ValueError, instead of a hang
            distributed.broadcast_from_main(lambda: (_ for _ in ()).throw(ValueError("bad checkpoint")))
        except ValueError as exc:
            result["error"] = str(exc)
        folder = os.path.join(os.path.dirname(out), "shared")
        if context.is_main:
            os.makedirs(folder)
            with open(os.path.join(folder, "a.bin"), "wb") as handle:
                handle.write(b"adapter bytes")
        with distributed.folder_from_main(folder) as readable:
            with open(os.path.join(readable, "a.bin"), "rb") as handle:
                result["read"] = handle.read().decode()
            result["own_copy"] = readable != folder
    root = os.path.join(os.path.dirname(out), f"world-{context.world_size}")
    result["history"] = training_loop(os.path.join(root, "plain"))
    # with dropout: resumed from epoch 1, each rank continues from its own RNG state, as if never stopped
    result["dropout"] = training_loop(os.path.join(root, "dropout"), 0.5)
    result["resumed"] = training_loop(os.path.join(root, "resumed"), 0.5,
                                      os.path.join(root, "dropout", "checkpoints", "epoch-1.pt"))
    results = distributed.all_gather_objects(result)
    if context.is_main:
        with open(out, "w") as handle:
            json.dump(results, handle)
distributed.leave(0)
'''


def test_distributed_helpers_and_the_training_loop_on_two_ranks(tmp_path):
    """distributed.py's collectives, then train() itself on 2 ranks against one process: uneven and empty
    shares, gradient accumulation, sharded evaluation, and an exact resume with dropout on."""
    script = tmp_path / "helpers.py"
    script.write_text(HELPERS)
    env = {k: v for k, v in os.environ.items() if k not in distributed.ENV_KEYS}
    alone = subprocess.run([sys.executable, str(script), str(tmp_path / "one.json")], cwd=tmp_path,
                           env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    assert alone.returncode == 0, alone.stderr[-3000:]
    ran = torchrun([str(script), str(tmp_path / "two.json")], cwd=tmp_path, timeout=120)
    assert ran.returncode == 0, ran.stderr[-3000:]
    ranks = json.loads((tmp_path / "two.json").read_text())
    assert [r["context"] for r in ranks] == [[0, 2, "gloo"], [1, 2, "gloo"]]
    assert all(r["gathered"] == [0, 10] and r["error"] == "bad checkpoint" for r in ranks)
    assert [(r["read"], r["own_copy"]) for r in ranks] == [("adapter bytes", False), ("adapter bytes", True)]

    # The loop itself, with uneven shares (an empty one included), grad accumulation and sharded evaluation:
    # every rank holds the same history, and it is one process's to fp32 rounding.
    (one,) = json.loads((tmp_path / "one.json").read_text())
    two, other = ([{k: v for k, v in row.items() if k != "train_seconds"} for row in r["history"]] for r in ranks)
    assert two == other
    for key in ("train_loss", "dev/outputs"):
        torch.testing.assert_close(torch.tensor([row[key] for row in two]),
                                   torch.tensor([row[key] for row in one["history"]]), rtol=1e-5, atol=1e-6, msg=key)
    assert one["history"][-1]["train_loss"] < one["history"][0]["train_loss"]
    checkpoints = sorted(os.listdir(tmp_path / "world-2" / "plain" / "checkpoints"))
    assert checkpoints == ["epoch-1.pt", "epoch-2.pt", "epoch-3.pt"]  # rank 0's, written once

    def drop_time(rows):
        return [{k: v for k, v in row.items() if k != "train_seconds"} for row in rows]

    assert drop_time(ranks[0]["resumed"]) == drop_time(ranks[0]["dropout"])
    assert drop_time(ranks[0]["dropout"]) != drop_time(one["dropout"])  # rank 1 draws its own masks


@pytest.mark.parametrize("env,message", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK is not; start each process with torchrun"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE must be an integer, got 'two'"),
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "RANK 2 / LOCAL_RANK 0 do not fit WORLD_SIZE 2"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "MASTER_ADDR is not set"),
], ids=["no-rank", "not-a-number", "rank-too-big", "no-master"])
def test_a_broken_torchrun_environment_is_named(monkeypatch, env, message):
    from lorakern.harness.glue import run_glue

    for key in distributed.ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=message):
        run_glue("sst2", out="unused")


def test_each_rank_restores_its_own_rng_state():
    """The per-rank part of resuming, without processes: rank r takes rng_ranks[r]; on another number of
    ranks rank 0 takes the saved rank-0 state and the others reseed."""
    torch.manual_seed(11)
    rank0 = _rng_state()
    torch.manual_seed(22)
    rank1 = _rng_state()
    state = {"rng": rank0, "rng_ranks": [rank0, rank1]}
    draws = {}
    for name, context in [("r1of2", distributed.Context(1, 2)), ("r0of3", distributed.Context(0, 3)),
                          ("r2of3", distributed.Context(2, 3)), ("single", distributed.SINGLE)]:
        _restore_rng(state, context, seed=5)
        draws[name] = torch.rand(3)
    torch.manual_seed(22)
    assert torch.equal(draws["r1of2"], torch.rand(3))
    torch.manual_seed(11)
    expected0 = torch.rand(3)
    assert torch.equal(draws["r0of3"], expected0) and torch.equal(draws["single"], expected0)
    torch.manual_seed(5 + 2)
    assert torch.equal(draws["r2of3"], torch.rand(3))
