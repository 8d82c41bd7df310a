"""lorakern bench's measurement of one shape: every provider timed interleaved round by round in each mode,
with min, median and paired ratios to the frozen layer, page faults, peak memory and the roofline columns."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from lorakern.bench.providers import FROZEN, Built, Operands, make_operands, providers
from lorakern.bench.shapes import PEAKS, Shape, _card_family, flops, min_bytes
from lorakern.bench.timing import MODES, _minor_faults, _step, _timer, calls_per_sample, peak_memory


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
    # formulation.choose_formulation); None for the peers and the Triton path
    formulation: Optional[str] = None
    samples: list = field(default_factory=list)


def timed_row(label: str, shape: Shape, dtype: torch.dtype, mode: str, provider: str, values: list[float],
              base: list[float]) -> Row:
    """The row of ``provider``'s samples ``values`` (ms per call, one per round): min, median, and their ratios
    to the frozen layer's samples ``base`` of the same rounds."""
    row = Row(label, shape.M, shape.K, shape.N, shape.r, str(dtype).replace("torch.", ""), mode, provider,
              min(values), statistics.median(values), samples=values)
    row.ratio_min = row.min_ms / min(base)
    row.ratio_median = row.median_ms / statistics.median(base)
    row.ratio_paired = statistics.median(v / b for v, b in zip(values, base))
    return row


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
        n_calls = calls if calls > 0 else calls_per_sample(timed, steps[FROZEN])
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
            row = timed_row(shape.name, shape, dtype, mode, name, values, base)
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
    from lorakern.formulation import choose_formulation, pinned_formulation

    pin = {"lorakern, factored": "factored", "lorakern, merged": "merged"}.get(provider)
    if pin is None and provider not in ("lorakern torch", "lorakern torch, no C"):
        return None
    with pinned_formulation(pin or "auto"):
        chosen = choose_formulation(shape.M, shape.K, shape.N, shape.r, False, dtype)
    return f"{chosen.forward}/{chosen.backward}"
