"""The training loop shared by GLUE and SQuAD: the seed's optimiser and schedule, checkpoints, resume.

What makes two runs with the same seed give the same numbers, and a resumed run the same numbers as an
uninterrupted one:
- every random draw comes from generators seeded here: the batch order of epoch e from its own
  generator (seed, e), dropout from torch's global generator, whose state (with Python's and NumPy's)
  goes into every checkpoint;
- a checkpoint is written at the end of each epoch, after evaluation, with the trainable tensors, the
  optimiser, the scheduler, the gradient scaler, the RNG states and the history so far, so resuming
  continues exactly where the uninterrupted run would (checkpoint.py: the format, shared with mixed.py).

Under torchrun (distributed.py) the same code runs on every rank:
- ``batch_size`` is the global batch. Every rank draws the same batch order; rank r takes items r, r + N,
  r + 2N, ... of each global (micro-)batch (DistributedSampler's interleaving, but per batch and without
  its padding by repeated examples, which would change the last batch) and scales its mean loss by
  ``len(its share) * N / len(global batch)``; DDP averages the gradients over the N ranks, so each step
  applies the gradient of the global batch's mean loss, as one process does. A rank whose share is empty
  (a last batch smaller than N) runs one example with weight 0, because every rank must join each
  all-reduce. Only trainable tensors are all-reduced; ``find_unused_parameters`` is set only when a
  trainable tensor gets no gradient (the seed recipe's pooler bias: the seed head reads ``<s>`` directly).
- dropout draws from torch's global generator seeded with ``seed + rank``: ranks get different masks, and
  rank 0 the masks of a single process. Without dropout a run on N processes gives one process's curve
  to fp32 rounding (the ranks pad their shares to their own longest sequence, and the all-reduce adds in
  another order).
- rank 0 writes the checkpoints, with every rank's RNG state; a resumed run on the same number of
  processes continues exactly, on another number with the same global batches (the other ranks reseed).
"""
from __future__ import annotations

import contextlib
import csv
import inspect
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch import nn

from lorakern._io import atomic_write_bytes
from lorakern.harness import distributed
from lorakern.harness.checkpoint import begin, save_checkpoint
from lorakern.loraplus import check_loraplus_lr_ratio, loraplus_optimizer

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass
class TrainConfig:
    """Optimiser, schedule and run settings. Defaults are the seed's (shared/seed.md).

    lr: 4e-5 is what the published code used (its saved weights confirm it); the post says 5e-4.
    Epochs = warmup_epochs + decay_epochs: linear warm-up from 0, then linear decay to 0, stepped per
    optimiser step. batch_size is per optimiser step (the global batch under torchrun, shared by the
    ranks); with grad_accum=k it is split into k micro-batches.
    precision: "auto" is fp16 autocast on CUDA (the seed) and fp32 on CPU.
    loraplus_lr_ratio: None, one AdamW group; a ratio, LoRA+'s groups (lorakern.loraplus: B at lr * ratio,
    weight_decay on the groups PEFT's create_loraplus_optimizer decays).
    """

    lr: float = 4e-5
    warmup_epochs: int = 2
    decay_epochs: int = 4
    batch_size: int = 16
    grad_accum: int = 1
    eval_batch_size: int = 64
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    progress: bool = True
    loraplus_lr_ratio: Optional[float] = None

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive and finite, got {self.lr}")
        if self.loraplus_lr_ratio is not None:  # checked here, before any training, as the optimiser will
            check_loraplus_lr_ratio(self.loraplus_lr_ratio)
        if self.warmup_epochs < 0 or self.decay_epochs < 0 or self.epochs < 1:
            raise ValueError(f"need warmup_epochs >= 0, decay_epochs >= 0 and at least one epoch, got "
                             f"{self.warmup_epochs} + {self.decay_epochs}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be a positive multiple of grad_accum "
                             f"({self.grad_accum}); each optimiser step sees batch_size examples")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    @property
    def epochs(self) -> int:
        return self.warmup_epochs + self.decay_epochs

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def autocast_dtype(self, device: torch.device) -> Optional[torch.dtype]:
        precision = self.precision
        if precision == "auto":
            precision = "fp16" if device.type == "cuda" else "fp32"
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device (fp16 autocast on CPU is not supported); "
                             "use bf16 or fp32 on CPU")
        return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]

    def fingerprint(self) -> dict:
        """The settings a resumed run must share with the run it continues (progress and device may change)."""
        data = asdict(self)
        data.pop("progress")
        data.pop("device")
        if data["loraplus_lr_ratio"] is None:
            data.pop("loraplus_lr_ratio")  # runs from before LoRA+ resume as they were
        data["betas"] = list(self.betas)
        return data


def schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The seed's multiplier of the peak lr: linear 0 -> 1 over warm-up, then linear 1 -> 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def _batches(n: int, batch_size: int, generator: Optional[torch.Generator]) -> list[list[int]]:
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def predict(model: nn.Module, features: list, collate: Callable, forward: Callable, config: TrainConfig,
            device: torch.device) -> list[torch.Tensor]:
    """Outputs of ``forward(model, batch)`` for every feature, in order, as float32 CPU tensors per batch.

    Under torchrun every rank must call it: rank r computes batches r, r + N, ... and the outputs are
    all-gathered, so every rank returns what one process returns (the same batches, padded the same way).
    """
    context = distributed.current()
    model.eval()
    dtype = config.autocast_dtype(device)
    batches = _batches(len(features), config.eval_batch_size, None)
    outputs = {}
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for number in range(context.rank, len(batches), context.world_size):
            batch = {k: v.to(device) for k, v in collate([features[i] for i in batches[number]]).items()}
            outputs[number] = forward(model, batch).float().cpu()
    if context.enabled:
        outputs = {number: out for shard in distributed.all_gather_objects(outputs) for number, out in shard.items()}
    return [outputs[number] for number in range(len(batches))]


def write_history(out_dir: str, history: list[dict], extra: Optional[dict] = None) -> None:
    """metrics.json (everything) and metrics.csv (one row per epoch), each written atomically."""
    data = {"epochs": history, **(extra or {})}
    atomic_write_bytes(os.path.join(out_dir, "metrics.json"), (json.dumps(data, indent=2) + "\n").encode())
    columns = list(dict.fromkeys(k for row in history for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(os.path.join(out_dir, "metrics.csv"), text.getvalue().encode())


def _parameters_reached(loss: torch.Tensor) -> set[int]:
    """ids of the leaf tensors whose gradient ``loss.backward()`` would fill (a walk of the autograd graph)."""
    reached, seen, stack = set(), set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # AccumulateGrad: the leaf it accumulates into
        if variable is not None:
            reached.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return reached


def _wrap_ddp(model: nn.Module, probe: Callable[[], torch.Tensor], device: torch.device) -> nn.Module:
    """DistributedDataParallel over the trainable tensors; find_unused_parameters only when needed.

    ``probe()`` is one training forward (loss, no backward, under a forked RNG): trainable tensors it does
    not reach would leave DDP waiting for their gradients, so their presence on any rank turns
    find_unused_parameters on (it costs a graph walk per step, so it stays off otherwise).
    """
    from torch.nn.parallel import DistributedDataParallel

    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
        loss = probe()
    reached = _parameters_reached(loss)
    del loss
    unused = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in reached]
    find_unused = any(distributed.all_gather_objects(bool(unused)))
    if distributed.current().is_main and unused:
        print(f"DDP: find_unused_parameters=True; {len(unused)} trainable tensor(s) get no gradient: "
              f"{', '.join(unused[:4])}{' ...' if len(unused) > 4 else ''}")
    # The harness's buffers (position ids) never change: no broadcast of them before every forward.
    # (torch >= 2.13 renames broadcast_buffers to forward_sync_buffers.)
    buffers = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
        DistributedDataParallel.__init__).parameters else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused, **{buffers: False})


def train(model: nn.Module, features: list, collate: Callable, loss_fn: Callable, evaluate: Callable,
          config: TrainConfig, out_dir: str, fingerprint: dict, resume: Optional[str] = None) -> list[dict]:
    """Train ``model`` (its trainable parameters) and return the per-epoch history.

    collate(features) -> batch of tensors; loss_fn(model, batch) -> scalar loss; evaluate(model) -> flat
    {"split/metric": value}. Writes metrics.json/.csv and checkpoints/epoch-N.pt into ``out_dir`` after every
    epoch. ``resume``: a checkpoint (or run folder) of a run with the same ``fingerprint``.
    Under torchrun every rank calls it (see the module docstring); rank 0 writes the files, and
    ``evaluate`` gets the plain model (not the DDP wrapper) on every rank.
    """
    from tqdm.auto import tqdm

    context = distributed.current()
    rank, world = context.rank, context.world_size
    device = config.resolved_device()
    dtype = config.autocast_dtype(device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; inject LoRA (a recipe) before training")
    if config.loraplus_lr_ratio is None:
        optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps,
                                      weight_decay=config.weight_decay)
    else:
        optimizer = loraplus_optimizer(model, torch.optim.AdamW, lr=config.lr,
                                       loraplus_lr_ratio=config.loraplus_lr_ratio,
                                       loraplus_weight_decay=config.weight_decay, betas=config.betas, eps=config.eps)
    micro = config.batch_size // config.grad_accum
    steps_per_epoch = math.ceil(math.ceil(len(features) / micro) / config.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, schedule(config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    fingerprint = {**fingerprint, "train": config.fingerprint()}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}  # what a checkpoint holds
    history, start_epoch = begin(resume, fingerprint, trainable, optimizer, scheduler, scaler, config.seed, rank,
                                 context.is_main, out_dir)

    def forward_loss(net: nn.Module, indices: list[int]) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in collate([features[i] for i in indices]).items()}
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return loss_fn(net, batch)

    net = model  # what training calls: the model, or DDP around it
    if context.enabled and start_epoch <= config.epochs:
        probe = list(range(min(len(features), micro)))[rank::world] or [0]
        net = _wrap_ddp(model.train(), lambda: forward_loss(model, probe), device)
    for epoch in range(start_epoch, config.epochs + 1):
        model.train()
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        groups = _batches(len(features), micro, generator)  # global micro-batches, the same on every rank
        total_loss, seen = 0.0, 0
        bar = tqdm(range(0, len(groups), config.grad_accum), desc=f"epoch {epoch}/{config.epochs}",
                   disable=not (config.progress and context.is_main), leave=False)
        for first in bar:
            step_groups = groups[first:first + config.grad_accum]
            step_size = sum(len(g) for g in step_groups)
            for number, indices in enumerate(step_groups):
                share = indices[rank::world]
                # DDP averages over the ranks: this weight makes the sum over ranks the global batch's mean
                weight = len(share) * world / step_size
                last = number == len(step_groups) - 1
                with net.no_sync() if net is not model and not last else contextlib.nullcontext():
                    loss = forward_loss(net, share or indices[:1])
                    scaler.scale(loss * weight).backward()
                total_loss += loss.item() * len(share)
                seen += len(share)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            bar.set_postfix(loss=f"{total_loss / max(seen, 1):.4f}")
        bar.close()
        if context.enabled:
            shares = distributed.all_gather_objects((total_loss, seen))
            total_loss, seen = sum(t for t, _ in shares), sum(n for _, n in shares)
        row = {"epoch": epoch, "train_loss": total_loss / max(seen, 1), "lr": scheduler.get_last_lr()[0],
               "train_seconds": round(time.perf_counter() - started, 3)}
        row.update(evaluate(model))
        history.append(row)
        save_checkpoint(out_dir, epoch, trainable, optimizer, scheduler, scaler, history, fingerprint)
        if not context.is_main:
            continue
        if config.progress:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "train_seconds", "lr"))
            tqdm.write(f"epoch {epoch}/{config.epochs}: {shown}")
        write_history(out_dir, history)
    del net  # the DDP wrapper (its reducer holds the process group)
    return history
