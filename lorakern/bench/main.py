"""What ``lorakern bench`` runs (lorakern/cli.py turns its flags into this call): every shape measured,
the tables printed, the files written."""
from __future__ import annotations

import os
import sys
from dataclasses import asdict
from typing import Optional

import torch

from lorakern.bench.machine import keep_freed_memory, machine
from lorakern.bench.measure import Row, _checked, measure
from lorakern.bench.nf4 import measure_nf4, nf4_markdown
from lorakern.bench.providers import _importable
from lorakern.bench.report import markdown, plot, summary, write_results
from lorakern.bench.shapes import Shape
from lorakern.bench.timing import MODES


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
