"""GLUE and SQuAD loaders: the official files, Hugging Face ``datasets``, or the fixtures that ship here.

Every loader returns plain Python records, so tokenization, training and metrics never see where the data
came from. A malformed file or row raises ``ValueError`` naming the file, the line and the fix.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
HF = "hf"  # --data hf: Hugging Face datasets from the local cache


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task lays out its files and what it is scored by.

    columns: (text_a, text_b or None, label) as header names, or as column indices for header-less CoLA.
    labels: label strings in class-index order (Hugging Face's order); None for STS-B's float score.
    """

    name: str
    folder: str
    columns: tuple
    labels: Optional[tuple[str, ...]]
    metrics: tuple[str, ...]
    eval_splits: tuple[str, ...] = ("dev",)
    header: bool = True
    hf_columns: tuple = ()
    hf_eval_splits: tuple[str, ...] = ("validation",)

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None


BINARY = ("0", "1")
GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t for t in [
        GlueTask("cola", "CoLA", (3, None, 1), BINARY, ("mcc",), header=False, hf_columns=("sentence", None)),
        GlueTask("sst2", "SST-2", ("sentence", None, "label"), BINARY, ("accuracy",), hf_columns=("sentence", None)),
        GlueTask("mrpc", "MRPC", ("#1 String", "#2 String", "Quality"), BINARY, ("accuracy", "f1"),
                 hf_columns=("sentence1", "sentence2")),
        GlueTask("stsb", "STS-B", ("sentence1", "sentence2", "score"), None, ("pearson", "spearman"),
                 hf_columns=("sentence1", "sentence2")),
        GlueTask("qqp", "QQP", ("question1", "question2", "is_duplicate"), BINARY, ("accuracy", "f1"),
                 hf_columns=("question1", "question2")),
        GlueTask("mnli", "MNLI", ("sentence1", "sentence2", "gold_label"), ("entailment", "neutral", "contradiction"),
                 ("accuracy",), eval_splits=("dev_matched", "dev_mismatched"), hf_columns=("premise", "hypothesis"),
                 hf_eval_splits=("validation_matched", "validation_mismatched")),
        GlueTask("qnli", "QNLI", ("question", "sentence", "label"), ("entailment", "not_entailment"), ("accuracy",),
                 hf_columns=("question", "sentence")),
        GlueTask("rte", "RTE", ("sentence1", "sentence2", "label"), ("entailment", "not_entailment"), ("accuracy",),
                 hf_columns=("sentence1", "sentence2")),
        GlueTask("wnli", "WNLI", ("sentence1", "sentence2", "label"), BINARY, ("accuracy",),
                 hf_columns=("sentence1", "sentence2")),
    ]
}


@dataclass
class PairExample:
    """One GLUE row: text_b is None for single-sentence tasks; label is a class index or a float score."""

    text_a: str
    text_b: Optional[str]
    label: Union[int, float]


@dataclass
class QAExample:
    """One SQuAD question. answers are (text, char_start) pairs; empty for an unanswerable v2.0 question."""

    qid: str
    question: str
    context: str
    answers: list[tuple[str, int]] = field(default_factory=list)
    is_impossible: bool = False


def glue_task(name: str) -> GlueTask:
    key = name.lower().replace("-", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; choose one of {', '.join(GLUE_TASKS)} (or 'all')")
    return GLUE_TASKS[key]


def _label_index(task: GlueTask, raw: str, where: str) -> Union[int, float]:
    if task.labels is None:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{where}: score {raw!r} is not a number; STS-B scores are floats in [0, 5]") from None
    if raw not in task.labels:
        raise ValueError(f"{where}: label {raw!r} is not one of {task.labels}; fix the row or check that the file "
                         f"belongs to {task.folder}")
    return task.labels.index(raw)


def read_glue_tsv(task: GlueTask, path: str, skip_bad_rows: bool = False) -> list[PairExample]:
    """Rows of one GLUE TSV, read as the GLUE distribution writes them: tab-separated, no quoting.

    Columns are found by header name (CoLA: by position, it has no header), so MNLI's train and dev files,
    whose label columns differ in number, read the same way. A row with the wrong number of fields or a bad
    label raises, naming the line; ``skip_bad_rows`` drops such rows instead (real QQP has a few).
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist; --data must be a GLUE folder holding {task.folder}/ "
                         f"(train.tsv, {', '.join(s + '.tsv' for s in task.eval_splits)})")
    with open(path, encoding="utf-8", newline="") as handle:
        lines = handle.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    if task.header:
        if not lines:
            raise ValueError(f"{path}: the file is empty; expected a header line with {task.columns}")
        header = lines[0].split("\t")
        missing = [c for c in task.columns if c is not None and c not in header]
        if missing:
            raise ValueError(f"{path}:1: header {header} lacks column(s) {missing}; is this the {task.folder} "
                             f"file of the GLUE distribution?")
        index = [header.index(c) if c is not None else None for c in task.columns]
        width, first = len(header), 1
    else:
        index, width, first = list(task.columns), 4, 0
    examples = []
    for number, line in enumerate(lines[first:], start=first + 1):
        where = f"{path}:{number}"
        fields = line.split("\t")
        try:
            if len(fields) != width:
                raise ValueError(f"{where}: expected {width} tab-separated fields, got {len(fields)}; the row is "
                                 f"malformed (fix it, or pass skip_bad_rows=True / --skip-bad-rows to drop it)")
            text_a = fields[index[0]]
            if not text_a.strip():
                raise ValueError(f"{where}: empty text in column {task.columns[0]!r}; fix or drop the row")
            text_b = fields[index[1]] if index[1] is not None else None
            label = _label_index(task, fields[index[2]].strip(), where)
        except ValueError:
            if skip_bad_rows:
                continue
            raise
        examples.append(PairExample(text_a, text_b, label))
    if not examples:
        raise ValueError(f"{path} has no data rows; point --data at the GLUE files")
    return examples


def load_glue(task: Union[str, GlueTask], data: Optional[str] = None, skip_bad_rows: bool = False,
              ) -> dict[str, list[PairExample]]:
    """{"train": [...], <eval split>: [...]} from a GLUE folder (``data``), ``"hf"``, or the fixtures (None).

    ``data`` is the folder holding the task folders (glue_data/ with CoLA/, SST-2/, ...) or the task folder
    itself. Eval splits are named as the GLUE files: "dev", or MNLI's "dev_matched" and "dev_mismatched".
    """
    task = glue_task(task) if isinstance(task, str) else task
    if data == HF:
        return _load_glue_hf(task)
    root = os.path.join(FIXTURES, "glue") if data is None else data
    if not os.path.isdir(root):
        raise ValueError(f"--data {root!r} is not a folder; give the GLUE folder (with {task.folder}/ inside), "
                         f"'hf' for Hugging Face datasets, or nothing for the fixtures")
    folder = os.path.join(root, task.folder)
    if not os.path.isdir(folder) and os.path.basename(os.path.normpath(root)) == task.folder:
        folder = root  # --data names the task folder itself
    return {split: read_glue_tsv(task, os.path.join(folder, f"{split}.tsv"), skip_bad_rows)
            for split in ("train", *task.eval_splits)}


def glue_examples_from_hf(task: GlueTask, rows: Iterable[dict], split: str) -> list[PairExample]:
    """Records of a Hugging Face ``glue`` split (its labels are already class indices in our order)."""
    a, b = task.hf_columns
    out = []
    for number, row in enumerate(rows):
        label = row["label"]
        if task.is_regression:
            label = float(label)
        elif not 0 <= int(label) < task.num_labels:
            raise ValueError(f"datasets glue/{task.name} {split} row {number}: label {label!r} is outside "
                             f"0..{task.num_labels - 1} (a test split has no labels; use train and validation)")
        out.append(PairExample(row[a], row[b] if b else None, label))
    return out


def _hf_load(*args):
    try:
        import datasets
    except ImportError as exc:
        raise ValueError("--data hf needs the `datasets` package (pip install datasets) and the sets in its "
                         "cache; or pass --data with the folder of the official files") from exc
    return datasets.load_dataset(*args)


def _load_glue_hf(task: GlueTask) -> dict[str, list[PairExample]]:
    sets = _hf_load("glue", task.name)
    splits = {"train": glue_examples_from_hf(task, sets["train"], "train")}
    for ours, theirs in zip(task.eval_splits, task.hf_eval_splits):
        splits[ours] = glue_examples_from_hf(task, sets[theirs], theirs)
    return splits


# ---------------------------------------------------------------------------------------------- SQuAD

SQUAD_VERSIONS = ("1.1", "2.0")


def squad_version(version: str) -> str:
    version = str(version).lstrip("v")
    if version not in SQUAD_VERSIONS:
        raise ValueError(f"unknown SQuAD version {version!r}; choose 1.1 or 2.0")
    return version


def read_squad_json(path: str, version: str) -> list[QAExample]:
    """Questions of a SQuAD JSON file (data -> paragraphs -> context, qas), checked as they are read.

    Errors name the file and the JSON path of the bad entry (JSON has no useful line numbers once
    minified, as the official files are), e.g. ``data[3].paragraphs[0].qas[2]``.
    """
    version = squad_version(version)
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist; --data must be a folder holding train-v{version}.json and "
                         f"dev-v{version}.json (the official file names)")
    try:
        with open(path, encoding="utf-8") as handle:
            doc = json.load(handle)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); is the download complete?") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise ValueError(f"{path}: expected a JSON object with a 'data' list (the SQuAD layout)")
    examples = []
    for a, article in enumerate(doc["data"]):
        for p, paragraph in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            if not isinstance(context, str) or not isinstance(paragraph.get("qas"), list):
                raise ValueError(f"{where}: a paragraph needs a 'context' string and a 'qas' list")
            for q, qa in enumerate(paragraph["qas"]):
                examples.append(_qa_example(qa, context, version, f"{where}.qas[{q}]"))
    if not examples:
        raise ValueError(f"{path} holds no questions; point --data at the SQuAD files")
    return examples


def _qa_example(qa: dict, context: str, version: str, where: str) -> QAExample:
    if not isinstance(qa, dict) or not isinstance(qa.get("id"), str) or not isinstance(qa.get("question"), str):
        raise ValueError(f"{where}: a question needs string fields 'id' and 'question'")
    impossible = bool(qa.get("is_impossible", False))
    if impossible and version == "1.1":
        raise ValueError(f"{where}: is_impossible=true in a v1.1 file; load it with --version 2.0")
    answers = []
    for k, answer in enumerate(qa.get("answers", [])):
        try:
            text, start = answer["text"], int(answer["answer_start"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}.answers[{k}]: an answer needs 'text' and an integer 'answer_start'") from None
        if context[start:start + len(text)] != text:
            raise ValueError(f"{where}.answers[{k}]: {text!r} is not at answer_start={start} of the context "
                             f"(found {context[start:start + len(text)]!r}); fix the offset")
        answers.append((text, start))
    if not answers and not impossible:
        raise ValueError(f"{where}: no answers and not is_impossible; add an answer or mark it impossible (v2.0)")
    return QAExample(qa["id"], qa["question"], context, [] if impossible else answers, impossible)


def load_squad(version: str, data: Optional[str] = None) -> dict[str, list[QAExample]]:
    """{"train": [...], "dev": [...]} from a folder with the official file names, ``"hf"``, or the fixtures."""
    version = squad_version(version)
    if data == HF:
        sets = _hf_load("squad" if version == "1.1" else "squad_v2")
        return {"train": squad_examples_from_hf(sets["train"]), "dev": squad_examples_from_hf(sets["validation"])}
    root = os.path.join(FIXTURES, "squad") if data is None else data
    if not os.path.isdir(root):
        raise ValueError(f"--data {root!r} is not a folder; give the folder with train-v{version}.json and "
                         f"dev-v{version}.json, 'hf', or nothing for the fixtures")
    return {split: read_squad_json(os.path.join(root, f"{split}-v{version}.json"), version)
            for split in ("train", "dev")}


def squad_examples_from_hf(rows: Iterable[dict]) -> list[QAExample]:
    """Records of a Hugging Face ``squad`` / ``squad_v2`` split (answers as parallel text/start lists)."""
    out = []
    for row in rows:
        answers = list(zip(row["answers"]["text"], (int(s) for s in row["answers"]["answer_start"])))
        out.append(QAExample(row["id"], row["question"], row["context"], answers, not answers))
    return out


def corpus_texts(splits: dict) -> list[str]:
    """The training texts of a loaded set, for building the tiny model's vocabulary."""
    texts = []
    for example in splits["train"]:
        if isinstance(example, QAExample):
            texts += [example.question, example.context]
        else:
            texts += [example.text_a] + ([example.text_b] if example.text_b is not None else [])
    return texts
