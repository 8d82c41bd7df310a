"""The harness under ``torchrun``: one process per device, the same flags, the same numbers.

``torchrun --nproc_per_node N -m lorakern glue ...`` sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR /
MASTER_PORT in every process; ``session`` reads them, starts the process group (nccl on CUDA, each process
on cuda:LOCAL_RANK; gloo on CPU) and ends it. What each part of a run does with it:
- training: ``--batch-size`` stays the *global* batch; each global batch (the same ones, in the same
  order, as in one process) is dealt out to the ranks and DDP averages their gradients, so a run on N
  processes follows the one-process loss curve (train.py says how);
- evaluation: whole evaluation batches are dealt out round-robin and their outputs all-gathered, so every
  rank computes the metrics of exactly the logits one process would have computed;
- files: rank 0 alone writes the run folder (reports, metrics, checkpoints, the adapter); what the other
  ranks need from it (a checkpoint to resume from, the adapter of the reload check) rank 0 reads and
  broadcasts, so machines need not share a file system.
Without WORLD_SIZE > 1 (a plain ``lorakern glue``) nothing here starts or changes anything.
"""
from __future__ import annotations

import contextlib
import gc
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Context:
    """Where this process stands: rank of world_size (1: a single process), its local rank, the backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"{self.world_size} ({self.backend}, DDP)" if self.enabled else "1"


SINGLE = Context()
_started_here = False  # set once session() has started (and so later destroyed) a process group here


def current() -> Context:
    """The running process group's context, or SINGLE when there is none."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SINGLE
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())


def _env_int(name: str) -> int:
    text = os.environ.get(name)
    if text is None:
        raise ValueError(f"WORLD_SIZE is set but {name} is not; start each process with torchrun, which sets "
                         f"{', '.join(ENV_KEYS)}")
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {text!r}") from None


def from_env() -> Optional[tuple[int, int, int]]:
    """(rank, world_size, local_rank) as torchrun sets them, or None outside torchrun (or with one process)."""
    if "WORLD_SIZE" not in os.environ:
        return None
    world = _env_int("WORLD_SIZE")
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world}")
    if world == 1:
        return None
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if not 0 <= rank < world or local_rank < 0:
        raise ValueError(f"RANK {rank} / LOCAL_RANK {local_rank} do not fit WORLD_SIZE {world}")
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise ValueError(f"WORLD_SIZE={world} but {key} is not set; start the processes with torchrun "
                             f"(--rdzv-endpoint HOST:PORT, or --master-addr / --master-port)")
    return rank, world, local_rank


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[Context]:
    """Start the process group torchrun's environment describes, yield its Context, destroy it at the end.

    Re-entrant: inside a running process group (an outer session, or one the caller started) it yields
    that group's context and leaves the group alone. ``device``: the run's device; cuda uses nccl with each
    process on cuda:LOCAL_RANK, cpu uses gloo.
    """
    if dist.is_available() and dist.is_initialized():
        yield current()
        return
    found = from_env()
    if found is None:
        yield SINGLE
        return
    rank, world, local_rank = found
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed; run a single process (without torchrun)")
    if device.type == "cuda":
        if device.index is not None and device.index != local_rank:
            raise ValueError(f"--device {device} under torchrun: each process uses cuda:LOCAL_RANK (here "
                             f"cuda:{local_rank}); pass --device cuda or auto")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s); use --nproc_per_node <= {torch.cuda.device_count()}")
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"the harness runs under torchrun on cuda (nccl) or cpu (gloo), got --device {device}")
    global _started_here
    dist.init_process_group(backend)
    _started_here = True
    failed = False
    try:
        yield Context(rank, world, local_rank, backend)
    except BaseException:
        failed = True
        raise
    finally:
        if not failed:
            dist.barrier()  # rank 0 may still be writing; leave together
        gc.collect()  # DDP's reducer holds the group: release any left before destroying it
        dist.destroy_process_group()


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not current().enabled:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_from_main(compute: Callable[[], T]) -> T:
    """``compute()`` run on rank 0 only, its result given to every rank.

    A ValueError on rank 0 (bad input, e.g. a checkpoint of other settings) is raised on every rank, so
    no rank waits for a broadcast that never comes.
    """
    context = current()
    if not context.enabled:
        return compute()
    box: list[Any] = [None]
    if context.is_main:
        try:
            box[0] = ("ok", compute())
        except ValueError as exc:
            box[0] = ("error", str(exc))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise ValueError(value)
    return value


@contextlib.contextmanager
def folder_from_main(path: str) -> Iterator[str]:
    """A folder rank 0 wrote, readable on every rank: ``path`` itself on rank 0, a copy elsewhere.

    Rank 0 broadcasts the files' bytes (an adapter: a few MB), so other machines need not see its disk.
    """
    context = current()
    if not context.enabled:
        yield path
        return
    files = broadcast_from_main(lambda: {name: _read(os.path.join(path, name)) for name in sorted(os.listdir(path))
                                         if os.path.isfile(os.path.join(path, name))})
    if context.is_main:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="lorakern-rank{}-".format(context.rank)) as copy:
        for name, data in files.items():
            with open(os.path.join(copy, name), "wb") as handle:
                handle.write(data)
        yield copy


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def leave(code: int) -> int:
    """``code``, or, in a process where ``session`` ran a process group, exit with it right away.

    gloo's threads can abort the interpreter's teardown ("terminate called without an active exception")
    even after the group is destroyed, which torchrun reports as a failed run. By now every file is
    written (atomically, fsynced) and the group is gone, so the command leaves without that teardown.
    """
    if not _started_here:
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
