"""The cost model that picks, per call, between the factored form (through u = x~ A^T) and forming
W + s B A (formulation.choose_formulation): the choice on each side of the switch, the cases where merged
is declined, and both forms against the float64 reference there, with and without the C kernels."""
import pytest
import torch

from lorakern import formulation, functional, native
from lorakern.formulation import BACKWARD_MERGE_OVERHEAD, FORWARD_MERGE_OVERHEAD, choose_formulation, pinned_formulation
from lorakern.testing import assert_matches_reference, compare_layer, random_layer

K, N, r = 16, 24, 3
# merged pays once its N K (r + c) is below the M N r (forward) or M K r (backward) it saves
SWITCH = K * (r + FORWARD_MERGE_OVERHEAD) // r  # the forward's
BACKWARD_SWITCH = N * (r + BACKWARD_MERGE_OVERHEAD) // r


def test_the_switch_sits_where_the_stated_cost_model_puts_it():
    def forms(M):
        chosen = choose_formulation(M, K, N, r, False, torch.float32)
        return chosen.forward, chosen.backward

    assert forms(1) == ("factored", "factored")
    assert forms(SWITCH) == ("factored", "factored")  # equal cost: stays factored
    assert forms(SWITCH + 1) == ("merged", "factored")
    assert forms(BACKWARD_SWITCH) == ("merged", "factored")
    assert forms(BACKWARD_SWITCH + 1) == ("merged", "merged")
    assert forms(10**6) == ("merged", "merged")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merged_is_declined_for_half_dtypes_and_dropout(dtype):
    big = 10**6
    assert choose_formulation(big, K, N, r, False, dtype).forward == "factored"
    declined = choose_formulation(big, K, N, r, True, torch.float32)
    assert (declined.forward, declined.backward) == ("factored", "factored")
    assert "dropout" in declined.reason
    with pinned_formulation("merged"):
        assert choose_formulation(big, K, N, r, True, torch.float32).forward == "factored"


def test_the_formulation_can_be_pinned_and_a_bad_pin_is_refused(monkeypatch):
    monkeypatch.setenv(formulation.FORMULATION_ENV, "merged")
    assert choose_formulation(1, K, N, r, False, torch.float32).forward == "merged"
    monkeypatch.setenv(formulation.FORMULATION_ENV, "factored")
    assert choose_formulation(10**6, K, N, r, False, torch.float64).backward == "factored"
    with pinned_formulation("merged"):  # the context wins over the environment
        assert choose_formulation(1, K, N, r, False, torch.float32).forward == "merged"
    monkeypatch.setenv(formulation.FORMULATION_ENV, "fused")
    with pytest.raises(ValueError, match="LORAKERN_FORMULATION='fused'.*auto, factored, merged"):
        choose_formulation(1, K, N, r, False, torch.float32)
    with pytest.raises(ValueError, match="formulation must be one of"):
        with pinned_formulation("fused"):
            pass


@pytest.fixture
def record(monkeypatch):
    """The formulations the layer's calls took."""
    taken = []
    original = functional.choose_formulation

    def spy(*args):
        chosen = original(*args)
        taken.append((chosen.forward, chosen.backward))
        return chosen

    monkeypatch.setattr(functional, "choose_formulation", spy)
    return taken


@pytest.mark.parametrize("native_kernels,dtype", [(True, torch.float32), (False, torch.float32), (False, torch.float64)],
                         ids=["C kernels-fp32", "plain torch-fp32", "plain torch-fp64"])  # the C kernels take fp32 only
@pytest.mark.parametrize("rows,expected", [(SWITCH - 7, ("factored", "factored")), (SWITCH + 9, ("merged", "factored")),
                                           (BACKWARD_SWITCH + 3, ("merged", "merged"))],
                         ids=["below", "forward-merged", "both-merged"])
def test_each_side_of_the_switch_matches_the_reference(record, native_kernels, dtype, rows, expected):
    if native_kernels and native.lora_library() is None:
        pytest.skip(f"the C kernels are not built here: {native.build_status()[1]}")
    layer = random_layer(K, N, r, dtype, bias=rows % 2 == 0).train()
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows), dtype=torch.float64)
    if native_kernels:
        comparison = compare_layer(layer, x.to(dtype))
    else:
        with native.disabled():
            comparison = compare_layer(layer, x.to(dtype))
    assert_matches_reference(comparison)
    assert record and set(record) == {expected}, record


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["plain torch-fp64", "C kernels-fp32"])
@pytest.mark.parametrize("rows,expected", [(SWITCH + 9, ("merged", "factored")),
                                           (BACKWARD_SWITCH + 3, ("merged", "merged"))],
                         ids=["forward-merged", "both-merged"])
@pytest.mark.parametrize("frozen", ["lora_A", "lora_B", "x", "none"])
def test_merged_form_with_any_subset_of_gradients(record, frozen, rows, expected, dtype):
    """Merged with B frozen needs no u (with A frozen, the backward still forms u from x for dB); with x
    needing no gradient no dx: the rest equals the factored form's."""
    if dtype == torch.float32 and native.lora_library() is None:
        pytest.skip(f"the C kernels are not built here: {native.build_status()[1]}")
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    layer = random_layer(K, N, r, dtype)
    x = torch.randn(rows, K, dtype=dtype, requires_grad=frozen != "x")
    reference = random_layer(K, N, r, dtype)
    reference.load_state_dict(layer.state_dict())
    if frozen in ("lora_A", "lora_B"):
        getattr(layer, frozen).requires_grad_(False)
        getattr(reference, frozen).requires_grad_(False)
    xr = x.detach().clone().requires_grad_(frozen != "x")
    y = layer(x)
    with pinned_formulation("factored"):
        yr = reference(xr)
    torch.testing.assert_close(y, yr, rtol=tolerance, atol=tolerance)
    grad = torch.randn_like(y)
    y.backward(grad)
    yr.backward(grad)
    for name, p in layer.named_parameters():
        q = dict(reference.named_parameters())[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=tolerance, atol=tolerance, msg=name)
    if frozen != "x":
        torch.testing.assert_close(x.grad, xr.grad, rtol=tolerance, atol=tolerance)
    assert expected in record


def test_merged_form_in_inference_and_on_a_transposed_weight(record):
    """no_grad (nothing saved, no u) and GPT-2's Conv1D layout (W stored (in, out)) take the merged form too."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(N, K).double()
    layer = __import__("lorakern").LoraLinear.from_linear(conv, r=r)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(BACKWARD_SWITCH + 1, K, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
    expected = conv(x) + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert record == [("merged", "merged")]


def test_merged_layers_of_one_shape_share_the_workspace_without_mixing_results():
    """Two layers of one shape run merged (the W' workspace reused by both, forward and backward, and by an
    activation-checkpointed recompute) give what each gives run factored."""
    torch.manual_seed(0)
    first, second = (random_layer(K, K, r, torch.float32) for _ in range(2))
    for layer in (first, second):
        torch.nn.init.normal_(layer.lora_B)  # a non-zero B A, so a W' of the other layer would show
    x = torch.randn(40, K)

    def run(form, checkpoint):
        for p in (*first.parameters(), *second.parameters()):
            p.grad = None
        with pinned_formulation(form):
            middle = torch.utils.checkpoint.checkpoint(first, x, use_reentrant=False) if checkpoint else first(x)
            y = second(torch.tanh(middle))
            y.square().sum().backward()
        return [y.detach()] + [p.grad.clone() for p in (first.lora_A, first.lora_B, second.lora_A, second.lora_B)]

    formulation.release_workspaces()
    expected = run("factored", False)
    for checkpoint in (False, True):
        got = run("merged", checkpoint)
        for name, a, b in zip(["y", "A1", "B1", "A2", "B2"], got, expected):
            # the two forms round differently (fp32, reductions of 16..40); another layer's W' would be O(1) off
            error = float((a - b).abs().max() / b.abs().max())
            assert error < 1e-5, f"{name} (checkpoint={checkpoint}): relative error {error:.2g}"
    assert (tuple(first.weight.shape), torch.float32) in formulation._WORKSPACES.buffers
    formulation.release_workspaces()
    assert not formulation._WORKSPACES.buffers


@pytest.mark.parametrize("backend", ["torch", "c"])
@pytest.mark.parametrize("form", ["factored", "merged"])
def test_inference_without_an_autograd_node_is_the_training_forward(backend, form, monkeypatch):
    """With nothing to differentiate (torch.no_grad, or no operand that requires grad) the call runs the
    forward's math without the autograd Function (functional._run): no graph node, and bit for bit the output
    of the Function's forward, which the tests above compare with the float64 reference, in both forms."""
    if backend == "c" and native.lora_library() is None:
        pytest.skip(f"the C kernels are not built here: {native.build_status()[1]}")
    layer = random_layer(K, N, r, torch.float32, bias=True).eval()
    layer.backend = backend
    x = torch.randn(3, SWITCH, K, generator=torch.Generator().manual_seed(7))
    with pinned_formulation(form):
        trained = layer(x.clone().requires_grad_(True))
        with torch.no_grad():
            inferred = layer(x)
        frozen_operands = layer(x)  # grad mode, x without grad but the adapters train: a graph node
        layer.requires_grad_(False)
        plain = layer(x)  # nothing requires grad: no node either
    assert trained.grad_fn is not None and frozen_operands.grad_fn is not None
    assert inferred.grad_fn is None and plain.grad_fn is None
    assert inferred.shape == trained.shape == (3, SWITCH, N)
    torch.testing.assert_close(inferred, trained.detach(), rtol=0, atol=0)
    torch.testing.assert_close(plain, trained.detach(), rtol=0, atol=0)
