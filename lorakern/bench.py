"""Side-by-side timing and peak memory of a LoRA linear layer against its frozen base layer and its peers.

Providers (each used when importable): the frozen ``nn.Linear`` (the floor), the seed's naive formulation
(forms B @ A on every call), lorakern's torch path (and its Triton path on CUDA), PEFT's
``peft.tuners.lora.Linear`` and loralib's ``loralib.Linear``, all holding the same W, b, A, B and scale.

How it measures, and why:
- Interleaved: every round times every provider once (a sample of one or more calls), so a noisy or
  shared machine slows all providers alike; several rounds, min and median reported, each as a ratio to
  the frozen layer's min and median in the same mode.
- Modes: ``fwd`` (a training forward: autograd records the graph), ``bwd`` (the backward call alone: the
  forward runs untimed before each sample and the timed calls back-propagate through it with
  ``retain_graph=True``), ``fwd+bwd`` (a training step of the layer). The frozen layer's backward
  computes dx only; the LoRA providers compute dx, dA and dB.
- Peak memory, measured in a separate untimed pass. CUDA: ``torch.cuda.max_memory_allocated`` minus the
  memory allocated before the step. CPU has no allocator statistics, so ``AllocationTracker`` (a
  TorchDispatchMode) adds up the bytes of every storage an ATen op creates and subtracts them when the
  storage is freed; the peak of that sum over the step is reported. It counts every tensor, outputs,
  saved activations and temporaries, but not scratch memory private to a BLAS call (MKL packing
  buffers), which is the same for every provider's base GEMM.
- On CUDA also TFLOP/s, GB/s (compulsory traffic over time) and the roofline bound for the card.
- By default the process runs as a user's training loop would, with the C library's allocator as it is.
  ``--malloc keep`` (``keep_freed_memory``) is a labelled extra that keeps freed host memory for reuse. With
  glibc's defaults a freed 12 MB activation often goes back to the kernel (the heap top is trimmed) and
  the next one is faulted in again page by page (measured: ~6,000 page faults per round of the 768x768,
  M=4096 providers, medians 6-10% above their minimum); how often depends on the order of allocations,
  which differs between providers, so the faults land on some providers and not others. Buffers over
  32 MiB stay mmapped, and fault in for every provider, as by default. Every provider runs under the
  same setting; the JSON records it (``machine.malloc``) and each row's minor page faults per call.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lorakern._io import atomic_write_bytes
from lorakern.functional import lora_linear

MODES = ("fwd", "bwd", "fwd+bwd")
FROZEN = "frozen nn.Linear"


@dataclass(frozen=True)
class Shape:
    name: str
    M: int
    K: int
    N: int
    r: int


# Layers of real models (in_features K, out_features N). Token counts M: sized for 2 CPU cores (a
# training step of the largest shape stays under a second) and real batch sizes on a GPU.
LAYERS = {
    "768x768": ("roberta-base attention", 768, 768),
    "768x3072": ("roberta-base FFN up", 768, 3072),
    "4096x4096": ("LLaMA-style 4096", 4096, 4096),
}
TOKENS_CPU = {"768x768": 4096, "768x3072": 4096, "4096x4096": 1024}
TOKENS_GPU = {"768x768": 8192, "768x3072": 8192, "4096x4096": 8192}
RANKS = (8, 16, 64)


def shape_grid(layers=tuple(LAYERS), ranks=RANKS, device: str = "cpu", tokens: Optional[int] = None) -> list[Shape]:
    """Every layer in ``layers`` at every rank in ``ranks``; M from ``tokens`` or the device's default."""
    out = []
    for key in layers:
        if key not in LAYERS:
            raise ValueError(f"unknown layer {key!r}; choose from {', '.join(LAYERS)} (e.g. --shapes 768x768,4096x4096)")
        name, K, N = LAYERS[key]
        M = tokens or (TOKENS_GPU if device == "cuda" else TOKENS_CPU)[key]
        for r in ranks:
            if not isinstance(r, int) or r <= 0:
                raise ValueError(f"rank must be a positive integer, got {r!r}; pass e.g. --ranks 8,16,64")
            out.append(Shape(f"{name} {key}", M, K, N, r))
    return out


SHAPES_CPU = shape_grid(device="cpu")
SHAPES_GPU = shape_grid(device="cuda")
SHAPES_QUICK = [Shape("quick 96x80", 64, 96, 80, 4)]

# Dense peaks by card: FLOP/s per dtype (16-bit tensor cores, TF32, plain fp32) and HBM bytes/s.
PEAKS = {
    "H200": ({"float16": 989e12, "bfloat16": 989e12, "tf32": 494e12, "float32": 67e12}, 4.8e12),
    "H100": ({"float16": 989e12, "bfloat16": 989e12, "tf32": 494e12, "float32": 67e12}, 3.35e12),
    "A100": ({"float16": 312e12, "bfloat16": 312e12, "tf32": 156e12, "float32": 19.5e12}, 2.0e12),
}


@dataclass
class Operands:
    x: torch.Tensor
    W: torch.Tensor
    b: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    s: float
    grad: torch.Tensor


def make_operands(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> Operands:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rand = lambda *size, scale=1.0: (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)
    return Operands(
        x=rand(shape.M, shape.K).requires_grad_(True),
        W=rand(shape.N, shape.K, scale=shape.K ** -0.5),
        b=rand(shape.N, scale=0.1),
        A=rand(shape.r, shape.K, scale=shape.K ** -0.5).requires_grad_(True),
        B=rand(shape.N, shape.r, scale=shape.r ** -0.5).requires_grad_(True),
        s=2.0,
        grad=rand(shape.M, shape.N),
    )


@dataclass
class Built:
    """A provider bound to operands: ``forward()`` computes y from o.x; ``params`` are the tensors whose
    gradients a training step needs, in the order (x, A, B) (just (x,) for the frozen layer)."""

    forward: Callable[[], torch.Tensor]
    params: list


def _frozen(o: Operands) -> Built:
    return Built(lambda: F.linear(o.x, o.W, o.b), [o.x])


def _naive(o: Operands) -> Built:
    # The seed's formulation: forms B @ A on every call.
    return Built(lambda: F.linear(o.x, o.W + o.s * (o.B @ o.A), o.b), [o.x, o.A, o.B])


def _lorakern(backend: Optional[str]) -> Callable[[Operands], Built]:
    def build(o: Operands) -> Built:
        return Built(lambda: lora_linear(o.x, o.W, o.b, o.A, o.B, o.s, backend=backend), [o.x, o.A, o.B])

    return build


def _lorakern_pinned(formulation: str) -> Callable[[Operands], Built]:
    """lorakern's torch path with the formulation pinned (``functional.choose_formulation`` picks one of
    these two by cost for the plain provider): what the choice buys, side by side."""
    from lorakern.functional import pinned_formulation

    def build(o: Operands) -> Built:
        def forward() -> torch.Tensor:
            with pinned_formulation(formulation):  # the backward follows the forward's choice
                return lora_linear(o.x, o.W, o.b, o.A, o.B, o.s, backend=None if o.x.device.type == "cpu" else "torch")

        return Built(forward, [o.x, o.A, o.B])

    return build


def _lorakern_without_c(o: Operands) -> Built:
    """The torch path with lorakern.native switched off: what the C kernels for the rank-r products buy."""
    from lorakern import native

    def forward() -> torch.Tensor:
        with native.disabled():  # the backward follows the forward's choice
            return lora_linear(o.x, o.W, o.b, o.A, o.B, o.s, backend="torch")

    return Built(forward, [o.x, o.A, o.B])


def _base_linear(o: Operands) -> torch.nn.Linear:
    N, K = o.W.shape
    base = torch.nn.Linear(K, N, device=o.W.device, dtype=o.W.dtype)
    with torch.no_grad():
        base.weight.copy_(o.W)
        base.bias.copy_(o.b)
    base.requires_grad_(False)
    return base


def _peft(o: Operands) -> Built:
    """PEFT's LoRA Linear wrapping an nn.Linear that holds W and b; A, B and the scale copied in."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear

    r = o.A.shape[0]
    layer = Linear(_base_linear(o), "default", config=LoraConfig(r=r, lora_alpha=o.s * r), r=r, lora_alpha=o.s * r)
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        lora_A.copy_(o.A)
        lora_B.copy_(o.B)
    layer.scaling["default"] = o.s
    layer.to(device=o.W.device, dtype=o.W.dtype).train()
    return Built(lambda: layer(o.x), [o.x, lora_A, lora_B])


def _loralib(o: Operands) -> Built:
    """loralib's Linear with the same weights (merge_weights=False, so it never folds B A into W)."""
    import loralib

    N, K = o.W.shape
    r = o.A.shape[0]
    layer = loralib.Linear(K, N, r=r, lora_alpha=o.s * r, merge_weights=False)
    with torch.no_grad():
        layer.weight.copy_(o.W)
        layer.bias.copy_(o.b)
        layer.lora_A.copy_(o.A)
        layer.lora_B.copy_(o.B)
    layer.bias.requires_grad_(False)
    layer.scaling = o.s
    layer.to(device=o.W.device, dtype=o.W.dtype).train()
    return Built(lambda: layer(o.x), [o.x, layer.lora_A, layer.lora_B])


def _magnitude(o: Operands) -> torch.Tensor:
    """A DoRA magnitude 10% above the row norms of W + s B A (so m / n is not 1), as a trained one."""
    from lorakern.dora import weight_norm

    return (1.1 * weight_norm(o.W, o.A, o.B, o.s)).to(o.W.dtype).requires_grad_(True)


def _lorakern_dora(o: Operands, cuda_backend: str = "torch") -> Built:
    """lorakern's DoRA as a layer runs it: ||W_i||^2 computed once (the layer caches it), the rest per call;
    on CUDA on ``cuda_backend`` (the torch path, or the Triton kernels: "lorakern DoRA triton")."""
    from lorakern import dispatch
    from lorakern.dora import row_norms_sq

    m, norm_sq = _magnitude(o), row_norms_sq(o.W)
    backend = None if o.x.device.type == "cpu" else cuda_backend
    return Built(lambda: dispatch.lora_forward(o.x, "dense", o.W, o.b, [(o.A, o.B, o.s, 0.0, m)], requested=backend,
                                               base_norm_sq=norm_sq), [o.x, o.A, o.B, m])


def _peft_dora(o: Operands) -> Built:
    """PEFT's DoRA Linear (use_dora=True) with the same W, b, A, B, s and magnitude."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear

    r = o.A.shape[0]
    layer = Linear(_base_linear(o), "default", config=LoraConfig(r=r, lora_alpha=o.s * r, use_dora=True), r=r,
                   lora_alpha=o.s * r, use_dora=True)
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    magnitude = layer.lora_magnitude_vector["default"].weight
    layer.scaling["default"] = o.s
    with torch.no_grad():
        lora_A.copy_(o.A)
        lora_B.copy_(o.B)
        magnitude.copy_(_magnitude(o))
    layer.to(device=o.W.device, dtype=o.W.dtype).train()
    return Built(lambda: layer(o.x), [o.x, lora_A, lora_B, magnitude])


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def providers(device: str) -> dict[str, Callable[[Operands], Built]]:
    """Every provider available here, by name: peers only when their package is installed."""
    # "lorakern torch": lorakern's torch-side path as auto picks it (with the C kernels for fp32 on a CPU)
    out = {FROZEN: _frozen, "naive (forms B@A)": _naive, "lorakern torch": _lorakern(None if device == "cpu" else "torch")}
    if device == "cuda":
        out["lorakern triton"] = _lorakern("triton")
    else:
        out["lorakern torch, no C"] = _lorakern_without_c
    out["lorakern, factored"] = _lorakern_pinned("factored")
    out["lorakern, merged"] = _lorakern_pinned("merged")
    out["lorakern DoRA"] = _lorakern_dora
    if device == "cuda":
        out["lorakern DoRA triton"] = lambda o: _lorakern_dora(o, "triton")
    if _importable("peft"):
        out["PEFT lora.Linear"] = _peft
        out["PEFT DoRA"] = _peft_dora
    if _importable("loralib"):
        out["loralib Linear"] = _loralib
    return out


def flops(shape: Shape, mode: str, lora: bool) -> float:
    M, K, N, r = shape.M, shape.K, shape.N, shape.r
    forward = 2 * M * N * K + (2 * M * K * r + 2 * M * N * r if lora else 0)
    # backward: dx = g W (+ (g B) A), g B, dA = (g B)^T x, dB = g^T u
    backward = 2 * M * N * K + (2 * M * N * r + 2 * M * r * K + 2 * M * r * K + 2 * M * N * r if lora else 0)
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[mode]


def min_bytes(shape: Shape, mode: str, itemsize: int) -> float:
    """Compulsory traffic: each operand read once, each result written once."""
    M, K, N, r = shape.M, shape.K, shape.N, shape.r
    forward = (M * K + N * K + M * N + r * (K + N) + M * r) * itemsize
    backward = (M * N + N * K + M * K + M * K + M * r + r * (K + N) * 2) * itemsize
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[mode]


@dataclass
class Row:
    shape: str
    M: int
    K: int
    N: int
    r: int
    dtype: str
    mode: str
    provider: str
    min_ms: float
    median_ms: float
    ratio_min: float = math.nan
    ratio_median: float = math.nan
    # median over rounds of (this provider's sample / the frozen layer's sample of the same round): the two
    # ran back to back, so a slow patch of the machine moves both; steadier than the ratio of medians
    ratio_paired: float = math.nan
    peak_bytes: Optional[int] = None
    extra_peak_over_Mr: Optional[float] = None
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    roofline_ms: Optional[float] = None
    # minor page faults per timed call (the process's count over this provider's samples): first touches
    # of memory the allocator got from the kernel, a cost the allocator setting decides (see module doc)
    faults_per_call: Optional[float] = None
    # the formulation lorakern's torch path took, forward/backward ("merged/factored"; see
    # functional.choose_formulation); None for the peers and the Triton path
    formulation: Optional[str] = None
    samples: list = field(default_factory=list)


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


_MALLOC = "default"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> str:
    """Make glibc's malloc keep freed memory for the next allocation of this process: the heap top is
    never trimmed, and buffers up to 32 MiB live on the heap from the first one on (32 MiB is the most
    glibc's own adaptive threshold reaches; larger ones stay mmapped as by default: with them on the heap
    too, posix_memalign's slack let the heap grow by a whole buffer per round in a measured loop).
    Returns what was set (also reported by ``machine()["malloc"]``). Process-wide and not undone: for a
    benchmark process, not a library call. Raises ValueError where the C library is not glibc (pass
    ``--malloc default`` there)."""
    global _MALLOC
    import ctypes

    libc_name, _ = platform.libc_ver()
    libc = ctypes.CDLL(None)
    if libc_name != "glibc" or not hasattr(libc, "mallopt"):
        raise ValueError(f"--malloc keep needs glibc's mallopt; this C library is {libc_name or 'unknown'!r}: "
                         "pass --malloc default")
    trim, mmap = 2**31 - 1, 32 * 2**20
    if not (libc.mallopt(_M_TRIM_THRESHOLD, trim) and libc.mallopt(_M_MMAP_THRESHOLD, mmap)):
        raise ValueError("glibc refused mallopt(M_TRIM_THRESHOLD / M_MMAP_THRESHOLD); pass --malloc default")
    _MALLOC = f"glibc, freed memory kept: mallopt M_TRIM_THRESHOLD={trim}, M_MMAP_THRESHOLD={mmap}"
    return _MALLOC


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


def _checked(device: str, rounds: int, modes, only: Optional[list[str]]) -> dict[str, Callable[[Operands], Built]]:
    """The providers available on ``device``, once ``rounds``, ``modes`` and ``only`` are known to be valid."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}; pass --rounds 7 (or more on a noisy machine)")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    available = providers(device)
    if only is not None:
        unknown = [name for name in only if name not in available]
        if unknown:
            raise ValueError(f"unknown or unavailable provider(s) {unknown}; available here: {list(available)}")
    return available


def measure(shape: Shape, dtype: torch.dtype, device: str, rounds: int = 7, calls: int = 0,
            modes=MODES, only: Optional[list[str]] = None, memory: bool = True) -> list[Row]:
    """Time (and measure the peak memory of) every provider on ``shape``, interleaved round by round."""
    available = _checked(device, rounds, modes, only)
    o = make_operands(shape, dtype, device)
    built = {name: make(o) for name, make in available.items() if only is None or name in only or name == FROZEN}
    timed = _timer(device)
    rows = []
    for mode in modes:
        steps = {name: _step(b, o.grad, mode) for name, b in built.items()}
        for step in steps.values():  # warm-up: compile, autotune, allocate
            for _ in range(2):
                timed(step.run, 1, step.setup)
        # Enough calls per sample that one sample lasts ~20 ms (timer resolution and launch jitter).
        if calls <= 0:
            probe = timed(steps[FROZEN].run, 3, steps[FROZEN].setup)
            n_calls = max(1, min(200, int(20.0 / max(probe, 1e-3))))
        else:
            n_calls = calls
        samples = {name: [] for name in steps}
        faults = dict.fromkeys(steps, 0)
        for _ in range(rounds):
            for name, step in steps.items():
                if step.setup is not None:  # untimed, and its page faults are not the step's
                    step.setup()
                before = _minor_faults()
                samples[name].append(timed(step.run, n_calls))
                faults[name] += _minor_faults() - before
        peaks = {name: peak_memory(b, o.grad, mode, device) for name, b in built.items()} if memory else {}
        base = samples[FROZEN]
        lora_activation = shape.M * shape.r * o.x.element_size()
        for name, values in samples.items():
            row = Row(shape.name, shape.M, shape.K, shape.N, shape.r, str(dtype).replace("torch.", ""), mode, name,
                      min(values), statistics.median(values), samples=values)
            row.ratio_min = row.min_ms / min(base)
            row.ratio_median = row.median_ms / statistics.median(base)
            row.ratio_paired = statistics.median(v / b for v, b in zip(values, base))
            row.faults_per_call = faults[name] / (rounds * n_calls)
            row.formulation = _formulation(name, shape, dtype)
            if memory:
                row.peak_bytes = peaks[name]
                row.extra_peak_over_Mr = (peaks[name] - peaks[FROZEN]) / lora_activation
            if device == "cuda":
                lora = name != FROZEN
                row.tflops = flops(shape, mode, lora) / (row.min_ms * 1e-3) / 1e12
                row.gbps = min_bytes(shape, mode, o.x.element_size()) / (row.min_ms * 1e-3) / 1e9
                peak = PEAKS.get(_card_family() or "")
                if peak is not None:
                    key = "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else row.dtype
                    if key in peak[0]:
                        row.roofline_ms = 1e3 * max(flops(shape, mode, lora) / peak[0][key],
                                                    min_bytes(shape, mode, o.x.element_size()) / peak[1])
            rows.append(row)
    return rows


def _formulation(provider: str, shape: Shape, dtype: torch.dtype) -> Optional[str]:
    from lorakern.functional import choose_formulation, pinned_formulation

    pin = {"lorakern, factored": "factored", "lorakern, merged": "merged"}.get(provider)
    if pin is None and provider not in ("lorakern torch", "lorakern torch, no C"):
        return None
    with pinned_formulation(pin or "auto"):
        chosen = choose_formulation(shape.M, shape.K, shape.N, shape.r, False, dtype)
    return f"{chosen.forward}/{chosen.backward}"


def _card_family() -> Optional[str]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((family for family in PEAKS if family in name), None)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    from lorakern.native import cpu_info

    return cpu_info().get("model name") or platform.processor() or platform.machine()


# The /proc/cpuinfo flags that decide which kernels run (lorakern's C builds, MKL's and ATen's code paths):
# RESULTS.md gives them beside each machine's numbers.
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16",
                "avx512_fp16", "amx_bf16", "amx_tile", "asimd", "sve", "sve2")


def cpu_flags() -> str:
    """This CPU's VECTOR_FLAGS, space-separated ("flags" on x86, "Features" on aarch64)."""
    from lorakern.native import cpu_info

    info = cpu_info()
    have = set((info.get("flags") or info.get("Features") or "").split())
    return " ".join(flag for flag in VECTOR_FLAGS if flag in have)


def c_kernels() -> str:
    """The ISA level lorakern's C kernels were built for, or why they serve no call here."""
    from lorakern import native

    level, why = native.build_status()
    return level or f"not built: {why}"


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed, or installed without metadata
        return None


def machine() -> dict:
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_flags": cpu_flags(),
        "c_kernels": c_kernels(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "malloc": _MALLOC,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lorakern": _version("lorakern"),
    }
    for package in ("triton", "peft", "loralib", "bitsandbytes"):
        info[package] = _version(package)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_results(out_dir: str, stem: str, payload: dict, text: str) -> None:
    """``stem``.json (``payload``) and ``stem``.md (``text``, newline-terminated) in ``out_dir``, each atomically."""
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_bytes(os.path.join(out_dir, f"{stem}.json"), json.dumps(payload, indent=2).encode())
    atomic_write_bytes(os.path.join(out_dir, f"{stem}.md"), (text if text.endswith("\n") else text + "\n").encode())


def report(table: str, out_dir: Optional[str], stem: str, **fields) -> None:
    """Print a benchmark script's ``table``; with ``out_dir``, write it as ``stem``.md and ``{"machine": ...,
    **fields}`` as ``stem``.json."""
    print(table)
    if out_dir:
        write_results(out_dir, stem, {"machine": machine(), **fields}, table)


def reference_markdown(rows: list[dict]) -> str:
    """The table of rows timing lorakern against a reference (keys benchmark, reference, lorakern_ms,
    reference_ms, ratio), as benchmarks/bench_qlora.py and bench_mixed.py report them."""
    lines = ["| benchmark | reference | lorakern ms | reference ms | lorakern / reference |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['benchmark']} | {r['reference']} | {r['lorakern_ms']:.3f} | {r['reference_ms']:.3f} | "
              f"{r['ratio']:.3f} |" for r in rows]
    return "\n".join(lines)


def gpu_script_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every target-shape script takes (benchmarks/bench_mixed.py, bench_dora.py): --device,
    --quick (tiny shapes, 1 round: runs interpreted on a CPU), --tokens, --shape K x N, --rank, --rounds, --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1 round (interpreted on CPU)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--shape", default="4096x4096", help="K x N of the layer")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=None)
    return parser


def finish_checked(title: str, stem: str, shape: str, checks: list[dict], times: list[dict],
                   out_dir: Optional[str]) -> int:
    """A target-shape script's ending: print (and under ``out_dir`` write, as ``stem``) the checked report;
    the exit status, 1 when a correctness check failed."""
    report(checked_markdown(f"{title}, {shape}", checks, times), out_dir, stem, shape=shape, checks=checks,
           rows=times)
    return 0 if all(c["ok"] for c in checks) else 1


def checked_markdown(title: str, checks: list[dict], times: list[dict]) -> str:
    """A GPU script's report: its title, the correctness checks run before timing (keys check,
    worst_rel_error, bound, ok), then ``reference_markdown(times)`` (benchmarks/bench_mixed.py, bench_dora.py)."""
    lines = [title, "", "| check | worst rel. error | bound | ok |", "|---|---:|---:|---|"]
    lines += [f"| {c['check']} | {c['worst_rel_error']:.3g} | {c['bound']:.3g} | {'yes' if c['ok'] else 'NO'} |"
              for c in checks]
    return "\n".join(lines) + "\n\n" + reference_markdown(times)


def markdown(rows: list[Row]) -> str:
    cuda = any(r.tflops is not None for r in rows)
    memory = any(r.peak_bytes is not None for r in rows)
    head = ("| shape (M, K, N, r) | dtype | mode | provider | form fwd/bwd | min ms | median ms | × frozen (min) | × frozen (median) "
            "| × frozen (paired) |")
    rule = "|---|---|---|---|---|---:|---:|---:|---:|---:|"
    if memory:
        head += " peak MiB | extra peak / (M·r) |"
        rule += "---:|---:|"
    if cuda:
        head += " TFLOP/s | GB/s | roofline ms |"
        rule += "---:|---:|---:|"
    lines = [head, rule]
    for r in rows:
        line = (f"| {r.shape} ({r.M}, {r.K}, {r.N}, {r.r}) | {r.dtype} | {r.mode} | {r.provider} | "
                f"{r.formulation or '-'} | {r.min_ms:.3f} | "
                f"{r.median_ms:.3f} | {r.ratio_min:.3f} | {r.ratio_median:.3f} | {r.ratio_paired:.3f} |")
        if memory:
            line += (f" {r.peak_bytes / 2**20:.1f} | {r.extra_peak_over_Mr:.1f} |" if r.peak_bytes is not None
                     else " n/a | n/a |")
        if cuda:
            line += f" {r.tflops:.1f} | {r.gbps:.0f} | " + (f"{r.roofline_ms:.3f} |" if r.roofline_ms else "n/a |")
        lines.append(line)
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    """The compact table for the README: the paired ratio to the frozen layer (median over rounds of the
    per-round ratio) per shape, provider and mode."""
    shapes = list(dict.fromkeys((r.shape, r.M, r.K, r.N, r.r) for r in rows))
    names = list(dict.fromkeys(r.provider for r in rows if r.provider != FROZEN))
    modes = [m for m in MODES if any(r.mode == m for r in rows)]
    lines = ["| shape (M, K, N, r) | provider | " + " | ".join(f"{m} × (paired)" for m in modes) + " |",
             "|---|---|" + "---:|" * len(modes)]
    for key in shapes:
        for name in names:
            cells = []
            for mode in modes:
                row = next((r for r in rows if (r.shape, r.M, r.K, r.N, r.r) == key and r.provider == name
                            and r.mode == mode), None)
                cells.append("n/a" if row is None else f"{row.ratio_paired:.2f}")
            lines.append(f"| {key[0]} ({key[1]}, {key[2]}, {key[3]}, {key[4]}) | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_png(rows: list[Row]) -> bytes:
    """A bar chart of each provider's median ratio to the frozen layer, per shape and mode, as PNG bytes."""
    from lorakern.errors import require

    matplotlib = require("matplotlib", "bench", "lorakern bench --plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r.shape, r.r, r.mode) for r in rows))
    names = [n for n in dict.fromkeys(r.provider for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups)), 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [next((r.ratio_median for r in rows if (r.shape, r.r, r.mode) == g and r.provider == name), math.nan)
                  for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{s}\nr={r} {m}" for s, r, m in groups], fontsize=6, rotation=90)
    ax.set_ylabel("time / frozen nn.Linear (median)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def plot(rows: list[Row], path: str) -> None:
    """Write ``plot_png(rows)`` to ``path`` atomically."""
    atomic_write_bytes(path, plot_png(rows))


def run(shapes: list[Shape], dtype: torch.dtype, device: str, out_dir: Optional[str], rounds: int = 7,
        draw: bool = False, only: Optional[list[str]] = None, nf4: Optional[tuple[int, int, int]] = None,
        echo: bool = True, modes=MODES, keep_memory: bool = False) -> list[Row]:
    """Measure ``shapes``; print the table; write lora_linear.{json,md} (and .png with ``draw``) to ``out_dir``.

    ``nf4`` = (rows, cols, tokens) adds the NF4-vs-bitsandbytes table (nf4.* files) when bitsandbytes is
    installed. ``keep_memory``: ``keep_freed_memory()`` first, once the arguments are checked (it changes
    the process's allocator for good, so a bad argument must not get that far).
    """
    _checked(device, rounds, modes, only)
    if keep_memory:
        print(f"lorakern bench: this process's allocator changed ({keep_freed_memory()}); ratios are those of "
              "a tuned process, not a default one", file=sys.stderr)
    rows = []
    for i, shape in enumerate(shapes):
        if echo:  # progress on stderr: a default CPU run takes minutes
            print(f"[{i + 1}/{len(shapes)}] {shape.name} M={shape.M} r={shape.r}", file=sys.stderr, flush=True)
        rows.extend(measure(shape, dtype, device, rounds=rounds, only=only, modes=modes))
    info = machine()
    title = f"{info['date']} on {info.get('gpu') or info['processor']} ({device}, {dtype}, {info['torch_threads']} threads, {rounds} rounds)"
    if device == "cpu":
        title += f"; CPU flags: {info['cpu_flags'] or '-'}; C kernels: {info['c_kernels']}"
    table = markdown(rows)
    nf4_rows = None
    if nf4 is not None and _importable("bitsandbytes"):
        nf4_rows = measure_nf4(*nf4, device, rounds=rounds)
    if echo:
        print(title + "\n\n" + table + "\n\n" + summary(rows))
        if nf4_rows is not None:
            print("\nNF4, lorakern vs bitsandbytes\n\n" + nf4_markdown(nf4_rows))
    if out_dir:
        payload = {"machine": info, "dtype": str(dtype), "device": device, "rounds": rounds,
                   "rows": [asdict(r) for r in rows], "nf4": nf4_rows}
        text = f"{title}\n\n{table}\n\n{summary(rows)}\n"
        if nf4_rows is not None:
            text += f"\nNF4, lorakern vs bitsandbytes\n\n{nf4_markdown(nf4_rows)}\n"
        write_results(out_dir, "lora_linear", payload, text)
        if draw:
            plot(rows, os.path.join(out_dir, "lora_linear.png"))
    return rows


def measure_nf4(rows: int, cols: int, tokens: int, device: str, rounds: int = 5) -> list[dict]:
    """NF4 against bitsandbytes, side by side: quantize, dequantize, and a forward through the 4-bit layer.

    Rows report each lorakern time and its ratio to bitsandbytes' time for the same operation (< 1 is
    faster), and whether both produced the same bits.
    """
    import warnings

    from lorakern.quant import LinearNF4, NF4Storage, quantize_nf4

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(rows, cols, generator=gen) / cols ** 0.5).to(device)
    x = torch.randn(tokens, cols, generator=gen).to(device)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = NF4Storage(quantize_nf4(w, 64, double_quant=False))
    linear = torch.nn.Linear(cols, rows, bias=False).to(device)
    with torch.no_grad():
        linear.weight.copy_(w)
    ours_layer = LinearNF4.from_linear(linear, double_quant=False)
    theirs_layer = bnb.nn.Linear4bit(cols, rows, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                                     compress_statistics=False)
    theirs_layer.load_state_dict(linear.state_dict())
    theirs_layer = theirs_layer.to(device)
    pairs = {
        "quantize": (lambda: quantize_nf4(w, 64, double_quant=False),
                     lambda: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)),
        "dequantize": (lambda: ours.dequantize(torch.float32), lambda: bnbf.dequantize_4bit(packed, state)),
        "forward (4-bit layer)": (lambda: ours_layer(x), lambda: theirs_layer(x)),
    }
    same = {"quantize": bool(torch.equal(ours.packed.reshape(-1), packed.reshape(-1))
                             and torch.equal(ours.absmax, state.absmax)),
            "dequantize": None, "forward (4-bit layer)": None}
    out = []
    with torch.no_grad():
        for name, (mine, theirs) in pairs.items():
            samples = interleaved({"lorakern": mine, "bitsandbytes": theirs}, rounds, device)
            out.append({"operation": name, "shape": f"{rows}x{cols}", "tokens": tokens if "forward" in name else None,
                        "lorakern_ms": min(samples["lorakern"]), "bitsandbytes_ms": min(samples["bitsandbytes"]),
                        "ratio": min(samples["lorakern"]) / min(samples["bitsandbytes"]),
                        "bit_identical": same[name]})
    return out


def nf4_markdown(rows: list[dict]) -> str:
    lines = ["| operation | shape | lorakern ms | bitsandbytes ms | lorakern / bitsandbytes | bit-identical |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        same = "n/a" if r["bit_identical"] is None else ("yes" if r["bit_identical"] else "NO")
        lines.append(f"| {r['operation']} | {r['shape']} | {r['lorakern_ms']:.1f} | {r['bitsandbytes_ms']:.1f} | "
                     f"{r['ratio']:.2f} | {same} |")
    return "\n".join(lines)
