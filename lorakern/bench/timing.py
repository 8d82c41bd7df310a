"""How lorakern bench times and measures memory: the timer (CUDA events or perf_counter), interleaved
rounds, one sample's step per mode, the page-fault count, and the peak memory of a step
(``AllocationTracker`` on CPU)."""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lorakern.bench.providers import Built

MODES = ("fwd", "bwd", "fwd+bwd")


class AllocationTracker(TorchDispatchMode):
    """Live bytes of the storages ATen ops create while active, and their peak.

    A storage counts from the op that creates it until it is freed (seen at the next op after it dies;
    no op can allocate in between, so the peak is exact at op granularity). Views and in-place ops
    create no storage and count nothing. Does not see scratch memory private to a BLAS call.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._sweep()
        known = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in known and key not in self.live and storage.nbytes() > 0:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def _timer(device: str):
    """timed(fn, calls, setup) -> ms per call of fn; setup (untimed) runs once before the calls."""
    if device == "cuda":
        def timed(fn, calls, setup=None):
            if setup is not None:
                setup()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / calls
    else:
        def timed(fn, calls, setup=None):
            if setup is not None:
                setup()
            begin = time.perf_counter()
            for _ in range(calls):
                fn()
            return (time.perf_counter() - begin) * 1e3 / calls
    return timed


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@dataclass
class _Step:
    """What one sample runs: ``setup`` untimed, then ``run`` timed ``calls`` times."""

    run: Callable[[], None]
    setup: Optional[Callable[[], None]] = None


def interleaved(candidates: dict[str, Callable[[], object]], rounds: int, device: str, calls: int = 1
                ) -> dict[str, list[float]]:
    """ms per call of each candidate, one sample per round, the candidates taking turns within each round
    (after one warm-up call each), so that a noisy machine slows them alike."""
    timed = _timer(device)
    for fn in candidates.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            samples[name].append(timed(fn, calls))
    return samples


def calls_per_sample(timed, step: _Step) -> int:
    """Enough calls of ``step`` (the frozen layer's, probed with ``timed``) per sample that one sample lasts
    ~20 ms (timer resolution and launch jitter), at most 200."""
    probe = timed(step.run, 3, step.setup)
    return max(1, min(200, int(20.0 / max(probe, 1e-3))))


def _step(built: Built, grad: torch.Tensor, mode: str) -> _Step:
    if mode == "fwd":
        return _Step(lambda: built.forward())
    if mode == "fwd+bwd":
        return _Step(lambda: torch.autograd.grad(built.forward(), built.params, grad))
    if mode != "bwd":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    graph = {}

    def setup():
        graph["y"] = built.forward()

    def run():
        torch.autograd.grad(graph["y"], built.params, grad, retain_graph=True)

    return _Step(run, setup)


def peak_memory(built: Built, grad: torch.Tensor, mode: str, device: str) -> int:
    """Peak bytes allocated during one ``mode`` step above what was allocated before it (see module doc)."""
    y = built.forward() if mode == "bwd" else None
    if mode == "bwd":
        work = lambda: torch.autograd.grad(y, built.params, grad)
    elif mode == "fwd":
        work = lambda: built.forward()
    else:
        work = lambda: torch.autograd.grad(built.forward(), built.params, grad)
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = work()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        with AllocationTracker() as tracker:
            result = work()
        peak = tracker.peak
    del result
    return int(peak)
