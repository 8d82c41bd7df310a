"""How a LoRA call computes its rank-r term: factored (through u = x~ A^T, never forming B A) or merged (through
W + s B A formed for the call), chosen per call by a stated cost model (``choose_formulation``), and the per-thread
workspace the merged form's weight lives in (``merged_weight``). lorakern.functional's forward and backward
(and DoRA's folded forms, lorakern.dora) use them; docs/kernels.md has the measurements behind the constants.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Optional

import torch

from lorakern import _env
from lorakern.errors import LorakernError
from lorakern.native import LORA_MAX_RANK
from lorakern.native import pointer as _ptr


@dataclass(frozen=True)
class Formulation:
    """How one call computes the low-rank term: "factored" (through u = x~ A^T, never forming B A) or
    "merged" (through W + s B A, an N x K weight formed for the call), for the forward and for dx."""

    forward: str
    backward: str
    reason: str


FORMULATION_ENV = "LORAKERN_FORMULATION"
FORMULATION_CHOICES = ("auto", "factored", "merged")
# Forming W' = W + s B A (an addmm over r into this thread's N x K workspace that the GEMM then reads instead
# of W) costs about N K (r + c) multiply-adds of the thin kernels' time (~0.024 ns each on 2 cores, fp32,
# lorakern/native/lora_cpu.c), c for writing and reading W'. The two sides differ in what merging saves:
# - forward: the factored form's C pass over x and y (reads x for u, writes b + s u B^T) goes entirely, since
#   the merged forward leaves u to the backward's pass over x; W' at 768 x 768 r=8 takes ~0.14 ms from the
#   workspace. Measured side by side (2026-11-30, 768 x 768 r=8, glibc keeping freed memory so that page
#   faults do not decide): merged 1.02-1.04x the frozen layer vs factored 1.04-1.09x at 1024 and 4096 tokens,
#   a tie at 512. c = 4: merged from M > 1.5 K at r=8.
# - backward: merged saves only the write of dx's rank-r term (g B is still needed for dA): a tie at 4096
#   tokens, merged behind at 1024. c = 64: merged only where the term's M K r clearly dominates (M > 9 N).
FORWARD_MERGE_OVERHEAD = 4
BACKWARD_MERGE_OVERHEAD = 64
_PINNED: list[str] = []


@contextlib.contextmanager
def pinned_formulation(name: str):
    """Within the block every call takes ``name`` ("factored" or "merged") where merged is allowed, as with
    $LORAKERN_FORMULATION (benchmarks time both side by side). The backward follows its forward's choice."""
    if name not in FORMULATION_CHOICES:
        raise LorakernError(f"formulation must be one of {FORMULATION_CHOICES}, got {name!r}")
    _PINNED.append(name)
    try:
        yield
    finally:
        _PINNED.pop()


def choose_formulation(rows: int, in_features: int, out_features: int, r: int, lora_separate: bool,
                       dtype: torch.dtype) -> Formulation:
    """The cheaper formulation for one call, by the cost of the work the two forms do not share.

    Counted in multiply-adds (M rows, K in, N out; u = x~ A^T, the M K r both forms compute for dB (the
    factored forward, or the backward's pass over x~ after a merged forward), and g B, dA and dB, which both
    backward forms compute, are left out):
        forward   factored: the rank-r term of y, s u B^T            M N r
                  merged:   W' = W + s B A, then x W'^T              N K (r + c_f)
                  -> merged when M N r > N K (r + c_f), i.e. M > K (1 + c_f / r)
        backward  factored: the rank-r term of dx, s (g B) A         M K r
                  merged:   W' formed again, then g W'               N K (r + c_b)
                  -> merged when M K r > N K (r + c_b), i.e. M > N (1 + c_b / r)
    with c_f = FORWARD_MERGE_OVERHEAD and c_b = BACKWARD_MERGE_OVERHEAD for writing and reading W' and for
    what each side's merge does not save (measured; see above). W' is formed again in the backward rather than
    kept, so the merged form holds no N x K tensor between the passes.

    Merged is declined, whatever the cost, when dropout is on (the LoRA branch sees dropout(x), not x,
    so no single weight serves both) and for half dtypes (W' rounded to fp16/bf16 would round away most
    of s B A, which is small beside W). $LORAKERN_FORMULATION=factored|merged pins the choice where
    merged is allowed (``pinned_formulation`` does the same within a block).
    """
    pinned = _PINNED[-1] if _PINNED else (_env.get(FORMULATION_ENV) or "auto").strip().lower()
    if pinned not in FORMULATION_CHOICES:
        raise LorakernError(f"{FORMULATION_ENV}={pinned!r} is not a formulation; set it to one of "
                         f"{', '.join(FORMULATION_CHOICES)} (or unset it for auto)")
    if lora_separate:
        return Formulation("factored", "factored", "dropout on: the LoRA branch sees dropout(x), not x")
    if dtype not in (torch.float32, torch.float64):
        return Formulation("factored", "factored", f"{dtype}: W + s B A would round away s B A")
    if pinned != "auto":
        return Formulation(pinned, pinned, f"pinned by {FORMULATION_ENV}={pinned}")
    weight_size = in_features * out_features
    forward = "merged" if rows * out_features * r > weight_size * (r + FORWARD_MERGE_OVERHEAD) else "factored"
    backward = "merged" if rows * in_features * r > weight_size * (r + BACKWARD_MERGE_OVERHEAD) else "factored"
    return Formulation(forward, backward, f"cost model: M={rows}, K={in_features}, N={out_features}, r={r}")


class _Workspaces(threading.local):
    """Per thread: one buffer per (shape, dtype) for W' = W + s B A, reused by every merged call."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}


_WORKSPACES = _Workspaces()


def workspace_like(weight: torch.Tensor) -> torch.Tensor:
    """This thread's workspace for an N x K weight of ``weight``'s shape and dtype on the CPU (merged_weight):
    the next call for that shape overwrites it."""
    key = (tuple(weight.shape), weight.dtype)
    buffer = _WORKSPACES.buffers.get(key)
    if buffer is None:
        buffer = _WORKSPACES.buffers[key] = torch.empty(weight.shape, dtype=weight.dtype)
    return buffer


def merged_weight(weight: torch.Tensor, lora_B: torch.Tensor, lora_A: torch.Tensor, scaling: float,
                  library=None, row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W' = W + s B A (diag(row_scale) (W + s B A) when given: DoRA's folded weight) for one merged call, in a
    workspace kept per thread and (shape, dtype) on the CPU. ``library`` (lorakern.native, the caller's C
    path): fp32 operands are merged and scaled in one pass over W (lora_cpu.c, lora_merge_f32) instead of
    torch's addmm and mul_ (768 x 768, r=8, caches cold: ~0.32 ms with the scale, two reads and writes of W').

    Why: a fresh N x K tensor per call came from fresh pages in a default process (glibc returns large
    blocks to the OS), and faulting them in cost more than forming W' (768 x 768: ~580 faults per call;
    4096 x 4096: a 64 MB W' took 24-27 ms fresh). The caller must not keep the result past its call: the
    next merged call of that shape overwrites it (forward and backward use it within the call; activation
    checkpointing recomputes a forward inside the backward, never while another call holds the buffer).
    One buffer per distinct layer shape and thread stays allocated; ``release_workspaces`` frees them. Under
    torch.compile's tracing, and off the CPU, W' is a fresh tensor."""
    if torch.compiler.is_compiling() or weight.device.type != "cpu":
        merged = torch.addmm(weight, lora_B, lora_A, alpha=scaling)
    else:
        buffer = workspace_like(weight)
        (out_features, in_features), r = weight.shape, lora_A.shape[0]
        if library is not None and r <= LORA_MAX_RANK and \
                all(t.dtype == torch.float32 for t in (weight, lora_A, lora_B, buffer)) and \
                (row_scale is None or row_scale.dtype == torch.float32):
            # named: the contiguous copies outlive the call
            W, A, B = weight.detach().contiguous(), lora_A.detach().contiguous(), lora_B.detach().contiguous()
            c = None if row_scale is None else row_scale.detach().contiguous()
            library.lora_merge_f32(_ptr(W), _ptr(A), _ptr(B), scaling, _ptr(c), out_features, in_features, r,
                                   _ptr(buffer), torch.get_num_threads())
            return buffer
        merged = torch.addmm(weight, lora_B, lora_A, alpha=scaling, out=buffer)
    return merged if row_scale is None else merged.mul_(row_scale[:, None])


def release_workspaces() -> None:
    """Free this thread's W' workspaces (the next merged call allocates again)."""
    _WORKSPACES.buffers.clear()
