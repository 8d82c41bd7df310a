"""Inits from the base weight, refused: bad configs and layers name the fix, a weight conversion refuses
before writing anything, a second base-rewriting adapter on the same layer is refused and a failed
injection leaves the model as it was."""
import os

import pytest
import torch
from torch import nn

import lorakern
from lorakern import LoraConfig, inject, lora_layers
from lorakern.errors import AdapterError, ConfigError, LorakernError
from lorakern.layer import LoraLinear
from toy_models import InitToy


class WithEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.q = nn.Linear(8, 8)


def test_bad_input_names_the_fix(tmp_path):
    with pytest.raises(LorakernError, match=r"init_lora_weights='pissa' decomposes the weight of a Linear.*Embedding"):
        inject(WithEmbedding(), LoraConfig(target_modules=["emb", "q"], init_lora_weights="pissa"))
    with pytest.raises(ConfigError, match="loftq.*quantize='nf4'"):
        LoraConfig(target_modules=["q"], init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    with pytest.raises(ConfigError, match="loftq_config must be specified"):
        LoraConfig(target_modules=["q"], init_lora_weights="loftq", quantize="nf4")
    with pytest.raises(ConfigError, match="loftq_bits=8.*use loftq_bits=4"):
        LoraConfig(target_modules=["q"], init_lora_weights="loftq", quantize="nf4", loftq_config={"loftq_bits": 8})
    with pytest.raises(LorakernError, match="keep the layer out of quantize_skip"):
        inject(InitToy(), LoraConfig(target_modules=["q"], init_lora_weights="loftq", quantize="nf4", quantize_skip=["q"],
                                 loftq_config={"loftq_iter": 1}))
    with pytest.raises(ConfigError, match="full precision; inject with quantize='nf4'"):
        LoraLinear(8, 8, init="loftq")
    with pytest.raises(ConfigError, match=r"r=9 directions of a \(8, 20\).*use r <= 8"):
        LoraLinear(20, 8, r=9, init="pissa")
    with pytest.raises(ConfigError, match="pissa_niter_4"):
        LoraConfig(target_modules=["q"], init_lora_weights="pissa_niter_x")
    model = inject(InitToy(), LoraConfig(r=2, target_modules=["q"], init_lora_weights="olora"))
    with pytest.raises(ConfigError, match="cannot be reset"):
        model.q.reset_lora_parameters()
    # conversion: no initial adapter, a mismatched one, nothing to convert
    with pytest.raises(AdapterError, match="no initial adapter 'default'.*save the adapter right after lorakern.inject"):
        lorakern.save_adapter(model, str(tmp_path / "out"), path_initial_model_for_weight_conversion=str(tmp_path / "no"))
    other = inject(InitToy(), LoraConfig(r=3, target_modules=["q"], init_lora_weights="olora"))
    lorakern.save_adapter(other, str(tmp_path / "other"))
    with pytest.raises(AdapterError, match="does not match adapter 'default'.*differ in shape"):
        lorakern.save_adapter(model, str(tmp_path / "out"), path_initial_model_for_weight_conversion=str(tmp_path / "other"))
    plain = inject(InitToy(), LoraConfig(r=2, target_modules=["q"]))
    with pytest.raises(AdapterError, match="converts PiSSA.*save without it"):
        lorakern.save_adapter(plain, str(tmp_path / "out"), path_initial_model_for_weight_conversion=str(tmp_path / "other"))
    assert not os.path.exists(tmp_path / "out")  # every refusal came before anything was written
    with pytest.warns(UserWarning, match="cannot be converted"):
        rs = LoraConfig(target_modules=["q"], init_lora_weights="pissa", use_rslora=True, rank_pattern={"q": 2})
    rs_model = inject(InitToy(), rs)
    lorakern.save_adapter(rs_model, str(tmp_path / "rs_init"))
    with pytest.raises(AdapterError, match="use_rslora with rank_pattern"):
        lorakern.save_adapter(rs_model, str(tmp_path / "out"), path_initial_model_for_weight_conversion=str(tmp_path / "rs_init"))


def test_a_second_base_rewriting_adapter_is_refused_and_the_model_is_left_as_it_was():
    model = inject(InitToy(), LoraConfig(r=2, target_modules=["q", "v"], init_lora_weights="pissa"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match=r"rewrites this layer's base weight.*adapters \['default'\]"), \
            pytest.warns(UserWarning, match="do not combine as plain LoRAs do"):
        lorakern.add_adapter(model, "b", LoraConfig(r=2, target_modules=["v"], init_lora_weights="olora"))
    after = model.state_dict()
    assert list(model.lorakern_configs) == ["default"] and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.warns(UserWarning, match="do not combine as plain LoRAs do"):  # another layer: allowed, as in PEFT
        lorakern.add_adapter(model, "c", LoraConfig(r=2, target_modules=["head"]))
    assert list(model.lorakern_configs) == ["default", "c"]
    # a failed injection puts the wrapped modules back with their weights untouched
    toy = InitToy()
    original = {k: v.clone() for k, v in toy.state_dict().items()}
    with pytest.raises(ConfigError, match="use r <= 3"):
        inject(toy, LoraConfig(r=4, target_modules=["q", "head"], init_lora_weights="pissa"))
    assert all(torch.equal(original[k], v) for k, v in toy.state_dict().items()) and not lora_layers(toy)
