"""LoRA+ (Hayou et al., 2024): B learns ``loraplus_lr_ratio`` times faster than A.

The parameter groups are PEFT 0.21's ``peft.optimizers.create_loraplus_optimizer``, rule for rule, over
the trainable parameters:

    embedding LoRA tensors (lora_embedding_A / _B)   lr = loraplus_lr_embedding   decay = loraplus_weight_decay
    names containing "lora_B", and every 1-D tensor   lr = lr * ratio              decay = loraplus_weight_decay,
                                                                                   0 for biases and LayerNorm tensors
    everything else (lora_A, 2-D modules_to_save)    lr = lr                      decay = loraplus_weight_decay

("decay" parameters are transformers' rule: not inside an nn.LayerNorm and no "bias" in the name.)
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lorakern.errors import LorakernError


def _decay_names(module: nn.Module, prefix: str = "") -> set[str]:
    """Parameter names outside any nn.LayerNorm (transformers' get_parameter_names(model, [LayerNorm]))."""
    names = set()
    for child_name, child in module.named_children():
        if not isinstance(child, nn.LayerNorm):
            names |= _decay_names(child, f"{prefix}{child_name}.")
    names.update(f"{prefix}{name}" for name in module._parameters)
    return names


def _positive_finite(value: object) -> bool:
    # an infinite rate trains B to inf/NaN without an error; True would pass as the ratio 1
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value)


def check_loraplus_lr_ratio(loraplus_lr_ratio: object) -> None:
    """Raise LorakernError unless ``loraplus_lr_ratio`` is a positive, finite number (not a bool): the one
    check of the ratio, made by loraplus_param_groups and by the harness's TrainConfig."""
    if not _positive_finite(loraplus_lr_ratio):
        raise LorakernError(f"loraplus_lr_ratio must be a positive number (B's learning rate over A's, finite), got "
                            f"{loraplus_lr_ratio!r}; LoRA+ suggests 16 (values below 1 make B the slower factor)")


def _is_embedding_lora(name: str) -> bool:
    return any(part.startswith("lora_embedding_") for part in name.split("."))


def loraplus_param_groups(model: nn.Module, lr: float, loraplus_lr_ratio: float = 16.0,
                          loraplus_weight_decay: float = 0.0, loraplus_lr_embedding: float = 1e-6) -> list[dict]:
    """The four groups of PEFT's LoRA+ (A, embedding, B with decay, B without), in PEFT's order."""
    check_loraplus_lr_ratio(loraplus_lr_ratio)
    if not _positive_finite(lr):
        raise LorakernError(f"lr must be a positive number (A's learning rate, finite), got {lr!r}")
    decay = {name for name in _decay_names(model) if "bias" not in name}
    groups: dict[str, dict[str, torch.Tensor]] = {"A": {}, "embedding": {}, "B": {}, "B_no_decay": {}}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if _is_embedding_lora(name):
            groups["embedding"][name] = param
        elif "lora_B" in name or param.ndim == 1:
            groups["B" if name in decay else "B_no_decay"][name] = param
        else:
            groups["A"][name] = param
    if not any(groups.values()):
        raise LorakernError(f"{type(model).__name__} has no trainable parameters; inject LoRA (lorakern.inject) first")
    settings = {"A": (lr, loraplus_weight_decay), "embedding": (loraplus_lr_embedding, loraplus_weight_decay),
                "B": (lr * loraplus_lr_ratio, loraplus_weight_decay), "B_no_decay": (lr * loraplus_lr_ratio, 0.0)}
    return [{"params": list(groups[key].values()), "lr": settings[key][0], "weight_decay": settings[key][1]}
            for key in ("A", "embedding", "B", "B_no_decay")]


def loraplus_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], lr: float,
                       loraplus_lr_ratio: float = 16.0, loraplus_weight_decay: float = 0.0,
                       loraplus_lr_embedding: float = 1e-6, **kwargs: Any) -> torch.optim.Optimizer:
    """``optimizer_cls`` over the model's trainable parameters in LoRA+'s groups (PEFT's
    create_loraplus_optimizer); ``kwargs`` go to the optimizer (betas, eps, ...). Each group sets its own
    weight_decay, so a ``weight_decay`` in kwargs is overridden, as in PEFT."""
    groups = loraplus_param_groups(model, lr, loraplus_lr_ratio, loraplus_weight_decay, loraplus_lr_embedding)
    return optimizer_cls(groups, lr=lr, **kwargs)


__all__ = ["check_loraplus_lr_ratio", "loraplus_optimizer", "loraplus_param_groups"]
