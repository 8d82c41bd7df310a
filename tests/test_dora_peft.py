"""DoRA against PEFT both ways: PEFT's adapters load here with the same logits and gradients (the magnitude
keyed with or without its .weight suffix), ours load into PEFT, fresh magnitudes and two active adapters as
PEFT's, merge_and_unload, QLoRA + DoRA saved, reloaded and merged, GPT-2's Conv1D."""
import json

import torch
from torch import nn

from conftest import tiny_roberta_classifier
from lorakern import LoraConfig, inject, load_adapter, lora_layers, merge_and_unload, save_adapter


def _peft_dora(**overrides):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = dict(r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense"], use_dora=True)
    return get_peft_model(tiny_roberta_classifier(), PeftLoraConfig(**{**config, **overrides}))


def _perturb(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:  # inactive adapters too
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def _lora_grads(model, peft_names: bool) -> dict:
    """{(module, "A" | "B" | "m"): grad} of every LoRA tensor, keyed alike for PEFT's and lorakern's names."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None or "lora" not in name:
            continue
        name = name.removeprefix("base_model.model.")
        for tag, marks in (("A", (".lora_A.", ".lora_A")), ("B", (".lora_B.", ".lora_B")),
                           ("m", (".lora_magnitude_vector",))):
            if any(k in name for k in marks):
                module = name.split(".lora_")[0] if peft_names else name.split(".adapters.")[0]
                out[(module, tag)] = p.grad
    return out


def _step_grads(model, batch, peft_names):
    model.train()
    model.zero_grad()
    model(**batch, labels=torch.tensor([0, 1, 1])).loss.backward()
    return _lora_grads(model, peft_names)


def _assert_same_step_grads(theirs, ours, batch, count: int) -> None:
    """One training step's gradients of every A, B and magnitude: PEFT's model against ours, key by key."""
    expected, got = _step_grads(theirs, batch, True), _step_grads(ours, batch, False)
    assert set(got) == set(expected) and len(got) == count
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


def test_peft_dora_adapter_loads_here_with_the_same_logits_and_gradients(tmp_path, batch):
    theirs = _peft_dora()
    _perturb(theirs, seed=1)
    theirs.save_pretrained(str(tmp_path))
    ours = load_adapter(tiny_roberta_classifier(), str(tmp_path))
    assert all(layer.adapters["default"].use_dora for layer in lora_layers(ours).values())
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-5, atol=1e-6)
    _assert_same_step_grads(theirs, ours, batch, 3 * 2 * 3)  # 2 layers x 3 targets x (A, B, m)


def test_magnitude_keyed_with_weight_suffix_loads_too(tmp_path, batch):
    from safetensors.torch import load_file, save_file

    ours = inject(tiny_roberta_classifier(), LoraConfig(r=4, target_modules=["query"], use_dora=True))
    _perturb(ours, seed=8)
    save_adapter(ours, str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    renamed = {k + ".weight" if k.endswith("lora_magnitude_vector") else k: v for k, v in load_file(path).items()}
    save_file(renamed, path, metadata={"format": "pt"})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["lorakern"]["weights_sha256"] = None
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    fresh = load_adapter(tiny_roberta_classifier(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, ours(**batch).logits, rtol=0, atol=0)


def test_lorakern_dora_adapter_loads_into_peft(tmp_path, batch):
    from peft import PeftModel

    ours = inject(tiny_roberta_classifier(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                         use_dora=True))
    _perturb(ours, seed=2)
    save_adapter(ours, str(tmp_path))
    theirs = PeftModel.from_pretrained(tiny_roberta_classifier(), str(tmp_path), is_trainable=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, ours(**batch).logits, rtol=1e-5, atol=1e-6)
    # one training step's gradients of A, B and the magnitude, this direction too
    _assert_same_step_grads(theirs, ours, batch, 2 * 2 * 3)  # 2 layers x 2 targets x (A, B, m)


def test_fresh_dora_magnitude_equals_peft_init():
    theirs = _peft_dora(init_lora_weights=False)  # B random too: the norm of W + s B A, not just ||W||
    ours = inject(tiny_roberta_classifier(), LoraConfig(r=4, lora_alpha=8, target_modules=["query"], use_dora=True))
    for name, layer in lora_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        a = layer.adapters["default"]
        with torch.no_grad():
            a.lora_A.copy_(peft_layer.lora_A["default"].weight)
            a.lora_B.copy_(peft_layer.lora_B["default"].weight)
        layer.reset_magnitude("default")
        torch.testing.assert_close(a.lora_magnitude_vector, peft_layer.lora_magnitude_vector["default"].weight,
                                   rtol=1e-6, atol=1e-7)


def test_two_active_dora_adapters_compose_as_in_peft(tmp_path, batch):
    theirs = _peft_dora()
    from peft import LoraConfig as PeftLoraConfig

    theirs.add_adapter("b", PeftLoraConfig(r=2, lora_alpha=4, target_modules=["query"], use_dora=True))
    _perturb(theirs, seed=3)
    theirs.save_pretrained(str(tmp_path), selected_adapters=["default", "b"])
    theirs.base_model.set_adapter(["default", "b"])
    ours = load_adapter(tiny_roberta_classifier(), str(tmp_path))
    load_adapter(ours, str(tmp_path / "b"), adapter_name="b")
    from lorakern import set_adapter

    set_adapter(ours, ["default", "b"])
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-5, atol=1e-6)


def test_merge_and_unload_equals_peft(batch):
    theirs = _peft_dora()
    _perturb(theirs, seed=4)
    ours = inject(tiny_roberta_classifier(), LoraConfig(r=4, lora_alpha=8,
                                                         target_modules=["query", "value", "intermediate.dense"],
                                                         use_dora=True))
    ours.load_state_dict({k.replace(".lora_A.default.weight", ".adapters.default.lora_A")
                          .replace(".lora_B.default.weight", ".adapters.default.lora_B")
                          .replace(".lora_magnitude_vector.default.weight", ".adapters.default.lora_magnitude_vector")
                          .replace(".base_layer.", "."): v
                          for k, v in theirs.base_model.model.state_dict().items()})
    theirs.eval()
    with torch.no_grad():
        expected = theirs(**batch).logits
        merged_theirs = theirs.merge_and_unload()
        merged_ours = merge_and_unload(ours)
        torch.testing.assert_close(merged_ours(**batch).logits, expected, rtol=1e-5, atol=1e-6)
    for name, module in merged_theirs.named_modules():
        if isinstance(module, nn.Linear):
            torch.testing.assert_close(merged_ours.get_submodule(name).weight, module.weight, rtol=1e-6, atol=1e-7)


def test_qlora_dora_saves_reloads_and_merges_to_full_precision(tmp_path, batch):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], use_dora=True, quantize="nf4",
                        compute_dtype="float32")
    model = inject(tiny_roberta_classifier(), config)
    assert all(layer.is_quantized and layer.use_dora for layer in lora_layers(model).values())
    _perturb(model, seed=5)
    with torch.no_grad():
        expected = model(**batch).logits
        save_adapter(model, str(tmp_path))
        fresh = load_adapter(tiny_roberta_classifier(), str(tmp_path))
        torch.testing.assert_close(fresh(**batch).logits, expected, rtol=0, atol=0)
        merged = merge_and_unload(model)
        assert not lora_layers(merged)
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-5, atol=1e-6)


def test_gpt2_conv1d_dora_loads_into_peft_and_merges(tmp_path):
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    def base():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)).eval()

    model = inject(base(), LoraConfig(r=2, target_modules=["c_attn", "c_proj"], use_dora=True))
    assert all(layer.fan_in_fan_out and layer.use_dora for layer in lora_layers(model).values())
    _perturb(model, seed=6)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        save_adapter(model, str(tmp_path))
        theirs = PeftModel.from_pretrained(base(), str(tmp_path)).eval()
        torch.testing.assert_close(theirs(ids).logits, expected, rtol=1e-5, atol=1e-5)
        unloaded = merge_and_unload(model)
        assert type(unloaded.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
        torch.testing.assert_close(unloaded(ids).logits, expected, rtol=1e-4, atol=1e-5)
