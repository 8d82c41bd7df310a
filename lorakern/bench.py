"""Side-by-side timing of a LoRA linear layer against its frozen base layer and other formulations.

Providers run interleaved, round by round, on the same tensors; each round times every provider once
(a batch of calls), so a noisy machine slows all of them alike. Reported: min and median per call, and
each provider's ratio to the frozen nn.Linear of the same mode (fwd: forward; fwd+bwd: forward and
backward, the frozen layer computing dx only). On CUDA also achieved TFLOP/s and the roofline bound.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from lorakern._io import atomic_write_bytes
from lorakern.functional import lora_linear


@dataclass(frozen=True)
class Shape:
    name: str
    M: int
    K: int
    N: int
    r: int


SHAPES_CPU = [Shape("roberta-base 768x768", 4096, 768, 768, 8), Shape("llama 4096x4096", 1024, 4096, 4096, 16)]
SHAPES_GPU = [Shape("llama 4096x4096", 8192, 4096, 4096, 16), Shape("roberta-base 768x768", 8192, 768, 768, 8)]
SHAPES_QUICK = [Shape("quick 96x80", 64, 96, 80, 4)]

# Dense peak (FLOP/s) for 16-bit tensor-core math and HBM bandwidth (B/s), by card name.
PEAKS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12)}


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


# A provider computes y from the operands, with autograd; its backward is whatever autograd runs.
def _frozen(o: Operands) -> torch.Tensor:
    return F.linear(o.x, o.W, o.b)


def _naive(o: Operands) -> torch.Tensor:
    # The seed's formulation: forms B @ A on every call.
    return F.linear(o.x, o.W + o.s * (o.B @ o.A), o.b)


def _peft_ops(o: Operands) -> torch.Tensor:
    # PEFT's Linear.forward: base(x) + lora_B(lora_A(dropout(x))) * scaling.
    return F.linear(o.x, o.W, o.b) + F.linear(F.linear(o.x, o.A), o.B) * o.s


def _addmm_form(o: Operands) -> torch.Tensor:
    # Unsloth's form: the base GEMM, then the low-rank product added through addmm's alpha.
    return torch.addmm(torch.addmm(o.b, o.x, o.W.t()), o.x @ o.A.t(), o.B.t(), alpha=o.s)


def _lorakern(backend: str) -> Callable[[Operands], torch.Tensor]:
    def run(o: Operands) -> torch.Tensor:
        return lora_linear(o.x, o.W, o.b, o.A, o.B, o.s, backend=backend)

    return run


def providers(device: str) -> dict[str, Callable[[Operands], torch.Tensor]]:
    out = {
        "frozen nn.Linear": _frozen,
        "naive (forms B@A)": _naive,
        "PEFT ops (unfused)": _peft_ops,
        "addmm form (Unsloth)": _addmm_form,
        "lorakern torch": _lorakern("torch"),
    }
    if device == "cuda":
        out["lorakern triton"] = _lorakern("triton")
    return out


def flops(shape: Shape, mode: str, lora: bool) -> float:
    M, K, N, r = shape.M, shape.K, shape.N, shape.r
    forward = 2 * M * N * K + (2 * M * K * r + 2 * M * N * r if lora else 0)
    if mode == "fwd":
        return forward
    backward = 2 * M * N * K + (2 * M * N * r + 2 * M * r * K + 2 * M * r * K + 2 * M * N * r if lora else 0)
    return forward + backward


def min_bytes(shape: Shape, mode: str, itemsize: int) -> float:
    """Compulsory traffic: each operand read once, each result written once."""
    M, K, N, r = shape.M, shape.K, shape.N, shape.r
    forward = (M * K + N * K + M * N + r * (K + N) + M * r) * itemsize
    if mode == "fwd":
        return forward
    return forward + (M * N + N * K + M * K + M * K + M * r + r * (K + N) * 2) * itemsize


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
    tflops: Optional[float] = None
    roofline_ms: Optional[float] = None
    samples: list = field(default_factory=list)


def _timer(device: str):
    if device == "cuda":
        def timed(fn, calls):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / calls
    else:
        def timed(fn, calls):
            begin = time.perf_counter()
            for _ in range(calls):
                fn()
            return (time.perf_counter() - begin) * 1e3 / calls
    return timed


def _step(provider, o: Operands, mode: str) -> Callable[[], None]:
    if mode == "fwd":
        def run():
            provider(o)
    else:
        params = [o.x] if provider is _frozen else [o.x, o.A, o.B]

        def run():
            torch.autograd.grad(provider(o), params, o.grad)
    return run


def measure(shape: Shape, dtype: torch.dtype, device: str, rounds: int = 7, calls: int = 0,
            modes=("fwd", "fwd+bwd"), only: Optional[list[str]] = None) -> list[Row]:
    """Time every provider on ``shape``, interleaved round by round."""
    o = make_operands(shape, dtype, device)
    chosen = {k: v for k, v in providers(device).items() if only is None or k in only or k == "frozen nn.Linear"}
    timed = _timer(device)
    rows = []
    for mode in modes:
        steps = {name: _step(fn, o, mode) for name, fn in chosen.items()}
        for step in steps.values():  # warm-up: compile, autotune, allocate
            step()
            step()
        # Enough calls per sample that one sample lasts ~20 ms (timer resolution and launch jitter).
        if calls <= 0:
            probe = timed(steps["frozen nn.Linear"], 3)
            n_calls = max(1, min(200, int(20.0 / max(probe, 1e-3))))
        else:
            n_calls = calls
        samples = {name: [] for name in steps}
        for _ in range(rounds):
            for name, step in steps.items():
                samples[name].append(timed(step, n_calls))
        base = samples["frozen nn.Linear"]
        for name, values in samples.items():
            row = Row(shape.name, shape.M, shape.K, shape.N, shape.r, str(dtype).replace("torch.", ""), mode, name,
                      min(values), statistics.median(values), samples=values)
            row.ratio_min = row.min_ms / min(base)
            row.ratio_median = row.median_ms / statistics.median(base)
            if device == "cuda":
                row.tflops = flops(shape, mode, name != "frozen nn.Linear") / (row.min_ms * 1e-3) / 1e12
                peak = PEAKS.get(_card_family())
                if peak is not None and dtype in (torch.float16, torch.bfloat16):
                    row.roofline_ms = 1e3 * max(flops(shape, mode, name != "frozen nn.Linear") / peak[0],
                                                min_bytes(shape, mode, o.x.element_size()) / peak[1])
            rows.append(row)
    return rows


def _card_family() -> Optional[str]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((family for family in PEAKS if family in name), None)


def machine() -> dict:
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def markdown(rows: list[Row]) -> str:
    cuda = any(r.tflops is not None for r in rows)
    head = "| shape (M, K, N, r) | dtype | mode | provider | min ms | median ms | × frozen (min) | × frozen (median) |"
    rule = "|---|---|---|---|---:|---:|---:|---:|"
    if cuda:
        head += " TFLOP/s | roofline ms |"
        rule += "---:|---:|"
    lines = [head, rule]
    for r in rows:
        line = (f"| {r.shape} ({r.M}, {r.K}, {r.N}, {r.r}) | {r.dtype} | {r.mode} | {r.provider} | {r.min_ms:.3f} | "
                f"{r.median_ms:.3f} | {r.ratio_min:.3f} | {r.ratio_median:.3f} |")
        if cuda:
            line += f" {r.tflops:.1f} | " + (f"{r.roofline_ms:.3f} |" if r.roofline_ms else "n/a |")
        lines.append(line)
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r.shape, r.mode) for r in rows})
    names = list(dict.fromkeys(r.provider for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [next((r.ratio_median for r in rows if (r.shape, r.mode) == g and r.provider == name), math.nan)
                  for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{s}\n{m}" for s, m in groups], fontsize=8)
    ax.set_ylabel("time / frozen nn.Linear (median)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def run(shapes: list[Shape], dtype: torch.dtype, device: str, out_dir: Optional[str], rounds: int = 7,
        draw: bool = False, only: Optional[list[str]] = None) -> list[Row]:
    rows = []
    for shape in shapes:
        rows.extend(measure(shape, dtype, device, rounds=rounds, only=only))
    table = markdown(rows)
    print(table)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        payload = {"machine": machine(), "dtype": str(dtype), "device": device, "rounds": rounds,
                   "rows": [asdict(r) for r in rows]}
        atomic_write_bytes(os.path.join(out_dir, "lora_linear.json"), json.dumps(payload, indent=2).encode())
        atomic_write_bytes(os.path.join(out_dir, "lora_linear.md"),
                           (f"{payload['machine']['date']} on {payload['machine'].get('gpu') or payload['machine']['processor']}"
                            f" ({device}, {dtype})\n\n{table}\n").encode())
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
    timed = _timer(device)
    out = []
    with torch.no_grad():
        for name, (mine, theirs) in pairs.items():
            mine(), theirs()
            samples = {"lorakern": [], "bitsandbytes": []}
            for _ in range(rounds):
                samples["lorakern"].append(timed(mine, 1))
                samples["bitsandbytes"].append(timed(theirs, 1))
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
