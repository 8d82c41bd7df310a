"""What only a CUDA run would otherwise show, checked on the CPU: the comparisons' grad_y drawn on the device
of the result it backpropagates through (autograd refuses a grad_output on another device).
"""
from __future__ import annotations

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
