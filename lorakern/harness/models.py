"""Encoders, tokenizers, heads and LoRA recipes: everything the harness builds a model from.

``build_model`` is the one place a harness model is made (training, the reload check and the parity
test all go through it), so what is tested is what runs.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import os
from typing import Any, Optional, Union

import torch
from torch import nn

from lorakern.heads import SeedClassifier, SeedQuestionAnswering, SeedRegressor
from lorakern.injection import LoraConfig, inject

TINY = "tiny"
# Small enough that `lorakern glue --task sst2` trains in seconds on 2 CPU cores.
TINY_SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # RoBERTa's ids 0..4 for the first four
KINDS = ("classification", "regression", "qa", "qa_v2")
HEADS = ("seed", "hf")
RECIPES = ("seed", "qlora")


def build_tiny_tokenizer(texts: list[str], max_length: int, max_vocab: int = 8000):
    """A word-level tokenizer over ``texts`` with RoBERTa's special tokens, built without any download.

    Deterministic: words are lower-cased, split like BERT's pre-tokenizer (runs of word characters, runs of
    punctuation) and ranked by (count desc, word), so the same texts always give the same ids. Offsets map
    back to the original text, which SQuAD's answer extraction needs.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer, pre = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    counts = collections.Counter(word for text in texts for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: max_vocab - len(vocab)]:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer, backend.pre_tokenizer = normalizer, pre
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        mask_token="<mask>", cls_token="<s>", sep_token="</s>", model_max_length=max_length,
        model_input_names=["input_ids", "attention_mask"])


class Backbone:
    """Where encoders come from: ``"tiny"`` (random init from a config), a local Hugging Face folder or
    cached id, or a ``transformers.PretrainedConfig`` (random weights of that shape, for tests).

    Every call of ``encoder()`` / ``hf_model()`` returns a fresh model with the same weights: random inits
    happen under a private RNG seeded by ``seed``, so a rebuilt tiny model equals the trained one's base and
    the global RNG stream of the training run is untouched.
    """

    def __init__(self, model: Union[str, Any] = TINY, texts: Optional[list[str]] = None, max_length: int = 128,
                 seed: int = 0) -> None:
        from transformers import PretrainedConfig, RobertaConfig

        self.seed, self.max_length = seed, max_length
        self.pretrained: Optional[str] = None
        if isinstance(model, PretrainedConfig):
            self.config, self.tokenizer, self.name = model, None, f"{type(model).__name__}(random init)"
        elif model == TINY:
            if not texts:
                raise ValueError("the tiny model builds its vocabulary from the training texts; pass texts=")
            self.tokenizer = build_tiny_tokenizer(texts, max_length)
            self.config = RobertaConfig(
                vocab_size=len(self.tokenizer), max_position_embeddings=max_length + 2, type_vocab_size=1,
                pad_token_id=1, bos_token_id=0, eos_token_id=2, **TINY_SIZES)
            self.name = f"tiny RoBERTa ({TINY_SIZES['num_hidden_layers']} layers, hidden "
            self.name += f"{TINY_SIZES['hidden_size']}, vocab {len(self.tokenizer)}, random init seed {seed})"
        else:
            self.pretrained, self.name = str(model), str(model)
            self.config, self.tokenizer = _load_pretrained_config_and_tokenizer(str(model))

    def _fresh(self, build):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return build()

    def encoder(self) -> nn.Module:
        from transformers import AutoModel

        if self.pretrained:
            return self._fresh(lambda: AutoModel.from_pretrained(self.pretrained, local_files_only=True))
        # a copy: the heads write num_labels into their encoder's config, which must not leak into the next model
        return self._fresh(lambda: AutoModel.from_config(copy.deepcopy(self.config)))

    def hf_model(self, kind: str, num_labels: int) -> nn.Module:
        """transformers' standard head for ``kind``: *ForSequenceClassification or *ForQuestionAnswering."""
        from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

        if kind in ("qa", "qa_v2"):
            cls, kwargs = AutoModelForQuestionAnswering, {}
        else:
            cls = AutoModelForSequenceClassification
            kwargs = {"num_labels": 1 if kind == "regression" else num_labels,
                      "problem_type": "regression" if kind == "regression"
                      else "single_label_classification"}
        if self.pretrained:
            return self._fresh(lambda: cls.from_pretrained(self.pretrained, local_files_only=True, **kwargs))
        config = copy.deepcopy(self.config)
        for key, value in kwargs.items():
            setattr(config, key, value)
        return self._fresh(lambda: cls.from_config(config))


def _load_pretrained_config_and_tokenizer(path: str):
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
    except (OSError, ValueError) as exc:
        hint = "" if os.path.isdir(path) else " (no such folder; ids work only when cached locally)"
        raise ValueError(f"--model {path!r} could not be loaded{hint}: {exc}. Give a local Hugging Face folder "
                         f"with config.json, the weights and the tokenizer files, or 'tiny'") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"--model {path!r} has no fast tokenizer (tokenizer.json); SQuAD's offsets need one")
    return config, tokenizer


def head_module(kind: str) -> str:
    """The name of the task head in models of ``kind`` (the seed's and transformers' agree)."""
    return "qa_outputs" if kind in ("qa", "qa_v2") else "classifier"


def recipe_config(recipe: str, kind: str, overrides: Optional[dict] = None) -> LoraConfig:
    """The LoraConfig of a recipe for a model of ``kind``, with ``overrides`` (LoraConfig fields) on top.

    seed: the published code (shared/seed.md): r=8 on query/value, s = alpha/r = 1, no LoRA dropout,
    A ~ N(0, 1), B zeros; every bias, every LayerNorm and the head train.
    qlora: the post's PEFT + bitsandbytes recipe with the repository's values: NF4 base (the head not
    quantized), r=4, alpha 8, dropout 0.1 on query, key, value, intermediate.dense, output.dense;
    LayerNorm and the head train, biases do not.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    head = head_module(kind)
    task_type = "QUESTION_ANS" if kind in ("qa", "qa_v2") else "SEQ_CLS"
    if recipe == "seed":
        fields = dict(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"], bias="all",
                      modules_to_save=["LayerNorm", head], init_lora_weights="normal", task_type=task_type)
    elif recipe == "qlora":
        names = {f.name for f in dataclasses.fields(LoraConfig)}
        if "quantize" not in names:
            raise ValueError("--recipe qlora needs lorakern's NF4 support (LoraConfig.quantize), which this "
                             "install lacks; update lorakern, or use --recipe seed")
        fields = dict(r=4, lora_alpha=8, lora_dropout=0.1,
                      target_modules=["query", "key", "value", "intermediate.dense", "output.dense"], bias="none",
                      modules_to_save=["LayerNorm", head], task_type=task_type, quantize="nf4",
                      quantize_skip=[head])
    else:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {RECIPES}")
    fields.update(overrides or {})
    return LoraConfig(**fields)


def build_model(backbone: Backbone, kind: str, num_labels: int = 2, head: str = "seed",
                lora: Optional[LoraConfig] = None) -> nn.Module:
    """A fresh model of ``kind`` with the chosen head, with LoRA injected by ``lora`` (none when None).

    kind: "classification" (num_labels classes), "regression" (STS-B), "qa" (SQuAD v1.1) or "qa_v2".
    head: "seed" (lorakern.heads) or "hf" (transformers' standard heads on the same encoder).
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if head == "hf":
        model = backbone.hf_model(kind, num_labels)
    else:
        with torch.random.fork_rng(devices=[]):
            encoder = backbone.encoder()
            torch.manual_seed(backbone.seed + 1)  # the head's init, the same on every rebuild
            if kind == "classification":
                model = SeedClassifier(encoder, num_labels)
            elif kind == "regression":
                model = SeedRegressor(encoder)
            else:
                model = SeedQuestionAnswering(encoder, no_answer=kind == "qa_v2")
    if lora is not None:
        inject(model, lora)
    return model


def forward_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """Logits of any harness model: (B, C) classes, (B,) regression scores, or (B, T, 2|3) for QA."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "start_logits"):
        return torch.stack([out.start_logits, out.end_logits], dim=-1)
    logits = out.logits
    config = getattr(_unwrap(model), "config", None)
    return logits.squeeze(-1) if getattr(config, "problem_type", None) == "regression" else logits


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (which has no ``config``), or the model."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model
