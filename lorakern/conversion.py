"""A trained PiSSA / OLoRA adapter as a plain LoRA adapter on the ORIGINAL base weight (PEFT's
``save_pretrained(..., path_initial_model_for_weight_conversion=...)``).

At init the base became W_res = W - s B0 A0; after training the model computes W_res + s B A, i.e.

    W + s (B A - B0 A0) = W + s [B | -B0] [A ; A0]

a LoRA of rank 2r on W: A' = [A ; A0] (rows), B' = [B | -B0] (columns). Its config doubles r and
lora_alpha (alpha * sqrt(2) with rsLoRA) so s stays the same, doubles every rank_pattern / alpha_pattern
value, and says init_lora_weights=True: it loads anywhere, next to other adapters, on the original base.
As in PEFT, rsLoRA together with rank_pattern / alpha_pattern cannot be converted (the doubled patterns
would change s).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Callable, Optional

import torch

from lorakern.config import LoraConfig
from lorakern.errors import AdapterError
from lorakern.inits import rewrites_base

CONVERTIBLE = "PiSSA ('pissa', 'pissa_niter_K') or OLoRA ('olora')"


def convertible(config: LoraConfig) -> bool:
    return rewrites_base(config.init) and config.init != "loftq"


def _how_to_save_initial(path: str) -> str:
    return (f"save the adapter right after lorakern.inject (before any training step) with "
            f"lorakern.save_adapter(model, {path!r}), then pass that directory here")


def read_initial(configs: dict[str, LoraConfig], directories: dict[str, str], path: str,
                 live: Callable[[str], dict[str, torch.Tensor]],
                 read: Callable[[str], Optional[dict[str, torch.Tensor]]]) -> dict[str, dict[str, torch.Tensor]]:
    """The initial lora_A / lora_B of every PiSSA / OLoRA adapter in ``configs``, read (``read(directory)``,
    None when no weights file is there) from ``directories[name]`` under ``path`` and checked against the
    adapter's live tensors (``live(name)``). Adapters with other inits are saved as they are; none to
    convert is an error."""
    targets = [name for name, config in configs.items() if convertible(config)]
    if not targets:
        inits = {name: config.init for name, config in configs.items()}
        raise AdapterError(f"path_initial_model_for_weight_conversion converts {CONVERTIBLE} adapters, but the adapters "
                           f"saved have inits {inits}; save without it (a LoftQ adapter belongs to its NF4 base: "
                           f"load_adapter rebuilds that base)")
    initial = {}
    for name in targets:
        config, directory = configs[name], directories[name]
        if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
            raise AdapterError(f"adapter {name!r} uses use_rslora with rank_pattern/alpha_pattern: its conversion to a "
                               f"plain LoRA cannot keep the scaling (PEFT refuses it too); save it without "
                               f"path_initial_model_for_weight_conversion")
        if config.quantize:
            warnings.warn(f"adapter {name!r} was initialised on an NF4 base holding NF4(W_res): the converted adapter on "
                          f"NF4(W) gives NF4(W) + s(B A - B0 A0), which differs from the trained NF4(W_res) + s B A by "
                          f"the two quantization errors (PEFT warns the same)", stacklevel=3)
        weights = read(directory)
        if weights is None:
            raise AdapterError(f"no initial adapter {name!r} in {directory!r}: converting a {config.init!r} adapter "
                               f"needs its values at init; {_how_to_save_initial(path)}")
        tensors = {k: t for k, t in live(name).items() if k.endswith((".lora_A.weight", ".lora_B.weight"))}
        problems = [k for k in tensors if k not in weights or weights[k].shape != tensors[k].shape]
        if problems:
            found = tuple(weights[problems[0]].shape) if problems[0] in weights else "missing"
            raise AdapterError(f"the initial adapter in {directory!r} does not match adapter {name!r}: {len(problems)} "
                               f"of its lora_A/lora_B tensors are missing or differ in shape, e.g. {problems[0]} "
                               f"(file: {found}, model: {tuple(tensors[problems[0]].shape)}); "
                               f"{_how_to_save_initial(path)}")
        initial[name] = {k: weights[k] for k in tensors}
    return initial


def converted_config(config: LoraConfig) -> LoraConfig:
    """The config of the rank-2r plain LoRA: same scaling s for every layer, init_lora_weights=True."""
    alpha = config.lora_alpha
    if config.use_rslora:
        # s = alpha / sqrt(r) must hold at rank 2r; alpha None meant alpha = r
        alpha = (config.r if alpha is None else alpha) * math.sqrt(2)
    elif alpha is not None:
        alpha = alpha * 2  # alpha None (= r) doubles with r by itself
    return dataclasses.replace(
        config, r=2 * config.r, lora_alpha=alpha, init_lora_weights=True,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()})


def convert(tensors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], config: LoraConfig
            ) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """``tensors`` (a save's, keyed as PEFT keys them) with every lora_A / lora_B replaced by its rank-2r
    conversion, and the converted config."""
    out = dict(tensors)
    for key, start in initial.items():
        trained = tensors[key]
        start = start.to(dtype=trained.dtype)
        if key.endswith(".lora_A.weight"):
            out[key] = torch.cat([trained, start], dim=0).contiguous()  # A' = [A ; A0]
        else:
            out[key] = torch.cat([trained, -start], dim=1).contiguous()  # B' = [B | -B0]
    return out, converted_config(config)


__all__ = ["convert", "converted_config", "convertible", "read_initial"]
