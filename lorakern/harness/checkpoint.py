"""Epoch checkpoints of the harness's training loops (train.py's single task, mixed.py's several): what
they hold, writing them, finding and checking one, and resuming from it.

A checkpoint ``checkpoints/epoch-N.pt`` (torch.save, written atomically by rank 0 at the end of epoch N,
after evaluation) holds:
- ``model``: every trainable tensor by name (a mixed run: every task's adapter and modules_to_save copies);
- ``optimizer`` / ``scheduler`` / ``scaler``: their state_dicts; a mixed run, whose tasks each have their
  own, holds ``{task: state_dict}`` in the same keys (``Keyed``);
- ``rng`` (rank 0's torch/Python/NumPy/CUDA generator states) and, under torchrun, ``rng_ranks`` (every
  rank's), so dropout continues with the masks the uninterrupted run would draw;
- ``epoch`` and ``history``: where the data order stands. The batch order of epoch e is drawn from a
  generator seeded by (seed, e) (by each task's seed in a mixed run), so the finished epoch is the position;
- ``fingerprint``: the settings a resumed run must share. A single-task run's has ``task``, a mixed run's
  ``mixed`` (its tasks, in order); a checkpoint of the other kind, or of other tasks, is refused with the
  command that resumes it.
"""
from __future__ import annotations

import io
import os
import random
import re

import numpy as np
import torch

from lorakern._io import atomic_write_bytes
from lorakern.harness import distributed

CHECKPOINT_DIR = "checkpoints"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)



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
    _check_mode(path, saved, fingerprint)
    differ = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if differ:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {fingerprint.get(k)!r}" for k in differ[:6])
        raise ValueError(f"{path} was written by a run with other settings ({details}); resume with the same "
                         f"task, model, data, recipe and training flags")
    state["path"] = path
    return state


class Keyed:
    """Several optimisers (or schedulers, or scalers) saved and restored as one, by name: a mixed run
    (mixed.py) has one per task, and its checkpoint holds ``{task: state_dict}`` where a single-task run's
    holds the one state_dict. The rest of the checkpoint is the same for both."""

    def __init__(self, items: dict) -> None:
        self.items = dict(items)

    def state_dict(self) -> dict:
        return {name: item.state_dict() for name, item in self.items.items()}

    def check(self, state) -> None:
        if not isinstance(state, dict) or list(state) != list(self.items):
            single = not isinstance(state, dict) or "param_groups" in state or "base_lrs" in state
            found = "one (a single-task run's)" if single else list(state)
            raise ValueError(f"the checkpoint holds states for {found}, this run has {list(self.items)}; resume "
                             f"with the same tasks in the same order")

    def load_state_dict(self, state: dict) -> None:
        self.check(state)
        for name, item in self.items.items():
            item.load_state_dict(state[name])


def begin(resume, fingerprint: dict, trainable: dict[str, torch.Tensor], optimizer, scheduler, scaler, seed: int,
          rank: int, is_main: bool, out_dir: str) -> tuple[list, int]:
    """Where a run starts: (the checkpoint's history, the next epoch) when resuming, else ([], 1) after seeding
    every generator with seed + rank; rank 0 makes the checkpoint folder."""
    history, start = [], 1
    if resume:
        history, start = resume_from(resume, fingerprint, trainable, optimizer, scheduler, scaler, seed)
    else:
        seed_everything(seed + rank)
    if is_main:
        os.makedirs(os.path.join(out_dir, CHECKPOINT_DIR), exist_ok=True)
    return history, start


def resume_from(resume: str, fingerprint: dict, trainable: dict[str, torch.Tensor], optimizer, scheduler, scaler,
                seed: int) -> tuple[list[dict], int]:
    """Load a checkpoint (rank 0 reads, every rank gets it) into the trainable tensors, optimiser, scheduler,
    scaler and this rank's RNG; returns (the history so far, the first epoch still to run).

    Everything is checked before anything changes, so a refused checkpoint leaves the run as it was."""
    state = distributed.broadcast_from_main(lambda: load_checkpoint(resume, fingerprint))
    if set(state["model"]) != set(trainable):
        missing, extra = sorted(set(trainable) - set(state["model"])), sorted(set(state["model"]) - set(trainable))
        raise ValueError(f"{state['path']} holds other trainable tensors than this model (missing {missing[:3]}, "
                         f"extra {extra[:3]}); resume with the same recipe and LoRA flags")
    for name, param in trainable.items():
        if state["model"][name].shape != param.shape:
            raise ValueError(f"{state['path']}: {name} has shape {tuple(state['model'][name].shape)}, this model's "
                             f"{tuple(param.shape)}; resume with the same model and LoRA flags")
    for part, holder in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if isinstance(holder, Keyed):
            holder.check(state[part])
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(state["model"][name].to(param.device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    _restore_rng(state, distributed.current(), seed)
    return list(state["history"]), state["epoch"] + 1


def save_checkpoint(out_dir: str, epoch: int, trainable: dict[str, torch.Tensor], optimizer, scheduler, scaler,
                    history: list[dict], fingerprint: dict) -> None:
    """``checkpoints/epoch-N.pt`` at the end of an epoch: every rank calls it (their RNG states are
    gathered), rank 0 writes it atomically."""
    rng_states = distributed.all_gather_objects(_rng_state())
    if not distributed.current().is_main:
        return
    checkpoint = {"epoch": epoch, "model": {n: p.detach().cpu().clone() for n, p in trainable.items()},
                  "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                  "scaler": scaler.state_dict(), "rng": rng_states[0], "history": history, "fingerprint": fingerprint}
    if len(rng_states) > 1:
        checkpoint["rng_ranks"] = rng_states
    save_torch(checkpoint, os.path.join(out_dir, CHECKPOINT_DIR, f"epoch-{epoch}.pt"))


def _check_mode(path: str, saved: dict, fingerprint: dict) -> None:
    """A single-task checkpoint into a --mixed run, the reverse, or other mixed tasks: said plainly, with the
    command that resumes it (a mixed run's fingerprint has "mixed": its tasks, a single-task run's "task")."""
    was, now = saved.get("mixed"), fingerprint.get("mixed")
    if was == now:
        return
    if now is None:
        raise ValueError(f"{path} is a checkpoint of a --mixed run (tasks {','.join(was)}); resume it with --task "
                         f"{','.join(was)} --mixed, or start this run ({fingerprint.get('task')}) without --resume")
    if was is None:
        raise ValueError(f"{path} is a checkpoint of a single-task run ({saved.get('task')}), not of a --mixed run; "
                         f"resume it without --mixed, or run --task {','.join(now)} --mixed without --resume")
    saved_tasks, tasks = ",".join(was), ",".join(now)
    raise ValueError(f"{path} is a checkpoint of a --mixed run of tasks {saved_tasks}, this run trains {tasks}; "
                     f"resume with --task {saved_tasks} --mixed (the same tasks in the same order), or run without "
                     f"--resume")


def _restore_rng(state: dict, context: distributed.Context, seed: int) -> None:
    """The RNG state of this rank at the checkpoint; on another number of ranks rank 0 takes the saved
    rank 0 state and the others reseed (their dropout masks then differ from the uninterrupted run's)."""
    ranks = state.get("rng_ranks")
    if context.enabled and ranks is not None and len(ranks) == context.world_size:
        _set_rng_state(ranks[context.rank])
    elif context.is_main:
        _set_rng_state(state["rng"])
    else:
        seed_everything(seed + context.rank)


