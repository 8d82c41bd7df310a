"""``lorakern glue``: fine-tune with LoRA on a GLUE task and score it by the task's official metrics."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
from torch.nn import functional as F

from lorakern.harness import distributed
from lorakern.harness.data import GLUE_TASKS, HF, GlueTask, PairExample, corpus_texts, glue_task, load_glue
from lorakern.harness.metrics import glue_metrics
from lorakern.harness.models import TINY, Backbone, forward_logits
from lorakern.harness.run import RunOptions, TaskPlan, collate_fn, run_plan
from lorakern.harness.train import predict

TINY_MAX_LENGTH, SEED_MAX_LENGTH = 128, 512


def featurize(tokenizer, examples: list[PairExample], max_length: int, regression: bool) -> list[dict]:
    """Token ids of each (text_a, text_b) pair, truncated to max_length, with its label."""
    pairs = examples[0].text_b is not None
    encoded = tokenizer([e.text_a for e in examples], [e.text_b for e in examples] if pairs else None,
                        truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    return [{**{k: encoded[k][i] for k in keys}, "labels": float(e.label) if regression else int(e.label)}
            for i, e in enumerate(examples)]


def make_plan(task: GlueTask, splits: dict[str, list[PairExample]], backbone: Backbone, max_length: int) -> TaskPlan:
    """Features, loss and evaluation of one GLUE task (cross-entropy; MSE for STS-B)."""
    tokenizer = backbone.tokenizer
    regression = task.is_regression
    features = {name: featurize(tokenizer, examples, max_length, regression) for name, examples in splits.items()}
    collate = collate_fn(tokenizer.pad_token_id)

    def loss_fn(model, batch):
        logits = forward_logits(model, batch).float()
        if regression:
            return F.mse_loss(logits, batch["labels"].float())
        return F.cross_entropy(logits, batch["labels"])

    def evaluate(model, config) -> dict[str, float]:
        device = next(model.parameters()).device
        out = {}
        for split in task.eval_splits:
            logits = torch.cat(predict(model, features[split], collate, forward_logits, config, device))
            predictions = logits.numpy() if regression else logits.argmax(-1).numpy()
            labels = [f["labels"] for f in features[split]]
            out.update({f"{split}/{k}": v for k, v in glue_metrics(task.metrics, predictions, labels).items()})
        return out

    headline = [f"{split}/{metric}" for split in task.eval_splits for metric in task.metrics]
    return TaskPlan(name=f"glue-{task.name}", kind="regression" if regression else "classification",
                    num_labels=task.num_labels, features=features["train"], loss_fn=loss_fn, evaluate=evaluate,
                    headline=headline, settings={"max length": max_length,
                                                 "examples": {k: len(v) for k, v in splits.items()}},
                    pad_id=tokenizer.pad_token_id)


def run_glue(task: str, options: Optional[RunOptions] = None, **overrides) -> dict:
    """Fine-tune on one GLUE task (or "all", each into its own folder) and return the run summary.

    ``overrides`` set RunOptions fields (model=, data=, out=, recipe=, head=, lora=, train=, lr=, ...).
    For "all" the summary maps each task to its own summary. Under torchrun it runs on every rank
    (lorakern.harness.distributed); rank 0's summary is the full one.
    """
    options = dataclasses.replace(options or RunOptions(), **overrides)
    with distributed.session(options.resolved_train().resolved_device()):
        return _run_glue(task, options)


def _run_glue(task: str, options: RunOptions) -> dict:
    if task == "all":
        root = options.out or os.path.join("runs", "glue-all")
        if options.resume:
            raise ValueError("--resume continues one run; resume each task with --task NAME --resume FOLDER")
        summaries = {name: run_glue(name, options, out=os.path.join(root, name)) for name in GLUE_TASKS}
        if distributed.current().is_main:
            _write_summary(root, summaries)
        return summaries
    spec = glue_task(task)
    splits = load_glue(spec, options.data, options.skip_bad_rows)
    max_length = options.max_length or (TINY_MAX_LENGTH if options.model == TINY else SEED_MAX_LENGTH)
    backbone = Backbone(options.model, corpus_texts(splits) if options.model == TINY else None, max_length,
                        seed=options.train.seed)
    data_label = "fixtures (lorakern/harness/fixtures/glue)" if options.data is None else (
        "Hugging Face datasets (glue)" if options.data == HF else os.path.abspath(options.data))
    return run_plan(make_plan(spec, splits, backbone, max_length), backbone, options, data_label)


def _write_summary(root: str, summaries: dict[str, dict]) -> None:
    from lorakern._io import atomic_write_bytes

    lines = ["# lorakern glue --task all", ""]
    for name, summary in summaries.items():
        lines += [f"## {name}", "", summary["table"], ""]
    atomic_write_bytes(os.path.join(root, "summary.md"), "\n".join(lines).encode())

