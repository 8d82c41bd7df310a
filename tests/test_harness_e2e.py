"""End to end on the tiny default: it learns, the reloaded adapter scores the same, a fixed seed repeats,
and a run resumed from an epoch checkpoint ends with the same numbers as the uninterrupted one."""
import json
import os

import pytest

from lorakern.cli import main
from lorakern.harness.glue import run_glue
from lorakern.harness.squad import run_squad
from lorakern.harness.train import TrainConfig

SHORT = TrainConfig(warmup_epochs=1, decay_epochs=2, progress=False)


def _curve(summary_out):
    with open(os.path.join(summary_out, "metrics.json")) as handle:
        epochs = json.load(handle)["epochs"]
    return [{k: v for k, v in row.items() if k != "train_seconds"} for row in epochs]


@pytest.fixture(scope="module")
def sst2(tmp_path_factory):
    return run_glue("sst2", out=str(tmp_path_factory.mktemp("sst2")), train=SHORT, compare="seed")


def test_glue_learns_and_the_reloaded_adapter_agrees(sst2):
    epochs = _curve(sst2["out"])
    assert sst2["final"]["dev/accuracy"] >= 0.9  # chance is 0.5 on the balanced fixture
    assert epochs[-1]["train_loss"] < 0.5 * epochs[0]["train_loss"]
    assert sst2["reload_agrees"] and sst2["reloaded"] == sst2["final"]
    assert sst2["adapter_bytes"] == sum(f.stat().st_size for f in os.scandir(os.path.join(sst2["out"], "adapter")))


def test_glue_writes_its_files(sst2):
    out = sst2["out"]
    with open(os.path.join(out, "curve.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "metrics.csv")) as handle:
        lines = handle.read().splitlines()
    assert lines[0].split(",")[:2] == ["epoch", "train_loss"] and "dev/accuracy" in lines[0] and len(lines) == 4
    report = open(os.path.join(out, "report.md")).read()
    assert "| dev | accuracy | " in report and "| 0.9380 |" in report  # the seed's published SST-2 number
    assert "Reload check: the adapter saved to adapter/, loaded into a freshly built model, gives the same metrics" in report
    assert "| **trainable / total** |" in report and "Adapter on disk:" in report
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["epoch-1.pt", "epoch-2.pt", "epoch-3.pt"]
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_config.json"))
    assert not [name for _, _, files in os.walk(out) for name in files if name.endswith(".tmp")]


def test_glue_same_seed_same_numbers_and_resume_reaches_them(sst2, tmp_path):
    again = run_glue("sst2", out=str(tmp_path / "again"), train=SHORT)
    assert _curve(again["out"]) == _curve(sst2["out"])
    resumed = run_glue("sst2", out=str(tmp_path / "resumed"), train=SHORT,
                       resume=os.path.join(sst2["out"], "checkpoints", "epoch-1.pt"))
    assert _curve(resumed["out"]) == _curve(sst2["out"])
    assert resumed["final"] == sst2["final"] and resumed["reloaded"] == sst2["reloaded"]


def test_resume_refuses_other_settings(sst2, tmp_path):
    other = TrainConfig(warmup_epochs=1, decay_epochs=2, progress=False, lr=1e-3)
    with pytest.raises(ValueError, match=r"written by a run with other settings \(train: checkpoint .*'lr': 0\.005"):
        run_glue("sst2", out=str(tmp_path), train=other, lr=1e-3, resume=sst2["out"])


def test_squad_v2_learns_reloads_and_resumes(tmp_path):
    first = run_squad("2.0", out=str(tmp_path / "first"), train=SHORT)
    final = first["final"]
    # The fixture's answers are names, places and years; about 35% of its questions have no answer.
    assert final["dev/best_f1"] >= 80 and final["dev/HasAns_f1"] >= 60, final
    assert first["reload_agrees"] and first["reloaded"] == final
    with open(os.path.join(first["out"], "predictions.json")) as handle:
        assert len(json.load(handle)) == 96
    resumed = run_squad("2.0", out=str(tmp_path / "resumed"), train=SHORT,
                        resume=os.path.join(first["out"], "checkpoints"))  # a folder: its latest checkpoint
    assert resumed["final"] == final  # resumed from epoch 3 of 3: nothing left to train, same numbers


def test_squad_resume_mid_run_matches(tmp_path):
    short = TrainConfig(warmup_epochs=1, decay_epochs=1, progress=False)
    first = run_squad("1.1", out=str(tmp_path / "first"), train=short, max_length=96)
    resumed = run_squad("1.1", out=str(tmp_path / "resumed"), train=short, max_length=96,
                        resume=os.path.join(first["out"], "checkpoints", "epoch-1.pt"))
    assert _curve(resumed["out"]) == _curve(first["out"])
    assert first["final"]["dev/f1"] > 20  # after 2 short epochs; a random span scores near 0


def test_cli_glue_with_hf_head_regression(tmp_path, capsys):
    code = main(["glue", "--task", "stsb", "--head", "hf", "--warmup-epochs", "0", "--decay-epochs", "2",
                 "--grad-accum", "2", "--out", str(tmp_path), "--no-progress", "--compare", "seed"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| dev | pearson |" in out and "0.8080 |" in out and "reload check: same metrics" in out
    assert json.load(open(tmp_path / "metrics.json"))["final"]["dev/pearson"] > 0.5


def test_cli_reports_bad_input_with_the_fix(tmp_path, capsys):
    assert main(["glue", "--task", "rte", "--data", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"lorakern: error: {os.path.join(str(tmp_path), 'RTE', 'train.tsv')} does not exist; --data must be" in err
    with pytest.raises(SystemExit):
        main(["glue", "--task", "sst3"])
