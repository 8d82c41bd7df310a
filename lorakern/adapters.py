"""Adapters in PEFT's on-disk format (several per model, both ways); merge_and_unload and unload (in
lorakern.unloading) are re-exported here.

A directory holds ``adapter_config.json`` (PEFT's LoraConfig fields) and ``adapter_model.safetensors``
with PEFT's keys: ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``, the biases chosen by
``bias`` (a LoRA layer's own bias as ``<module>.base_layer.bias``), and every tensor of the adapter's
copy of the modules_to_save under its plain path. As PEFT's save_pretrained, the adapter "default" goes
to the directory itself and every other one to ``<directory>/<name>/``. lorakern adds a ``"lorakern"``
entry (PEFT drops unknown keys) with the number of labels of a classification head, the checksum of the
weights file, and for a QLoRA adapter the quantization of its base (so a load into a plain model
rebuilds the same 4-bit layers).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Optional

import torch
from torch import nn

from lorakern._io import atomic_write_bytes
from lorakern.config import LoraConfig
from lorakern.errors import AdapterError, LorakernError
from lorakern.inits import rewrites_base
from lorakern.injection import (_configs, _wrappers, add_adapter_undoable, adapter_names,
                                lora_layers, set_submodule)
from lorakern.layer import DEFAULT_ADAPTER
from lorakern.unloading import merge_and_unload, unload  # noqa: F401  their import path before lorakern.unloading

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Keys PEFT writes for its own wrappers (copies of tensors it also writes under the plain path).
_PEFT_WRAPPER_MARKERS = (".original_module.", ".modules_to_save.")
_PEFT_INIT = {"kaiming": True, "gaussian": "gaussian", "normal": True, False: False}


def _config_of(model: nn.Module, adapter_name: str) -> LoraConfig:
    configs = _configs(model)
    if not configs or not lora_layers(model):
        raise AdapterError(f"{type(model).__name__} has no LoRA layers; call lorakern.inject(model, config) "
                           f"(or lorakern.load_adapter) before saving")
    if adapter_name not in configs:
        raise AdapterError(f"unknown adapter {adapter_name!r}; this model has {list(configs)}")
    return configs[adapter_name]


def adapter_tensors(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """The model's live tensors that adapter ``adapter_name`` holds, keyed as PEFT keys them."""
    config = _config_of(model, adapter_name)
    selected: dict[str, torch.Tensor] = {}
    wrappers, layers = _wrappers(model), lora_layers(model)
    for name, layer in layers.items():
        if adapter_name in layer.adapters:
            for key, tensor in layer.peft_tensors(adapter_name).items():  # lora_A.weight, lora_embedding_A, ...
                selected[f"{PEFT_PREFIX}{name}.{key}"] = tensor
            if layer.bias is not None and config.bias in ("all", "lora_only"):
                selected[f"{PEFT_PREFIX}{name}.base_layer.bias"] = layer.bias
    for name, wrapper in wrappers.items():
        if adapter_name in wrapper.modules_to_save:
            for key, tensor in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                selected[f"{PEFT_PREFIX}{name}.{key}"] = tensor
    if config.bias == "all":
        for name, module in model.named_modules():
            inside = any(name.startswith(w + ".") for w in (*wrappers, *layers))
            bias = getattr(module, "bias", None)
            if name and not inside and name not in layers and name not in wrappers and isinstance(bias, torch.Tensor):
                selected.setdefault(f"{PEFT_PREFIX}{name}.bias", bias)
    return selected


def _num_labels(model: nn.Module) -> Optional[int]:
    model_config = getattr(model, "config", None)
    num_labels = getattr(model_config, "num_labels", None) or getattr(model, "num_labels", None)
    return int(num_labels) if num_labels else None


def _head_modules(model: nn.Module, adapter_name: str, num_labels: Optional[int]) -> list[str]:
    """Linear layers of the adapter's modules_to_save whose outputs are the labels (by their plain path):
    resized on load when the count differs."""
    if not num_labels:
        return []
    heads = []
    for name, wrapper in _wrappers(model).items():
        copy_ = wrapper.modules_to_save[adapter_name] if adapter_name in wrapper.modules_to_save else None
        for sub, module in (copy_.named_modules() if copy_ is not None else ()):
            if isinstance(module, nn.Linear) and module.out_features == num_labels:
                heads.append(f"{name}.{sub}" if sub else name)
    return heads


def _peft_config_dict(model: nn.Module, adapter_name: str, config: LoraConfig, weights_sha256: str) -> dict:
    layers = {n: l for n, l in lora_layers(model).items() if adapter_name in l.adapters}
    alpha = float(config.r if config.lora_alpha is None else config.lora_alpha)
    # lora_alpha=None means each layer's own r; PEFT's alpha is global, so spell it out per pattern.
    alpha_pattern = dict(config.alpha_pattern)
    if config.lora_alpha is None:
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
        "lora_dropout": config.lora_dropout,
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "init_lora_weights": config.init if rewrites_base(config.init) else _PEFT_INIT[config.init],
        "loftq_config": dict(config.loftq_config),
        "target_modules": target,
        "exclude_modules": config.exclude_modules,
        "modules_to_save": config.modules_to_save,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": alpha_pattern,
        "layers_to_transform": config.layers_to_transform,
        "layers_pattern": config.layers_pattern,
        "task_type": config.task_type,
        "base_model_name_or_path": getattr(model_config, "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "lorakern": {
            "version": __version__,
            "init": config.init,
            "alpha": config.lora_alpha,
            "num_labels": num_labels,
            "head_modules": _head_modules(model, adapter_name, num_labels),
            "weights_sha256": weights_sha256,
            "quantization": config.quantization(),
        },
    }


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2/DTensor shard (a collective), or the tensor itself."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else tensor


def adapter_directory(directory: str, adapter_name: str) -> str:
    """Where save_adapter writes ``adapter_name``: "default" in ``directory``, others in a subfolder (PEFT's layout)."""
    return directory if adapter_name == DEFAULT_ADAPTER else os.path.join(directory, adapter_name)


def save_adapter(model: nn.Module, directory: str, selected_adapters: Optional[list[str]] = None,
                 path_initial_model_for_weight_conversion: Optional[str] = None) -> None:
    """Write every adapter of ``model`` (or ``selected_adapters``) in PEFT's format: "default" to
    ``directory``, each other one to ``directory/<name>`` (each file atomically, weights before config).

    ``path_initial_model_for_weight_conversion``: where the PiSSA / OLoRA adapters were saved right after
    injection (same layout); they are then written as plain rank-2r LoRA adapters on the original base
    (PEFT's save_pretrained option of the same name; lorakern.conversion).

    Under torch.distributed every rank calls it: sharded (FSDP2) tensors are gathered, rank 0 writes.
    """
    from safetensors.torch import save as safetensors_bytes

    from lorakern import conversion

    names = list(selected_adapters) if selected_adapters is not None else adapter_names(model)
    for name in names or [DEFAULT_ADAPTER]:
        _config_of(model, name)  # every name is known before anything is written
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise LorakernError(f"save_adapter writes a directory, but {directory!r} is an existing file; pass a "
                            f"directory path (it is created if missing)")
    initial = None
    if path_initial_model_for_weight_conversion is not None:
        # every initial adapter is read and checked before anything is written
        path = path_initial_model_for_weight_conversion
        initial = conversion.read_initial({n: _config_of(model, n) for n in names},
                                          {n: adapter_directory(path, n) for n in names}, path,
                                          lambda n: adapter_tensors(model, n), _read_saved_weights)
    rank0 = not (torch.distributed.is_available() and torch.distributed.is_initialized()
                 and torch.distributed.get_rank() != 0)
    for name in names:
        config = _config_of(model, name)
        tensors = {k: _full(t).detach().to("cpu", copy=True).contiguous() for k, t in adapter_tensors(model, name).items()}
        if initial is not None and name in initial:
            tensors, config = conversion.convert(tensors, initial[name], config)
        if not rank0:
            continue  # every rank gathered its shards above (a collective); rank 0 writes
        weights = safetensors_bytes(tensors, metadata={"format": "pt"})
        peft_config = _peft_config_dict(model, name, config, hashlib.sha256(weights).hexdigest())
        target = adapter_directory(directory, name)
        os.makedirs(target, exist_ok=True)
        # Weights first, config last: the config's checksum tells a reader if a save stopped between them.
        atomic_write_bytes(os.path.join(target, WEIGHTS_NAME), weights)
        atomic_write_bytes(os.path.join(target, CONFIG_NAME),
                           (json.dumps(peft_config, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise LorakernError(f"no {CONFIG_NAME} in {directory!r}; point load_adapter at a directory written by "
                            f"save_adapter or PEFT's save_pretrained")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LorakernError(f"{path} is not valid JSON ({exc}); re-save the adapter") from exc
    if not isinstance(data, dict) or data.get("peft_type") != "LORA":
        raise LorakernError(f"{path} describes peft_type={data.get('peft_type') if isinstance(data, dict) else data!r}; "
                            f"lorakern loads LoRA adapters only (peft_type 'LORA')")
    return data


def config_from_peft(data: dict) -> LoraConfig:
    """A LoraConfig from the fields of a PEFT adapter_config.json (lorakern's own entry restores what PEFT
    cannot say: lora_alpha=None, the seed's "normal" init, the quantization of a QLoRA base)."""
    ours = data.get("lorakern") or {}
    fields = {k: v for k, v in data.items() if k != "lorakern"}
    if "alpha" in ours:
        fields["lora_alpha"] = ours["alpha"]
    if ours.get("init") in ("normal", "gaussian", "kaiming"):
        fields["init_lora_weights"] = ours["init"]
    quant = ours.get("quantization")
    if quant:
        fields.update(quantize=quant["quant_type"], quantize_blocksize=quant["blocksize"],
                      quantize_double=quant["double_quant"], compute_dtype=quant["compute_dtype"],
                      quant_storage=quant["quant_storage"], quantize_skip=quant["skip_modules"])
    return LoraConfig(**fields)


def _read_weights(directory: str, expected_sha256: Optional[str]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as safetensors_load

    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise LorakernError(f"no {WEIGHTS_NAME} in {directory!r}; the adapter directory is incomplete")
    with open(path, "rb") as handle:
        data = handle.read()
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise LorakernError(f"{path} does not match the checksum in {CONFIG_NAME} (a save interrupted between the "
                            f"two files, or a file replaced by hand); save the adapter again")
    try:
        return safetensors_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise LorakernError(f"{path} is not a readable safetensors file ({exc}); the file is corrupt, save it again") from exc


def _read_saved_weights(directory: str) -> Optional[dict[str, torch.Tensor]]:
    """The weights saved in ``directory`` (checked against its config's checksum), or None if there are none."""
    if not os.path.isfile(os.path.join(directory, WEIGHTS_NAME)):
        return None
    ours = (_read_config(directory).get("lorakern") or {}) if os.path.isfile(os.path.join(directory, CONFIG_NAME)) else {}
    return _read_weights(directory, ours.get("weights_sha256"))


def _resize_heads(model: nn.Module, head_modules: list[str], weights: dict, num_labels: Optional[int]) -> Callable[[], None]:
    """Give each recorded head the label count the adapter was trained with; returns the undo."""
    undo_steps = []
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
            undo_steps.append(lambda name=name, module=module: set_submodule(model, name, module))
    model_config = getattr(model, "config", None)
    if num_labels and model_config is not None and getattr(model_config, "num_labels", num_labels) != num_labels:
        old = model_config.num_labels
        model_config.num_labels = num_labels
        undo_steps.append(lambda: setattr(model_config, "num_labels", old))
    if num_labels and hasattr(model, "num_labels") and model.num_labels != num_labels:
        old_count = model.num_labels
        model.num_labels = num_labels
        undo_steps.append(lambda: setattr(model, "num_labels", old_count))
    return lambda: [step() for step in reversed(undo_steps)]


def load_adapter(model: nn.Module, directory: str, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Load an adapter saved by lorakern or PEFT into ``model`` under ``adapter_name`` and return the model.

    The adapter is added by its saved config (a model without adapters is injected first; a QLoRA
    adapter rebuilds the same 4-bit base in a plain model); a classification head is resized to the
    number of labels lorakern recorded. Every tensor of the file must find its place with the same
    shape, and every tensor the config implies must be in the file; otherwise nothing in the model
    changes. A later adapter is added inactive, as in PEFT (``set_adapter`` activates it)."""
    data = _read_config(directory)
    config = config_from_peft(data)
    ours = data.get("lorakern") or {}
    weights = _read_weights(directory, ours.get("weights_sha256"))
    weights = {k: v for k, v in weights.items() if not any(m in k for m in _PEFT_WRAPPER_MARKERS)}
    # DoRA's magnitude: PEFT writes "<module>.lora_magnitude_vector"; files keyed with the parameter's own
    # ".weight" (PEFT's in-memory name without the adapter) are read the same
    weights = {k.removesuffix(".weight") if k.endswith(".lora_magnitude_vector.weight") else k: v
               for k, v in weights.items()}
    existing = _configs(model)
    if adapter_name in existing:
        raise AdapterError(f"{type(model).__name__} already has an adapter named {adapter_name!r} (adapters: "
                           f"{list(existing)}); load it under another adapter_name, or delete_adapter({adapter_name!r}) first")
    if existing:
        base_quant = next(iter(existing.values())).quantize
        if config.quantize != base_quant:
            how = ("build a fresh model and load it there (its 4-bit base is rebuilt from the adapter's record)"
                   if config.quantize else "load it into a model whose base is not quantized")
            raise AdapterError(f"the adapter in {directory!r} was trained on a base with quantize={config.quantize!r}, "
                               f"this model's base has quantize={base_quant!r}; {how}")
    elif lora_layers(model):
        raise AdapterError(f"{type(model).__name__} has LoRA layers but no record of their adapters; load into a model "
                           f"built by lorakern.inject / load_adapter")
    undo_heads = _resize_heads(model, ours.get("head_modules") or [], weights, ours.get("num_labels")) \
        if not existing else (lambda: None)
    try:
        undo_adapter = add_adapter_undoable(model, adapter_name, config)
    except BaseException:
        undo_heads()
        raise
    expected = adapter_tensors(model, adapter_name)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = [f"{k}: file {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(expected) & set(weights)) if weights[k].shape != expected[k].shape]
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:8]))
    if missing:
        problems.append(f"{len(missing)} tensors missing from the file, e.g. " + ", ".join(missing[:5]))
    if unexpected:
        problems.append(f"{len(unexpected)} tensors in the file fit no module of the model, e.g. " + ", ".join(unexpected[:5]))
    if problems:
        undo_adapter()
        undo_heads()
        raise LorakernError(f"the adapter in {directory!r} does not fit this {type(model).__name__}: " + " | ".join(problems)
                            + ". Load it into the same base model (architecture and sizes) it was trained on; the "
                            "model was left unchanged")
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(weights[key].to(device=tensor.device, dtype=tensor.dtype))
    return model
