"""GLUE and SQuAD loaders on the shipped fixtures, Hugging Face rows, and every malformed-input error."""
import json
import os
import re

import pytest

from lorakern.harness.data import (
    FIXTURES, GLUE_TASKS, QAExample, glue_examples_from_hf, glue_task, load_glue, load_squad, read_glue_tsv,
    read_squad_json, squad_examples_from_hf,
)
from lorakern.harness.squad import featurize as squad_features
from lorakern.harness.models import build_tiny_tokenizer
from lorakern.harness.data import corpus_texts

PAIRED = {"mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}


@pytest.mark.parametrize("name", list(GLUE_TASKS), ids=list(GLUE_TASKS))
def test_each_glue_loader_reads_its_fixture(name):
    task = GLUE_TASKS[name]
    splits = load_glue(name)
    assert list(splits) == ["train", *task.eval_splits]
    for split, examples in splits.items():
        assert len(examples) == 256 if split == "train" else 80
        assert all(e.text_a.strip() for e in examples)
        assert all((e.text_b is not None) == (name in PAIRED) for e in examples)
        labels = [e.label for e in examples]
        if task.is_regression:
            assert all(isinstance(v, float) and 0.0 <= v <= 5.0 for v in labels)
        else:
            assert set(labels) == set(range(task.num_labels)), (split, set(labels))  # every class present


def test_glue_reads_by_header_name_and_label_spelling(tmp_path):
    folder = tmp_path / "MNLI"
    folder.mkdir()
    header = "index\tsentence1\tsentence2\tlabel1\tlabel2\tgold_label\n"
    for split in ("train", "dev_matched", "dev_mismatched"):
        (folder / f"{split}.tsv").write_text(header + "0\ta man sleeps\ta person rests\tneutral\tentailment\tentailment\n"
                                             "1\tit rains\tit is dry\tcontradiction\tcontradiction\tcontradiction\n")
    splits = load_glue("mnli", str(tmp_path))
    assert [(e.text_a, e.text_b, e.label) for e in splits["dev_matched"]] == [
        ("a man sleeps", "a person rests", 0), ("it rains", "it is dry", 2)]
    assert load_glue("mnli", str(folder))["train"][1].label == 2  # --data may name the task folder itself


def test_cola_has_no_header_and_reads_by_position(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("gj04\t1\t\tOur friends won't buy this analysis.\ngj04\t0\t*\tThey drank the pub.\n")
    examples = read_glue_tsv(glue_task("cola"), str(path))
    assert [(e.text_a, e.label) for e in examples] == [("Our friends won't buy this analysis.", 1),
                                                        ("They drank the pub.", 0)]


@pytest.mark.parametrize(
    "content,line,message",
    [
        ("sentence\tlabel\ngood film\t1\nbad film\n", 3, "expected 2 tab-separated fields, got 1"),
        ("sentence\tlabel\ngood film\t1\nbad film\tnegative\n", 3, r"label 'negative' is not one of \('0', '1'\)"),
        ("sentence\tlabel\n\t1\n", 2, "empty text in column 'sentence'"),
        ("text\tlabel\ngood\t1\n", 1, r"lacks column\(s\) \['sentence'\]"),
    ],
    ids=["columns", "label", "empty-text", "header"],
)
def test_malformed_glue_rows_name_file_and_line(tmp_path, content, line, message):
    path = tmp_path / "train.tsv"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(f"{path}:{line}: ") + ".*" + message):
        read_glue_tsv(glue_task("sst2"), str(path))


def test_skip_bad_rows_drops_them(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\ngood film\t1\nbroken row\nbad film\t0\n")
    assert [e.label for e in read_glue_tsv(glue_task("sst2"), str(path), skip_bad_rows=True)] == [1, 0]


def test_stsb_score_must_be_a_number(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("sentence1\tsentence2\tscore\na\tb\thigh\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: score 'high' is not a number")):
        read_glue_tsv(glue_task("stsb"), str(path))


def test_missing_files_and_unknown_tasks(tmp_path):
    with pytest.raises(ValueError, match="unknown GLUE task 'sst3'; choose one of cola, sst2"):
        glue_task("sst3")
    with pytest.raises(ValueError, match=re.escape(os.path.join(str(tmp_path), "SST-2", "train.tsv")) + " does not exist"):
        load_glue("sst2", str(tmp_path))
    with pytest.raises(ValueError, match="is not a folder"):
        load_glue("sst2", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown SQuAD version '3.0'"):
        load_squad("3.0")


def test_glue_from_hugging_face_rows():
    rows = [{"premise": "p", "hypothesis": "h", "label": 2, "idx": 0}]
    assert [(e.text_a, e.text_b, e.label) for e in glue_examples_from_hf(GLUE_TASKS["mnli"], rows, "train")] == [
        ("p", "h", 2)]
    stsb = glue_examples_from_hf(GLUE_TASKS["stsb"], [{"sentence1": "a", "sentence2": "b", "label": 3.2}], "train")
    assert stsb[0].label == 3.2
    with pytest.raises(ValueError, match="label -1 is outside 0..1"):
        glue_examples_from_hf(GLUE_TASKS["sst2"], [{"sentence": "x", "label": -1}], "test")


@pytest.mark.parametrize("version", ["1.1", "2.0"])
def test_squad_loader_reads_its_fixture(version):
    splits = load_squad(version)
    assert (len(splits["train"]), len(splits["dev"])) == (160, 96)
    for example in splits["train"] + splits["dev"]:
        for text, start in example.answers:
            assert example.context[start:start + len(text)] == text
        assert example.is_impossible == (not example.answers)
    assert all(len(e.answers) == 3 for e in splits["dev"] if e.answers)  # several gold answers, as in SQuAD dev
    impossible = sum(e.is_impossible for e in splits["train"])
    assert (impossible == 0) if version == "1.1" else (30 <= impossible <= 90)


def _squad_file(tmp_path, qa, version="2.0"):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps({"version": version, "data": [{"title": "t", "paragraphs": [
        {"context": "Paris is in France.", "qas": [qa]}]}]}))
    return str(path)


@pytest.mark.parametrize(
    "qa,version,message",
    [
        ({"id": "q", "question": "?", "answers": [{"text": "Paris", "answer_start": 3}]}, "2.0",
         r"'Paris' is not at answer_start=3 of the context \(found 'is is'\)"),
        ({"id": "q", "question": "?", "answers": [{"text": "Paris"}]}, "2.0", "needs 'text' and an integer"),
        ({"id": "q", "question": "?", "answers": []}, "2.0", "no answers and not is_impossible"),
        ({"id": "q", "question": "?", "answers": [], "is_impossible": True}, "1.1", "load it with --version 2.0"),
        ({"question": "?", "answers": []}, "2.0", "needs string fields 'id' and 'question'"),
    ],
    ids=["offset", "no-start", "no-answer", "impossible-in-v1", "no-id"],
)
def test_malformed_squad_entries_name_file_and_path(tmp_path, qa, version, message):
    path = _squad_file(tmp_path, qa, version)
    with pytest.raises(ValueError, match=re.escape(f"{path}: data[0].paragraphs[0].qas[0]") + ".*" + message):
        read_squad_json(path, version)


def test_squad_bad_json_names_the_line(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text('{"data": [\n  {"title": }\n]}')
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not valid JSON")):
        read_squad_json(str(path), "1.1")


def test_squad_from_hugging_face_rows():
    rows = [{"id": "a", "question": "q?", "context": "c d", "answers": {"text": ["d"], "answer_start": [2]}},
            {"id": "b", "question": "q?", "context": "c d", "answers": {"text": [], "answer_start": []}}]
    assert squad_examples_from_hf(rows) == [QAExample("a", "q?", "c d", [("d", 2)], False),
                                            QAExample("b", "q?", "c d", [], True)]


def test_squad_windows_cover_long_contexts_and_label_the_answer_tokens():
    splits = load_squad("2.0")
    tokenizer = build_tiny_tokenizer(corpus_texts(splits), 128)
    examples = splits["train"]
    features = squad_features(tokenizer, examples, max_length=64, doc_stride=24, mode="sliding")
    per_example = [sum(f["_example"] == i for f in features) for i in range(len(examples))]
    assert min(per_example) >= 1 and max(per_example) >= 3  # long contexts become several windows
    labelled = 0
    for f in features:
        assert len(f["input_ids"]) <= 64
        example = examples[f["_example"]]
        if f["start_positions"]:
            labelled += 1
            text = example.context[f["_offsets"][f["start_positions"]][0]:f["_offsets"][f["end_positions"]][1]]
            assert text == example.answers[0][0]
        else:
            assert f["no_answer"] == 1.0
    assert labelled >= sum(bool(e.answers) for e in examples)  # every answer lands in at least one window
    seed_mode = squad_features(tokenizer, examples, max_length=64, doc_stride=0, mode="seed")
    assert len(seed_mode) == len(examples)  # the seed truncates: one window per question
    with pytest.raises(ValueError, match=r"doc_stride must be in \(0, max_length=64\), got 64"):
        squad_features(tokenizer, examples, max_length=64, doc_stride=64, mode="sliding")


def test_fixtures_are_small_and_regenerate_identically(tmp_path, monkeypatch):
    from lorakern.harness.fixtures import make_fixtures

    files = [os.path.join(d, f) for d, _, fs in os.walk(FIXTURES) for f in fs if f.endswith((".tsv", ".json"))]
    assert sum(os.path.getsize(f) for f in files) < 1_000_000
    monkeypatch.setattr(make_fixtures, "HERE", str(tmp_path))
    make_fixtures.main()
    for path in files:
        relative = os.path.relpath(path, FIXTURES)
        with open(path, "rb") as shipped, open(tmp_path / relative, "rb") as fresh:
            assert shipped.read() == fresh.read(), relative


def test_hf_data_without_the_datasets_package_says_how_to_fix(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # as on a machine without `datasets`
    with pytest.raises(ValueError, match=r"--data hf needs the `datasets` package \(pip install datasets\)"):
        load_glue("sst2", "hf")
    with pytest.raises(ValueError, match="--data hf needs the `datasets` package"):
        load_squad("2.0", "hf")
