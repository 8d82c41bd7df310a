"""Adapters in PEFT's on-disk format, and merge_and_unload.

A directory holds ``adapter_config.json`` (PEFT's LoraConfig fields) and ``adapter_model.safetensors``
with PEFT's keys: ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``, the biases chosen by
``bias`` (a LoRA layer's own bias as ``<module>.base_layer.bias``), and every tensor of the
modules_to_save under its plain path. lorakern adds a ``"lorakern"`` entry (PEFT drops unknown keys)
with the number of labels of a classification head and a checksum of the weights file.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Optional

import torch
from torch import nn

from lorakern._io import atomic_write_bytes
from lorakern.injection import LoraConfig, set_submodule, inject, lora_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Keys PEFT writes for its own wrappers (copies of tensors it also writes under the plain path).
_PEFT_WRAPPER_MARKERS = (".original_module.", ".modules_to_save.")
_PEFT_INIT = {"kaiming": True, "gaussian": "gaussian", "normal": True}


def _config_of(model: nn.Module) -> LoraConfig:
    config = getattr(model, "lorakern_config", None)
    if config is None or not lora_layers(model):
        raise ValueError(
            f"{type(model).__name__} has no LoRA layers; call lorakern.inject(model, config) "
            f"(or lorakern.load_adapter) before saving"
        )
    return config


def _saved_module_names(model: nn.Module, config: LoraConfig) -> list[str]:
    names = [n for n, _ in model.named_modules() if n and any(n.endswith(m) for m in config.modules_to_save or ())]
    return [n for n in names if not any(n.startswith(outer + ".") for outer in names)]


def _peft_key(model_key: str, lora_names: set[str]) -> str:
    module, _, attr = model_key.rpartition(".")
    if module in lora_names:
        if attr in ("lora_A", "lora_B"):
            return f"{PEFT_PREFIX}{module}.{attr}.weight"
        return f"{PEFT_PREFIX}{module}.base_layer.{attr}"
    return PEFT_PREFIX + model_key


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's live tensors that an adapter holds, keyed as PEFT keys them."""
    config = _config_of(model)
    layers = lora_layers(model)
    lora_names = set(layers)
    saved_modules = _saved_module_names(model, config)
    selected = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        module, _, attr = key.rpartition(".")
        take = (
            (module in lora_names and attr in ("lora_A", "lora_B"))
            or (attr == "bias" and config.bias == "all")
            or (attr == "bias" and config.bias == "lora_only" and module in lora_names)
            or any(key.startswith(name + ".") for name in saved_modules)
        )
        if take:
            selected[_peft_key(key, lora_names)] = tensor
    return selected


def _num_labels(model: nn.Module) -> Optional[int]:
    model_config = getattr(model, "config", None)
    num_labels = getattr(model_config, "num_labels", None) or getattr(model, "num_labels", None)
    return int(num_labels) if num_labels else None


def _head_modules(model: nn.Module, config: LoraConfig, num_labels: Optional[int]) -> list[str]:
    """Linear layers to save whose outputs are the labels: resized on load when the count differs."""
    if not num_labels:
        return []
    saved = _saved_module_names(model, config)
    return [
        name for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.out_features == num_labels
        and any(name == s or name.startswith(s + ".") for s in saved)
    ]


def _peft_config_dict(model: nn.Module, config: LoraConfig, weights_sha256: str) -> dict:
    layers = lora_layers(model)
    alpha = float(config.r if config.alpha is None else config.alpha)
    # Our alpha defaults to each layer's own r; PEFT's is global, so spell it out per pattern.
    alpha_pattern = dict(config.alpha_pattern)
    if config.alpha is None:
        for key, rank in config.rank_pattern.items():
            alpha_pattern.setdefault(key, rank)
    target = config.target_modules
    if isinstance(target, str) and target.lower() == "all-linear":
        target = sorted(layers)  # PEFT would re-resolve "all-linear" with its own exclusions
    num_labels = _num_labels(model)
    model_config = getattr(model, "config", None)
    from lorakern import __version__

    return {
        "peft_type": "LORA",
        "r": config.r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "use_dora": False,
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "init_lora_weights": _PEFT_INIT[config.init],
        "target_modules": target,
        "exclude_modules": config.exclude_modules,
        "modules_to_save": config.modules_to_save,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": alpha_pattern,
        "layers_to_transform": None,
        "layers_pattern": None,
        "task_type": config.task_type,
        "base_model_name_or_path": getattr(model_config, "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "lorakern": {
            "version": __version__,
            "init": config.init,
            "alpha": config.alpha,
            "num_labels": num_labels,
            "head_modules": _head_modules(model, config, num_labels),
            "weights_sha256": weights_sha256,
        },
    }


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2/DTensor shard (a collective), or the tensor itself."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else tensor


def save_adapter(model: nn.Module, directory: str) -> None:
    """Write the adapter of ``model`` to ``directory`` in PEFT's format (each file atomically).

    Under torch.distributed every rank calls it: sharded (FSDP2) tensors are gathered, rank 0 writes.
    """
    from safetensors.torch import save as safetensors_bytes

    config = _config_of(model)
    tensors = {k: _full(t).detach().to("cpu", copy=True).contiguous() for k, t in adapter_tensors(model).items()}
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return  # every rank gathered its shards above (a collective); rank 0 writes
    weights = safetensors_bytes(tensors, metadata={"format": "pt"})
    peft_config = _peft_config_dict(model, config, hashlib.sha256(weights).hexdigest())
    os.makedirs(directory, exist_ok=True)
    # Weights first, config last: the config's checksum tells a reader if a save stopped between them.
    atomic_write_bytes(os.path.join(directory, WEIGHTS_NAME), weights)
    atomic_write_bytes(
        os.path.join(directory, CONFIG_NAME),
        (json.dumps(peft_config, indent=2, sort_keys=True) + "\n").encode("utf-8"),
    )


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"no {CONFIG_NAME} in {directory!r}; point load_adapter at a directory written by "
                         f"save_adapter or PEFT's save_pretrained")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); re-save the adapter") from exc
    if not isinstance(data, dict) or data.get("peft_type") != "LORA":
        raise ValueError(f"{path} describes peft_type={data.get('peft_type') if isinstance(data, dict) else data!r}; "
                         f"lorakern loads LoRA adapters only (peft_type 'LORA')")
    if data.get("use_dora"):
        raise ValueError(f"{path} is a DoRA adapter (use_dora=true); lorakern loads plain LoRA adapters only")
    return data


def config_from_peft(data: dict) -> LoraConfig:
    """A LoraConfig from the fields of a PEFT adapter_config.json."""
    ours = data.get("lorakern") or {}
    init = ours.get("init") or ("gaussian" if data.get("init_lora_weights") == "gaussian" else "kaiming")
    return LoraConfig(
        r=int(data.get("r", 8)),
        alpha=ours["alpha"] if "alpha" in ours else data.get("lora_alpha", 8),
        dropout=float(data.get("lora_dropout") or 0.0),
        target_modules=data.get("target_modules"),
        exclude_modules=data.get("exclude_modules"),
        bias=data.get("bias") or "none",
        modules_to_save=data.get("modules_to_save"),
        rank_pattern=dict(data.get("rank_pattern") or {}),
        alpha_pattern=dict(data.get("alpha_pattern") or {}),
        use_rslora=bool(data.get("use_rslora", False)),
        init=init,
        task_type=data.get("task_type"),
    )


def _read_weights(directory: str, expected_sha256: Optional[str]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as safetensors_load

    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"no {WEIGHTS_NAME} in {directory!r}; the adapter directory is incomplete")
    with open(path, "rb") as handle:
        data = handle.read()
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ValueError(
            f"{path} does not match the checksum in {CONFIG_NAME} (a save interrupted between the two "
            f"files, or a file replaced by hand); save the adapter again"
        )
    try:
        return safetensors_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc}); the file is corrupt, save it again") from exc


def _resize_heads(model: nn.Module, head_modules: list[str], weights: dict, num_labels: Optional[int]) -> None:
    """Give each recorded head the label count the adapter was trained with."""
    for name in head_modules:
        saved = weights.get(f"{PEFT_PREFIX}{name}.weight")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if saved is None or not isinstance(module, nn.Linear) or saved.shape[1] != module.in_features:
            continue
        if saved.shape[0] != module.out_features:
            weight = module.weight
            set_submodule(model, name, nn.Linear(module.in_features, saved.shape[0], bias=module.bias is not None,
                                               device=weight.device, dtype=weight.dtype))
    model_config = getattr(model, "config", None)
    if num_labels and model_config is not None and getattr(model_config, "num_labels", num_labels) != num_labels:
        model_config.num_labels = num_labels
    if num_labels and hasattr(model, "num_labels"):
        model.num_labels = num_labels


def load_adapter(model: nn.Module, directory: str) -> nn.Module:
    """Load an adapter saved by lorakern or PEFT into ``model`` and return it.

    A model without LoRA layers is injected first by the adapter's config; a classification head is
    resized to the number of labels lorakern recorded. Every tensor of the adapter must find its place
    in the model with the same shape, and every tensor the config implies must be in the file.
    """
    data = _read_config(directory)
    config = config_from_peft(data)
    ours = data.get("lorakern") or {}
    weights = _read_weights(directory, ours.get("weights_sha256"))
    weights = {k: v for k, v in weights.items() if not any(m in k for m in _PEFT_WRAPPER_MARKERS)}
    if lora_layers(model):
        if getattr(model, "lorakern_config", None) is None:
            model.lorakern_config = config
    else:
        _resize_heads(model, ours.get("head_modules") or [], weights, ours.get("num_labels"))
        inject(model, config)
    expected = adapter_tensors(model)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = [
        f"{k}: file {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(weights)) if weights[k].shape != expected[k].shape
    ]
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:8]))
    if missing:
        problems.append(f"{len(missing)} tensors missing from the file, e.g. " + ", ".join(missing[:5]))
    if unexpected:
        problems.append(f"{len(unexpected)} tensors in the file fit no module of the model, e.g. "
                        + ", ".join(unexpected[:5]))
    if problems:
        raise ValueError(
            f"the adapter in {directory!r} does not fit this {type(model).__name__}: " + " | ".join(problems)
            + ". Load it into the same base model (architecture and sizes) it was trained on"
        )
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(weights[key].to(device=tensor.device, dtype=tensor.dtype))
    return model


def merge_and_unload(model: nn.Module, safe: bool = True, requantize: bool = False) -> nn.Module:
    """Fold every LoRA update into its weight and put plain Linear (or Conv1D) layers back.

    With ``safe`` every merge is checked for non-finite values before any weight changes. A 4-bit
    (NF4) LoRA layer becomes a full-precision nn.Linear holding its decoded weight plus the update;
    with ``requantize=True`` it goes back to NF4 instead, and the error that adds is reported (a
    warning, and ``model.requantize_errors``: per layer max abs, RMS and max relative error).
    """
    from lorakern.quant import LoraLinearNF4
    from lorakern.quant import requantize as requantize_linear

    layers = lora_layers(model)
    if safe:
        for name, layer in layers.items():
            merged = layer.merged_weight() if isinstance(layer, LoraLinearNF4) else (
                None if layer.merged else layer.weight + layer.delta_weight())
            if merged is not None and not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaNs or infs detected in the merged weight of {name!r}; no layer was changed. "
                    f"Check that layer's lora_A and lora_B for non-finite values"
                )
    errors = {}
    for name, layer in layers.items():
        if isinstance(layer, LoraLinearNF4):
            replacement = layer.to_linear()
            if requantize:
                replacement, errors[name] = requantize_linear(replacement, layer.nf4.blocksize, layer.nf4.double_quant,
                                                              layer.compute_dtype, layer.nf4.quant_storage)
        else:
            if not layer.merged:
                layer.merge(safe=False)
            replacement = layer.unload()
        set_submodule(model, name, replacement)
    if errors:
        worst = max(errors, key=lambda n: errors[n]["max_rel"])
        model.requantize_errors = errors
        warnings.warn(
            f"requantizing {len(errors)} merged layers to NF4 changed their weights: worst {worst!r} max abs error "
            f"{errors[worst]['max_abs']:.3g} ({100 * errors[worst]['max_rel']:.2f}% of its max |w|), RMS "
            f"{errors[worst]['rms']:.3g}; see model.requantize_errors",
            stacklevel=2,
        )
    if hasattr(model, "lorakern_config"):
        del model.lorakern_config
    return model
