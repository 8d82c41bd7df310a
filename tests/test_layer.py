"""LoraLinear (torch path) against lorakern.core, plus its module behaviour and its errors."""
import math
import warnings

import pytest
import torch
from hypothesis import given
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lorakern import LoraLinear, LoraLinearFunction
from lorakern.testing import TOLERANCE, assert_matches_reference, compare_layer, random_layer

import strategies

DTYPES = list(TOLERANCE)
DTYPE_IDS = [str(d).replace("torch.", "") for d in DTYPES]


def torch_layer(case):
    layer = random_layer(case.K, case.N, case.r, case.dtype, bias=case.bias, alpha=case.alpha, dropout=case.dropout,
                         seed=case.seed, use_rslora=case.use_rslora).train()
    layer.backend = "torch"
    return layer


SEEN = []


@given(case=strategies.lora_cases(DTYPES, scaling=True))
def _torch_path_matches_reference(case):
    SEEN.append(case)
    assert_matches_reference(compare_layer(torch_layer(case), strategies.make_input(case), seed=case.seed))


def test_matches_reference():
    """The torch path, output and every gradient, on every tile class, layout, rank class and dtype (the
    stated shares asserted on the examples that ran)."""
    SEEN.clear()
    _torch_path_matches_reference()
    strategies.assert_shares(SEEN, strategies.axes_for(DTYPES))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("index", range(len(strategies.EXPLICIT)), ids=strategies.explicit_id)
def test_explicit_tile_classes(index, dtype):
    case = strategies.explicit_case(index, dtype)
    assert_matches_reference(compare_layer(torch_layer(case), strategies.make_input(case), seed=index))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(6, 42, 123, 5), (1, 431, 6, 64), (123, 6, 42, 1)], ids=lambda s: "x".join(map(str, s)))
def test_weird_shapes(dtype, shape):
    M, K, N, r = shape
    layer = random_layer(K, N, r, dtype, dropout=0.1, seed=M).train()
    layer.backend = "torch"
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(K), dtype=torch.float64).to(dtype)
    assert_matches_reference(compare_layer(layer, x))


def test_gradcheck_float64():
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    x_lora = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    W = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(LoraLinearFunction.apply, (x, None, W, b, A, B, 0.7))
    assert torch.autograd.gradcheck(LoraLinearFunction.apply, (x, x_lora, W, b, A, B, 0.7))
    assert torch.autograd.gradcheck(LoraLinearFunction.apply, (x, None, W, None, A, B, 2.0))


class _RecordShapes(TorchDispatchMode):
    """Shapes of the tensors each op allocates: views of existing storage and in-place ops (copy_, set_,
    which the Triton interpreter uses to move arguments to and from the host) are not allocations."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0].endswith("_"):
            return func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        known = {a.untyped_storage().data_ptr() for a in inputs}
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in known:
                self.shapes.append(tuple(t.shape))
        return out


def recorder_inside(implementations: dict) -> type:
    """A _RecordShapes that also sees inside lorakern's custom ops (a dispatch mode sees an op as one call):
    ``implementations`` maps each op to the function behind it, which runs with the mode still on."""

    class RecordShapesInsideOps(_RecordShapes):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in implementations:
                with self:
                    return implementations[func](*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

    return RecordShapesInsideOps


def allocations(layer, x: torch.Tensor, grad: torch.Tensor, recorder=_RecordShapes) -> tuple[list, list]:
    """The shapes ``recorder`` sees allocated by y = layer(x) (any callable) and by y's backward from ``grad``;
    asserts that neither formed an N x K tensor (B @ A or its transpose; K = x's last dim, N = grad's).
    test_kernels_interpreted.py runs it on the kernels."""
    with recorder() as forward:
        y = layer(x)
    with recorder() as backward:
        y.backward(grad)
    N, K = grad.shape[-1], x.shape[-1]
    for shapes in (forward.shapes, backward.shapes):
        assert (N, K) not in shapes and (K, N) not in shapes, "B @ A (or its transpose) was formed"
    return forward.shapes, backward.shapes


def test_never_forms_BA_and_keeps_one_output_sized_tensor():
    M, K, N, r = 11, 13, 17, 3
    layer = random_layer(K, N, r, torch.float32)
    x = torch.randn(M, K, requires_grad=True)
    saved = []  # packed in forward only (the backward builds no graph), so the hooks may span both
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        forward, backward = allocations(layer, x, torch.randn(M, N))
    assert forward.count((M, N)) == 1, f"M x N temporaries in forward: {forward}"
    assert (M, N) not in backward, f"M x N temporary in backward: {backward}"
    activations = [s for s in saved if s not in {(N, K), (r, K), (N, r)}]
    assert sorted(activations) == sorted([(M, K), (M, r)]), f"saved activations: {activations}"


def test_dropout_only_on_the_lora_branch():
    torch.manual_seed(0)
    layer = random_layer(32, 8, 4, torch.float32, dropout=0.5).train()
    x = torch.randn(64, 32)
    with torch.no_grad():
        layer.lora_B.zero_()
        assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    layer.eval()
    with torch.no_grad():
        nn.init.normal_(layer.lora_B)
        assert torch.equal(layer(x), layer(x)), "dropout must be off in eval mode"


def test_dropout_draws_a_fresh_mask_each_step_unless_seeded():
    layer = random_layer(32, 8, 4, torch.float32, dropout=0.5).train()
    x = torch.randn(16, 32)
    assert not torch.equal(layer(x), layer(x))
    layer.dropout_seed = 7
    assert torch.equal(layer(x), layer(x))
    torch.manual_seed(3)
    layer.dropout_seed = None
    first = layer(x)
    torch.manual_seed(3)
    assert torch.equal(layer(x), first), "unseeded masks follow torch.manual_seed"


def test_torch_dropout_mask_keeps_the_expected_share():
    from lorakern.functional import torch_dropout_mask

    mask = torch_dropout_mask(5, (200, 300), 0.25, "cpu")
    assert mask.unique().tolist() == pytest.approx([0.0, 1 / 0.75])
    assert (mask > 0).float().mean().item() == pytest.approx(0.75, abs=0.01)


def check_autocast(layer, x: torch.Tensor, dtype: torch.dtype) -> None:
    """Under autocast to ``dtype`` the fp32 ``layer`` computes in ``dtype``: output and gradients against the
    float64 reference on the operands cast to it (not against the layer itself cast); the gradients of the
    fp32 leaves stay fp32. test_kernels_interpreted.py runs it on the kernel path."""
    with torch.autocast(x.device.type, dtype=dtype):
        comparison = compare_layer(layer, x)
        y = layer(x)
    assert comparison.dtype == dtype and y.dtype == dtype
    assert_matches_reference(comparison)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.lora_A.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast(dtype):
    layer = random_layer(24, 12, 4, torch.float32)
    layer.backend = "torch"
    check_autocast(layer, torch.randn(5, 24, requires_grad=True), dtype)


def test_keeps_the_input_dtype_with_fp32_adapter_on_bf16_base():
    layer = LoraLinear(16, 8, r=4, dtype=torch.bfloat16)
    layer.lora_A.data = layer.lora_A.data.float()
    layer.lora_B.data = torch.randn(8, 4)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32


def test_constructor_defaults_and_init():
    torch.manual_seed(0)
    layer = LoraLinear(300, 20)
    assert (layer.r, layer.alpha, layer.scaling) == (8, 8.0, 1.0)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert layer.lora_A.shape == (8, 300) and layer.lora_B.shape == (20, 8)
    assert not layer.lora_B.any(), "B starts at zero so the layer starts as its base"
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(300)
    assert LoraLinear(4, 4, r=2, alpha=8).scaling == 4.0
    assert LoraLinear(16, 16, r=4, alpha=8, use_rslora=True).scaling == 4.0
    assert LoraLinear(300, 4, r=4, init="gaussian").lora_A.std().item() == pytest.approx(0.25, rel=0.1)
    assert LoraLinear(300, 4, r=4, init="normal").lora_A.std().item() == pytest.approx(1.0, rel=0.1)


def test_from_linear_shares_tensors_and_freezes():
    base = nn.Linear(10, 6)
    layer = LoraLinear.from_linear(base, r=2, alpha=4)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not base.weight.requires_grad and not base.bias.requires_grad
    x = torch.randn(3, 10)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


def test_from_linear_gpt2_conv1d():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(6, 10)  # nf=out=6, nx=in=10, weight stored (10, 6)
    nn.init.normal_(conv.bias)
    layer = LoraLinear.from_linear(conv, r=3)
    assert layer.weight is conv.weight and layer.fan_in_fan_out
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 10)
    expected = conv(x) + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(layer(x), expected)
    layer.merge()
    torch.testing.assert_close(layer(x), expected)
    unloaded = layer.unload()
    assert isinstance(unloaded, Conv1D) and unloaded.weight is conv.weight
    torch.testing.assert_close(unloaded(x), expected)


def test_merge_unmerge_to_linear():
    layer = random_layer(20, 12, 4, torch.float64)
    x = torch.randn(5, 20, dtype=torch.float64)
    expected = layer(x)
    weight = layer.weight.detach().clone()
    linear = layer.to_linear()
    assert type(linear) is nn.Linear and not layer.merged
    torch.testing.assert_close(linear(x), expected)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), expected)
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.weight, weight)
    torch.testing.assert_close(layer(x), expected)


def test_safe_merge_refuses_non_finite_and_leaves_weight_alone():
    layer = random_layer(8, 4, 2, torch.float32)
    with torch.no_grad():
        layer.lora_B[0, 0] = float("inf")
    weight = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaNs or infs detected in the merged weight"):
        layer.merge(safe=True)
    assert torch.equal(layer.weight, weight) and not layer.merged


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"r": 0}, ValueError, "r must be a positive integer, got r=0"),
        ({"r": -3}, ValueError, "r must be a positive integer, got r=-3"),
        ({"r": 2.5}, TypeError, "r must be an int"),
        ({"alpha": 0}, ValueError, "alpha must be a positive number, got alpha=0"),
        ({"alpha": -1.0}, ValueError, "alpha must be a positive number"),
        ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\), got dropout=1.0"),
        ({"dropout": -0.1}, ValueError, "dropout must be in"),
        ({"init": "xavier"}, ValueError, "init must be one of"),
    ],
    ids=["r=0", "r<0", "r-float", "alpha=0", "alpha<0", "dropout=1", "dropout<0", "init"],
)
def test_bad_hyperparameters(kwargs, error, message):
    with pytest.raises(error, match=message):
        LoraLinear(8, 8, **kwargs)


def test_rank_above_min_dimension_warns_but_works():
    with pytest.warns(UserWarning, match="cannot reach rank 16"):
        layer = LoraLinear(8, 4, r=16)
    assert layer(torch.randn(2, 8)).shape == (2, 4)


def test_bad_inputs_are_named():
    layer = LoraLinear(8, 4, r=2)
    with pytest.raises(ValueError, match=r"input has shape \(3, 7\) but this layer takes in_features=8"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"input dtype torch.float64 does not match the layer's weight dtype torch.float32"):
        layer(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="input must be a floating-point tensor, got dtype torch.int64"):
        layer(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="input is on meta but weight is on cpu"):
        layer(torch.randn(3, 8, device="meta"))
    layer.merge()
    with pytest.raises(ValueError, match="in_features=8"):
        layer(torch.randn(3, 7))


def test_backend_switch(monkeypatch):
    """auto takes the first implementation that fits (the C kernels for fp32 on a CPU when they are built),
    bit for bit the same as asking for it by name."""
    from lorakern import native

    layer = random_layer(8, 4, 2, torch.float32)
    x = torch.randn(3, 8)
    monkeypatch.setenv("LORAKERN_BACKEND", "c" if native.lora_library() is not None else "torch")
    expected = layer(x)
    monkeypatch.setenv("LORAKERN_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="LORAKERN_BACKEND='cuda-magic' is not a backend"):
        layer(x)
    monkeypatch.setenv("LORAKERN_BACKEND", "auto")
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def test_triton_backend_request(monkeypatch):
    from lorakern import kernels

    # compiled (on a CUDA machine) the kernels take CUDA tensors only; interpreted, CPU ones
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = random_layer(8, 4, 2, torch.float32, device=device)
    x = torch.randn(3, 8, device=device)
    monkeypatch.setenv("LORAKERN_BACKEND", "triton")
    if kernels.triton_available():
        assert_matches_reference(compare_layer(layer, x))
    else:
        with pytest.raises(ValueError, match="triton is not installed"):
            layer(x)


def test_state_dict_keeps_linear_names():
    layer = LoraLinear(6, 3, r=2)
    assert set(layer.state_dict()) == {"weight", "bias", "adapters.default.lora_A", "adapters.default.lora_B"}
    linear = nn.Linear(6, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.load_state_dict(linear.state_dict(), strict=False)
    assert torch.equal(layer.weight, linear.weight)
