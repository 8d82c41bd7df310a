"""lorakern.core: the float64 oracle, checked against finite differences and the textbook formulas."""
import math
import subprocess
import sys

import numpy as np
import pytest

from lorakern import core


def _operands(rng, lead=(5,), K=7, N=4, r=3):
    x = rng.normal(size=lead + (K,))
    W = rng.normal(size=(N, K))
    A = rng.normal(size=(r, K))
    B = rng.normal(size=(N, r))
    b = rng.normal(size=N)
    return x, W, A, B, b


def test_import_does_not_import_torch():
    code = "import sys, lorakern.core, lorakern; assert 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("lead", [(), (1,), (5,), (2, 3)], ids=["1-D", "M=1", "2-D", "3-D"])
def test_forward_matches_the_merged_weight_formula(lead):
    x, W, A, B, b = _operands(np.random.default_rng(0), lead=lead)
    y = core.forward(x, W, A, B, b, s=0.5)
    assert y.shape == lead + (4,)
    np.testing.assert_allclose(y, x @ (W + 0.5 * B @ A).T + b, rtol=1e-12, atol=1e-12)


def test_dropout_mask_applies_to_the_lora_branch_only():
    x, W, A, B, b = _operands(np.random.default_rng(1))
    mask = (np.random.default_rng(2).random(x.shape) > 0.5) / 0.5
    y = core.forward(x, W, A, B, b, s=2.0, dropout_mask=mask)
    np.testing.assert_allclose(y, x @ W.T + b + 2.0 * (x * mask) @ A.T @ B.T, rtol=1e-12)


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-dropout", "dropout"])
def test_backward_matches_finite_differences(with_mask):
    rng = np.random.default_rng(3)
    x, W, A, B, b = _operands(rng, lead=(2, 3))
    mask = (rng.random(x.shape) > 0.3) / 0.7 if with_mask else None
    dy = rng.normal(size=(2, 3, 4))
    s = 1.7
    grads = core.backward(x, W, A, B, dy, s, dropout_mask=mask)

    operands = {"x": x, "A": A, "B": B, "b": b}

    def loss(**changed):
        o = {**operands, **changed}
        return float(np.sum(dy * core.forward(o["x"], W, o["A"], o["B"], o["b"], s, dropout_mask=mask)))

    def numeric(which):
        array = operands[which]
        out = np.zeros_like(array)
        eps = 1e-6
        for idx in np.ndindex(array.shape):
            plus, minus = array.copy(), array.copy()
            plus[idx] += eps
            minus[idx] -= eps
            out[idx] = (loss(**{which: plus}) - loss(**{which: minus})) / (2 * eps)
        return out

    for name in ("x", "A", "B", "b"):
        np.testing.assert_allclose(grads["d" + name], numeric(name), rtol=1e-6, atol=1e-7, err_msg=name)


def test_merge_and_unmerge_are_inverse():
    x, W, A, B, b = _operands(np.random.default_rng(4))
    merged = core.merge(W, A, B, s=0.25)
    np.testing.assert_allclose(core.forward(x, merged, A, 0 * B, b), core.forward(x, W, A, B, b, s=0.25), rtol=1e-12)
    np.testing.assert_allclose(core.unmerge(merged, A, B, s=0.25), W, rtol=0, atol=1e-14)


def test_scaling_rules():
    assert core.scaling(8, 16) == 2.0
    assert core.scaling(16, 16, use_rslora=True) == 4.0
    with pytest.raises(ValueError, match="r must be a positive integer, got 0"):
        core.scaling(0, 8)


@pytest.mark.parametrize("init,std", [("kaiming", 1 / math.sqrt(3 * 256)), ("gaussian", 1 / 4), ("normal", 1.0)])
def test_init_rules(init, std):
    A, B = core.init_lora(4, 256, 10, init, np.random.default_rng(5))
    assert A.shape == (4, 256) and B.shape == (10, 4) and not B.any()
    assert core.init_std(init, 4, 256) == pytest.approx(std)
    assert A.std() == pytest.approx(std, rel=0.1)
    if init == "kaiming":
        assert np.abs(A).max() <= 1 / math.sqrt(256)


def test_bad_shapes_and_values_are_named():
    x, W, A, B, b = _operands(np.random.default_rng(6))
    with pytest.raises(ValueError, match=r"x must end in in_features=7, got shape \(5, 6\)"):
        core.forward(x[:, :6], W, A, B)
    with pytest.raises(ValueError, match=r"B must have shape \(4, 3\)"):
        core.forward(x, W, A, B[:, :2])
    with pytest.raises(ValueError, match="non-finite"):
        core.forward(x, W * np.nan, A, B)
    with pytest.raises(ValueError, match="init must be one of"):
        core.init_lora(2, 3, 4, "xavier")
