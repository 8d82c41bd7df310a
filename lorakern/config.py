"""LoraConfig: which layers get an adapter, with what rank, and what else trains. PEFT's field names and
defaults, so ``lorakern.LoraConfig(**peft_config.to_dict())`` works; a PEFT field set to a value lorakern
does not support is refused by name, never ignored.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from lorakern.adapter import check_hyperparameters
from lorakern.core.nf4 import BLOCKSIZES
from lorakern.errors import ConfigError
from lorakern.inits import rewrites_base

BIAS_MODES = ("none", "all", "lora_only")
ALL_LINEAR = "all-linear"
# lorakern's earlier names for three PEFT fields, still accepted as keywords (and readable as properties)
ALIASES = {"alpha": "lora_alpha", "dropout": "lora_dropout", "init": "init_lora_weights"}
# PEFT's bookkeeping fields: accepted and not used (peft_type must say LORA)
PEFT_BOOKKEEPING = ("peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                    "inference_mode")
# PEFT fields lorakern does not implement, with the default PEFT gives them: any other value is refused
PEFT_UNSUPPORTED = {
    "lora_bias": False, "megatron_config": None, "megatron_core": "megatron.core",
    "trainable_token_indices": None, "eva_config": None, "corda_config": None,
    "lora_ga_config": None, "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False,
    "qalora_group_size": 16, "monteclora_config": None, "layer_replication": None, "target_parameters": None,
    "use_bdlora": False, "arrow_config": None, "kasa_config": None, "ensure_weight_tying": False,
    "runtime_config": None,
}


def _is_default_like(value: Any) -> bool:
    """True for the values an unused PEFT option holds: None, False, empty, or a dict of those."""
    if value is None or value is False or (isinstance(value, (dict, list, tuple, set, str)) and not value):
        return True
    if isinstance(value, dict):
        return all(_is_default_like(v) for v in value.values())
    return False


@dataclass(init=False)
class LoraConfig:
    """PEFT's LoraConfig fields that lorakern implements, PEFT's defaults, plus lorakern's QLoRA fields.

    target_modules: a list (or set) matches a module whose full name equals an entry or ends with "." +
        entry; a string is a regex that must match the full name; "all-linear" takes every Linear-like
        layer but the output embedding (and a classification head).
    lora_alpha: s = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora); PEFT's default 8. None: alpha = r.
    use_dora: DoRA (PEFT's definition; lorakern.dora): a magnitude vector per adapted layer, saved as PEFT's
        ``lora_magnitude_vector``; linear layers (dense or NF4 base) only.
    modules_to_save: modules whose name ends with one of these plain suffixes train in full, as a copy
        per adapter; the original is kept for the base model (PEFT's ModulesToSaveWrapper).
    rank_pattern / alpha_pattern: {name pattern: value}; a key matches names like (.*\\.)?key$, first wins.
    layers_to_transform / layers_pattern: only layers with these indices (PEFT's rule) get an adapter.
    init_lora_weights: True (A kaiming-uniform, B zeros), False (both random), "gaussian", and lorakern's
        "normal" (A ~ N(0, 1): the seed's rule); from the base weight, which they rewrite (lorakern.inits,
        docs/inits.md): "pissa", "pissa_niter_K", "olora", and "loftq" (needs quantize="nf4").
    loftq_config: PEFT's LoftQConfig as a dict, {"loftq_bits": 4, "loftq_iter": n}; required with "loftq".
    fan_in_fan_out: accepted for PEFT's sake; lorakern reads each layer's layout itself (GPT-2 Conv1D).
    quantize ...: QLoRA. Store the frozen Linear weights in NF4 (targets, and the other Linear layers but
        those in quantize_skip and modules_to_save, which stay in full precision like a trainable head).
    quant_storage: what holds the packed NF4 bytes (bitsandbytes' option): "uint8", a buffer, replicated
        by FSDP; "bfloat16" / "float16" / "float32", a frozen Parameter with the same bytes that FSDP2's
        fully_shard shards. Under a MixedPrecisionPolicy it must equal param_dtype.
    """

    r: int = 8
    target_modules: Union[list[str], str, None] = None
    exclude_modules: Union[list[str], str, None] = None
    lora_alpha: Optional[float] = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Union[list[int], int, None] = None
    layers_pattern: Union[list[str], str, None] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    loftq_config: dict[str, int] = field(default_factory=dict)
    task_type: Optional[str] = None
    quantize: Optional[str] = None
    quantize_skip: list[str] = field(default_factory=list)
    quantize_blocksize: int = 64
    quantize_double: bool = True
    compute_dtype: Optional[str] = None
    quant_storage: str = "uint8"

    def __init__(self, **kwargs: Any) -> None:
        for old, new in ALIASES.items():
            if old in kwargs:
                if new in kwargs:
                    raise ConfigError(f"both {old}= and {new}= were given; {old} is lorakern's earlier name for "
                                      f"PEFT's {new}: pass only {new}")
                kwargs[new] = kwargs.pop(old)
        names = {f.name for f in dataclasses.fields(self)}
        for name in list(kwargs):
            if name in names:
                continue
            value = kwargs.pop(name)
            if name == "peft_type":
                if str(getattr(value, "value", value)) != "LORA":
                    raise ConfigError(f"peft_type={value!r}: lorakern's LoraConfig describes LoRA adapters only")
            elif name in PEFT_BOOKKEEPING:
                continue
            elif name in PEFT_UNSUPPORTED:
                if value != PEFT_UNSUPPORTED[name] and not _is_default_like(value):
                    raise ConfigError(f"{name}={value!r} is a PEFT option lorakern does not support yet; leave it at "
                                      f"PEFT's default ({PEFT_UNSUPPORTED[name]!r}) or drop the field")
            elif not _is_default_like(value):
                raise ConfigError(f"{name}={value!r} is not a LoraConfig field lorakern knows; drop it (fields: "
                                  f"{', '.join(sorted(names))})")
        for f in dataclasses.fields(self):
            if f.name in kwargs:
                value = kwargs[f.name]
            elif f.default is not dataclasses.MISSING:
                value = f.default
            else:
                value = f.default_factory()
            setattr(self, f.name, value)
        self.__post_init__()

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, frozenset, tuple)):
            self.target_modules = sorted(self.target_modules)  # PEFT keeps a set
        if isinstance(self.exclude_modules, (set, frozenset, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if self.task_type is not None:
            self.task_type = str(getattr(self.task_type, "value", self.task_type))
        init = self.init_lora_weights
        check_hyperparameters(self.r, self.lora_alpha, self.lora_dropout, "kaiming" if init is True else init)
        if self.target_modules is None or (not isinstance(self.target_modules, str) and not self.target_modules):
            raise ConfigError("target_modules is empty; name the layers to adapt, e.g. target_modules=['query', "
                              "'value'], a regex string, or 'all-linear'")
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is None or (isinstance(value, str) and name != "modules_to_save"):
                continue
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise TypeError(f"{name} must be a list of non-empty module names"
                                + (" or a regex string" if name != "modules_to_save" else "") + f", got {value!r}")
            setattr(self, name, list(value))
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str) and value.lower() != ALL_LINEAR:
                try:
                    re.compile(value)
                except re.error as exc:
                    raise ConfigError(f"{name}={value!r} is not a valid regex ({exc}); fix the pattern") from exc
        if not isinstance(self.use_dora, bool):
            raise ConfigError(f"use_dora must be True or False, got use_dora={self.use_dora!r}")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias must be one of {BIAS_MODES}, got bias={self.bias!r}")
        for key, rank in self.rank_pattern.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise ConfigError(f"rank_pattern[{key!r}] must be a positive int, got {rank!r}")
        for key, alpha in self.alpha_pattern.items():
            if not isinstance(alpha, (int, float)) or alpha <= 0:
                raise ConfigError(f"alpha_pattern[{key!r}] must be a positive number, got {alpha!r}")
        layers = self.layers_to_transform
        if layers is not None and not (isinstance(layers, int) or all(isinstance(i, int) for i in layers)):
            raise ConfigError(f"layers_to_transform must be an int or a list of ints, got {layers!r}")
        if isinstance(self.layers_pattern, str):
            self.layers_pattern = [self.layers_pattern]
        self._check_loftq()
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern) and rewrites_base(init) and init != "loftq":
            warnings.warn(f"init_lora_weights={init!r} with use_rslora and rank_pattern/alpha_pattern: such an adapter "
                          f"cannot be converted to a plain LoRA on save (path_initial_model_for_weight_conversion), "
                          f"as in PEFT; drop use_rslora or the patterns if you mean to convert it", stacklevel=3)
        if self.quantize not in (None, "nf4"):
            raise ConfigError(f"quantize={self.quantize!r} is not a known quant type; use 'nf4' (or None)")
        if self.quantize_blocksize not in BLOCKSIZES:
            raise ConfigError(f"quantize_blocksize={self.quantize_blocksize!r} is not allowed; use one of {BLOCKSIZES}")
        if self.compute_dtype not in (None, "float32", "float16", "bfloat16"):
            raise ConfigError(f"compute_dtype={self.compute_dtype!r} is not supported; use 'bfloat16', 'float16', "
                              f"'float32' or None (the weight's own dtype)")
        if self.quant_storage != "uint8":
            from lorakern.nf4.storage import quant_storage_name

            self.quant_storage = quant_storage_name(self.quant_storage)  # torch dtypes too, stored as the name
            if self.quantize is None and self.quant_storage != "uint8":
                raise ConfigError(f"quant_storage={self.quant_storage!r} applies to quantized base weights only; "
                                  f"pass quantize='nf4' with it, or leave quant_storage at 'uint8'")
        if isinstance(self.quantize_skip, str) or not all(isinstance(v, str) and v for v in self.quantize_skip):
            raise TypeError(f"quantize_skip must be a list of module names, got {self.quantize_skip!r}")
        self.quantize_skip = list(self.quantize_skip)

    def _check_loftq(self) -> None:
        """PEFT's rules for loftq_config, and lorakern's: LoftQ needs an NF4 base (4 bits)."""
        if dataclasses.is_dataclass(self.loftq_config):  # PEFT's LoftQConfig object
            self.loftq_config = dataclasses.asdict(self.loftq_config)
        if self.init_lora_weights != "loftq":
            if self.loftq_config:
                warnings.warn("loftq_config is ignored unless init_lora_weights='loftq' (as in PEFT)", stacklevel=4)
                self.loftq_config = {}
            return
        fix = "pass loftq_config={'loftq_bits': 4, 'loftq_iter': 1} (PEFT's LoftQConfig fields)"
        if not isinstance(self.loftq_config, dict) or not self.loftq_config:
            raise ConfigError(f"loftq_config must be specified when init_lora_weights is 'loftq'; {fix}")
        unknown = sorted(set(self.loftq_config) - {"loftq_bits", "loftq_iter"})
        if unknown:
            raise ConfigError(f"loftq_config has unknown keys {unknown}; {fix}")
        config = {"loftq_bits": 4, "loftq_iter": 1, **self.loftq_config}
        if config["loftq_bits"] != 4:
            raise ConfigError(f"loftq_bits={config['loftq_bits']!r}: lorakern's LoftQ fits an NF4 (4-bit) base; use "
                              f"loftq_bits=4")
        iters = config["loftq_iter"]
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ConfigError(f"loftq_iter must be an int >= 1, got {iters!r}; {fix}")
        if self.quantize != "nf4":
            raise ConfigError(f"init_lora_weights='loftq' fits the adapter to the quantization error of an NF4 base, "
                              f"but quantize={self.quantize!r}; pass quantize='nf4' (PEFT's route of a dense base "
                              f"rewritten to its dequantized values is not supported)")
        self.loftq_config = config

    # lorakern's earlier names
    alpha = property(lambda self: self.lora_alpha)
    dropout = property(lambda self: self.lora_dropout)
    init = property(lambda self: "kaiming" if self.init_lora_weights is True else self.init_lora_weights)

    def to_dict(self) -> dict:
        return asdict(self)

    def matches_target(self, name: str) -> bool:
        """PEFT's rule: exact name or '.'-suffix for a list (then layers_to_transform), full regex for a string."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        return _list_match(self.target_modules, name) and self._in_transformed_layer(name)

    def _in_transformed_layer(self, name: str) -> bool:
        if self.layers_to_transform is None:
            return True
        patterns = self.layers_pattern or [r"[^.]*"]
        index = next((m for m in (re.match(rf".*\.{p}\.(\d+)\.", name) for p in patterns) if m), None)
        if index is None:
            return False
        wanted = self.layers_to_transform
        return int(index.group(1)) == wanted if isinstance(wanted, int) else int(index.group(1)) in wanted

    def is_excluded(self, name: str) -> bool:
        if self.exclude_modules is None:
            return False
        if isinstance(self.exclude_modules, str):
            return re.fullmatch(self.exclude_modules, name) is not None
        return _list_match(self.exclude_modules, name)

    def in_modules_to_save(self, name: str) -> bool:
        """True for a module to save or anything inside one (PEFT never puts LoRA there)."""
        return within(self.modules_to_save or (), name)

    def keeps_full_precision(self, name: str) -> bool:
        """With quantize: layers named in quantize_skip or modules_to_save (or inside them) stay unquantized."""
        return within(self.quantize_skip, name) or self.in_modules_to_save(name)

    def rank_and_alpha(self, name: str) -> tuple[int, Optional[float]]:
        return _pattern_value(self.rank_pattern, name, self.r), _pattern_value(self.alpha_pattern, name, self.lora_alpha)

    def quantization(self) -> Optional[dict]:
        """What a QLoRA adapter records of its base, or None: enough to rebuild the same 4-bit layers."""
        if self.quantize is None:
            return None
        return {"quant_type": self.quantize, "blocksize": self.quantize_blocksize, "double_quant": self.quantize_double,
                "compute_dtype": self.compute_dtype, "quant_storage": self.quant_storage,
                "skip_modules": list(self.quantize_skip)}


def within(entries, name: str) -> bool:
    """True when ``name`` is one of ``entries`` (by name component) or lies inside one."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in entries)


def _list_match(entries: list[str], name: str) -> bool:
    return any(name == entry or name.endswith("." + entry) for entry in entries)


def _pattern_value(pattern: dict, name: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


__all__ = ["ALIASES", "ALL_LINEAR", "BIAS_MODES", "LoraConfig", "PEFT_UNSUPPORTED", "within"]
