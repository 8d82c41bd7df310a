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

Checkpoints and --resume are train.py's (checkpoint.py): the same file, with every task's tensors and
``{task: state}`` for the optimisers and schedulers (``Keyed``); each task's batch order for epoch e comes
from (its seed, e), so the epoch is the data position. Under torchrun each task's batch is dealt out to
the ranks as train.py deals one batch, each task's loss weighted by the rank's share of that task's batch;
DDP is built inside an adapter_rows block naming every task and every step names them all (``active=``),
so each task's tensors get a gradient on every rank at every step (zero without rows), as the reducer needs.

Writes ``<out>/adapter/<task>/`` (PEFT's multi-adapter layout, one folder per adapter),
``<out>/metrics.json`` and ``<out>/checkpoints/``; the adapters are reloaded into a freshly built model
and scored again.
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
from lorakern.harness.checkpoint import Keyed, begin, save_checkpoint
from lorakern.harness.run import RunOptions, _jsonable, _out_dir, collate_fn
from lorakern.harness.train import _batches, _wrap_ddp, schedule
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
    ``tasks``; a task trained alone for comparison passes the mixed run's tasks, to get its base).
    Under torchrun every rank runs it; rank 0 writes the files, and the others' result has "rank"."""
    options = dataclasses.replace(options or RunOptions(), **overrides)
    if len(set(tasks)) != len(tasks) or not tasks or "all" in tasks:
        raise ValueError(f"--mixed takes the tasks by name, each once (not all), got {tasks}")
    specs = [glue_task(t) for t in tasks]
    kinds = {(s.is_regression, s.num_labels) for s in specs}
    if len(kinds) != 1:
        raise ValueError(f"mixed tasks share one head shape: {tasks} mix regression/classification or numbers of "
                         f"labels ({', '.join(f'{s.name}: {s.num_labels}' for s in specs)}); mix tasks of one kind")
    config = options.resolved_train()
    if config.grad_accum != 1:
        raise ValueError("--mixed takes --grad-accum 1 (each task's batch is --batch-size)")
    if config.loraplus_lr_ratio is not None:
        raise ValueError("--mixed does not take --loraplus-lr-ratio (each task has one plain AdamW); leave it unset")
    with distributed.session(config.resolved_device()):
        return _run(tasks, specs, options, config, vocabulary)


def _run(tasks: list[str], specs: list, options: RunOptions, config, vocabulary: Optional[list[str]]) -> dict:
    context = distributed.current()
    device = config.resolved_device()
    out_dir = distributed.broadcast_from_main(lambda: _out_dir(options, "glue-mixed-" + "-".join(tasks)))
    if context.is_main:
        os.makedirs(out_dir, exist_ok=True)
    splits = {s.name: load_glue(s, options.data, options.skip_bad_rows) for s in specs}
    max_length = options.max_length or (TINY_MAX_LENGTH if options.model == TINY else SEED_MAX_LENGTH)
    texts = None
    words = sorted(vocabulary or tasks)
    if options.model == TINY:
        corpus = {name: splits.get(name) or load_glue(glue_task(name), options.data, options.skip_bad_rows)
                  for name in words}
        texts = [t for name in sorted(corpus) for t in corpus_texts(corpus[name])]
    backbone = Backbone(options.model, texts, max_length, seed=config.seed)
    plans = {s.name: make_plan(s, splits[s.name], backbone, max_length) for s in specs}
    kind, num_labels = plans[tasks[0]].kind, plans[tasks[0]].num_labels
    lora = dataclasses.replace(options.lora_config(kind), bias="none")
    data_label = "fixtures" if options.data is None else ("Hugging Face datasets" if options.data == HF else options.data)
    fingerprint = {"mixed": list(tasks), "vocabulary": words if options.model == TINY else None,
                   "model": backbone.name, "data": data_label, "head": options.head, "lora": _jsonable(lora),
                   "settings": {"max length": max_length, "examples": {t: len(plans[t].features) for t in tasks}},
                   "train": config.fingerprint()}

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
        history = _train(model, tasks, plans, config, device, out_dir, fingerprint, options.resume)
    finally:
        torch.set_num_threads(threads)
    final = {task: {k: v for k, v in history[-1][task].items() if "/" in k} for task in tasks}

    adapter_dir = os.path.join(out_dir, "adapter")
    save_adapter(model, adapter_dir)  # under torchrun: rank 0 writes
    fresh = build_model(backbone, kind, num_labels, options.head, lora=None)
    for task in tasks:
        with distributed.folder_from_main(os.path.join(adapter_dir, task)) as readable:
            load_adapter(fresh, readable, adapter_name=task)
    fresh.to(device)
    summaries = {}
    for task in tasks:
        set_adapter(fresh, task)
        reloaded = plans[task].evaluate(fresh, config)
        agree = max(abs(final[task][k] - reloaded[k]) for k in final[task]) <= 1e-9
        summaries[task] = {"task": task, "final": final[task], "reloaded": reloaded, "reload_agrees": agree,
                           "table": report.results_table(final[task], reloaded, plans[task].headline)}
    result = {"tasks": summaries, "out": out_dir, "history": history}
    if not context.is_main:
        return {**result, "rank": context.rank}
    payload = {"tasks": tasks, "model": backbone.name, "data": data_label, "lora": dataclasses.asdict(lora),
               "processes": context.describe(), "epochs": history,
               "summaries": {t: {k: v for k, v in s.items() if k != "table"} for t, s in summaries.items()}}
    if options.resume:
        payload["resumed from"] = options.resume
    _write_metrics(out_dir, payload)
    if options.model == TINY and backbone.tokenizer is not None:
        atomic_write_bytes(os.path.join(out_dir, "tokenizer.json"), backbone.tokenizer.backend_tokenizer.to_str().encode())
    return result


def _write_metrics(out_dir: str, payload: dict) -> None:
    text = json.dumps(payload, indent=2, default=str) + "\n"
    atomic_write_bytes(os.path.join(out_dir, "metrics.json"), text.encode())


def _task_parameters(model, task: str) -> dict:
    """A task's trainable tensors by name: its adapter's factors and its modules_to_save copies."""
    return {n: p for n, p in model.named_parameters() if f".{task}." in f".{n}."
            and (".adapters." in n or ".modules_to_save." in n)}


def _train(model, tasks: list[str], plans: dict, config, device, out_dir: str, fingerprint: dict,
           resume: Optional[str]) -> list[dict]:
    """The mixed loop: per step every task's next batch (this rank's share of it under torchrun), one
    forward and backward, each task's optimiser; a checkpoint after each epoch; resumes from one."""
    context = distributed.current()
    rank, world = context.rank, context.world_size
    regression = plans[tasks[0]].kind == "regression"
    collates = {t: collate_fn(plans[t].pad_id) for t in tasks}
    pad_id = plans[tasks[0]].pad_id
    dtype = config.autocast_dtype(device)
    trainable, optimizers, schedulers = {}, {}, {}
    for task in tasks:
        params = _task_parameters(model, task)
        trainable.update(params)
        steps = math.ceil(len(plans[task].features) / config.batch_size)
        optimizers[task] = torch.optim.AdamW(list(params.values()), lr=config.lr, betas=config.betas, eps=config.eps,
                                             weight_decay=config.weight_decay)
        schedulers[task] = torch.optim.lr_scheduler.LambdaLR(
            optimizers[task], schedule(config.warmup_epochs * steps, config.epochs * steps))
    optimizer, scheduler = Keyed(optimizers), Keyed(schedulers)  # checkpointed as {task: state}
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # one for all: one backward
    history, start = begin(resume, fingerprint, trainable, optimizer, scheduler, scaler, config.seed, rank,
                           context.is_main, out_dir)

    def step_loss(net, order: dict, step: int, present: list[str], losses: Optional[dict]) -> torch.Tensor:
        """The loss of this rank's rows of step ``step``: each present task's share of its batch, weighted so
        that DDP's average over the ranks is the sum of each task's mean over its whole batch."""
        shares = {t: order[t][step][rank::world] for t in present}
        mine = [t for t in present if shares[t]]
        weight = 1.0
        if not mine:  # this rank has no rows at this step but must join the all-reduce: one row, weight 0
            mine, weight = present[:1], 0.0
            shares = {present[0]: order[present[0]][step][:1]}
        parts = [collates[t]([plans[t].features[i] for i in shares[t]]) for t in mine]
        batch = {k: v.to(device) for k, v in _concat(parts, pad_id).items()}
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = forward_logits(net, batch).float()
            loss, first = 0.0, 0
            for task in mine:
                n = len(shares[task])
                mask = slice(first, first + n)
                first += n
                labels = batch["labels"][mask]
                task_loss = (F.mse_loss(logits[mask], labels.float()) if regression
                             else F.cross_entropy(logits[mask], labels))
                if losses is not None and weight:
                    losses[task][step] = (task_loss.item(), n)
                # 1.0 in one process; under DDP (which averages) the share's part of the task's batch, times N
                loss = loss + task_loss * (weight * n * world / len(order[task][step]) if world > 1 else weight)
        return loss

    net = model  # what training calls: the model, or DDP around it
    if context.enabled and start <= config.epochs:
        probe = {t: [list(range(min(len(plans[t].features), config.batch_size)))] for t in tasks}
        # DDP registers the tensors that require a gradient: every task's, as inside a block naming them all
        with adapter_rows(model, _rows_of(probe, 0, tasks, rank, world), active=tasks):
            net = _wrap_ddp(model.train(), lambda: step_loss(model, probe, 0, tasks, None), device)
    for epoch in range(start, config.epochs + 1):
        model.train()
        started = time.perf_counter()
        order = {t: _batches(len(plans[t].features), config.batch_size,
                             torch.Generator().manual_seed(task_seed(config.seed, t) * 100_003 + epoch)) for t in tasks}
        losses = {t: {} for t in tasks}  # task -> step -> (this rank's mean loss, its rows)
        for step in range(max(len(b) for b in order.values())):
            present = [t for t in tasks if step < len(order[t])]
            # under DDP every task's tensors get a gradient at every step (zero without rows), as the reducer
            # expects; a task whose data has run out is not stepped, as in one process
            active = tasks if net is not model else None
            with adapter_rows(model, _rows_of(order, step, present, rank, world), active=active):
                loss = step_loss(net, order, step, present, losses)
                scaler.scale(loss).backward()
            for task in present:
                scaler.step(optimizers[task])
                schedulers[task].step()
            scaler.update()
            for task in tasks:
                optimizers[task].zero_grad(set_to_none=True)
        step_losses = _gather_losses(losses, order)
        row = {"epoch": epoch, "train_seconds": round(time.perf_counter() - started, 3)}
        for task in tasks:
            set_adapter(model, task)
            row[task] = {"train_loss": sum(step_losses[task]) / max(len(step_losses[task]), 1),
                         **plans[task].evaluate(model, config), "step_losses": step_losses[task]}
        history.append(row)
        save_checkpoint(out_dir, epoch, trainable, optimizer, scheduler, scaler, history, fingerprint)
        if not context.is_main:
            continue
        _write_metrics(out_dir, {"tasks": tasks, "epochs": history})
        if config.progress:
            print(f"epoch {epoch}/{config.epochs}: " + "; ".join(
                f"{t} " + ", ".join(f"{k} {v:.4f}" for k, v in row[t].items() if k != "step_losses") for t in tasks))
    del net  # the DDP wrapper (its reducer holds the process group)
    return history


def _rows_of(order: dict, step: int, present: list[str], rank: int, world: int) -> list[str]:
    """The adapter of each row this rank runs at ``step`` (step_loss's rows, known before its forward)."""
    rows = [t for t in present for _ in order[t][step][rank::world]]
    return rows or present[:1]


def _gather_losses(losses: dict, order: dict) -> dict[str, list[float]]:
    """Each task's loss per step over its whole batch: one process's value as it is; under torchrun the
    ranks' share-weighted means combined (one all-gather per epoch)."""
    shards = distributed.all_gather_objects(losses)
    out = {}
    for task in losses:
        values = []
        for step in range(len(order[task])):
            parts = [shard[task][step] for shard in shards if step in shard[task]]
            values.append(parts[0][0] if len(parts) == 1 else sum(v * n for v, n in parts) / sum(n for _, n in parts))
        out[task] = values
    return out


__all__ = ["run_glue_mixed", "task_seed"]
