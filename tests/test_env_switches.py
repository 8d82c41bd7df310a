"""lorakern._env.get reads the environment as os.environ.get does, and a switch set between two calls of the
same layer decides the second (the fast read must not keep a stale value)."""
import os

import pytest
import torch

from lorakern import _env, dispatch
from lorakern.layer import LoraLinear

NAME = "LORAKERN_TEST_SWITCH"


def test_get_follows_every_way_of_changing_the_environment(monkeypatch):
    monkeypatch.delenv(NAME, raising=False)
    assert _env.get(NAME) is None and _env.get(NAME, "d") == "d"
    monkeypatch.setenv(NAME, "torch")
    assert _env.get(NAME) == os.environ.get(NAME) == "torch"
    os.environ[NAME] = "ünïcode value"  # decoded as os.environ decodes it
    assert _env.get(NAME) == "ünïcode value"
    del os.environ[NAME]
    assert _env.get(NAME, "gone") == "gone"
    os.environ.update({NAME: "c"})
    assert _env.get(NAME) == "c"
    os.environ.pop(NAME)
    assert _env.get(NAME) is None


@pytest.mark.parametrize("first,second", [("torch", "c"), ("c", "torch")])
def test_a_backend_switch_between_calls_decides_the_next_call(monkeypatch, first, second):
    layer = LoraLinear(12, 10, r=2, alpha=4)
    x = torch.randn(3, 12)
    seen = []
    choose = dispatch.choose

    def spy(call, requested=None):
        implementation, declined = choose(call, requested)
        seen.append(implementation.name)
        return implementation, declined

    monkeypatch.setattr(dispatch, "choose", spy)
    for backend in (first, second):
        monkeypatch.setenv(dispatch.BACKEND_ENV, backend)
        with torch.no_grad():
            layer(x)
    if dispatch.verdict("c", dispatch.prepare(x, "dense", layer.weight, layer.bias, layer._active().lora_A,
                                              layer._active().lora_B, 1.0)) is not None:
        pytest.skip("the C kernels are not built here")
    assert seen == [first, second]


def test_ci_draws_take_no_constants_from_our_code():
    """Under the CI profile hypothesis draws no literal of lorakern's or the tests' source (tests/conftest.py), so
    the fixed examples depend on the strategies alone; the thorough profile keeps them."""
    import conftest

    if conftest.HYPOTHESIS_PROFILE != "ci":
        pytest.skip("the thorough profile draws hypothesis's local constants")
    from hypothesis.internal.conjecture import providers

    assert 131 not in providers._get_local_constants()  # a literal of tests/test_mixed_c.py's M classes
