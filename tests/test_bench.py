"""The benchmark's providers compute the same layer, and its quick mode runs end to end (no timing asserts)."""
import json

import numpy as np
import pytest
import torch

from lorakern import bench, core


@pytest.mark.parametrize("name", list(bench.providers("cpu")))
def test_every_provider_computes_the_reference(name):
    shape = bench.Shape("t", 7, 19, 11, 3)
    o = bench.make_operands(shape, torch.float64, "cpu")
    y = bench.providers("cpu")[name](o)
    f64 = lambda t: t.detach().numpy()
    if name == "frozen nn.Linear":
        expected = f64(o.x) @ f64(o.W).T + f64(o.b)
    else:
        expected = core.forward(f64(o.x), f64(o.W), f64(o.A), f64(o.B), f64(o.b), o.s)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-12, atol=1e-12)


def test_quick_run_writes_json_markdown_and_plot(tmp_path):
    rows = bench.run(bench.SHAPES_QUICK, torch.float32, "cpu", str(tmp_path), rounds=2, draw=True)
    providers = {r.provider for r in rows}
    assert {"frozen nn.Linear", "lorakern torch"} <= providers
    assert {r.mode for r in rows} == {"fwd", "fwd+bwd"}
    assert all(r.ratio_median > 0 and len(r.samples) == 2 for r in rows)
    assert all(r.ratio_min == 1.0 for r in rows if r.provider == "frozen nn.Linear")
    data = json.loads((tmp_path / "lora_linear.json").read_text())
    assert data["machine"]["torch"] == torch.__version__ and len(data["rows"]) == len(rows)
    assert "| frozen nn.Linear |" in (tmp_path / "lora_linear.md").read_text()
    assert (tmp_path / "lora_linear.png").read_bytes()[:4] == b"\x89PNG"


def test_flop_and_byte_counts():
    shape = bench.Shape("t", 8, 4, 2, 1)
    assert bench.flops(shape, "fwd", lora=False) == 2 * 8 * 2 * 4
    assert bench.flops(shape, "fwd", lora=True) == 2 * 8 * 2 * 4 + 2 * 8 * 4 + 2 * 8 * 2
    assert bench.flops(shape, "fwd+bwd", lora=False) == 2 * bench.flops(shape, "fwd", lora=False)
    assert bench.min_bytes(shape, "fwd", 2) == (8 * 4 + 2 * 4 + 8 * 2 + 1 * (4 + 2) + 8) * 2
