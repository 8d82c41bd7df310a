"""One run of a task, the same for GLUE and SQuAD: build, train, save the adapter, reload it, report.

A task module (glue.py, squad.py) describes its task as a ``TaskPlan`` (features, loss, evaluation);
everything else — the model, the trainer, the files a run writes and the reload check — lives here once.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from lorakern._io import atomic_write_bytes
from lorakern.adapters import load_adapter, save_adapter
from lorakern.injection import LoraConfig, count_parameters, parameter_table
from lorakern.harness import distributed, report
from lorakern.harness.models import TINY, Backbone, build_model, recipe_config
from lorakern.harness.checkpoint import CHECKPOINT_DIR
from lorakern.harness.train import TrainConfig, train, write_history

TINY_LR = 5e-3  # the tiny random-init default learns its fixtures in 6 epochs at this lr, not at 4e-5
TINY_EMBEDDINGS = "word_embeddings"
SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class RunOptions:
    """What a user chooses for a run (the CLI flags), task-independent.

    model: "tiny", a local Hugging Face folder, a cached id, or a transformers config (tests).
    data: None for the fixtures, a folder of the official files, or "hf" for Hugging Face datasets.
    lora: LoraConfig fields that override the recipe's. train.lr None: 4e-5 (the seed's code) for a real
    model, 5e-3 for tiny. compare: "seed" adds the seed's published numbers to the report.
    """

    model: Any = TINY
    data: Optional[str] = None
    out: Optional[str] = None
    recipe: str = "seed"
    head: str = "seed"
    lora: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    lr: Optional[float] = None
    max_length: Optional[int] = None
    compare: Optional[str] = None
    resume: Optional[str] = None
    skip_bad_rows: bool = False

    def lora_config(self, kind: str) -> LoraConfig:
        """The recipe's LoraConfig with the user's fields on top; tiny also trains its word embeddings.

        Why tiny differs: the frozen random embeddings of a 64-wide model cannot single out a few hundred
        words linearly (SQuAD's fixture stays near F1 20 without them, reaches ~100 with them). Passing
        ``modules_to_save`` yourself turns this off; real models keep the recipe as it is.
        """
        config = recipe_config(self.recipe, kind, self.lora)
        if self.model == TINY and "modules_to_save" not in self.lora:
            config = dataclasses.replace(config, modules_to_save=[*(config.modules_to_save or []), TINY_EMBEDDINGS])
        return config

    def resolved_train(self) -> TrainConfig:
        lr = self.lr if self.lr is not None else (TINY_LR if self.model == TINY else TrainConfig.lr)
        return dataclasses.replace(self.train, lr=lr)


@dataclass
class TaskPlan:
    """A task as the runner needs it. evaluate(model, train_config) -> flat {"split/metric": value}."""

    name: str
    kind: str
    num_labels: int
    features: list
    loss_fn: Callable
    evaluate: Callable
    headline: list[str]
    settings: dict
    pad_id: int
    artifacts: Callable = lambda model, config, out_dir: None  # extra files (e.g. SQuAD predictions)


def collate_fn(pad_id: int) -> Callable[[list[dict]], dict]:
    """Pads each batch to its own longest sequence (the seed's per-batch padding)."""
    def collate(features: list[dict]) -> dict:
        longest = max(len(f["input_ids"]) for f in features)
        batch = {}
        for key in features[0]:
            if key in SEQUENCE_KEYS:
                pad = pad_id if key == "input_ids" else 0
                batch[key] = torch.tensor([f[key] + [pad] * (longest - len(f[key])) for f in features])
            elif not key.startswith("_"):
                batch[key] = torch.tensor([f[key] for f in features])
        return batch
    return collate


def default_out(prefix: str) -> str:
    return os.path.join("runs", f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}")


def _out_dir(options: RunOptions, name: str) -> str:
    if options.out:
        return options.out
    if options.resume:  # continue in the run folder the checkpoint belongs to
        path = os.path.abspath(options.resume)
        path = os.path.dirname(path) if os.path.isfile(path) else path
        return os.path.dirname(path) if os.path.basename(path) == CHECKPOINT_DIR else path
    return default_out(name)


def run_plan(plan: TaskPlan, backbone: Backbone, options: RunOptions, data_label: str) -> dict:
    """Train, save, reload, evaluate again, write metrics.json/.csv, curve.png and report.md; return the summary.

    The tiny model runs on one CPU thread: its 64-wide matrices gain nothing from intra-op threads, and on
    cores shared with other work the threads' spin-waits cost a lot (the harness's end-to-end tests took
    148 s with 2 threads and 19 s with 1 on 2 shared cores at load 3.8).
    """
    single = options.model == TINY and options.resolved_train().resolved_device().type == "cpu"
    threads = torch.get_num_threads()
    if single:
        torch.set_num_threads(1)
    try:
        return _run_plan(plan, backbone, options, data_label)
    finally:
        torch.set_num_threads(threads)


def _run_plan(plan: TaskPlan, backbone: Backbone, options: RunOptions, data_label: str) -> dict:
    context = distributed.current()
    config = options.resolved_train()
    out_dir = distributed.broadcast_from_main(lambda: _out_dir(options, plan.name))  # one timestamp for all
    if context.is_main:
        os.makedirs(out_dir, exist_ok=True)
    lora = options.lora_config(plan.kind)
    torch.manual_seed(config.seed)  # LoRA's A init draws from the global generator
    model = build_model(backbone, plan.kind, plan.num_labels, options.head, lora)
    fingerprint = {"task": plan.name, "model": backbone.name, "data": data_label, "head": options.head,
                   "lora": _jsonable(lora), "settings": _jsonable(plan.settings)}
    collate = collate_fn(plan.pad_id)
    history = train(model, plan.features, collate, plan.loss_fn, lambda m: plan.evaluate(m, config), config,
                    out_dir, fingerprint, options.resume)
    final = {k: v for k, v in history[-1].items() if "/" in k}

    adapter_dir = os.path.join(out_dir, "adapter")
    save_adapter(model, adapter_dir)  # under torchrun: rank 0 writes
    if context.is_main and backbone.tokenizer is not None and options.model == TINY:
        atomic_write_bytes(os.path.join(out_dir, "tokenizer.json"), backbone.tokenizer.backend_tokenizer.to_str().encode())
    fresh = build_model(backbone, plan.kind, plan.num_labels, options.head, lora=None)
    with distributed.folder_from_main(adapter_dir) as readable:
        load_adapter(fresh, readable)
    reloaded = plan.evaluate(fresh.to(config.resolved_device()), config)
    difference = max(abs(final[k] - reloaded[k]) for k in final)
    agree = difference <= 1e-9
    plan.artifacts(model, config, out_dir)
    if not context.is_main:  # the numbers are every rank's; the files and the report are rank 0's
        return {"task": plan.name, "final": final, "reloaded": reloaded, "reload_agrees": agree, "out": out_dir,
                "rank": context.rank}

    trainable, total = count_parameters(model)
    size = report.adapter_size(adapter_dir)
    published = report.SEED_PUBLISHED.get(plan.name, {}) if options.compare == "seed" else None
    settings = {"model": backbone.name, "data": data_label, "recipe": options.recipe, "head": options.head,
                "LoRA": _lora_line(lora), "lr": f"{config.lr:g}",
                "schedule": f"{config.warmup_epochs} warm-up + {config.decay_epochs} decay epochs, per step",
                "batch": f"{config.batch_size} (accumulation {config.grad_accum})" + (
                    f", global: {context.world_size} processes take about {config.batch_size // context.world_size}"
                    f" each" if context.enabled else ""),
                "processes": context.describe(),
                "AdamW": f"betas {config.betas}, eps {config.eps:g}, weight decay {config.weight_decay:g}" + (
                    f", LoRA+ (B's lr x {config.loraplus_lr_ratio:g})" if config.loraplus_lr_ratio else ""),
                "precision": _precision_line(config), "seed": config.seed, **plan.settings,
                "trainable parameters": f"{trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"}
    if options.resume:
        settings["resumed from"] = options.resume
    table = report.results_table(final, reloaded, plan.headline, published)
    reload_line = (f"Reload check: the adapter saved to adapter/, loaded into a freshly built model, gives "
                   f"{'the same metrics' if agree else 'DIFFERENT metrics'} (max |difference| {difference:.3g}).")
    summary = {"task": plan.name, "final": final, "reloaded": reloaded, "reload_agrees": agree,
               "trainable_parameters": trainable, "total_parameters": total, "adapter_bytes": size,
               "settings": {k: str(v) for k, v in settings.items()}, "out": out_dir}
    if published is not None:
        summary["seed_published"] = published
    write_history(out_dir, history, {k: v for k, v in summary.items() if k != "out"})
    report.plot_curves(os.path.join(out_dir, "curve.png"), history, plan.name)
    summary["report"] = report.write_report(
        os.path.join(out_dir, "report.md"), f"lorakern {plan.name}", settings, table, reload_line, size,
        parameter_table(model), history)
    summary["table"] = table
    return summary


def _precision_line(config: TrainConfig) -> str:
    dtype = config.autocast_dtype(config.resolved_device())
    return f"{config.precision} ({'fp32' if dtype is None else str(dtype).split('.')[-1] + ' autocast'} on " \
           f"{config.resolved_device().type})"


def _lora_line(config: LoraConfig) -> str:
    alpha = config.r if config.alpha is None else config.alpha
    return (f"r={config.r}, alpha={alpha:g}, dropout={config.dropout:g} on {config.target_modules}; bias={config.bias}; "
            f"modules_to_save={config.modules_to_save}; init={config.init}")


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=str))
