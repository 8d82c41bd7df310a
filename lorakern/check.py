"""``lorakern check``: every available path against lorakern.core, as a table."""
from __future__ import annotations

import sys
from typing import Optional

import torch

from lorakern import dispatch, native
from lorakern.functional import pinned_formulation
from lorakern.testing import compare_layer, random_layer

# (x shape, out_features, r, dropout): odd sizes that hit every edge, 1-D/3-D inputs, r above min(in, out).
GRID = [
    ((1,), 1, 1, 0.0),
    ((6, 42), 123, 5, 0.0),
    ((37, 123), 42, 8, 0.1),
    ((2, 7, 33), 64, 16, 0.0),
    ((64, 431), 96, 16, 0.1),
    ((5, 20), 9, 64, 0.0),
]
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def available_paths(device: torch.device) -> list[str]:
    """The implementations of lorakern.dispatch, each a row (one that cannot run gets a row saying why):
    "torch" (plain torch), "c" (torch GEMMs with lorakern/native's C kernels: fp32 on the CPU), "triton"."""
    return ["torch"] + (["c"] if device.type == "cpu" else []) + ["triton"]


def _path_label(path: str) -> str:
    if path == "c":
        level, _ = native.build_status()
        return f"C kernels ({level})" if level else "C kernels"
    if path != "triton" or _unsupported("triton", torch.device("cpu"), torch.float32) is not None:
        return path
    from lorakern.kernels import lora_linear

    return "triton (interpreted)" if lora_linear.INTERPRETED else "triton (compiled)"


def _unsupported(path: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when implementation ``path`` takes a small layer of ``dtype`` on ``device``, else why not."""
    probe = torch.zeros(2, 4, device=device, dtype=dtype)
    call = dispatch.Call(probe, "dense", torch.zeros(3, 4, device=device, dtype=dtype), None,
                         torch.zeros(2, 4, device=device, dtype=dtype), torch.zeros(3, 2, device=device, dtype=dtype), 1.0)
    return dispatch.verdict(path, call)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def run_check(device: Optional[str] = None, out=sys.stdout) -> bool:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for path in available_paths(device):
        whole_path = _unsupported(path, device, torch.float32)
        if whole_path is not None and path != "torch":
            rows.append((_path_label(path), "all", "-", f"not run: {whole_path}", "n/a"))
            continue
        for dtype in DTYPES:
            why = _unsupported(path, device, dtype)
            if why:
                rows.append((_path_label(path), _name(dtype), "-", f"not run by this path: {why}", "n/a"))
                continue
            worst_ratio, worst = -1.0, None
            # both formulations (functional.choose_formulation): merged where allowed, factored everywhere
            for form in ("factored", "merged") if path != "triton" else ("auto",):
                for case, (shape, out_features, r, dropout) in enumerate(GRID):
                    layer = random_layer(shape[-1], out_features, r, dtype, dropout=dropout, seed=case,
                                         device=str(device))
                    layer.train()
                    x = torch.randn(shape, generator=torch.Generator().manual_seed(100 + case), dtype=torch.float64)
                    layer.backend = path
                    with pinned_formulation(form):
                        comparison = compare_layer(layer, x.to(device=device, dtype=dtype), seed=case)
                    name, error = comparison.worst
                    if error / comparison.bound > worst_ratio or not comparison.passed:
                        worst_ratio, worst = error / comparison.bound, (comparison, name, error, form)
            comparison, name, error, form = worst
            where = f"{name} @ x{comparison.shape}" + (f" {form}" if form != "auto" else "")
            rows.append((_path_label(path), _name(dtype), f"{error:.2e}", where,
                         "pass" if comparison.passed else "FAIL"))
    header = ("path", "dtype", "worst error / bound", "where", "result")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    print(f"lorakern check on {device}: output and gradients (x, A, B, bias) against lorakern.core (float64)", file=out)
    print(f"{len(GRID)} shapes per row, each in both formulations (factored, merged where allowed); error = max "
          f"|got - ref| / its allowed error (lorakern.testing: from the dtype, the reduction length and the rounded "
          f"values); pass <= 1", file=out)
    print(line(header), file=out)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    for row in rows:
        print(line(row), file=out)
    ok = all(row[-1] in ("pass", "n/a") for row in rows)
    print("all paths pass" if ok else "FAILURES above", file=out)
    return ok
