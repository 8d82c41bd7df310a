"""What only a CUDA run would otherwise show, checked on the CPU: the comparisons' grad_y drawn on the device
of the result it backpropagates through (autograd refuses a grad_output on another device), and the autotuners
of the compiled kernels zeroing between trials every buffer their kernel adds into atomically (a name that is no
argument of the kernel raises on the first compiled launch; an accumulator left out sums every trial's run).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lorakern.layer import LoraLinear


class _Stop(Exception):
    pass


@pytest.fixture
def grad_devices(monkeypatch):
    """Each autograd.grad call's (output device, grad_output device), the layer's results moved to the meta
    device (a stand-in for CUDA: the CPU default generator draws there); the comparison stops at that call."""
    seen = []

    def grad(outputs, inputs, grad_outputs=None, **kwargs):
        seen.append((outputs.device, grad_outputs.device))
        raise _Stop

    monkeypatch.setattr(torch.autograd, "grad", grad)
    for name in ("forward", "forward_rows"):
        real = getattr(LoraLinear, name)
        monkeypatch.setattr(LoraLinear, name, lambda self, *args, real=real: real(self, *args).to("meta"))
    return seen


def test_layer_comparison_draws_grad_y_on_the_results_device(grad_devices):
    from lorakern.testing import compare_layer, random_layer

    with pytest.raises(_Stop):
        compare_layer(random_layer(8, 4, 2, torch.float32).train(), torch.randn(3, 8))
    assert grad_devices == [(torch.device("meta"), torch.device("meta"))]


def test_dora_comparisons_draw_grad_y_on_the_results_device(grad_devices):
    from lorakern.testing_dora import compare_dora, compare_mixed_dora, dora_layer

    with pytest.raises(_Stop):
        compare_dora(dora_layer(8, 4, 2, torch.float32).train(), torch.randn(3, 8))
    layer = dora_layer(8, 4, 2, torch.float32)
    layer.add_adapter("other", r=2, use_dora=True)
    with pytest.raises(_Stop):
        compare_mixed_dora(layer, torch.randn(3, 8), [0, 1, -1], ["default", "other"])
    assert grad_devices == [(torch.device("meta"), torch.device("meta"))] * 2


def test_a_spoiled_dora_result_stays_on_its_device(monkeypatch):
    """compare_dora's mutation check adds its shift on the result's device (a CUDA result with a CPU shift
    raises); shown with a result on the meta device against a stand-in rel_error."""
    from lorakern import testing_dora

    seen = []
    monkeypatch.setattr(testing_dora, "rel_error", lambda actual, *args: seen.append(actual.device) or (0.0, ""))
    testing_dora._judged({"y": torch.zeros(2, 3, device="meta")}, {"y": None}, {"y": torch.ones(2, 3).numpy()},
                         1e-3, torch.float32, (2, 3), {"y": 4.0})
    assert seen == [torch.device("meta")]


# Runs compiled-mode Python (TRITON_INTERPRET=0) without a GPU: every autotuner is built, none launched (the
# split-K kernel's are built inside its launcher, whose launch then fails for want of a driver).
AUTOTUNERS = r"""
import inspect, re, sys
import torch
import triton
from lorakern.kernels import configs, launchers
from lorakern.kernels.backward import _lora_bwd_kernel
from lorakern.kernels.forward import _lora_fwd_kernel
from lorakern.kernels.mixed_backward import _mixed_bwd_kernel
from lorakern.kernels.mixed_forward import _mixed_fwd_kernel
assert not configs.INTERPRETED

def reachable(fn, seen=None):
    # the source of a jit function and of every jit function it calls, by name through its module's globals
    seen = {} if seen is None else seen
    if fn.__name__ in seen:
        return seen
    seen[fn.__name__] = fn.src
    for name in set(re.findall(r"\b(\w+)\(", fn.src)):
        callee = fn.fn.__globals__.get(name)
        if isinstance(callee, triton.runtime.JITFunction):
            reachable(callee, seen)
    return seen

def accumulated(kernel):
    # the kernel's arguments some reachable source adds into atomically (slot tiles x_tile_ptr of x_ptr)
    names = set()
    for src in reachable(kernel).values():
        names |= {re.sub(r"_tile_ptr$", "_ptr", n) for n in re.findall(r"\w*atomic_add\w*\(\s*(\w+)", src)}
    return names & set(kernel.arg_names)

def problems(tuner):
    kernel = tuner.fn
    reset = set(tuner.reset_to_zero)
    out = [f"{n} is no argument of {kernel.__name__}" for n in sorted(reset - set(kernel.arg_names))]
    return out + [f"{n} of {kernel.__name__} is accumulated but not reset" for n in sorted(accumulated(kernel) - reset)]

tuners = {}
for kernel, kinds in ((_lora_fwd_kernel, ("fwd", "dora_fwd", "dora_drop_fwd")),
                      (_lora_bwd_kernel, ("bwd", "dora_bwd", "dora_drop_bwd")),
                      (_mixed_fwd_kernel, ("mixed_fwd", "mixed_dora_fwd", "mixed_dora_drop_fwd")),
                      (_mixed_bwd_kernel, ("mixed_bwd", "mixed_dora_bwd", "mixed_dora_drop_bwd"))):
    for kind in kinds:
        for weight in ("dense", "nf4"):
            tuners[(kind, weight)] = configs._autotuned(kernel, kind, torch.bfloat16, 16, weight)[0]
x, W = torch.randn(3, 32, dtype=torch.bfloat16), torch.randn(8, 32, dtype=torch.bfloat16)
A, B = torch.randn(4, 32, dtype=torch.bfloat16), torch.randn(8, 4, dtype=torch.bfloat16)
for scale, p in ((None, 0.0), (torch.ones(8), 0.0), (torch.ones(8), 0.1)):
    try:
        launchers._forward_small_m(x, W, None, A, B, 1.0, p, 0, scale, scale is not None)
    except RuntimeError:  # no GPU driver: the autotuner exists, its launch cannot run
        pass
small = {k: v for k, v in configs._AUTOTUNED.items() if k[0].endswith("small")}
assert len(small) == 3, small
tuners.update({(key[0], key[3]): tuner for key, tuner in small.items()})
bad = {key: problems(tuner) for key, tuner in tuners.items() if problems(tuner)}
# the check can fail: a misspelt name, and a dropped accumulator
spoiled = triton.autotune(configs.compiled_configs("bwd", torch.bfloat16, 16), key=["M"],
                          reset_to_zero=["da_ptr", "db_ptr", "dbias", "dc_ptr"])(_lora_bwd_kernel)
assert problems(spoiled) == ["dbias is no argument of _lora_bwd_kernel",
                             "dbias_ptr of _lora_bwd_kernel is accumulated but not reset"], problems(spoiled)
assert accumulated(_mixed_bwd_kernel) == {"da_ptr", "db_ptr", "dbias_ptr", "dc_ptr"}, accumulated(_mixed_bwd_kernel)
assert accumulated(launchers._lora_small_m_kernel) == {"y_ptr", "u_ptr", "z_ptr"}
print("checked", len(tuners), "autotuners", bad)
sys.exit(1 if bad else 0)
"""


def test_autotuners_reset_exactly_their_kernels_accumulators():
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-c", AUTOTUNERS], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "checked 27 autotuners {}" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
