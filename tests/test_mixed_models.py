"""Mixed-adapter batches at the model level (lorakern.adapter_rows): training two adapters in one mixed run
against training each alone, under torch.compile; a tiny RoBERTa with per-row heads (dense and NF4), under
activation checkpointing and DDP; and the errors that leave the model as it was."""
import pytest
import torch
from torch import nn

import lorakern
from conftest import tiny_roberta_classifier
from lorakern import LoraConfig, inject, lora_layers
from lorakern.errors import AdapterError, LorakernError
from toy_models import Toy, check_compiled_mixed_batch, check_mixed_training_equals_alone, randomize


def toy_two_adapters(quantize=None):
    model = inject(Toy(), LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], modules_to_save=["head"],
                                     quantize=quantize), "a")
    lorakern.add_adapter(model, "b", LoraConfig(r=3, lora_alpha=3, target_modules=["q"], modules_to_save=["head"],
                                                quantize=quantize))
    randomize(model, 1)
    return model


def test_training_two_adapters_mixed_equals_training_each_alone_on_its_rows():
    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(6, 4, 8, generator=gen), torch.randn(6, 4, 3, generator=gen)) for _ in range(3)]
    check_mixed_training_equals_alone(toy_two_adapters, ["a", "b", "b", None, "a", "b"], data)
    mixed = toy_two_adapters()
    base_rows = torch.randn(1, 4, 8)
    with lorakern.adapter_rows(mixed, [None]):
        out = mixed(base_rows)
    with lorakern.disable_adapters(mixed):
        torch.testing.assert_close(out, mixed(base_rows), rtol=0, atol=0)


@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["dense", "nf4"])
def test_compiled_mixed_batch_has_no_graph_breaks_and_matches_eager(quantize):
    model = toy_two_adapters(quantize)
    x = torch.randn(4, 3, 8)
    compiled, _ = check_compiled_mixed_batch(model, x, ["b", None, "a", "b"])
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with lorakern.adapter_rows(model, ["a", "a", None, "b"]):  # other rows, same adapters: no recompile
        compiled(x).sum().backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def roberta_two_tasks(quantize=None):
    quant = {"quantize": "nf4", "quantize_skip": ["classifier"]} if quantize else {}
    model = tiny_roberta_classifier()
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"],
                             **quant), adapter_name="sst2")
    # "mrpc" leaves "value" alone and adds "key" (dense): a layer each adapter lacks. A 4-bit model's
    # untargeted layers are LinearNF4, which a later adapter cannot target.
    mrpc_targets = ["query"] if quantize else ["query", "key"]
    lorakern.add_adapter(model, "mrpc", LoraConfig(r=2, lora_alpha=3, target_modules=mrpc_targets,
                                                   modules_to_save=["classifier"], **quant))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name or ".modules_to_save." in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def model_state(model):
    return (list(model.lorakern_active), {n: p.requires_grad for n, p in model.named_parameters()},
            {n: list(m.active_adapters) for n, m in lora_layers(model).items()})


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_each_row_of_a_roberta_batch_gets_its_adapter_and_head_and_trains_only_it(quantize):
    model = roberta_two_tasks(quantize)
    before = model_state(model)
    ids = torch.randint(3, 64, (5, 9), generator=torch.Generator().manual_seed(3))
    rows = ["sst2", "mrpc", None, "sst2", "mrpc"]
    with lorakern.adapter_rows(model, rows):
        logits = model(input_ids=ids).logits
        assert lorakern.active_adapters(model) == ["sst2", "mrpc"]
    assert model_state(model)[0] == before[0] and model_state(model)[2] == before[2]  # active set restored
    # requires_grad stays as the block set it until the block's backward has run (autograd skips a tensor
    # that no longer requires a gradient), then is restored
    assert model_state(model)[1] != before[1]
    logits[[1, 4]].sum().backward()  # only mrpc's rows
    assert model_state(model) == before
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(".mrpc." in n for n in grads), grads
    assert any("modules_to_save.mrpc" in n for n in grads) and any("query.adapters.mrpc" in n for n in grads)
    for name in ("sst2", "mrpc"):
        lorakern.set_adapter(model, name)
        with torch.no_grad():
            alone = model(input_ids=ids).logits
        mine = [i for i, r in enumerate(rows) if r == name]
        torch.testing.assert_close(logits[mine].detach(), alone[mine], rtol=1e-5, atol=1e-6)
    with lorakern.disable_adapters(model), torch.no_grad():
        torch.testing.assert_close(logits[2].detach(), model(input_ids=ids).logits[2], rtol=0, atol=0)


def test_activation_checkpointing_gives_the_same_gradients_with_backward_inside_or_after_the_block():
    labels = torch.tensor([0, 1, 1, 0])
    ids = torch.randint(3, 64, (4, 7), generator=torch.Generator().manual_seed(4))
    rows = ["mrpc", "sst2", None, "mrpc"]

    def grads(checkpointing, backward_inside):
        model = roberta_two_tasks().train()
        before = model_state(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(3)
        with lorakern.adapter_rows(model, rows):
            loss = nn.functional.cross_entropy(model(input_ids=ids).logits, labels)
            if backward_inside:
                loss.backward()
        if not backward_inside:  # the recomputation runs after the block: it still gets the block's rows
            loss.backward()
        assert model_state(model) == before
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain = grads(False, True)
    assert any(".sst2." in n for n in plain) and any(".mrpc." in n for n in plain)
    for checkpointed in (grads(True, True), grads(True, False)):
        assert plain.keys() == checkpointed.keys()
        for name in plain:
            torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bad_rows_give_clear_errors_and_leave_the_model_as_it_was():
    model = roberta_two_tasks()
    ids = torch.randint(3, 64, (3, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before_out = model(input_ids=ids).logits
    before = model_state(model)
    with pytest.raises(AdapterError, match=r"unknown adapter\(s\) \['cola'\].*\['sst2', 'mrpc'\]"):
        with lorakern.adapter_rows(model, ["sst2", "cola", None]):
            pass
    with pytest.raises(LorakernError, match="gave 2 row names but .* shape \\(3, 6, 32\\)|gave 2 row names"):
        with lorakern.adapter_rows(model, ["sst2", "mrpc"]):
            model(input_ids=ids)
    with pytest.raises(TypeError, match="one adapter name"):
        with lorakern.adapter_rows(model, "sst2"):
            pass
    with pytest.raises(AdapterError, match="do not nest"):
        with lorakern.adapter_rows(model, ["sst2"] * 3), lorakern.adapter_rows(model, ["mrpc"] * 3):
            pass
    with pytest.raises(AdapterError, match="has no adapters"):
        with lorakern.adapter_rows(Toy(), ["a"]):
            pass
    assert model_state(model) == before
    assert all(m.row_groups is None for m in model.modules() if hasattr(m, "row_groups"))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before_out, rtol=0, atol=0)


DDP_WORKER = r'''
import json, os, sys
import torch, torch.distributed as dist
from torch import nn
import lorakern
from lorakern import LoraConfig, inject
from toy_models import randomize  # the tests folder is on PYTHONPATH

def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    inject(model, LoraConfig(r=2, target_modules=["0", "2"], modules_to_save=["2"]), "a")
    lorakern.add_adapter(model, "b", LoraConfig(r=3, lora_alpha=6, target_modules=["0"]))
    randomize(model, 1)
    return model

def main():
    out = sys.argv[1]
    model = build()
    gen = torch.Generator().manual_seed(2)
    xs, ys = torch.randn(4, 8, 8, generator=gen), torch.randn(4, 8, 4, generator=gen)
    rows = ["a", "b", None, "a", "b", "b", "a", None]
    rank, world = 0, 1
    wrapped = model
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        from torch.nn.parallel import DistributedDataParallel
        with lorakern.adapter_rows(model, rows, active=["a", "b"]):  # every adapter trainable: DDP reduces them all
            wrapped = DistributedDataParallel(model)
    mine = rows[rank::world] if world > 1 else rows
    params = [p for n, p in model.named_parameters() if ".adapters." in n or ".modules_to_save." in n]
    optimizer = torch.optim.SGD(params, lr=0.05)
    for x, y in zip(xs, ys):
        optimizer.zero_grad()
        x, y = (x[rank::world], y[rank::world]) if world > 1 else (x, y)
        with lorakern.adapter_rows(model, mine, active=["a", "b"]):
            # DDP averages the ranks' gradients: each rank's share of the global sum / 8, times the world size
            loss = ((wrapped(x) - y) ** 2).sum() / 8 * world
            loss.backward()
        optimizer.step()
    if rank == 0:
        torch.save({n: p.detach() for n, p in model.named_parameters() if ".adapters." in n or ".modules_to_save." in n}, out)
    if world > 1:
        del wrapped
        dist.barrier()
        dist.destroy_process_group()
        os._exit(0)

main()
'''


def test_ddp_two_ranks_train_a_mixed_batch_as_one_process(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    tests = os.path.dirname(os.path.abspath(__file__))  # for the worker's `from toy_models import randomize`
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p))
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(script), str(tmp_path / "two.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one.keys() == two.keys() and any(".b." in n for n in one)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_merged_layer_is_refused_and_the_model_left_as_it_was():
    model = toy_two_adapters()
    before = model_state(model)
    model.q.merge()
    with pytest.raises(AdapterError, match=r"\['q'\] have merged adapters.*unmerge\(\)"):
        with lorakern.adapter_rows(model, ["a", "b"]):
            pass
    assert model_state(model) == before and model.q.row_groups is None


@pytest.mark.parametrize("backend", ["c", "torch"])
def test_a_mixed_batch_equals_peft_mixed_batch_inference(tmp_path, backend):
    """PEFT runs mixed batches at inference (``adapter_names=``, "__base__" for the base): the same adapters and
    heads, saved by lorakern and loaded by PEFT, give lorakern's logits row for row (two adapters with different
    r, alpha and targets, per-row output projections of the head, base rows)."""
    from peft import PeftModel

    # PEFT batches modules_to_save copies per row only for Linear/Embedding/Conv modules: the head's out_proj
    model = tiny_roberta_classifier()
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["out_proj"]),
           adapter_name="sst2")
    lorakern.add_adapter(model, "mrpc", LoraConfig(r=2, lora_alpha=3, target_modules=["query", "key"],
                                                   modules_to_save=["out_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name or ".modules_to_save." in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    for layer in lora_layers(model).values():
        layer.backend = backend
    lorakern.save_adapter(model, str(tmp_path))
    peft = PeftModel.from_pretrained(tiny_roberta_classifier(), str(tmp_path / "sst2"), adapter_name="sst2")
    peft.load_adapter(str(tmp_path / "mrpc"), adapter_name="mrpc")
    peft.eval()
    model.eval()
    ids = torch.randint(3, 64, (6, 9), generator=torch.Generator().manual_seed(5))
    rows = ["mrpc", None, "sst2", "sst2", "mrpc", None]
    with torch.no_grad(), lorakern.adapter_rows(model, rows):
        ours = model(input_ids=ids).logits
    with torch.no_grad():
        theirs = peft(input_ids=ids, adapter_names=["__base__" if r is None else r for r in rows]).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # the rows differ by adapter (a model that ignored the rows, or swapped two adapters, would fail above)
    assert not torch.allclose(ours[0], ours[2]) and not torch.allclose(ours[1], ours[0])
    with torch.no_grad():
        swapped = peft(input_ids=ids, adapter_names=["sst2" if r == "mrpc" else "mrpc" if r == "sst2" else "__base__"
                                                     for r in rows]).logits
    assert not torch.allclose(ours, swapped, rtol=1e-5, atol=1e-6)
