"""``lorakern glue --task sst2,mrpc,rte --mixed``: several GLUE tasks trained at once on one frozen base,
one adapter and one head per task, every batch mixed across the tasks (lorakern.adapter_rows).

What makes each task's numbers those of training it alone (``run_glue_mixed`` with that one task):
- one base for all: the tiny model's vocabulary is built from every task's texts (the task trained alone
  for comparison builds it from the same texts, ``vocabulary=``, so "alone" means alone on this base);
- each task draws its own adapter init (the global generator reseeded per task before its adapter is
  added) and its own batch order (a generator per task and epoch), whatever the other tasks are;
- each step's batch is every task's next batch side by side (padded to the longest row), the loss is the
  sum of each task's own mean loss over its rows, so each adapter's gradient is its task's alone; each
  task has its own AdamW and learning-rate schedule, stepped only on the steps its data lasts;
- shared trainable tensors would learn from every task, so the recipe's biases stay frozen (bias="none").
With dropout on, the masks depend on the whole batch, so the curves then differ from the alone runs'.

Writes ``<out>/adapter/<task>/`` (PEFT's multi-adapter layout, one folder per adapter) and
``<out>/metrics.json``; the adapters are reloaded into a freshly built model and scored again.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Optional

import torch
from torch.nn import functional as F

from lorakern._io import atomic_write_bytes
from lorakern.adapters import load_adapter, save_adapter
from lorakern.harness import distributed, report
from lorakern.harness.data import GLUE_TASKS, HF, corpus_texts, glue_task, load_glue
from lorakern.harness.glue import SEED_MAX_LENGTH, TINY_MAX_LENGTH, make_plan
from lorakern.harness.models import TINY, Backbone, build_model, forward_logits
from lorakern.harness.run import RunOptions, collate_fn, default_out
from lorakern.harness.train import _batches, schedule, seed_everything
from lorakern.injection import add_adapter, inject, set_adapter
from lorakern.row_adapters import adapter_rows

SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def task_seed(seed: int, task: str) -> int:
    """A task's own seed (adapter init, batch order): the same whichever tasks train beside it."""
    return seed + 7919 * (1 + sorted(GLUE_TASKS).index(task))


def _concat(batches: list[dict], pad_id: int) -> dict:
    """The tasks' batches as one: sequences padded to the longest row (the attention mask hides it)."""
    longest = max(b["input_ids"].shape[1] for b in batches)
    out = {}
    for key in batches[0]:
        parts = []
        for b in batches:
            value = b[key]
            if key in SEQUENCE_KEYS and value.shape[1] < longest:
                fill = pad_id if key == "input_ids" else 0
                value = F.pad(value, (0, longest - value.shape[1]), value=fill)
            parts.append(value)
        out[key] = torch.cat(parts)
    return out


def run_glue_mixed(tasks: list[str], options: Optional[RunOptions] = None, vocabulary: Optional[list[str]] = None,
                   **overrides) -> dict:
    """Train ``tasks`` together (see the module docstring); returns {"tasks": {task: summary}, "out": ...,
    "history": [...]}. ``vocabulary``: the tasks whose texts build the tiny model's vocabulary (default
    ``tasks``; a task trained alone for comparison passes the mixed run's tasks, to get its base)."""
    options = dataclasses.replace(options or RunOptions(), **overrides)
    if len(set(tasks)) != len(tasks) or not tasks or "all" in tasks:
        raise ValueError(f"--mixed takes the tasks by name, each once (not all), got {tasks}")
    if options.resume:
        raise ValueError("--mixed runs do not resume (no checkpoints are written); rerun from the start")
    if distributed.current().enabled:
        raise ValueError("--mixed runs in one process; run it without torchrun")
    specs = [glue_task(t) for t in tasks]
    kinds = {(s.is_regression, s.num_labels) for s in specs}
    if len(kinds) != 1:
        raise ValueError(f"mixed tasks share one head shape: {tasks} mix regression/classification or numbers of "
                         f"labels ({', '.join(f'{s.name}: {s.num_labels}' for s in specs)}); mix tasks of one kind")
    config = options.resolved_train()
    if config.grad_accum != 1:
        raise ValueError("--mixed takes --grad-accum 1 (each task's batch is --batch-size)")
    device = config.resolved_device()
    out_dir = options.out or default_out("glue-mixed-" + "-".join(tasks))
    os.makedirs(out_dir, exist_ok=True)
    splits = {s.name: load_glue(s, options.data, options.skip_bad_rows) for s in specs}
    max_length = options.max_length or (TINY_MAX_LENGTH if options.model == TINY else SEED_MAX_LENGTH)
    texts = None
    if options.model == TINY:
        corpus = {name: splits.get(name) or load_glue(glue_task(name), options.data, options.skip_bad_rows)
                  for name in sorted(vocabulary or tasks)}
        texts = [t for name in sorted(corpus) for t in corpus_texts(corpus[name])]
    backbone = Backbone(options.model, texts, max_length, seed=config.seed)
    plans = {s.name: make_plan(s, splits[s.name], backbone, max_length) for s in specs}
    kind, num_labels = plans[tasks[0]].kind, plans[tasks[0]].num_labels
    lora = dataclasses.replace(options.lora_config(kind), bias="none")

    model = build_model(backbone, kind, num_labels, options.head, lora=None)
    for i, task in enumerate(tasks):
        torch.manual_seed(task_seed(config.seed, task))  # LoRA's A init draws from the global generator
        if i == 0:
            inject(model, lora, adapter_name=task)
        else:
            add_adapter(model, task, lora)
    model.to(device)
    threads = torch.get_num_threads()
    if options.model == TINY and device.type == "cpu":
        torch.set_num_threads(1)  # as run_plan: the tiny model's 64-wide matrices gain nothing from threads
    try:
        history = _train(model, tasks, plans, config, device)
    finally:
        torch.set_num_threads(threads)
    final = {task: {k: v for k, v in history[-1][task].items() if "/" in k} for task in tasks}

    adapter_dir = os.path.join(out_dir, "adapter")
    save_adapter(model, adapter_dir)
    fresh = build_model(backbone, kind, num_labels, options.head, lora=None)
    for task in tasks:
        load_adapter(fresh, os.path.join(adapter_dir, task), adapter_name=task)
    fresh.to(device)
    summaries = {}
    for task in tasks:
        set_adapter(fresh, task)
        reloaded = plans[task].evaluate(fresh, config)
        agree = max(abs(final[task][k] - reloaded[k]) for k in final[task]) <= 1e-9
        summaries[task] = {"task": task, "final": final[task], "reloaded": reloaded, "reload_agrees": agree,
                           "table": report.results_table(final[task], reloaded, plans[task].headline)}
    data_label = "fixtures" if options.data is None else ("Hugging Face datasets" if options.data == HF else options.data)
    payload = {"tasks": tasks, "model": backbone.name, "data": data_label, "lora": dataclasses.asdict(lora),
               "epochs": history, "summaries": {t: {k: v for k, v in s.items() if k != "table"}
                                                for t, s in summaries.items()}}
    atomic_write_bytes(os.path.join(out_dir, "metrics.json"), (json.dumps(payload, indent=2, default=str) + "\n").encode())
    if options.model == TINY and backbone.tokenizer is not None:
        atomic_write_bytes(os.path.join(out_dir, "tokenizer.json"), backbone.tokenizer.backend_tokenizer.to_str().encode())
    return {"tasks": summaries, "out": out_dir, "history": history}


def _train(model, tasks: list[str], plans: dict, config, device) -> list[dict]:
    """The mixed loop: per step every task's next batch, one forward and backward, each task's optimiser."""
    regression = plans[tasks[0]].kind == "regression"
    collates = {t: collate_fn(plans[t].pad_id) for t in tasks}
    pad_id = plans[tasks[0]].pad_id
    optimizers, schedulers = {}, {}
    for task in tasks:
        params = [p for n, p in model.named_parameters() if f".{task}." in f".{n}."
                  and (".adapters." in n or ".modules_to_save." in n)]
        steps = math.ceil(len(plans[task].features) / config.batch_size)
        optimizers[task] = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps,
                                             weight_decay=config.weight_decay)
        schedulers[task] = torch.optim.lr_scheduler.LambdaLR(
            optimizers[task], schedule(config.warmup_epochs * steps, config.epochs * steps))
    dtype = config.autocast_dtype(device)
    seed_everything(config.seed)
    history = []
    for epoch in range(1, config.epochs + 1):
        model.train()
        started = time.perf_counter()
        order = {t: _batches(len(plans[t].features), config.batch_size,
                             torch.Generator().manual_seed(task_seed(config.seed, t) * 100_003 + epoch)) for t in tasks}
        losses = {t: [] for t in tasks}
        for step in range(max(len(b) for b in order.values())):
            present = [t for t in tasks if step < len(order[t])]
            parts = [collates[t]([plans[t].features[i] for i in order[t][step]]) for t in present]
            batch = {k: v.to(device) for k, v in _concat(parts, pad_id).items()}
            rows = [t for t, part in zip(present, parts) for _ in range(len(part["labels"]))]
            with adapter_rows(model, rows), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                            enabled=dtype is not None):
                logits = forward_logits(model, batch).float()
                loss, start = 0.0, 0
                for task, part in zip(present, parts):
                    mine = slice(start, start + len(part["labels"]))
                    start = mine.stop
                    labels = batch["labels"][mine]
                    task_loss = (F.mse_loss(logits[mine], labels.float()) if regression
                                 else F.cross_entropy(logits[mine], labels))
                    losses[task].append(task_loss.item())
                    loss = loss + task_loss  # each adapter's gradient: its own task's mean loss
                loss.backward()
            for task in present:
                optimizers[task].step()
                optimizers[task].zero_grad(set_to_none=True)
                schedulers[task].step()
        row = {"epoch": epoch, "train_seconds": round(time.perf_counter() - started, 3)}
        for task in tasks:
            set_adapter(model, task)
            row[task] = {"train_loss": sum(losses[task]) / max(len(losses[task]), 1), **plans[task].evaluate(model, config)}
        history.append(row)
        if config.progress:
            print(f"epoch {epoch}/{config.epochs}: " + "; ".join(
                f"{t} " + ", ".join(f"{k} {v:.4f}" for k, v in row[t].items()) for t in tasks))
    return history


__all__ = ["run_glue_mixed", "task_seed"]
