"""``lorakern check``: every available path against lorakern.core, as a table."""
from __future__ import annotations

import sys
from typing import Optional

import torch

from lorakern.functional import resolve_backend
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
    return ["torch"] + (["triton"] if _unsupported("triton", device, torch.float32) is None else [])


def _path_label(path: str) -> str:
    if path != "triton":
        return path
    from lorakern.kernels import lora_linear

    return "triton (interpreted)" if lora_linear.INTERPRETED else "triton (compiled)"


def _unsupported(path: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    probe = torch.zeros(1, 1, device=device, dtype=dtype)
    try:
        resolve_backend(probe, probe, probe, path)
    except ValueError as exc:
        return str(exc)
    return None


def run_check(device: Optional[str] = None, out=sys.stdout) -> bool:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for path in available_paths(device):
        for dtype in DTYPES:
            if _unsupported(path, device, dtype):
                rows.append((_path_label(path), str(dtype).replace("torch.", ""), "-", "-", "not run by this path", "n/a"))
                continue
            worst_ratio, worst = -1.0, None
            for case, (shape, out_features, r, dropout) in enumerate(GRID):
                layer = random_layer(shape[-1], out_features, r, dtype, dropout=dropout, seed=case, device=str(device))
                layer.train()
                x = torch.randn(shape, generator=torch.Generator().manual_seed(100 + case), dtype=torch.float64)
                layer.backend = path
                comparison = compare_layer(layer, x.to(device=device, dtype=dtype), seed=case)
                name, error = comparison.worst
                if error / comparison.bound > worst_ratio:
                    worst_ratio, worst = error / comparison.bound, (comparison, name, error)
            comparison, name, error = worst
            rows.append((_path_label(path), str(dtype).replace("torch.", ""), f"{error:.2e}", f"{comparison.bound:.2e}",
                         f"{name} @ x{comparison.shape}", "pass" if comparison.passed else "FAIL"))
    header = ("path", "dtype", "worst rel. error", "bound", "where", "result")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    print(f"lorakern check on {device}: output and gradients (x, A, B, bias) against lorakern.core (float64)", file=out)
    print(f"{len(GRID)} shapes per row; error = max |got - ref| / magnitude of the summed terms", file=out)
    print(line(header), file=out)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    for row in rows:
        print(line(row), file=out)
    ok = all(row[-1] in ("pass", "n/a") for row in rows)
    print("all paths pass" if ok else "FAILURES above", file=out)
    return ok
