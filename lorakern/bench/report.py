"""lorakern bench's output: the markdown tables, the PNG chart, and the JSON/markdown files (with the
machine), plus the pieces the target-shape scripts in benchmarks/ share (their parser and checked report)."""
from __future__ import annotations

import argparse
import io
import json
import math
import os
from typing import Optional

import torch

from lorakern._io import atomic_write_bytes
from lorakern.bench.machine import machine
from lorakern.bench.measure import Row
from lorakern.bench.providers import FROZEN
from lorakern.bench.timing import MODES


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
