"""lorakern inside PyTorch's and Hugging Face's own machinery: torch.compile, activation checkpointing,
transformers.Trainer (issue 7's first parts; DDP and FSDP2 follow)."""
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
