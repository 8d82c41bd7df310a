"""Injection by module name and named adapters on a model, with PEFT's matching, freezing and
modules_to_save rules:

    inject(model, config, adapter_name="default")      add_adapter(model, name, config)
    set_adapter(model, name or [names])                 active_adapters(model)
    delete_adapter(model, name)                         disable_adapters(model)  (a context)

The model keeps its adapters' configs in ``model.lorakern_configs`` ({name: LoraConfig}) and the active
names in ``model.lorakern_active``. Only the active adapters train, as in PEFT.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Union

import torch
from torch import nn

from lorakern.config import ALL_LINEAR, BIAS_MODES, LoraConfig
from lorakern.errors import AdapterError, LorakernError
from lorakern.inits import rewrites_base
from lorakern.layer import DEFAULT_ADAPTER, LoraLinear, is_linear_like
from lorakern.layer_types import LORA_LAYERS, SUPPORTED, can_take_lora, new_lora_layer
from lorakern.modules_to_save import ModulesToSaveWrapper
from lorakern.nf4.modules import LinearNF4

# Heads of transformers' sequence-classification models, kept out of "all-linear" like PEFT does.
_CLASSIFIER_HEAD_NAMES = ("classifier", "score")


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every LoRA layer of ``model`` by name: LoraLinear, LoraEmbedding, LoraConv."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LORA_LAYERS)}


def _wrappers(model: nn.Module) -> dict[str, ModulesToSaveWrapper]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}


def _configs(model: nn.Module) -> dict[str, LoraConfig]:
    return getattr(model, "lorakern_configs", None) or {}


def adapter_names(model: nn.Module) -> list[str]:
    return list(_configs(model))


def _output_layer_names(model: nn.Module, config: LoraConfig) -> set[str]:
    """Layers 'all-linear' leaves alone: the output embedding, and a classification head."""
    excluded = set()
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is None and config.task_type == "SEQ_CLS":
        output = next((getattr(model, n) for n in _CLASSIFIER_HEAD_NAMES if hasattr(model, n)), None)
    if output is not None:
        excluded.update(name for name, module in model.named_modules() if module is output)
    return excluded


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules an adapter with ``config`` goes into (a LoraLinear already there counts)."""
    all_linear = isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR
    skip = _output_layer_names(model, config) if all_linear else set()
    targets: list[str] = []
    for name, module in model.named_modules():
        if not name or name in skip or config.in_modules_to_save(name) or config.is_excluded(name):
            continue
        if isinstance(module, ModulesToSaveWrapper) or ".modules_to_save." in name or ".original_module" in name:
            continue
        if any(name.startswith(t + ".") for t in targets):
            continue  # inside a module already targeted (a LoraLinear's own children)
        matched = is_linear_like(module) or isinstance(module, LoraLinear) if all_linear else config.matches_target(name)
        if not matched:
            continue
        if rewrites_base(config.init) and not (is_linear_like(module) or isinstance(module, LoraLinear)):
            raise LorakernError(f"init_lora_weights={config.init!r} decomposes the weight of a Linear layer, but target "
                                f"{name!r} is a {type(module).__name__}; leave it out of target_modules (a second "
                                f"adapter with init_lora_weights=True can adapt it)")
        if not (can_take_lora(module) or isinstance(module, LORA_LAYERS)):
            raise LorakernError(f"target module {name!r} is a {type(module).__name__}; LoRA applies to {SUPPORTED}. "
                                f"Narrow target_modules so that it names only layers of those types")
        targets.append(name)
    return targets


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class _Edits:
    """Module replacements made so far, undone in reverse on failure: an injection that fails leaves
    the model as it found it."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.done = model, []

    def replace(self, name: str, new: nn.Module) -> None:
        self.done.append((name, self.model.get_submodule(name)))
        set_submodule(self.model, name, new)

    def undo(self) -> None:
        for name, old in reversed(self.done):
            set_submodule(self.model, name, old)


def _quant_kwargs(config: LoraConfig) -> dict:
    compute_dtype = None if config.compute_dtype is None else getattr(torch, config.compute_dtype)
    return {"quantize": config.quantize, "blocksize": config.quantize_blocksize, "double_quant": config.quantize_double,
            "compute_dtype": compute_dtype, "quant_storage": config.quant_storage}


def _layer_kwargs(config: LoraConfig, name: str) -> dict:
    r, alpha = config.rank_and_alpha(name)
    kwargs = {"r": r, "alpha": alpha, "dropout": config.lora_dropout, "use_rslora": config.use_rslora,
              "init": config.init}
    if config.use_dora:
        kwargs["use_dora"] = True
    if config.init == "loftq":  # only Linear layers take LoftQ (find_targets refuses the others)
        kwargs["loftq_iter"] = config.loftq_config.get("loftq_iter", 1)
    return kwargs


def add_adapter(model: nn.Module, adapter_name: str, config: LoraConfig) -> nn.Module:
    """Add adapter ``adapter_name`` with ``config`` (its own r, alpha, dropout and targets) to ``model``.

    The first adapter of a model is active; later ones are added inactive (``set_adapter`` switches),
    as in PEFT. Modules a previous adapter wrapped get this adapter beside it; new targets are wrapped.
    On any error the model is left as it was."""
    add_adapter_undoable(model, adapter_name, config)
    return model


def add_adapter_undoable(model: nn.Module, adapter_name: str, config: LoraConfig) -> Callable[[], None]:
    """``add_adapter``, returning a function that takes the adapter out again and puts every replaced
    module back (how load_adapter leaves a model untouched when the weights do not fit)."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a lorakern.LoraConfig, got {type(config).__name__}")
    configs = _configs(model)
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise AdapterError(f"an adapter name is a non-empty string without '.', got {adapter_name!r}")
    if adapter_name in configs:
        raise AdapterError(f"{type(model).__name__} already has an adapter named {adapter_name!r} (adapters: "
                           f"{list(configs)}); pick another adapter_name or delete_adapter({adapter_name!r}) first")
    if configs and config.quantize != next(iter(configs.values())).quantize:
        raise AdapterError(f"adapter {adapter_name!r} asks for quantize={config.quantize!r} but the model's base was "
                           f"built with quantize={next(iter(configs.values())).quantize!r}; adapters share one base")
    targets = find_targets(model, config)
    rewriting = [n for n, c in {**configs, adapter_name: config}.items() if rewrites_base(c.init)]
    if configs and rewriting:
        warnings.warn(f"adapters {rewriting} rewrote (or will rewrite) the base weights of their layers: with them "
                      f"inactive those layers compute the residual, not the original W, so this model's adapters do "
                      f"not combine as plain LoRAs do. Convert them to plain LoRA adapters (save_adapter(..., "
                      f"path_initial_model_for_weight_conversion=...)); PEFT warns the same", stacklevel=3)
    if not targets:
        seen = [name for name, m in model.named_modules() if name and (is_linear_like(m) or isinstance(m, LoraLinear))]
        raise LorakernError(
            f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}. Its linear layers "
            f"are: {', '.join(seen) or '(none)'}. Use full names or their last components, e.g. "
            f"{sorted({n.rsplit('.', 1)[-1] for n in seen})[:6]}")
    first = not configs
    previous_active = getattr(model, "lorakern_active", None)
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    edits = _Edits(model)
    added: list[nn.Module] = []  # existing LoraLinear layers and wrappers that got this adapter

    def undo() -> None:
        for module in added:
            if isinstance(module, LORA_LAYERS) and adapter_name in module.adapters:
                module.delete_adapter(adapter_name)
            elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                del module.modules_to_save[adapter_name]
        edits.undo()
        if first:
            for attribute in ("lorakern_configs", "lorakern_active"):
                if hasattr(model, attribute):
                    delattr(model, attribute)
            for param in model.parameters():
                param.requires_grad_(trainable.get(id(param), param.requires_grad))
        else:
            model.lorakern_configs = configs
            model.lorakern_active = previous_active
            _apply_active(model)

    try:
        if config.quantize and first:
            output = _output_layer_names(model, config)
            q = _quant_kwargs(config)
            for name, module in list(model.named_modules()):
                if (name and name not in targets and is_linear_like(module) and name not in output
                        and not config.keeps_full_precision(name)):
                    edits.replace(name, LinearNF4.from_linear(module, q["blocksize"], q["double_quant"],
                                                              q["compute_dtype"], q["quant_storage"]))
        for name in targets:
            module = model.get_submodule(name)
            if isinstance(module, LORA_LAYERS):
                module.add_adapter(adapter_name, **_layer_kwargs(config, name))
                added.append(module)
                continue
            quant = _quant_kwargs(config) if config.quantize and not config.keeps_full_precision(name) else {}
            edits.replace(name, new_lora_layer(module, name, adapter_name, quant, **_layer_kwargs(config, name)))
        for name in _saved_module_names(model, config):
            module = model.get_submodule(name)
            if isinstance(module, ModulesToSaveWrapper):
                module.add(adapter_name)
                added.append(module)
            else:
                edits.replace(name, ModulesToSaveWrapper(module, adapter_name))
        model.lorakern_configs = {**configs, adapter_name: config}
        if first:
            model.lorakern_active = [adapter_name]
        _apply_active(model)
    except BaseException:
        undo()
        raise
    return undo


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Put adapter ``adapter_name`` into ``model`` in place (LoraLinear on every target, copies of the
    modules_to_save) and freeze the rest by ``config``. Trainable afterwards: the active adapter's lora_A /
    lora_B; biases by ``config.bias``; its copies of the modules_to_save. Returns ``model``."""
    return add_adapter(model, adapter_name, config)


def _saved_module_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """The outermost modules whose name ends with a modules_to_save entry (wrappers count as themselves)."""
    names = []
    for name, module in model.named_modules():
        if not name or ".modules_to_save." in name or ".original_module" in name:
            continue
        if any(name.endswith(m) for m in config.modules_to_save or ()):  # PEFT's rule: a plain suffix
            if not any(name.startswith(outer + ".") for outer in names):
                names.append(name)
    return names


def set_adapter(model: nn.Module, adapter_names: Union[str, Iterable[str]]) -> None:
    """Make ``adapter_names`` active: with several, their outputs add up (as in PEFT). Only active adapters
    train; the others are frozen."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    known = adapter_names_or_raise(model)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise AdapterError(f"unknown adapter(s) {unknown or names}; this model has {known}")
    previous = model.lorakern_active
    model.lorakern_active = names
    try:
        _apply_active(model)
    except AdapterError:
        model.lorakern_active = previous
        _apply_active(model)
        raise


def adapter_names_or_raise(model: nn.Module) -> list[str]:
    names = adapter_names(model)
    if not names:
        raise AdapterError(f"{type(model).__name__} has no adapters; lorakern.inject(model, config) adds one")
    return names


def active_adapters(model: nn.Module) -> list[str]:
    adapter_names_or_raise(model)
    return list(model.lorakern_active)


def _apply_active(model: nn.Module) -> None:
    """Freeze everything, then make the active adapters' tensors trainable: their A and B, their copies of
    the modules_to_save, and the biases their configs name (PEFT's rules)."""
    names = model.lorakern_active
    layers = lora_layers(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for wrapper in _wrappers(model).values():
        wrapper.set_adapter(names)  # the active adapter's copy trains
    for layer in layers.values():
        layer.set_adapter(names)  # the active adapters' A and B train
    _train_biases(model, names, layers)


def _train_biases(model: nn.Module, names: list[str], layers: dict[str, LoraLinear]) -> None:
    """Make trainable the biases the configs of ``names`` name (PEFT's bias="lora_only" / "all")."""
    configs = _configs(model)
    for name in names:
        if configs[name].bias == "lora_only":
            for layer in layers.values():
                if name in layer.adapters and layer.bias is not None:
                    layer.bias.requires_grad_(True)
        elif configs[name].bias == "all":
            for param_name, param in model.named_parameters():
                if param_name.rsplit(".", 1)[-1] == "bias" and ".original_module." not in f".{param_name}":
                    param.requires_grad_(True)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name`` from every layer (and its copies of the modules_to_save). The only adapter
    cannot be deleted: merge_and_unload(model) or unload(model) give the base model back."""
    known = adapter_names_or_raise(model)
    if adapter_name not in known:
        raise AdapterError(f"unknown adapter {adapter_name!r}; this model has {known}")
    if len(known) == 1:
        raise AdapterError(f"{adapter_name!r} is this model's only adapter; use lorakern.merge_and_unload(model) to "
                           f"fold it in, or lorakern.unload(model) to drop it, and get plain layers back")
    merged = [n for n, layer in lora_layers(model).items() if adapter_name in layer.merged_adapters]
    if merged:
        raise AdapterError(f"adapter {adapter_name!r} is merged into {merged[:3]}; unmerge those layers first")
    for layer in lora_layers(model).values():
        if adapter_name in layer.adapters:
            layer.delete_adapter(adapter_name)
    for wrapper in _wrappers(model).values():
        if adapter_name in wrapper.modules_to_save:
            del wrapper.modules_to_save[adapter_name]
    configs = dict(model.lorakern_configs)
    del configs[adapter_name]
    model.lorakern_configs = configs
    remaining = [n for n in model.lorakern_active if n != adapter_name]
    model.lorakern_active = remaining or [next(iter(configs))]
    _apply_active(model)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model inside the block (PEFT's ``disable_adapter()``): LoRA layers compute
    their base alone (merged ones are unmerged for the block) and modules_to_save run their originals."""
    layers = [layer for layer in lora_layers(model).values() if not layer.disabled]
    merged = [(layer, list(layer.merged_adapters)) for layer in layers if layer.merged]
    wrappers = [w for w in _wrappers(model).values() if not w.disabled]
    for layer, _ in merged:
        layer.unmerge()
    for module in (*layers, *wrappers):
        module.disabled = True
    try:
        yield model
    finally:
        for module in (*layers, *wrappers):
            module.disabled = False
        for layer, names in merged:
            layer.merge(adapter_names=names)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors count once."""
    trainable = total = 0
    for param in model.parameters():  # parameters() yields each shared tensor once
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def parameter_table(model: nn.Module, trainable_only: bool = True) -> str:
    """A markdown table of parameter tensors (name, shape, count, trainable) with the totals."""
    rows = ["| parameter | shape | count | trainable |", "|---|---|---:|---|"]
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        rows.append(f"| {name} | {tuple(param.shape)} | {param.numel():,} | {'yes' if param.requires_grad else 'no'} |")
    trainable, total = count_parameters(model)
    rows.append(f"| **trainable / total** | | {trainable:,} / {total:,} | {100.0 * trainable / max(total, 1):.3f}% |")
    return "\n".join(rows)


__all__ = [
    "ALL_LINEAR", "BIAS_MODES", "LoraConfig", "ModulesToSaveWrapper", "active_adapters", "add_adapter",
    "adapter_names", "count_parameters", "delete_adapter", "disable_adapters", "find_targets", "inject",
    "lora_layers", "parameter_table", "set_adapter",
]
