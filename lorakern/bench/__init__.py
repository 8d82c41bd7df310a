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

The code, by role (this module re-exports the names the CLI, benchmarks/ and the tests use):

    shapes.py     the shapes measured (Shape, LAYERS, shape_grid), FLOPs, compulsory bytes, card peaks
    providers.py  what is timed: the operands, Built, each provider's builder, providers(device)
    timing.py     how: the timer, interleaved rounds, one step per mode, page faults, peak memory
                  (AllocationTracker)
    measure.py    one shape measured: Row, measure
    machine.py    the machine and process beside the numbers: CPU model and flags, C kernels, versions,
                  the allocator setting (keep_freed_memory)
    report.py     the tables, the chart, the JSON/markdown files; the target-shape scripts' shared pieces
    nf4.py        --nf4: NF4 against bitsandbytes
    mixed.py      --adapters N: a mixed-adapter batch (imported by the CLI when asked for)
    main.py       run: what ``lorakern bench`` does with its flags (parsed in lorakern/cli.py)
"""
from __future__ import annotations

# The public names, and the private ones benchmarks/ and tests/ reach for (_step, _formulation, ...).
from lorakern.bench.machine import VECTOR_FLAGS, c_kernels, cpu_flags, cpu_model, keep_freed_memory, machine
from lorakern.bench.main import run
from lorakern.bench.measure import Row, _formulation, measure, timed_row
from lorakern.bench.nf4 import measure_nf4, nf4_markdown
from lorakern.bench.providers import (FROZEN, Built, Operands, _base_linear, _importable, _magnitude, _peft_dora,
                                      make_operands, providers)
from lorakern.bench.report import (checked_markdown, finish_checked, gpu_script_parser, markdown, plot, plot_png,
                                   reference_markdown, report, summary, write_results)
from lorakern.bench.shapes import (LAYERS, PEAKS, RANKS, SHAPES_CPU, SHAPES_GPU, SHAPES_QUICK, TOKENS_CPU, TOKENS_GPU,
                                   Shape, flops, min_bytes, shape_grid)
from lorakern.bench.timing import MODES, AllocationTracker, _step, _timer, calls_per_sample, interleaved, peak_memory

__all__ = ["FROZEN", "LAYERS", "MODES", "PEAKS", "RANKS", "SHAPES_CPU", "SHAPES_GPU", "SHAPES_QUICK", "TOKENS_CPU",
           "TOKENS_GPU", "VECTOR_FLAGS", "AllocationTracker", "Built", "Operands", "Row", "Shape", "c_kernels",
           "calls_per_sample", "checked_markdown", "cpu_flags", "cpu_model", "finish_checked", "flops",
           "gpu_script_parser", "interleaved", "keep_freed_memory", "machine", "make_operands", "markdown", "measure",
           "measure_nf4", "min_bytes", "nf4_markdown", "peak_memory", "plot", "plot_png", "providers",
           "reference_markdown", "report", "run", "shape_grid", "summary", "timed_row", "write_results"]
# re-exported for benchmarks/ and tests/, which reach for them as lorakern.bench._X
_REEXPORTED = (_formulation, _base_linear, _importable, _magnitude, _peft_dora, _step, _timer)
