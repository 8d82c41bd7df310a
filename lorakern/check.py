"""``lorakern check``: every available path against lorakern.core, as a table."""
from __future__ import annotations

import sys
from typing import Optional

import torch

from lorakern import dispatch, native
from lorakern.formulation import pinned_formulation
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


# A mixed-adapter batch (rows' adapter slots; -1 base only): an adapter with no rows (slot 2), one the layer
# lacks (slot 3), base rows, ranks 1 / 8 / 16 over 37 rows of 3 tokens, 33 -> 42 features.
MIXED_SLOTS = [0, 1, -1, 1, 0, 3, 1, 0, -1, 1, 0, 0, 3]
MIXED_RANKS = (1, 8, 16, 4)


def _mixed_case(dtype: torch.dtype, device: torch.device):
    gen = torch.Generator().manual_seed(5)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    tokens, K, N = 3, 33, 42
    x64, W64, b64, dy64 = rand(len(MIXED_SLOTS) * tokens, K), rand(N, K) / K ** 0.5, rand(N), rand(len(MIXED_SLOTS) * tokens, N)
    factors64 = [(rand(r, K) / K ** 0.5, rand(N, r) / r ** 0.5, 16.0 / r) for r in MIXED_RANKS]
    factors64[3] = None  # the layer lacks that adapter: its rows get the base output
    rows = [slot for slot in MIXED_SLOTS for _ in range(tokens)]
    return x64, W64, b64, dy64, factors64, rows


def mixed_rows(device: torch.device) -> list[tuple]:
    """One row per implementation with a mixed-adapter path and dtype: output and every gradient against
    lorakern.core.mixed_forward / mixed_backward (row by row, float64)."""
    import numpy as np

    from lorakern import core
    from lorakern.rows import group_rows
    from lorakern.testing import bound, rel_error

    out = []
    x64, W64, b64, dy64, factors64, rows = _mixed_case(torch.float64, device)
    npf = lambda t: t.numpy()
    ref_adapters = [None if f is None else (npf(f[0]), npf(f[1]), f[2]) for f in factors64]
    abs_adapters = [None if f is None else (np.abs(npf(f[0])), np.abs(npf(f[1])), f[2]) for f in factors64]
    y_ref = core.mixed_forward(npf(x64), npf(W64), ref_adapters, rows, npf(b64))
    back = core.mixed_backward(npf(x64), npf(W64), ref_adapters, rows, npf(dy64))
    y_mag = core.mixed_forward(np.abs(npf(x64)), np.abs(npf(W64)), abs_adapters, rows, np.abs(npf(b64)))
    back_mag = core.mixed_backward(np.abs(npf(x64)), np.abs(npf(W64)), abs_adapters, rows, np.abs(npf(dy64)))
    for path in available_paths(device):
        for dtype in DTYPES:
            cast = lambda t: t.detach().to(device=device, dtype=dtype).clone()  # a fresh leaf per dtype
            x = cast(x64).requires_grad_()
            adapters = [None if f is None else (cast(f[0]).requires_grad_(), cast(f[1]).requires_grad_(), f[2], 0.0)
                        for f in factors64]
            groups = group_rows(torch.tensor(rows, device=device), len(adapters))
            call = dispatch.prepare_mixed(x, "dense", cast(W64), cast(b64), adapters, groups)
            why = dispatch.verdict(path, call)
            if why is not None:
                out.append((f"mixed: {_path_label(path)}", _name(dtype), "-", f"not run: {why}", "n/a"))
                continue
            y = dispatch.lora_forward_mixed(x, "dense", cast(W64), cast(b64), adapters, groups, requested=path)
            y.backward(cast(dy64))
            got = {"y": (y, y_ref, y_mag), "dx": (x.grad, back["dx"], back_mag["dx"])}
            for slot, adapter in enumerate(adapters):
                if adapter is not None:
                    got[f"dA{slot}"] = (adapter[0].grad, back["dA"][slot], back_mag["dA"][slot])
                    got[f"dB{slot}"] = (adapter[1].grad, back["dB"][slot], back_mag["dB"][slot])
            limit = bound(dtype, max(x64.shape[1], W64.shape[0], len(rows)))
            worst = max(((rel_error(t, ref, mag, dtype), name) for name, (t, ref, mag) in got.items()),
                        key=lambda item: item[0][0])
            (error, where), name = worst
            out.append((f"mixed: {_path_label(path)}", _name(dtype), f"{error / limit:.2e}",
                        f"{name} ({len(MIXED_RANKS)} adapters, {len(rows)} rows)", "pass" if error <= limit else "FAIL"))
    return out


# DoRA layers ((x shape), out_features, r): fewer rows than inputs (the scaled epilogue), at least as many (the
# C path's merged fold), a 3-D input with r above min(in, out).
DORA_GRID = [((6, 42), 123, 5), ((70, 64), 37, 5), ((2, 7, 9), 6, 16)]


def dora_rows(device: torch.device) -> list[tuple]:
    """One row per implementation and dtype for a DoRA adapter: output, dx, dA, dB and the magnitude's
    gradient against lorakern.core.dora (float64), or why the implementation does not run DoRA."""
    from lorakern.testing_dora import compare_dora, dora_layer

    out = []
    for path in available_paths(device):
        for dtype in DTYPES:
            worst, why = None, None
            for case, (shape, out_features, r) in enumerate(DORA_GRID):
                layer = dora_layer(shape[-1], out_features, r, dtype, seed=case, backend=path, device=str(device))
                a = layer.adapters["default"]
                x = torch.randn(shape, generator=torch.Generator().manual_seed(200 + case), dtype=torch.float64)
                x = x.to(device=device, dtype=dtype)
                call = dispatch.prepare(x.reshape(-1, shape[-1]), "dense", layer.weight, layer.bias, a.lora_A, a.lora_B,
                                        1.0, magnitude=a.lora_magnitude_vector)
                why = dispatch.verdict(path, call)
                if why is not None:
                    break
                comparison = compare_dora(layer.train(), x, seed=case)
                name, error = comparison.worst
                if worst is None or error / comparison.bound > worst[2] or not comparison.passed:
                    worst = (comparison, name, error / comparison.bound)
            if why is not None:
                out.append((f"DoRA: {_path_label(path)}", _name(dtype), "-", f"not run: {why}", "n/a"))
                continue
            comparison, name, ratio = worst
            out.append((f"DoRA: {_path_label(path)}", _name(dtype), f"{ratio:.2e}", f"{name} @ x{comparison.shape}",
                        "pass" if comparison.passed else "FAIL"))
    return out


# A mixed batch with DoRA adapters: DoRA (r=5), plain (r=3), a DoRA adapter without rows (r=16), base rows.
MIXED_DORA_SLOTS = [0, 1, -1, 0, 1, 0, -1, 0, 1]
MIXED_DORA_ADAPTERS = (("dora", 5, True), ("plain", 3, False), ("idle", 16, True))


def mixed_dora_rows(device: torch.device) -> list[tuple]:
    """One row per implementation and dtype for a mixed batch with DoRA adapters: output and every gradient
    (x, each A, B and magnitude) against lorakern.core.dora / core LoRA row by row, or why the
    implementation does not run it (c: fp32 only; triton: where a segmented DoRA kernel config exists)."""
    from lorakern import mixed
    from lorakern.rows import group_rows
    from lorakern.testing_dora import compare_mixed_dora, dora_layer

    out = []
    names = [name for name, _, _ in MIXED_DORA_ADAPTERS]
    for path in available_paths(device):
        for dtype in DTYPES:
            layer = dora_layer(33, 42, 4, torch.float64, seed=7)  # "default" stays out of the batch
            for name, r, use_dora in MIXED_DORA_ADAPTERS:
                layer.add_adapter(name, r=r, alpha=2.0 * r, use_dora=use_dora)
            with torch.no_grad():  # random B and magnitudes: every gradient non-trivial
                for i, name in enumerate(names):
                    a = layer.adapters[name]
                    gen = torch.Generator().manual_seed(20 + i)
                    a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=gen, dtype=torch.float64) / a.r ** 0.5)
                    if a.use_dora:
                        a.lora_magnitude_vector.mul_(0.5 + torch.rand(42, generator=gen, dtype=torch.float64))
            layer = layer.to(device=device, dtype=dtype)
            layer.set_adapter(names)
            layer.bias.requires_grad_(True)
            layer.backend = path
            x = torch.randn(len(MIXED_DORA_SLOTS), 33, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
            x = x.to(device=device, dtype=dtype)
            call = dispatch.prepare_mixed(x, "dense", layer.weight, layer.bias, mixed._adapters_for(layer, names),
                                          group_rows(torch.tensor(MIXED_DORA_SLOTS, device=device), len(names)))
            why = dispatch.verdict(path, call)
            label = f"mixed DoRA: {_path_label(path)}"
            if why is not None:
                out.append((label, _name(dtype), "-", f"not run: {why}", "n/a"))
                continue
            comparison = compare_mixed_dora(layer, x, MIXED_DORA_SLOTS, names)
            name, error = comparison.worst
            out.append((label, _name(dtype), f"{error / comparison.bound:.2e}",
                        f"{name} ({len(names)} adapters, {len(MIXED_DORA_SLOTS)} rows)",
                        "pass" if comparison.passed else "FAIL"))
    return out


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
            # both formulations (formulation.choose_formulation): merged where allowed, factored everywhere
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
    rows += mixed_rows(device)
    rows += dora_rows(device)
    rows += mixed_dora_rows(device)
    header = ("path", "dtype", "worst error / bound", "where", "result")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    print(f"lorakern check on {device}: output and gradients (x, A, B, bias; DoRA rows also the magnitude's) "
          f"against lorakern.core (float64)", file=out)
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
