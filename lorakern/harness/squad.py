"""``lorakern squad``: extractive question answering (SQuAD v1.1 / v2.0) with LoRA.

Two ways to turn a question and a context into model inputs and answers:
- "sliding" (default): the context is cut into windows of max_length tokens that overlap by doc_stride
  tokens, so no answer is lost to truncation; an answer is the best of the n-best start/end pairs over all
  windows with end >= start, both inside the context and at most max_answer_length tokens long.
- "seed": the seed's way, for comparison: question + context truncated to max_length (512), start and end
  each by argmax.
For v2.0 every question also gets a no-answer probability: the seed head's third channel at <s>
(sigmoid), or for transformers' head sigmoid(null score - best span score) where the null score is the
start + end logit at <s>; a question is answered "" when it exceeds ``null_threshold``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.nn import functional as F

from lorakern._io import atomic_write_bytes
from lorakern.harness import distributed
from lorakern.harness.data import HF, QAExample, corpus_texts, load_squad, squad_version
from lorakern.harness.metrics import squad_v1_metrics, squad_v2_metrics
from lorakern.harness.models import TINY, Backbone, forward_logits
from lorakern.harness.run import RunOptions, TaskPlan, collate_fn, run_plan
from lorakern.harness.train import predict

MODES = ("sliding", "seed")
NO_ANSWER_WEIGHT = 2.1  # the seed's weight of the no-answer BCE term


@dataclass
class SquadOptions:
    """SQuAD-specific settings. max_length None: 128 for tiny, 384 for a real model (512 in seed mode);
    doc_stride None: a third of max_length; null_threshold None: 0.5 (sliding) or the seed's 1.0 (seed)."""

    mode: str = "sliding"
    doc_stride: Optional[int] = None
    n_best: int = 20
    max_answer_length: int = 30
    null_threshold: Optional[float] = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.n_best < 1 or self.max_answer_length < 1:
            raise ValueError(f"n_best ({self.n_best}) and max_answer_length ({self.max_answer_length}) must be >= 1")


def featurize(tokenizer, examples: list[QAExample], max_length: int, doc_stride: int, mode: str) -> list[dict]:
    """Token windows with start/end labels (<s> = 0 when the window holds no answer) and their offsets.

    Each feature keeps "_example" (its question's index) and "_offsets" (character spans of context
    tokens, None elsewhere) for answer extraction; keys starting with "_" never reach the model.
    """
    sliding = mode == "sliding"
    if sliding and not 0 < doc_stride < max_length:
        raise ValueError(f"doc_stride must be in (0, max_length={max_length}), got {doc_stride}")
    encoded = tokenizer([e.question for e in examples], [e.context for e in examples], truncation="only_second",
                        max_length=max_length, stride=doc_stride if sliding else 0,
                        return_overflowing_tokens=sliding, return_offsets_mapping=True)
    sample_of = encoded["overflow_to_sample_mapping"] if sliding else range(len(examples))
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    features = []
    for i, example_index in enumerate(sample_of):
        example = examples[example_index]
        sequence = encoded.sequence_ids(i)
        offsets = [tuple(o) if s == 1 else None for o, s in zip(encoded["offset_mapping"][i], sequence)]
        start = end = 0
        if example.answers:
            text, char_start = example.answers[0]
            char_end = char_start + len(text)
            inside = [t for t, o in enumerate(offsets) if o is not None]
            if inside and offsets[inside[0]][0] <= char_start and offsets[inside[-1]][1] >= char_end:
                start = next(t for t in inside if offsets[t][1] > char_start)
                end = next(t for t in reversed(inside) if offsets[t][0] < char_end)
        features.append({**{k: encoded[k][i] for k in keys}, "start_positions": start, "end_positions": end,
                         "no_answer": float(start == 0), "_example": example_index, "_offsets": offsets})
    return features


def qa_loss(logits: torch.Tensor, batch: dict, no_answer_channel: bool) -> torch.Tensor:
    """Mean of start and end cross-entropy over real tokens, plus 2.1 x BCE of the no-answer logit (seed v2)."""
    logits = logits.float()
    padding = batch["attention_mask"] == 0
    start = logits[..., 0].masked_fill(padding, -1e4)
    end = logits[..., 1].masked_fill(padding, -1e4)
    loss = (F.cross_entropy(start, batch["start_positions"]) + F.cross_entropy(end, batch["end_positions"])) / 2
    if no_answer_channel:
        loss = loss + NO_ANSWER_WEIGHT * F.binary_cross_entropy_with_logits(logits[:, 0, 2], batch["no_answer"])
    return loss


def extract_answers(examples: list[QAExample], features: list[dict], logits: list[np.ndarray],
                    options: SquadOptions, version: str) -> tuple[dict[str, str], dict[str, float]]:
    """The best span text of every question and its no-answer probability (0 for v1.1)."""
    best: dict[int, tuple[float, str]] = {}
    null: dict[int, float] = {}
    for feature, feature_logits in zip(features, logits):
        index, offsets = feature["_example"], feature["_offsets"]
        context = examples[index].context
        n = len(feature["input_ids"])
        start_logits, end_logits = feature_logits[:n, 0], feature_logits[:n, 1]
        if options.mode == "seed":
            s, e = int(np.argmax(start_logits)), int(np.argmax(end_logits))
            valid = offsets[s] is not None and offsets[e] is not None and e >= s
            candidates = [(float(start_logits[s] + end_logits[e]), s, e)] if valid else []
        else:
            starts = np.argsort(start_logits)[::-1][: options.n_best]
            ends = np.argsort(end_logits)[::-1][: options.n_best]
            candidates = [(float(start_logits[s] + end_logits[e]), int(s), int(e)) for s in starts for e in ends
                          if offsets[s] is not None and offsets[e] is not None
                          and s <= e < s + options.max_answer_length]
        if candidates:
            score, s, e = max(candidates)
            if index not in best or score > best[index][0]:
                best[index] = (score, context[offsets[s][0]:offsets[e][1]])
        if version == "2.0":
            # the window most sure there is an answer decides: minimum over windows
            value = feature_logits[0, 2] if feature_logits.shape[-1] == 3 else start_logits[0] + end_logits[0]
            null[index] = min(null.get(index, math.inf), float(value))
    predictions, na_probs = {}, {}
    for index, example in enumerate(examples):
        score, text = best.get(index, (-math.inf, ""))
        predictions[example.qid] = text
        if version == "2.0":
            raw = null[index] if logits[0].shape[-1] == 3 else null[index] - score
            na_probs[example.qid] = float(1 / (1 + math.exp(-max(min(raw, 50.0), -50.0))))
        else:
            na_probs[example.qid] = 0.0
    return predictions, na_probs


def score(examples: list[QAExample], predictions: dict[str, str], na_probs: dict[str, float], version: str,
          threshold: float) -> dict[str, float]:
    golds = {e.qid: [text for text, _ in e.answers] for e in examples}
    if version == "1.1":
        return squad_v1_metrics(golds, predictions)
    return squad_v2_metrics(golds, predictions, na_probs, threshold)


def make_plan(version: str, splits: dict[str, list[QAExample]], backbone: Backbone, max_length: int,
              squad: SquadOptions, head: str) -> TaskPlan:
    tokenizer = backbone.tokenizer
    doc_stride = squad.doc_stride or max_length // 3
    threshold = squad.null_threshold if squad.null_threshold is not None else (1.0 if squad.mode == "seed" else 0.5)
    train_features = featurize(tokenizer, splits["train"], max_length, doc_stride, squad.mode)
    dev_features = featurize(tokenizer, splits["dev"], max_length, doc_stride, squad.mode)
    no_answer_channel = version == "2.0" and head == "seed"
    collate = collate_fn(tokenizer.pad_token_id)

    def answers(model, config):
        device = next(model.parameters()).device
        batches = predict(model, dev_features, collate, forward_logits, config, device)
        logits = [row.numpy() for batch in batches for row in batch]
        return extract_answers(splits["dev"], dev_features, logits, squad, version)

    def evaluate(model, config) -> dict[str, float]:
        predictions, na_probs = answers(model, config)
        return {f"dev/{k}": v for k, v in score(splits["dev"], predictions, na_probs, version, threshold).items()
                if not k.endswith("total")}

    def artifacts(model, config, out_dir):
        """predictions.json (the official scripts' input, no-answer applied) and na_probs.json for v2.0."""
        predictions, na_probs = answers(model, config)  # every rank: the evaluation is sharded
        if not distributed.current().is_main:
            return
        final = {q: ("" if na_probs[q] > threshold else text) for q, text in predictions.items()}
        atomic_write_bytes(os.path.join(out_dir, "predictions.json"), (json.dumps(final, indent=1) + "\n").encode())
        if version == "2.0":
            atomic_write_bytes(os.path.join(out_dir, "na_probs.json"), (json.dumps(na_probs, indent=1) + "\n").encode())

    headline = ["dev/exact_match", "dev/f1"] if version == "1.1" else [
        "dev/exact", "dev/f1", "dev/HasAns_exact", "dev/HasAns_f1", "dev/NoAns_exact", "dev/NoAns_f1",
        "dev/best_exact", "dev/best_f1", "dev/best_f1_thresh"]
    kind = "qa_v2" if no_answer_channel else "qa"
    settings = {"mode": squad.mode, "max length": max_length, "doc stride": doc_stride if squad.mode == "sliding"
                else "none (truncated)", "n-best": squad.n_best, "max answer length": squad.max_answer_length,
                "no-answer threshold": threshold,
                "examples": {"train": len(splits["train"]), "dev": len(splits["dev"])},
                "features": {"train": len(train_features), "dev": len(dev_features)}}
    return TaskPlan(name=f"squad-v{version}", kind=kind, num_labels=3 if no_answer_channel else 2,
                    features=train_features, loss_fn=lambda m, b: qa_loss(forward_logits(m, b), b, no_answer_channel),
                    evaluate=evaluate, headline=headline, settings=settings, pad_id=tokenizer.pad_token_id,
                    artifacts=artifacts)


def run_squad(version: str = "1.1", options: Optional[RunOptions] = None, squad: Optional[SquadOptions] = None,
              **overrides) -> dict:
    """Fine-tune on SQuAD v1.1 or v2.0 and return the run summary (see ``run_glue`` for ``overrides``)."""
    version = squad_version(version)
    options = dataclasses.replace(options or RunOptions(), **overrides)
    squad = squad or SquadOptions()
    with distributed.session(options.resolved_train().resolved_device()):
        return _run_squad(version, options, squad)


def _run_squad(version: str, options: RunOptions, squad: SquadOptions) -> dict:
    splits = load_squad(version, options.data)
    if options.max_length:
        max_length = options.max_length
    else:
        max_length = 128 if options.model == TINY else (512 if squad.mode == "seed" else 384)
    backbone = Backbone(options.model, corpus_texts(splits) if options.model == TINY else None, max_length,
                        seed=options.train.seed)
    data_label = "fixtures (lorakern/harness/fixtures/squad)" if options.data is None else (
        "Hugging Face datasets (squad)" if options.data == HF else os.path.abspath(options.data))
    return run_plan(make_plan(version, splits, backbone, max_length, squad, options.head), backbone, options,
                    data_label)
