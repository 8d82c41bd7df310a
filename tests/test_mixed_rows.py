"""The row grouping of a mixed-adapter batch (lorakern.rows): one sort per batch, shared by every layer the
batch reaches (each layer derives its tokens' grouping without sorting again), and the layer-level form's
(``LoraLinear.forward_rows``) bad input. The values of mixed batches: tests/test_mixed_batches.py."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lorakern
from lorakern import LoraConfig, inject
from lorakern.errors import LorakernError
from toy_models import randomize

SORTS = {"sort", "argsort", "msort", "topk", "kthvalue", "unique", "_unique", "_unique2", "unique_consecutive",
         "unique_dim"}


class _CountSorts(TorchDispatchMode):
    """The aten ops that sort (or could stand in for a sort) run inside the block, by name."""

    def __init__(self):
        super().__init__()
        self.sorts = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SORTS:
            self.sorts.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


class Deep(nn.Module):
    """Six Linear layers on (batch, tokens, features) inputs, two of them after the tokens are pooled in
    pairs (another tokens-per-row count), then a per-row head: every layer gets the batch's rows."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.pooled = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        x = x.reshape(x.shape[0], x.shape[1] // 2, 16)
        for layer in self.pooled:
            x = torch.relu(layer(x))
        return self.head(x.mean(1))


def deep_model():
    model = inject(Deep(), LoraConfig(r=2, target_modules=["layers.0", "layers.1", "layers.2", "layers.3", "pooled.0",
                                                          "pooled.1", "head"]), "a")
    lorakern.add_adapter(model, "b", LoraConfig(r=3, target_modules=["layers.1", "pooled.0", "head"]))
    lorakern.add_adapter(model, "c", LoraConfig(r=1, target_modules=["layers.3", "pooled.1"]))
    randomize(model, 3)
    return model


def test_rows_are_sorted_once_per_batch_not_once_per_layer():
    model = deep_model()
    rows = ["b", None, "a", "c", "b", "a"]
    x = torch.randn(6, 4, 8, generator=torch.Generator().manual_seed(1))
    with _CountSorts() as counted:
        with lorakern.adapter_rows(model, rows) as groups:
            entered = list(counted.sorts)
            out = model(x)
            during = counted.sorts[len(entered):]
        out.sum().backward()
    assert entered == ["sort"], entered  # RowGroups: the one stable sort, on entering the block
    assert during == [], f"the layers sorted again: {during}"  # 7 layers, tokens per row 4, 2 and 1
    assert {key[0] for key in groups._tokens} == {4, 2, 1}  # each layer derived its tokens' grouping
    # the one sort's grouping is right: each row's output is its adapter's alone (the base's for None)
    for name in ("a", "b", "c", None):
        mine = [i for i, r in enumerate(rows) if r == name]
        if name is None:
            with lorakern.disable_adapters(model), torch.no_grad():
                alone = model(x)
        else:
            lorakern.set_adapter(model, name)
            with torch.no_grad():
                alone = model(x)
        torch.testing.assert_close(out[mine].detach(), alone[mine], rtol=1e-5, atol=1e-6, msg=str(name))


def test_the_count_sees_a_sort_in_a_layer():
    """The counter above catches a layer that regroups its rows (a per-layer sort) in the block."""
    model = deep_model()
    real = lorakern.rows.RowGroups.tokens

    def regrouping(self, tokens_per_row, device):
        groups = real(self, tokens_per_row, device)
        return lorakern.rows.group_rows(groups.slot, len(self.names))  # sorts again, per layer and call

    x = torch.randn(6, 4, 8)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lorakern.rows.RowGroups, "tokens", regrouping)
        with _CountSorts() as counted, lorakern.adapter_rows(model, ["a", "b", None, "c", "a", "b"]):
            model(x)
    assert counted.sorts.count("sort") == 1 + 7, counted.sorts


def test_forward_rows_refuses_a_row_list_of_the_wrong_length_or_type():
    layer = lorakern.LoraLinear(12, 7, r=4)
    layer.add_adapter("b", r=2)
    x = torch.randn(3, 5, 12)  # 15 rows once flattened
    with pytest.raises(LorakernError, match=r"one entry per row of the flattened input \(15 rows\), got shape \(3,\)"):
        layer.forward_rows(x, torch.zeros(3, dtype=torch.int64), ["default", "b"])  # one per batch row: not this form
    with pytest.raises(LorakernError, match=r"1-D integer tensor .* got shape \(3, 5\)"):
        layer.forward_rows(x, torch.zeros(3, 5, dtype=torch.int64), ["default", "b"])
    with pytest.raises(LorakernError, match=r"1-D integer tensor .*torch.float32"):
        layer.forward_rows(x, torch.zeros(15), ["default", "b"])
    with pytest.raises(LorakernError, match="row_adapter holds -2"):
        layer.forward_rows(x, torch.full((15,), -2), ["default", "b"])


def test_a_batch_of_one_adapter_is_the_single_adapter_call(monkeypatch):
    """Every row one adapter (and no other handed in): each layer makes the single-adapter call, at its cost,
    no mixed call; rows of two adapters make mixed calls. Same values as set_adapter either way."""
    from lorakern import dispatch

    calls = []
    for name in ("lora_forward", "prepare_mixed"):
        real = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    model = deep_model()
    x = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(2))
    with lorakern.adapter_rows(model, ["b", "b", "b"]):
        out = model(x)
    assert calls and set(calls) == {"lora_forward"}, calls  # the 3 layers "b" targets; none mixed
    assert len(calls) == 3
    lorakern.set_adapter(model, "b")
    torch.testing.assert_close(out, model(x), rtol=1e-6, atol=1e-6)
    calls.clear()
    with lorakern.adapter_rows(model, ["b", "a", "b"]):
        model(x)
    assert "prepare_mixed" in calls, calls
