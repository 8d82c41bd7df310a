"""The training loop shared by GLUE and SQuAD: the seed's optimiser and schedule, checkpoints, resume.

What makes two runs with the same seed give the same numbers, and a resumed run the same numbers as an
uninterrupted one:
- every random draw comes from generators seeded here: the batch order of epoch e from its own
  generator (seed, e), dropout from torch's global generator, whose state (with Python's and NumPy's)
  goes into every checkpoint;
- a checkpoint is written at the end of each epoch, after evaluation, with the trainable tensors, the
  optimiser, the scheduler, the gradient scaler, the RNG states and the history so far, so resuming
  continues exactly where the uninterrupted run would.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from lorakern._io import atomic_write_bytes

CHECKPOINT_DIR = "checkpoints"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass
class TrainConfig:
    """Optimiser, schedule and run settings. Defaults are the seed's (shared/seed.md).

    lr: 4e-5 is what the published code used (its saved weights confirm it); the post says 5e-4.
    Epochs = warmup_epochs + decay_epochs: linear warm-up from 0, then linear decay to 0, stepped per
    optimiser step. batch_size is per optimiser step; with grad_accum=k it is split into k micro-batches.
    precision: "auto" is fp16 autocast on CUDA (the seed) and fp32 on CPU.
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

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
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
        data["betas"] = list(self.betas)
        return data


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The seed's multiplier of the peak lr: linear 0 -> 1 over warm-up, then linear 1 -> 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_torch(obj, path: str) -> None:
    """torch.save, atomically (a kill mid-write leaves the previous checkpoint intact)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def find_checkpoint(path: str) -> str:
    """A checkpoint file, or the latest epoch-N.pt of a run folder (or of its checkpoints/ folder)."""
    if os.path.isfile(path):
        return path
    for folder in (os.path.join(path, CHECKPOINT_DIR), path):
        if os.path.isdir(folder):
            epochs = [(int(m.group(1)), name) for name in os.listdir(folder)
                      if (m := re.fullmatch(r"epoch-(\d+)\.pt", name))]
            if epochs:
                return os.path.join(folder, max(epochs)[1])
    raise ValueError(f"--resume {path!r}: no checkpoint there; give a run folder holding {CHECKPOINT_DIR}/"
                     f"epoch-N.pt or the path of one such file")


def load_checkpoint(path: str, fingerprint: dict) -> dict:
    path = find_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"{path} is not a readable lorakern checkpoint ({exc}); resume from another epoch") from exc
    saved = state.get("fingerprint", {})
    differ = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if differ:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {fingerprint.get(k)!r}" for k in differ[:6])
        raise ValueError(f"{path} was written by a run with other settings ({details}); resume with the same "
                         f"task, model, data, recipe and training flags")
    state["path"] = path
    return state


def _batches(n: int, batch_size: int, generator: Optional[torch.Generator]) -> list[list[int]]:
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def predict(model: nn.Module, features: list, collate: Callable, forward: Callable, config: TrainConfig,
            device: torch.device) -> list[torch.Tensor]:
    """Outputs of ``forward(model, batch)`` for every feature, in order, as float32 CPU tensors per batch."""
    model.eval()
    dtype = config.autocast_dtype(device)
    outputs = []
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for indices in _batches(len(features), config.eval_batch_size, None):
            batch = {k: v.to(device) for k, v in collate([features[i] for i in indices]).items()}
            outputs.append(forward(model, batch).float().cpu())
    return outputs


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


def train(model: nn.Module, features: list, collate: Callable, loss_fn: Callable, evaluate: Callable,
          config: TrainConfig, out_dir: str, fingerprint: dict, resume: Optional[str] = None) -> list[dict]:
    """Train ``model`` (its trainable parameters) and return the per-epoch history.

    collate(features) -> batch of tensors; loss_fn(model, batch) -> scalar loss; evaluate(model) -> flat
    {"split/metric": value}. Writes metrics.json/.csv and checkpoints/epoch-N.pt into ``out_dir`` after every
    epoch. ``resume``: a checkpoint (or run folder) of a run with the same ``fingerprint``.
    """
    from tqdm.auto import tqdm

    device = config.resolved_device()
    dtype = config.autocast_dtype(device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; inject LoRA (a recipe) before training")
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps,
                                  weight_decay=config.weight_decay)
    micro = config.batch_size // config.grad_accum
    steps_per_epoch = math.ceil(math.ceil(len(features) / micro) / config.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, schedule(config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    fingerprint = {**fingerprint, "train": config.fingerprint()}
    history: list[dict] = []
    start_epoch = 1
    if resume:
        state = load_checkpoint(resume, fingerprint)
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(state["model"]) != names:
            raise ValueError(f"{state['path']} holds other trainable tensors than this model; resume with the "
                             f"same recipe and LoRA flags")
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in names:
                    param.copy_(state["model"][name].to(param.device))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        history = list(state["history"])
        start_epoch = state["epoch"] + 1
    else:
        seed_everything(config.seed)
    os.makedirs(os.path.join(out_dir, CHECKPOINT_DIR), exist_ok=True)
    for epoch in range(start_epoch, config.epochs + 1):
        model.train()
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        groups = _batches(len(features), micro, generator)
        total_loss, seen = 0.0, 0
        bar = tqdm(range(0, len(groups), config.grad_accum), desc=f"epoch {epoch}/{config.epochs}",
                   disable=not config.progress, leave=False)
        for first in bar:
            step_groups = groups[first:first + config.grad_accum]
            step_size = sum(len(g) for g in step_groups)
            for indices in step_groups:
                batch = {k: v.to(device) for k, v in collate([features[i] for i in indices]).items()}
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss = loss_fn(model, batch)
                scaler.scale(loss * (len(indices) / step_size)).backward()
                total_loss += loss.item() * len(indices)
                seen += len(indices)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            bar.set_postfix(loss=f"{total_loss / seen:.4f}")
        bar.close()
        row = {"epoch": epoch, "train_loss": total_loss / max(seen, 1), "lr": scheduler.get_last_lr()[0],
               "train_seconds": round(time.perf_counter() - started, 3)}
        row.update(evaluate(model))
        history.append(row)
        if config.progress:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "train_seconds", "lr"))
            tqdm.write(f"epoch {epoch}/{config.epochs}: {shown}")
        trainable = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        save_torch({"epoch": epoch, "model": trainable, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state(),
                    "history": history, "fingerprint": fingerprint},
                   os.path.join(out_dir, CHECKPOINT_DIR, f"epoch-{epoch}.pt"))
        write_history(out_dir, history)
    return history
