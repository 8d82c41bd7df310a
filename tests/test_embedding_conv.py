"""LoRA on nn.Embedding, nn.Conv1d and nn.Conv2d: output and every gradient against the float64 reference
(lorakern.core.layers, an im2col written in NumPy) and against PEFT's own layers with the same weights,
deltas, inits, and where PEFT fails. Inside a model (injection, merging, named adapters, PEFT's format both
ways, refusals): tests/test_embedding_conv_models.py."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import strategies
from lorakern import core
from lorakern.conv import LoraConv
from lorakern.embedding import LoraEmbedding
from lorakern.testing import bound, rel_error


def f64(t):
    return None if t is None else t.detach().to(torch.float64).cpu().numpy()


def randomize_adapters(layer, seed: int = 0) -> None:
    """Every A and B random (B too, so every gradient is non-trivial), scaled like a trained adapter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(p[0].numel()))


def check(results: dict, dtype: torch.dtype, length: int) -> float:
    """Assert every (actual, reference, magnitude) is inside the bound; returns the bound."""
    limit = bound(dtype, length)
    for name, (actual, expected, magnitude) in results.items():
        error, where = rel_error(actual, expected, magnitude, dtype)
        assert error <= limit, f"{name}: {error:.3g} > {limit:.3g} ({where})"
    return limit


def assert_check_can_fail(results: dict, dtype: torch.dtype, length: int) -> None:
    """Each comparison fails when its result is off by 4x the bound (relative to its term magnitudes)."""
    limit = bound(dtype, length)
    for name, (actual, expected, magnitude) in results.items():
        off = actual.detach().to(torch.float64) + torch.from_numpy(4 * limit * (magnitude + 1e-30))
        assert rel_error(off, expected, magnitude, dtype)[0] > limit, name


# ---- convolution against the reference ------------------------------------------------------------------
def run_conv(dims, C, O, k, stride, padding, dilation, groups, r, N, size, dtype, dropout=0.0, bias=True, seed=0):
    """LoraConv on random x: returns ({name: (actual, reference, magnitude)}, reduction length, layer, x)."""
    torch.manual_seed(seed)
    conv = {1: nn.Conv1d, 2: nn.Conv2d}[dims](C, O, k, stride, padding, dilation, groups, bias, dtype=torch.float64)
    layer = LoraConv.from_conv(conv, r=r, alpha=2 * r, dropout=dropout)
    randomize_adapters(layer, seed)
    layer.to(dtype).train()
    if bias:
        layer.bias.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(N, C, *size[:dims], generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    torch.manual_seed(seed + 2)
    y = layer(x)
    torch.manual_seed(seed + 2)  # the same draw on a tensor of ones is the mask F.dropout applied
    mask = f64(F.dropout(torch.ones_like(x), dropout, True)) if dropout else None
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
    params = [x, layer.lora_A, layer.lora_B] + ([layer.bias] if bias else [])
    grads = torch.autograd.grad(y, params, dy)
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    X, W, A, B, b, G = f64(x), f64(layer.weight), f64(layer.lora_A), f64(layer.lora_B), f64(layer.bias), f64(dy)
    s = 2.0  # alpha / r, recomputed here
    ref = core.conv_forward(X, W, A, B, b, s, dropout_mask=mask, **geometry)
    grad = core.conv_backward(X, W, A, B, G, s, dropout_mask=mask, **geometry)
    absm = None if mask is None else abs(mask)
    mag = core.conv_forward(abs(X), abs(W), abs(A), abs(B), None if b is None else abs(b), s, dropout_mask=absm,
                            **geometry)
    gmag = core.conv_backward(abs(X), abs(W), abs(A), abs(B), abs(G), s, dropout_mask=absm, **geometry)
    results = {"y": (y, ref, mag), "dx": (grads[0], grad["dx"], gmag["dx"]), "dA": (grads[1], grad["dA"], gmag["dA"]),
               "dB": (grads[2], grad["dB"], gmag["dB"])}
    if bias:
        results["db"] = (grads[3], grad["db"], gmag["db"])
    length = max(C * int(np.prod(W.shape[2:])), N * int(np.prod(y.shape[2:])), O, r)
    return results, length, layer, x


CONV_CASES = {
    "2d-k3-pad1": (2, 5, 6, 3, 1, 1, 1, 1, 4, 2, (7, 6)),
    "2d-k1": (2, 3, 7, 1, 1, 0, 1, 1, 2, 2, (5, 4)),
    "2d-k3-stride2-nonsquare": (2, 4, 5, (3, 2), 2, (1, 0), 1, 1, 3, 1, (9, 7)),
    "2d-dilation2": (2, 3, 4, 3, 1, 2, 2, 1, 2, 2, (8, 8)),
    "2d-groups2": (2, 4, 6, 3, 1, 1, 1, 2, 4, 2, (5, 5)),
    "1d-k3-stride2": (1, 5, 3, 3, 2, 1, 1, 1, 2, 3, (11,)),
    "1d-k1-groups3": (1, 6, 9, 1, 1, 0, 1, 3, 3, 2, (4,)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", list(CONV_CASES), ids=list(CONV_CASES))
def test_conv_output_and_gradients_match_the_reference(case, dtype):
    dims, C, O, k, stride, padding, dilation, groups, r, N, size = CONV_CASES[case]
    results, length, _, _ = run_conv(dims, C, O, k, stride, padding, dilation, groups, r, N, size, dtype)
    check(results, dtype, length)
    assert_check_can_fail(results, dtype, length)


def test_conv_dropout_applies_to_the_lora_input_only():
    results, length, _, _ = run_conv(2, 4, 5, 3, 1, 1, 1, 1, 2, 2, (6, 5), torch.float64, dropout=0.4)
    check(results, torch.float64, length)


CONV_SEEN = []
CONV_AXES = {"dims": ["Conv1d", "Conv2d"], "groups": ["groups=1", "groups=2"], "stride": ["stride=1", "stride=2"],
             "dilation": ["dilation=1", "dilation=2"], "padding": ["padding=0", "padding=1", "padding=2"]}


@given(dims=st.sampled_from([1, 2]), C=st.integers(1, 5), O=st.integers(1, 5), k=st.integers(1, 3),
       stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2), groups=st.sampled_from([1, 2]),
       r=st.integers(1, 3), N=st.integers(1, 2), size=st.tuples(st.integers(1, 7), st.integers(1, 7)))
@example(dims=2, C=1, O=1, k=1, stride=1, padding=0, dilation=1, groups=1, r=1, N=1, size=(1, 1))  # all 1
@example(dims=1, C=2, O=4, k=3, stride=2, padding=2, dilation=2, groups=2, r=2, N=2, size=(1, 1))  # all padding
@example(dims=2, C=5, O=3, k=3, stride=1, padding=0, dilation=1, groups=1, r=3, N=1, size=(3, 7))  # one row out
def _conv_matches_the_reference(dims, C, O, k, stride, padding, dilation, groups, r, N, size):
    C, O, r = C * groups, O * groups, r * groups
    if min(s + 2 * padding - dilation * (k - 1) for s in size[:dims]) < 1:
        return  # the kernel does not fit: torch refuses such a convolution for the base layer too
    # counted once it runs (explicit examples too: the share count is over the cases compared)
    CONV_SEEN.append(SimpleNamespace(classes={"dims": f"Conv{dims}d", "groups": f"groups={groups}",
                                              "stride": f"stride={stride}", "dilation": f"dilation={dilation}",
                                              "padding": f"padding={padding}"}))
    results, length, _, _ = run_conv(dims, C, O, k, stride, padding, dilation, groups, r, N, size, torch.float64)
    check(results, torch.float64, length)


def test_conv_matches_the_reference_over_shapes():
    """Conv1d and Conv2d over channels, kernel sizes, stride, padding, dilation, groups, ranks and batch sizes
    (the stated shares asserted on the examples that ran, those whose kernel fits its input)."""
    CONV_SEEN.clear()
    _conv_matches_the_reference()
    strategies.assert_shares(CONV_SEEN, CONV_AXES)


# ---- embedding against the reference --------------------------------------------------------------------
def run_embedding(V, D, r, ids, dtype, padding_idx=None, scale_grad_by_freq=False, seed=0):
    torch.manual_seed(seed)
    base = nn.Embedding(V, D, padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq, dtype=torch.float64)
    layer = LoraEmbedding.from_embedding(base, r=r, alpha=3 * r)
    randomize_adapters(layer, seed)
    layer.to(dtype)
    ids = torch.as_tensor(ids)
    y = layer(ids)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    dA, dB = torch.autograd.grad(y, [layer.lora_embedding_A, layer.lora_embedding_B], dy)
    E, A, B, G, I = f64(layer.weight), f64(layer.lora_embedding_A), f64(layer.lora_embedding_B), f64(dy), ids.numpy()
    s = 3.0
    padding = None if padding_idx is None else padding_idx % V  # torch's rule for a negative index
    grad = core.embedding_backward(I, A, B, G, s, padding, scale_grad_by_freq)
    gmag = core.embedding_backward(I, abs(A), abs(B), abs(G), s, None, scale_grad_by_freq)
    results = {"y": (y, core.embedding_forward(I, E, A, B, s), core.embedding_forward(I, abs(E), abs(A), abs(B), s)),
               "dA": (dA, grad["dA"], gmag["dA"]), "dB": (dB, grad["dB"], gmag["dB"])}
    return results, max(ids.numel(), D, r), layer


EMBEDDING_CASES = {
    "plain": dict(V=11, D=7, r=3, ids=[[1, 4, 4, 10], [0, 2, 9, 4]]),
    "padding_idx": dict(V=9, D=5, r=2, ids=[[0, 3, 0, 8, 3]], padding_idx=0),
    "padding_idx-last-freq": dict(V=6, D=4, r=4, ids=[[5, 1, 1, 1], [2, 5, 3, 1]], padding_idx=-1,
                                  scale_grad_by_freq=True),
    "1-D ids, r > D": dict(V=5, D=2, r=3, ids=[4, 0, 4]),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", list(EMBEDDING_CASES), ids=list(EMBEDDING_CASES))
def test_embedding_output_and_gradients_match_the_reference(case, dtype):
    results, length, layer = run_embedding(dtype=dtype, **EMBEDDING_CASES[case])
    check(results, dtype, length)
    assert_check_can_fail(results, dtype, length)
    if layer.padding_idx is not None:
        assert float(results["dA"][0][:, layer.padding_idx].abs().max()) == 0.0


EMBEDDING_SEEN = []
EMBEDDING_AXES = {"dtype": ["float64", "float32"], "padding_idx": ["none", "in 0..V-1", "negative"],
                  "V": ["V=1", "V>1"], "r": ["r<D", "r=D", "r>D"], "ids": ["none (M=0)", "1-D", "2-D"],
                  "scale_grad_by_freq": ["off", "on"]}


@st.composite
def embedding_cases(draw):
    """Each axis drawn uniformly from its labels (the stated share: 1 / its labels)."""
    label = {axis: draw(st.sampled_from(labels)) for axis, labels in EMBEDDING_AXES.items()}
    V = 1 if label["V"] == "V=1" else draw(st.integers(2, 12))
    D = draw(st.integers(2 if label["r"] == "r<D" else 1, 6))
    r = {"r<D": lambda: draw(st.integers(1, D - 1)), "r=D": lambda: D, "r>D": lambda: draw(st.integers(D + 1, 8))}[
        label["r"]]()
    shape = {"none (M=0)": (0,), "1-D": (draw(st.integers(1, 9)),),
             "2-D": (draw(st.integers(1, 3)), draw(st.integers(1, 5)))}[label["ids"]]
    ids = draw(st.lists(st.integers(0, V - 1), min_size=math.prod(shape), max_size=math.prod(shape)))
    padding_idx = {"none": None, "in 0..V-1": draw(st.integers(0, V - 1)), "negative": draw(st.integers(-V, -1))}[
        label["padding_idx"]]
    return SimpleNamespace(V=V, D=D, r=r, ids=torch.tensor(ids, dtype=torch.long).reshape(shape),
                           dtype=getattr(torch, label["dtype"]), padding_idx=padding_idx,
                           scale_grad_by_freq=label["scale_grad_by_freq"] == "on", classes=label)


@given(case=embedding_cases())
@example(case=SimpleNamespace(V=1, D=1, r=1, ids=torch.zeros(1, dtype=torch.long), dtype=torch.float64,
                              padding_idx=None, scale_grad_by_freq=False, classes={}))
@example(case=SimpleNamespace(V=7, D=3, r=2, ids=torch.zeros(0, dtype=torch.long), dtype=torch.float32,
                              padding_idx=None, scale_grad_by_freq=False, classes={}))  # no ids at all
def _embedding_matches_the_reference(case):
    if case.classes:
        EMBEDDING_SEEN.append(case)
    results, length, _ = run_embedding(case.V, case.D, case.r, case.ids, case.dtype, case.padding_idx,
                                       case.scale_grad_by_freq)
    check(results, case.dtype, length)  # fp32 against the float64 reference with fp32's bound
    if case.ids.numel():  # with no ids there is nothing to be off
        assert_check_can_fail(results, case.dtype, length)


def test_embedding_matches_the_reference_over_shapes():
    """LoraEmbedding against the float64 reference over fp64 / fp32, padding_idx absent, in range and
    negative, V = 1 and larger, r below, at and above D, no ids, 1-D and 2-D ids, scale_grad_by_freq off and
    on (the stated shares asserted on the examples that ran); each comparison also fails 4 bounds off."""
    EMBEDDING_SEEN.clear()
    _embedding_matches_the_reference()
    strategies.assert_shares(EMBEDDING_SEEN, EMBEDDING_AXES)


# ---- against PEFT's layers, same weights -----------------------------------------------------------------
def peft_layer(kind: str, base: nn.Module, r: int, alpha: float, **config):
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.lora import layer as peft_layers

    cls = {"embedding": peft_layers.Embedding, "conv1d": peft_layers.Conv1d, "conv2d": peft_layers.Conv2d}[kind]
    return cls(base, "default", config=PeftLoraConfig(r=r, lora_alpha=alpha, **config), r=r, lora_alpha=alpha)


@pytest.mark.parametrize("kind, base, x", [
    ("conv2d", lambda: nn.Conv2d(4, 6, (3, 2), stride=2, padding=1, dtype=torch.float64), (2, 4, 7, 6)),
    ("conv2d", lambda: nn.Conv2d(4, 6, 3, groups=2, padding="same", dtype=torch.float64), (1, 4, 5, 5)),
    ("conv1d", lambda: nn.Conv1d(3, 5, 3, stride=2, dtype=torch.float64), (2, 3, 9)),
    ("embedding", lambda: nn.Embedding(10, 6, padding_idx=2, dtype=torch.float64), None),
    ("embedding", lambda: nn.Embedding(10, 6, max_norm=0.5, dtype=torch.float64), None),
], ids=["conv2d-stride2", "conv2d-groups2-same", "conv1d", "embedding-padding_idx", "embedding-max_norm"])
def test_outputs_and_gradients_equal_peft_with_the_same_weights(kind, base, x):
    torch.manual_seed(0)
    base = base()
    ours = (LoraEmbedding.from_embedding if kind == "embedding" else LoraConv.from_conv)(copy.deepcopy(base), r=4,
                                                                                         alpha=6, dropout=0.25)
    randomize_adapters(ours)
    peft = peft_layer(kind, base, 4, 6, lora_dropout=0.25)
    if kind == "embedding":
        peft.lora_embedding_A["default"].data.copy_(ours.lora_embedding_A)
        peft.lora_embedding_B["default"].data.copy_(ours.lora_embedding_B)
        inputs = [torch.tensor([[2, 1, 7, 7, 9], [0, 2, 3, 4, 9]]), None]
        params = lambda m: [m.lora_embedding_A["default"], m.lora_embedding_B["default"]] if m is peft else \
            [m.lora_embedding_A, m.lora_embedding_B]
    else:
        peft.lora_A["default"].weight.data.copy_(ours.lora_A)
        peft.lora_B["default"].weight.data.copy_(ours.lora_B)
        inputs = [torch.randn(x, dtype=torch.float64, requires_grad=True)] * 2
        params = lambda m: [m.lora_A["default"].weight, m.lora_B["default"].weight] if m is peft else \
            [m.lora_A, m.lora_B]
    outputs = []
    for module in (ours, peft):
        module.train()
        torch.manual_seed(7)  # the same dropout draw in both
        y = module(inputs[0])
        wrt = params(module) + ([inputs[0]] if inputs[1] is not None else [])
        grads = torch.autograd.grad(y, wrt, torch.ones_like(y) + torch.arange(y.numel()).reshape(y.shape) / y.numel())
        outputs.append([y.detach(), *grads, *(p.detach().clone() for p in params(module))])
    names = ["y", "dA", "dB", "dx"][: len(outputs[0]) - 2] + ["A after", "B after"]  # max_norm rewrites A in place
    for name, a, b in zip(names, *outputs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


def test_delta_weights_equal_peft_and_the_reference():
    torch.manual_seed(0)
    for kind, base in (("conv2d", nn.Conv2d(3, 5, 3, dtype=torch.float64)),
                       ("conv2d", nn.Conv2d(3, 5, 1, dtype=torch.float64)),
                       ("conv1d", nn.Conv1d(3, 5, 2, dtype=torch.float64)),
                       ("embedding", nn.Embedding(8, 5, dtype=torch.float64))):
        ours = (LoraEmbedding.from_embedding if kind == "embedding" else LoraConv.from_conv)(copy.deepcopy(base), r=2,
                                                                                             alpha=5)
        randomize_adapters(ours)
        peft = peft_layer(kind, base, 2, 5)
        if kind == "embedding":
            peft.lora_embedding_A["default"].data.copy_(ours.lora_embedding_A)
            peft.lora_embedding_B["default"].data.copy_(ours.lora_embedding_B)
            reference = core.embedding_delta(f64(ours.lora_embedding_A), f64(ours.lora_embedding_B), 2.5)
        else:
            peft.lora_A["default"].weight.data.copy_(ours.lora_A)
            peft.lora_B["default"].weight.data.copy_(ours.lora_B)
            reference = core.conv_delta(f64(ours.lora_A), f64(ours.lora_B), 2.5)
        np.testing.assert_allclose(f64(ours.delta_weight()), reference, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(f64(peft.get_delta_weight("default")), reference, rtol=1e-13, atol=1e-15)


def test_dilation_runs_and_merges_where_peft_fails():
    base = nn.Conv2d(3, 4, 3, dilation=2, padding=1, dtype=torch.float64)
    layer = LoraConv.from_conv(copy.deepcopy(base), r=2)
    randomize_adapters(layer)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="must match the size"):
        peft_layer("conv2d", base, 2, 2, init_lora_weights=False)(x)


def test_sparse_table_trains_where_peft_fails():
    base = nn.Embedding(9, 4, sparse=True, dtype=torch.float64)
    layer = LoraEmbedding.from_embedding(copy.deepcopy(base), r=2, init=False)
    ids = torch.tensor([[1, 8, 8, 0]])
    dA, dB = torch.autograd.grad(layer(ids).sum(), [layer.lora_embedding_A, layer.lora_embedding_B])
    assert dA.layout == torch.strided and dA[:, [2, 3, 4, 5, 6, 7]].abs().max() == 0 and dA[:, 8].abs().max() > 0
    peft = peft_layer("embedding", base, 2, 2, init_lora_weights=False)
    with pytest.raises(RuntimeError, match="sparse"):
        peft(ids).sum().backward()


def test_inits_are_peft_rules():
    torch.manual_seed(0)
    emb = LoraEmbedding.from_embedding(nn.Embedding(300, 200), r=4)
    assert emb.lora_embedding_A.abs().max() == 0  # A zeros, B ~ N(0, 1): the update starts at zero
    assert abs(float(emb.lora_embedding_B.std()) - 1.0) < 0.05
    conv = LoraConv.from_conv(nn.Conv2d(30, 40, 3), r=8)
    bound_A = core.kaiming_uniform_bound(30 * 9)
    assert 0.95 * bound_A < float(conv.lora_A.abs().max()) <= bound_A and conv.lora_B.abs().max() == 0
    gaussian = LoraConv.from_conv(nn.Conv1d(30, 40, 5), r=8, init="gaussian")
    assert abs(float(gaussian.lora_A.std()) * 8 - 1.0) < 0.05 and gaussian.lora_B.abs().max() == 0


# ---- how the LoRA branch is computed -------------------------------------------------------------------
class _RecordOps(TorchDispatchMode):
    """(op name, shapes of its tensor arguments, its other arguments but None) of every aten op a block runs."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append((func.overloadpacket.__name__, [tuple(a.shape) for a in args if torch.is_tensor(a)],
                         [a for a in args if not torch.is_tensor(a) and a is not None]))
        return func(*args, **(kwargs or {}))


def test_embedding_gathers_rows_of_a_transposed_and_never_forms_a_one_hot():
    """The LoRA term of an embedding is a gather of A^T's rows (V x r) then (M, r) @ B^T: no op sees an
    (M, V) operand (a one-hot matmul would), and the only products are r wide."""
    V, D, r = 37, 6, 3
    layer = LoraEmbedding.from_embedding(nn.Embedding(V, D, padding_idx=1), r=r)
    randomize_adapters(layer)
    ids = torch.tensor([[1, 5, 36, 5], [0, 2, 2, 9]])
    with _RecordOps() as record:
        layer(ids)
    gathers = [shapes for name, shapes, _ in record.ops if name == "embedding"]
    assert gathers == [[(V, D), (2, 4)], [(V, r), (2, 4)]], record.ops  # the base's table, then A^T
    products = [shapes for name, shapes, _ in record.ops if name in ("mm", "bmm", "matmul", "addmm", "einsum")]
    assert products and all(r in shapes[0][-1:] for shapes in products), products  # (M, r) @ (r, D)
    assert not any(V in s[-1:] and len(s) > 1 and s[0] == ids.numel() for _, shapes, _ in record.ops for s in shapes)


@pytest.mark.parametrize("dims,groups", [(2, 1), (2, 2), (1, 3)], ids=["conv2d", "conv2d-groups2", "conv1d-groups3"])
def test_conv_runs_a_conv_with_r_outputs_then_a_1x1_conv(dims, groups):
    """The LoRA branch is conv(x, A) with r output channels and the base's stride, padding and dilation (all
    input channels), then a grouped 1 x 1 conv with B: never the merged (O, C, k...) kernel in the forward."""
    C, O, r, k = 6, 12, 3 * groups, 3
    base = {1: nn.Conv1d, 2: nn.Conv2d}[dims](C, O, k, stride=2, padding=1, dilation=2, groups=groups)
    layer = LoraConv.from_conv(base, r=r)
    randomize_adapters(layer)
    x = torch.randn(2, C, *(11,) * dims)
    with _RecordOps() as record:
        layer(x)
    convs = [(shapes[1], rest) for name, shapes, rest in record.ops if name == "convolution"]
    one = (1,) * dims
    kernel = (k,) * dims
    assert [c[0] for c in convs] == [(O, C // groups, *kernel), (r, C, *kernel), (O, r // groups, *one)], convs
    # (stride, padding, dilation, transposed, output_padding, groups) of the A and B convolutions
    assert convs[1][1][0] == [2] * dims and convs[1][1][1] == [1] * dims and convs[1][1][2] == [2] * dims
    assert convs[1][1][-1] == 1 and convs[2][1][0] == [1] * dims and convs[2][1][-1] == groups
