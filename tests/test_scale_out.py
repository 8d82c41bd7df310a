"""lorakern inside PyTorch's and Hugging Face's own machinery: torch.compile, activation checkpointing,
transformers.Trainer, DDP and FSDP2 under torchrun, QLoRA under FSDP2 with sharded NF4 bytes, and the Triton
path (dense and NF4) as torch.library custom ops that torch.compile traces around."""
import copy
import os

import pytest
import torch

import lorakern
from torch import nn

from conftest import tiny_roberta_classifier
from lorakern import LoraConfig, LoraLinear, inject, load_adapter, lora_layers


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
    # aot_eager leaves the RNG ops unfunctionalised: the compiled graph draws dropout's mask from the global
    # generator in eager's order, so from the same torch.manual_seed both see the same mask and must agree
    torch.testing.assert_close(compiled_out, eager_out)
    assert eager_grads.keys() == {k.replace("_orig_mod.", "") for k in compiled_grads}
    for name, grad in compiled_grads.items():
        torch.testing.assert_close(grad, eager_grads[name.replace("_orig_mod.", "")])
    if dropout:  # ... and a mask was drawn: without it the output differs
        with torch.no_grad():
            assert not torch.allclose(model.eval()(x), eager_out)


def test_torch_compile_of_the_nf4_torch_path_has_no_graph_breaks_and_matches_eager():
    """QLoRA on the torch path (CPU): under tracing the NF4 weight is decoded by the torch decoder (the C codec
    is a ctypes call, eager-only), one graph with eager's output and gradients (eager decodes in C: the same
    fp32 values)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = LoraLinear.from_linear(nn.Linear(64, 24), quantize="nf4", blocksize=32, r=4, dropout=0.1).train()
    nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(2, 5, 64)
    compiled = torch.compile(copy.deepcopy(layer), backend="aot_eager", fullgraph=True)
    eager_out, eager_grads = (torch.manual_seed(2), _grads(layer, x))[1]
    compiled_out, compiled_grads = (torch.manual_seed(2), _grads(compiled, x))[1]
    torch.testing.assert_close(compiled_out, eager_out)
    assert eager_grads.keys() == {k.replace("_orig_mod.", "") for k in compiled_grads}
    for name, grad in compiled_grads.items():
        torch.testing.assert_close(grad, eager_grads[name.replace("_orig_mod.", "")], msg=name)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_ops():
    """lorakern's kernel module (its import registers the lorakern:: ops); skips without triton."""
    pytest.importorskip("triton")
    from lorakern.kernels import lora_linear

    return lora_linear


def _ops_in(graph: torch.fx.GraphModule, name: str) -> int:
    return sum(1 for node in graph.graph.nodes if node.op == "call_function" and name in str(node.target))


@pytest.mark.parametrize("dropout, seed", [(0.0, None), (0.1, 7), (0.1, None)],
                         ids=["no-dropout", "dropout-fixed-seed", "dropout-drawn-seed"])
def test_torch_compile_traces_around_the_triton_ops(dropout, seed):
    """The Triton path compiles as one graph holding the lorakern:: custom ops (interpreted on CPU, tiny shapes),
    with the same output and gradients (x, A, B, bias) as eager, bit for bit. A seed drawn per call (seed None)
    is a 0-d tensor from torch.randint in the graph: the same draws as eager under the same torch.manual_seed."""
    _triton_ops()
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = inject(Mlp(), LoraConfig(r=4, target_modules=["up", "down"], dropout=dropout, bias="all")).to(DEVICE)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B, std=0.1)
        layer.backend, layer.dropout_seed = "triton", seed
    model.train()
    x = torch.randn(8, 32, device=DEVICE)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    assert _ops_in(explanation.graphs[0], "lorakern.lora_linear_fwd") == 2
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager", fullgraph=True)
    results = []
    for module in (model, compiled):
        torch.manual_seed(1)
        xg = x.clone().requires_grad_(True)
        out, grads = _grads(module, xg)
        results.append((out, {**{k.replace("_orig_mod.", ""): g for k, g in grads.items()}, "x": xg.grad}))
    (eager_out, eager_grads), (compiled_out, compiled_grads) = results
    torch.testing.assert_close(compiled_out, eager_out, rtol=0, atol=0)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in compiled_grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=0, atol=0, msg=name)


FIRST_COMPILE = r"""
import sys
import torch
from torch import nn
from torch._dynamo.utils import counters
from lorakern import LoraConfig, inject
device = sys.argv[1]
model = inject(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)),
               LoraConfig(r=4, target_modules=["0", "2"], dropout=0.1)).to(device).train()
assert "lorakern.kernels.lora_linear" not in sys.modules
compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
for _ in range(2):
    compiled(torch.randn(6, 32, device=device)).sum().backward()
assert "lorakern.kernels.lora_linear" in sys.modules
assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
print("compiled once")
"""


def test_first_trace_loads_the_kernels_without_a_graph_break():
    """LORAKERN_BACKEND=triton and a fresh process: the kernel module is imported while dynamo traces the first
    call (outside the graph), in one graph that is not recompiled on the next call."""
    import os
    import subprocess
    import sys

    _triton_ops()
    env = dict(os.environ, LORAKERN_BACKEND="triton")
    if DEVICE == "cpu":
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-c", FIRST_COMPILE, DEVICE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "compiled once" in done.stdout, done.stderr[-3000:]


def test_compiled_triton_backward_saves_x_and_u_and_recomputes_neither():
    """AOTAutograd's partition of one layer: the forward saves x (M, K) and u = x~ A^T (M, r) besides the
    weights and the seed; the backward is the one lorakern::lora_linear_bwd call, with no matmul (W frozen)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    _triton_ops()
    torch._dynamo.reset()
    graphs = {}

    def capture(kind):
        def compiler(graph, example_inputs):
            graphs[kind] = graph
            return make_boxed_func(graph.forward)
        return compiler

    M, K, N, r = 20, 24, 12, 3
    layer = LoraLinear(K, N, r=r, dropout=0.1, device=DEVICE).train()
    layer.backend = "triton"
    compiled = torch.compile(layer, backend=aot_autograd(fw_compiler=capture("fwd"), bw_compiler=capture("bwd")),
                             fullgraph=True)
    compiled(torch.randn(M, K, device=DEVICE, requires_grad=True)).sum().backward()
    output = next(node for node in graphs["fwd"].graph.nodes if node.op == "output")
    saved = sorted(tuple(node.meta["val"].shape) for node in output.args[0][1:])  # the first output is y
    # W, A, B, the 0-d seed, x and u: what lorakern::lora_linear_fwd's setup_context saves, nothing more
    assert saved == sorted([(N, K), (r, K), (N, r), (), (M, K), (M, r)]), saved
    assert _ops_in(graphs["fwd"], "lorakern.lora_linear_fwd") == 1
    assert _ops_in(graphs["bwd"], "lorakern.lora_linear_bwd") == 1
    assert _ops_in(graphs["bwd"], "aten.mm") == 0 and _ops_in(graphs["fwd"], "aten.mm") == 0


def test_torch_compile_traces_the_triton_nf4_path():
    """QLoRA on the Triton path (W decoded inside the kernels) compiles without graph breaks and matches eager,
    with and without double quantization."""
    _triton_ops()
    for double_quant in (True, False):
        torch._dynamo.reset()
        torch.manual_seed(0)
        layer = LoraLinear.from_linear(nn.Linear(40, 24), quantize="nf4", blocksize=32, double_quant=double_quant,
                                       r=4, dropout=0.1).to(DEVICE)
        nn.init.normal_(layer.lora_B, std=0.1)
        layer.bias.requires_grad_(True)
        layer.backend = "triton"
        layer.train()
        x = torch.randn(2, 9, 40, device=DEVICE)
        explanation = torch._dynamo.explain(layer)(x)
        assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
        compiled = torch.compile(copy.deepcopy(layer), backend="aot_eager", fullgraph=True)
        eager_out, eager_grads = (torch.manual_seed(2), _grads(layer, x))[1]
        compiled_out, compiled_grads = (torch.manual_seed(2), _grads(compiled, x))[1]
        torch.testing.assert_close(compiled_out, eager_out, rtol=0, atol=0)
        for name, grad in compiled_grads.items():
            torch.testing.assert_close(grad, eager_grads[name.replace("_orig_mod.", "")], rtol=0, atol=0, msg=name)


def test_triton_custom_ops_pass_opcheck():
    """torch.library.opcheck: schema, autograd registration, fake (meta) implementations against the real ops
    (shapes, dtypes, strides) and AOT dispatch with dynamic shapes; dense and NF4 weights, both kernels' M."""
    from lorakern.quant import NF4Storage, quantize_nf4

    kl = _triton_ops()
    gen = torch.Generator().manual_seed(0)
    K, N, r = 12, 10, 3

    def make(*shape, grad=True):
        return torch.randn(*shape, generator=gen).to(DEVICE).requires_grad_(grad)

    W = make(N, K, grad=False)
    nf4 = NF4Storage(quantize_nf4(torch.randn(N, K, generator=gen), blocksize=32, double_quant=True)).to(DEVICE)
    for M in (5, 20):  # the split-K decoding kernel (M <= 16) and the tiled one
        x, b, A, B = make(M, K), make(N), make(r, K), make(N, r)
        for weight in (W, nf4):
            w, state, blocksize = kl._weight_parts(weight)
            seed = torch.tensor(7)
            torch.library.opcheck(torch.ops.lorakern.lora_linear_fwd.default,
                                  (x, w, b, A, B, 0.5, 0.25, seed, state, blocksize))
            with torch.no_grad():
                _, u = torch.ops.lorakern.lora_linear_fwd(x, w, b, A, B, 0.5, 0.25, seed, state, blocksize)
            g = torch.randn(M, N, generator=gen).to(DEVICE)
            for needs in ([True, True, True, True], [False, True, False, False]):
                torch.library.opcheck(torch.ops.lorakern.lora_linear_bwd.default,
                                      (g, x.detach(), u, w, A.detach(), B.detach(), 0.5, 0.25, seed, state,
                                       blocksize, needs))


def test_triton_ops_give_clear_errors_while_tracing():
    """A bad operand fails in the fake implementation, at trace time, with the launcher's message."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    kl = _triton_ops()
    with FakeTensorMode():
        x, W, A, B = torch.empty(3, 7), torch.empty(4, 8), torch.empty(2, 8), torch.empty(4, 2)
        with pytest.raises(ValueError, match=r"shapes do not fit: x \(3, 7\)"):
            torch.ops.lorakern.lora_linear_fwd(x, W, None, A, B, 1.0, 0.0, torch.tensor(0), [], 0)
    with pytest.raises(ValueError, match=r"seed must be an int or a 0-d integer tensor, got a torch.float32"):
        kl.lora_linear_triton(torch.randn(3, 8), torch.randn(4, 8), None, torch.randn(2, 8), torch.randn(4, 2), 1.0,
                              0.1, torch.tensor(1.5))


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


def test_hugging_face_trainer_saves_adapters_through_its_own_checkpoints(tmp_path, batch):
    """Trainer with save_steps and SaveAdapterCallback: each checkpoint-N folder holds an adapter equal to
    Trainer's own full weights at step N, and the last one loads in lorakern and in PEFT with the trained
    model's outputs."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import Trainer, TrainingArguments

    from lorakern import SaveAdapterCallback

    config = LoraConfig(r=4, target_modules=["query", "value"], bias="all", modules_to_save=["classifier"])
    model = inject(tiny_roberta_classifier(), config)
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 64, (11,), generator=gen), "attention_mask": torch.ones(11, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(32)]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    out = tmp_path / "trainer"
    args = TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-2,
                             report_to=[], save_strategy="steps", save_steps=3, use_cpu=True, logging_steps=1,
                             disable_tqdm=True)
    result = Trainer(model=model, args=args, train_dataset=rows, callbacks=[SaveAdapterCallback()]).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits

    def outputs(loaded):
        with torch.no_grad():
            return loaded.eval()(**batch).logits

    for step in (3, 6):  # the adapter of checkpoint-N is Trainer's own full checkpoint at step N
        folder = out / f"checkpoint-{step}"
        assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors"} <= set(os.listdir(folder))
        full = inject(tiny_roberta_classifier(), config)
        full.load_state_dict(load_file(str(folder / "model.safetensors")))
        torch.testing.assert_close(outputs(load_adapter(tiny_roberta_classifier(), str(folder))), outputs(full),
                                   rtol=0, atol=0)
    last = str(out / "checkpoint-6")
    torch.testing.assert_close(outputs(load_adapter(tiny_roberta_classifier(), last)), expected, rtol=0, atol=0)
    torch.testing.assert_close(outputs(PeftModel.from_pretrained(tiny_roberta_classifier(), last)), expected,
                               rtol=1e-5, atol=1e-6)
    assert not torch.equal(outputs(load_adapter(tiny_roberta_classifier(), str(out / "checkpoint-3"))), expected)
    # at the end: the adapter in output_dir, as trainer.save_model() leaves a PeftModel's
    torch.testing.assert_close(outputs(load_adapter(tiny_roberta_classifier(), str(out))), expected, rtol=0, atol=0)


def test_save_adapter_callback_needs_the_model_and_lorakern_never_needs_transformers(tmp_path):
    import subprocess
    import sys

    from transformers import TrainerControl, TrainerState, TrainingArguments

    from lorakern.integrations import SaveAdapterCallback

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="SaveAdapterCallback.on_save got no model; pass it to Trainer"):
        SaveAdapterCallback().on_save(args, TrainerState(), TrainerControl())
    code = ("import sys, lorakern; from lorakern import LoraConfig, inject, save_adapter, load_adapter; "
            "assert 'transformers' not in sys.modules")
    ran = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-2000:]


WORKER = r'''
# One process of the distributed tests: `worker.py OUT MODE`, MODE ddp, fsdp, or fsdp-nf4-<quant_storage>
# (QLoRA, the packed NF4 bytes held in that float dtype); without torchrun's RANK it trains alone on the
# global batch (the reference curve). The tests exec this file for model_and_data (no __main__ there).
import json, os, sys
import torch, torch.distributed as dist
from torch import nn
from lorakern import LoraConfig, inject, lora_layers, save_adapter
from lorakern.quant import NF4Storage

# fp32 words whose bytes read as NaN (signalling and quiet), -NaN, inf and a subnormal in fp32, and whose
# 16-bit halves are signalling NaNs, inf or subnormals in bf16 / fp16.
SPECIAL_WORDS = [0x7F817F81, 0xFF80FF81, 0x7FC07C01, 0x7F800001, 0x00010001, 0x7C017F80]

def storages(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, NF4Storage)}

def model_and_data(mode):
    torch.manual_seed(0)
    quant_storage = mode.split("-nf4-")[1] if "-nf4-" in mode else None
    # QLoRA: sizes whose packed bytes (1166, 473) fill no whole number of fp32 elements and split unevenly.
    sizes = (37, 63, 15) if quant_storage else (32, 64, 16)
    model = nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.ReLU(), nn.Linear(sizes[1], sizes[2]))
    quant = dict(quantize="nf4", quant_storage=quant_storage) if quant_storage else {}
    inject(model, LoraConfig(r=4, target_modules=["0", "2"], bias="lora_only", **quant))
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B, std=0.1)
    gen = torch.Generator().manual_seed(1)
    for storage in storages(model).values():
        # Any byte is a valid pair of NF4 codes: random bytes, led by words that a value conversion
        # on the way (a cast, a NaN-canonicalising copy) would change, must survive sharding bit for bit.
        special = torch.tensor(SPECIAL_WORDS, dtype=torch.int64).to(torch.int32).view(torch.uint8)
        codes = torch.randint(0, 256, (storage.packed.numel(),), generator=gen, dtype=torch.uint8)
        codes[: special.numel()] = special
        storage.packed.copy_(codes.reshape(-1, 1))  # a view of packed_storage: writes its bytes
    xs, ys = torch.randn(5, 16, sizes[0], generator=gen), torch.randn(5, 16, sizes[2], generator=gen)
    if quant_storage:  # one global batch five times, so that the loss must fall at every step
        xs, ys = xs[:1].expand_as(xs), ys[:1].expand_as(ys)
    return model, xs, ys

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

def probe(model, xs):
    # Every rank runs it under FSDP (the forward all-gathers); rank 0's output is compared in the test.
    model.eval()
    with torch.no_grad():
        return model(torch.randn(4, xs.shape[-1], generator=torch.Generator().manual_seed(3)))

def nf4_state(model):
    # The NF4 entries of state_dict() (bitsandbytes' keys, uint8 bytes): gathered from the shards on every rank.
    return {k: v for k, v in model.state_dict().items() if ".weight" in k}

def main():
    out, mode = sys.argv[1], sys.argv[2]
    folder = os.path.dirname(out)
    model, xs, ys = model_and_data(mode)
    if "RANK" not in os.environ:
        with open(out, "w") as handle:
            json.dump({"losses": train(model, xs, ys)}, handle)
        torch.save(model.state_dict(), os.path.join(folder, "single.pt"))
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
        shards = {}
        for name, storage in storages(model).items():
            stored = storage.packed_storage
            rows = [None] * world
            dist.all_gather_object(rows, stored.to_local().shape[0] if type(stored).__name__ == "DTensor" else None)
            shards[name] = {"rows": rows, "global_rows": stored.shape[0], "itemsize": stored.element_size(),
                            "packed_bytes": (storage.numel + 1) // 2, "dtype": str(stored.dtype)}
        result["nf4_shards"] = shards
    result["losses"] = train(wrapped, xs, ys, rank, world)
    save_adapter(model, os.path.join(folder, "adapter"))  # every rank: shards are gathered
    if storages(model):
        state = nf4_state(model)
        output = probe(model, xs)
        errors = result["sharded_errors"] = []
        try:  # between forwards the bytes are sharded: reading them must say so, not return a shard
            model[0].nf4.packed
        except ValueError as exc:
            errors.append(str(exc))
        try:
            model.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            errors.append(str(exc))
        if rank == 0:
            torch.save({"nf4_state": state, "probe": output}, os.path.join(folder, "ranks.pt"))
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

if __name__ == "__main__":
    main()
'''


def _worker() -> dict:
    # The worker's definitions (model_and_data, probe, ...) in this process, without running its main().
    namespace = {"__name__": "worker"}
    exec(compile(WORKER, "worker.py", "exec"), namespace)
    return namespace


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


@pytest.mark.parametrize("quant_storage", ["float32", "bfloat16"])
def test_fsdp2_shards_the_nf4_bytes_and_matches_one_process(tmp_path, quant_storage):
    """QLoRA under fully_shard on CPU (gloo), the packed NF4 bytes held in a float Parameter: each rank
    holds its dim-0 chunk of them, the loss curve is the single-process one, the bytes gathered back
    are the original ones, and the adapter saved from the sharded model gives its outputs alone."""
    one, two = _single_and_two_ranks(tmp_path, f"fsdp-nf4-{quant_storage}")
    assert two["sharded"]
    assert set(two["nf4_shards"]) == {"0.nf4", "2.nf4"}
    for name, shard in two["nf4_shards"].items():
        assert shard["dtype"] == f"torch.{quant_storage}", name
        rows = -(-shard["packed_bytes"] // shard["itemsize"])  # the bytes, padded to whole elements
        assert shard["global_rows"] == rows
        assert shard["rows"] == [-(-rows // 2), rows - -(-rows // 2)], (name, shard)  # torch.chunk's split
    assert len(two["sharded_errors"]) == 2, two["sharded_errors"]
    assert "are sharded by FSDP2" in two["sharded_errors"][0] and "full_packed()" in two["sharded_errors"][0]
    assert "load the state dict into the model before fully_shard" in two["sharded_errors"][1]
    assert all(b < a for a, b in zip(one["losses"], one["losses"][1:])), one["losses"]
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6)

    single = torch.load(tmp_path / "single.pt")
    ranks = torch.load(tmp_path / "ranks.pt")
    assert ranks["nf4_state"]["0.weight"].dtype == torch.uint8
    assert ranks["nf4_state"].keys() == {k for k in single if ".weight" in k}
    for key, value in ranks["nf4_state"].items():
        assert torch.equal(value, single[key]), key

    worker = _worker()
    fresh, xs, _ = worker["model_and_data"](f"fsdp-nf4-{quant_storage}")
    # fresh has an untrained adapter "default" already; the saved one comes in beside it and is made active
    load_adapter(fresh, str(tmp_path / "adapter"), adapter_name="loaded")
    lorakern.set_adapter(fresh, "loaded")
    torch.testing.assert_close(worker["probe"](fresh, xs), ranks["probe"], rtol=1e-6, atol=1e-7)
    trained, _, _ = worker["model_and_data"](f"fsdp-nf4-{quant_storage}")
    trained.load_state_dict(single)
    torch.testing.assert_close(worker["probe"](fresh, xs), worker["probe"](trained, xs), rtol=1e-5, atol=1e-6)
