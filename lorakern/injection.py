"""LoraConfig and injection by module name, with PEFT's matching and freezing rules."""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional, Union

from torch import nn

from lorakern.core.nf4 import BLOCKSIZES
from lorakern.layer import LoraLinear, _check_hyperparameters, is_linear_like

BIAS_MODES = ("none", "all", "lora_only")
ALL_LINEAR = "all-linear"
# Heads of transformers' sequence-classification models, kept out of "all-linear" like PEFT does.
_CLASSIFIER_HEAD_NAMES = ("classifier", "score")


@dataclass
class LoraConfig:
    """Which layers get LoRA, with what rank, and what else trains. Field names follow PEFT.

    target_modules: a list matches a module whose full name equals an entry or ends with "." + entry;
        a string is a regex that must match the full name; "all-linear" takes every Linear-like layer
        but the output embedding and modules_to_save.
    modules_to_save: modules whose name ends with one of these plain suffixes train in full.
    rank_pattern / alpha_pattern: {name pattern: value}; a key matches names like (.*\\.)?key$, first wins.
    """

    r: int = 8
    alpha: Optional[float] = None
    dropout: float = 0.0
    target_modules: Union[list[str], str, None] = None
    exclude_modules: Union[list[str], str, None] = None
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    init: str = "kaiming"
    task_type: Optional[str] = None
    # QLoRA: store the frozen Linear weights in NF4 (targets, and the other Linear layers but those in
    # quantize_skip and modules_to_save, which stay in full precision like the seed's trainable heads).
    quantize: Optional[str] = None
    quantize_skip: list[str] = field(default_factory=list)
    quantize_blocksize: int = 64
    quantize_double: bool = True
    compute_dtype: Optional[str] = None
    # What holds the packed NF4 bytes (bitsandbytes' quant_storage): "uint8", a buffer, replicated by
    # FSDP; "bfloat16" / "float16" / "float32", a frozen Parameter holding the same bytes, which FSDP2's
    # fully_shard shards. Under a MixedPrecisionPolicy it must equal param_dtype (FSDP would cast it).
    quant_storage: str = "uint8"

    def __post_init__(self) -> None:
        _check_hyperparameters(self.r, self.alpha, self.dropout, self.init)
        if self.target_modules is None or (not isinstance(self.target_modules, str) and not self.target_modules):
            raise ValueError(
                "target_modules is empty; name the layers to adapt, e.g. target_modules=['query', 'value'], "
                "a regex string, or 'all-linear'"
            )
        for field_name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, field_name)
            if value is None or (isinstance(value, str) and field_name != "modules_to_save"):
                continue
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise TypeError(
                    f"{field_name} must be a list of non-empty module names"
                    + (" or a regex string" if field_name != "modules_to_save" else "")
                    + f", got {value!r}"
                )
            setattr(self, field_name, list(value))
        for field_name in ("target_modules", "exclude_modules"):
            value = getattr(self, field_name)
            if isinstance(value, str) and value.lower() != ALL_LINEAR:
                try:
                    re.compile(value)
                except re.error as exc:
                    raise ValueError(f"{field_name}={value!r} is not a valid regex ({exc}); fix the pattern") from exc
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got bias={self.bias!r}")
        for key, rank in self.rank_pattern.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"rank_pattern[{key!r}] must be a positive int, got {rank!r}")
        for key, alpha in self.alpha_pattern.items():
            if not isinstance(alpha, (int, float)) or alpha <= 0:
                raise ValueError(f"alpha_pattern[{key!r}] must be a positive number, got {alpha!r}")
        if self.quantize not in (None, "nf4"):
            raise ValueError(f"quantize={self.quantize!r} is not a known quant type; use 'nf4' (or None for no quantization)")
        if self.quantize_blocksize not in BLOCKSIZES:
            raise ValueError(f"quantize_blocksize={self.quantize_blocksize!r} is not allowed; use one of {BLOCKSIZES}")
        if self.compute_dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError(f"compute_dtype={self.compute_dtype!r} is not supported; use 'bfloat16', 'float16', "
                             f"'float32' or None (the weight's own dtype)")
        if self.quant_storage != "uint8":
            from lorakern.quant import quant_storage_name

            self.quant_storage = quant_storage_name(self.quant_storage)  # torch dtypes too, stored as the name
            if self.quantize is None and self.quant_storage != "uint8":
                raise ValueError(f"quant_storage={self.quant_storage!r} applies to quantized base weights only; pass "
                                 f"quantize='nf4' with it, or leave quant_storage at 'uint8'")
        if isinstance(self.quantize_skip, str) or not all(isinstance(v, str) and v for v in self.quantize_skip):
            raise TypeError(f"quantize_skip must be a list of module names, got {self.quantize_skip!r}")
        self.quantize_skip = list(self.quantize_skip)

    def to_dict(self) -> dict:
        return asdict(self)

    def matches_target(self, name: str) -> bool:
        """PEFT's rule: exact name or '.'-suffix for a list, full regex match for a string."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        return _list_match(self.target_modules, name)

    def is_excluded(self, name: str) -> bool:
        if self.exclude_modules is None:
            return False
        if isinstance(self.exclude_modules, str):
            return re.fullmatch(self.exclude_modules, name) is not None
        return _list_match(self.exclude_modules, name)

    def in_modules_to_save(self, name: str) -> bool:
        """True for a module to save or anything inside one (PEFT never puts LoRA there)."""
        return _within(self.modules_to_save or (), name)

    def keeps_full_precision(self, name: str) -> bool:
        """With quantize: layers named in quantize_skip or modules_to_save (or inside them) stay unquantized."""
        return _within(self.quantize_skip, name) or self.in_modules_to_save(name)

    def rank_and_alpha(self, name: str) -> tuple[int, Optional[float]]:
        r = _pattern_value(self.rank_pattern, name, self.r)
        alpha = _pattern_value(self.alpha_pattern, name, self.alpha)
        return r, alpha


def _within(entries, name: str) -> bool:
    """True when ``name`` is one of ``entries`` (by name component) or lies inside one."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in entries)


def _list_match(entries: list[str], name: str) -> bool:
    return any(name == entry or name.endswith("." + entry) for entry in entries)


def _pattern_value(pattern: dict, name: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


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
    """Names of the modules ``inject`` would replace."""
    all_linear = isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR
    skip = _output_layer_names(model, config) if all_linear else set()
    targets = []
    for name, module in model.named_modules():
        if not name or name in skip or config.in_modules_to_save(name) or config.is_excluded(name):
            continue
        if isinstance(module, LoraLinear):
            continue
        if any(name.startswith(t + ".") for t in targets):
            continue  # inside a module already targeted
        if all_linear:
            matched = is_linear_like(module)
        else:
            matched = config.matches_target(name)
        if not matched:
            continue
        if not is_linear_like(module):
            raise ValueError(
                f"target module {name!r} is a {type(module).__name__}; LoRA applies to nn.Linear and "
                f"transformers Conv1D only. Narrow target_modules so that it names linear layers only"
            )
        targets.append(name)
    return targets


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Replace the target layers of ``model`` by LoraLinear in place and freeze the rest by ``config``.

    Trainable afterwards: every lora_A / lora_B; biases by ``config.bias``; every parameter of
    ``modules_to_save``. Returns ``model``.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a lorakern.LoraConfig, got {type(config).__name__}")
    existing = lora_layers(model)
    if existing:
        raise ValueError(
            f"{type(model).__name__} already has {len(existing)} LoRA layers (e.g. {next(iter(existing))!r}); "
            f"lorakern keeps one adapter per model: call lorakern.merge_and_unload(model) first, or inject into "
            f"a fresh model"
        )
    targets = find_targets(model, config)
    if not targets:
        seen = [name for name, m in model.named_modules() if name and is_linear_like(m)]
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}. "
            f"Its linear layers are: {', '.join(seen) or '(none)'}. Use full names or their last "
            f"components, e.g. {sorted({n.rsplit('.', 1)[-1] for n in seen})[:6]}"
        )
    quantized = {}
    if config.quantize:
        import torch

        compute_dtype = None if config.compute_dtype is None else getattr(torch, config.compute_dtype)
        quantized = {"quantize": config.quantize, "blocksize": config.quantize_blocksize,
                     "double_quant": config.quantize_double, "compute_dtype": compute_dtype,
                     "quant_storage": config.quant_storage}
        output = _output_layer_names(model, config)
        for name, module in list(model.named_modules()):
            if (name and name not in targets and is_linear_like(module) and name not in output
                    and not config.keeps_full_precision(name)):
                from lorakern.quant import LinearNF4

                set_submodule(model, name, LinearNF4.from_linear(module, config.quantize_blocksize,
                                                                 config.quantize_double, compute_dtype,
                                                                 config.quant_storage))
    for name in targets:
        r, alpha = config.rank_and_alpha(name)
        module = model.get_submodule(name)
        layer_quantize = quantized if quantized and not config.keeps_full_precision(name) else {}
        layer = LoraLinear.from_linear(
            module, r=r, alpha=alpha, dropout=config.dropout, use_rslora=config.use_rslora, init=config.init,
            **layer_quantize,
        )
        set_submodule(model, name, layer)
    mark_trainable(model, config)
    model.lorakern_config = config
    return model


def mark_trainable(model: nn.Module, config: LoraConfig) -> None:
    """Freeze everything, then unfreeze LoRA, the biases chosen by ``config.bias``, and modules_to_save."""
    for param in model.parameters():
        param.requires_grad_(False)
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
            if config.bias == "lora_only" and module.bias is not None:
                module.bias.requires_grad_(True)
        if config.modules_to_save and any(name.endswith(m) for m in config.modules_to_save):
            for param in module.parameters():
                param.requires_grad_(True)
    if config.bias == "all":
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                param.requires_grad_(True)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model inside the block (PEFT's ``disable_adapter()``).

    Unmerged layers skip their LoRA term; merged layers are unmerged for the block and merged back after.
    """
    layers = [layer for layer in lora_layers(model).values() if not layer.disabled]
    merged = [layer for layer in layers if layer.merged]
    for layer in merged:
        layer.unmerge()
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
        for layer in merged:
            layer.merge()


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
    "ALL_LINEAR", "BIAS_MODES", "LoraConfig", "count_parameters", "disable_adapters", "find_targets", "inject",
    "lora_layers", "mark_trainable", "parameter_table",
]
