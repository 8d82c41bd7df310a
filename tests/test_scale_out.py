"""lorakern inside PyTorch's and Hugging Face's own machinery: torch.compile, activation checkpointing,
transformers.Trainer, DDP and FSDP2 under torchrun (QLoRA under FSDP2 and the Triton path as custom ops are
still to come)."""
import copy

import pytest
import torch
from torch import nn

from conftest import tiny_roberta_classifier
from lorakern import LoraConfig, inject, load_adapter, lora_layers, save_adapter


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _grads(model, x):
    out = model(x)
    out.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_torch_compile_has_no_graph_breaks_and_matches_eager(dropout):
    torch.manual_seed(0)
    model = inject(Mlp(), LoraConfig(r=4, target_modules=["up", "down"], dropout=dropout, bias="all")).train()
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(8, 32)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager")
    torch.manual_seed(1)
    eager_out, eager_grads = _grads(model, x)
    torch.manual_seed(1)
    compiled_out, compiled_grads = _grads(compiled, x)
    if dropout == 0:  # with dropout the compiled graph draws its own mask
        torch.testing.assert_close(compiled_out, eager_out)
        assert eager_grads.keys() == {k.replace("_orig_mod.", "") for k in compiled_grads}
        for name, grad in compiled_grads.items():
            torch.testing.assert_close(grad, eager_grads[name.replace("_orig_mod.", "")])
    else:
        assert compiled_out.shape == eager_out.shape and torch.isfinite(compiled_out).all()


def test_activation_checkpointing_gives_the_same_gradients(batch):
    """use_reentrant=False replays the forward with the saved RNG state: the LoRA dropout mask repeats."""
    config = LoraConfig(r=4, target_modules=["query", "value"], dropout=0.1, modules_to_save=["classifier"])
    labels = torch.tensor([0, 1, 1])

    def grads(checkpointing):
        model = inject(tiny_roberta_classifier(), config).train()
        for layer in lora_layers(model).values():
            nn.init.normal_(layer.lora_B, std=0.1)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(3)
        loss = nn.functional.cross_entropy(model(**batch).logits, labels)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain_loss, plain = grads(False)
    checkpointed_loss, checkpointed = grads(True)
    torch.testing.assert_close(checkpointed_loss, plain_loss)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_hugging_face_trainer(tmp_path, batch):
    from peft import PeftModel
    from transformers import Trainer, TrainingArguments

    model = inject(tiny_roberta_classifier(), LoraConfig(r=4, target_modules=["query", "value"], bias="all",
                                                         modules_to_save=["classifier"]))
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 64, (11,), generator=gen), "attention_mask": torch.ones(11, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(32)]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=6, per_device_train_batch_size=8,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
                             disable_tqdm=True)
    result = Trainer(model=model, args=args, train_dataset=rows).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    save_adapter(model, str(tmp_path / "adapter"))
    ours = load_adapter(tiny_roberta_classifier(), str(tmp_path / "adapter")).eval()
    peft_model = PeftModel.from_pretrained(tiny_roberta_classifier(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(peft_model(**batch).logits, expected, rtol=1e-5, atol=1e-6)


WORKER = r'''
# One process of the distributed tests: `worker.py OUT MODE`, MODE ddp or fsdp; without torchrun's
# RANK it trains alone on the global batch (the reference curve).
import json, os, sys
import torch, torch.distributed as dist
from torch import nn
from lorakern import LoraConfig, inject, lora_layers, save_adapter

def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    inject(model, LoraConfig(r=4, target_modules=["0", "2"], bias="lora_only"))
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B, std=0.1)
    gen = torch.Generator().manual_seed(1)
    return model, torch.randn(5, 16, 32, generator=gen), torch.randn(5, 16, 16, generator=gen)

def train(model, xs, ys, rank=0, world=1):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for x, y in zip(xs, ys):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x.chunk(world)[rank]), y.chunk(world)[rank])
        loss.backward()
        optimizer.step()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses

out, mode = sys.argv[1], sys.argv[2]
model, xs, ys = model_and_data()
if "RANK" not in os.environ:
    with open(out, "w") as handle:
        json.dump({"losses": train(model, xs, ys)}, handle)
    torch.save(model.state_dict(), os.path.join(os.path.dirname(out), "single.pt"))
    sys.exit(0)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
result = {}
if mode == "ddp":
    from torch.nn.parallel import DistributedDataParallel
    wrapped = DistributedDataParallel(model)
    result["trainable_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    result["reduced_bytes"] = wrapped._get_ddp_logging_data()["total_parameter_size_bytes"]
else:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    wrapped = fully_shard(model, mesh=mesh)
    result["sharded"] = all(type(layer.lora_A).__name__ == "DTensor" for layer in lora_layers(model).values())
result["losses"] = train(wrapped, xs, ys, rank, world)
save_adapter(model, os.path.join(os.path.dirname(out), "adapter"))  # every rank: shards are gathered
if rank == 0:
    with open(out, "w") as handle:
        json.dump(result, handle)
# DDP's reducer holds the process group: release it first. Even so, gloo's threads can abort the
# interpreter's teardown ("terminate called without an active exception") once in a few runs: the
# results are written, so leave without running destructors.
del wrapped, model
dist.barrier()
dist.destroy_process_group()
os._exit(0)
'''


def _single_and_two_ranks(tmp_path, mode: str) -> tuple[dict, dict]:
    # (the single-process result, rank 0's result of the 2-rank torchrun run)
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "single.json"), mode], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(script), str(tmp_path / "ranks.json"), mode], env=env, capture_output=True,
                           text=True, timeout=300)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    return json.loads((tmp_path / "single.json").read_text()), json.loads((tmp_path / "ranks.json").read_text())


def test_ddp_two_ranks_match_one_process(tmp_path):
    """torchrun --nproc_per_node 2 on gloo: the same loss curve as one process on the global batch, and
    only the trainable (LoRA) parameters are all-reduced."""
    one, two = _single_and_two_ranks(tmp_path, "ddp")
    assert two["reduced_bytes"] == two["trainable_bytes"] > 0
    assert one["losses"][-1] < one["losses"][0]
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6)


def test_fsdp2_two_ranks_match_one_process_and_the_adapter_loads_alone(tmp_path):
    """fully_shard on CPU (gloo): the single-process loss curve, and the adapter saved from the sharded
    model (every rank calls save_adapter, rank 0 writes) loads into a plain model with the same outputs."""
    one, two = _single_and_two_ranks(tmp_path, "fsdp")
    assert two["sharded"]
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6)

    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    load_adapter(fresh, str(tmp_path / "adapter"))
    trained = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    inject(trained, LoraConfig(r=4, target_modules=["0", "2"], bias="lora_only"))
    trained.load_state_dict(torch.load(tmp_path / "single.pt"))
    probe = torch.randn(4, 32)
    torch.testing.assert_close(fresh(probe), trained(probe), rtol=1e-5, atol=1e-6)
