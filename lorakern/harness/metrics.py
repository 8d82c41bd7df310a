"""Metrics by their official definitions.

GLUE: scikit-learn's Matthews correlation, accuracy and binary F1; scipy's Pearson and Spearman.
SQuAD: the official evaluation scripts (v1.1 and v2.0) re-stated: answer normalisation (lower case, no
punctuation, no articles a/an/the, single spaces), exact match and token F1 taken as the maximum over the
gold answers, an unanswerable question scored against the empty string, and for v2.0 the HasAns / NoAns
breakdown and the best no-answer threshold.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Mapping, Sequence

import numpy as np

GLUE_METRICS = ("mcc", "accuracy", "f1", "pearson", "spearman")


def glue_metrics(names: Sequence[str], predictions: Sequence, labels: Sequence) -> dict[str, float]:
    """The named GLUE metrics of class predictions (or STS-B scores) against the labels."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or predictions.size == 0:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} must be equal, non-empty")
    out = {}
    for name in names:
        if name == "mcc":
            out[name] = float(matthews_corrcoef(labels, predictions))
        elif name == "accuracy":
            out[name] = float(accuracy_score(labels, predictions))
        elif name == "f1":
            out[name] = float(f1_score(labels, predictions, zero_division=0.0))
        elif name in ("pearson", "spearman"):
            if np.ptp(predictions) == 0 or np.ptp(labels) == 0:
                out[name] = 0.0  # a constant series has no correlation (scipy would return nan and warn)
            else:
                fn = pearsonr if name == "pearson" else spearmanr
                out[name] = float(fn(predictions, labels)[0])
        else:
            raise ValueError(f"unknown metric {name!r}; known: {GLUE_METRICS}")
    return out


# ----------------------------------------------------------------------------------------------- SQuAD

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official normalisation: lower case, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> int:
    return int(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of normalised answers; two empty answers score 1, one empty answer 0 (v2.0 rule)."""
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _raw_scores(golds: Mapping[str, Sequence[str]], predictions: Mapping[str, str]):
    missing = sorted(set(golds) - set(predictions))
    if missing:
        raise ValueError(f"{len(missing)} questions have no prediction, e.g. {missing[:3]}; predict every id")
    exact, f1 = {}, {}
    for qid, answers in golds.items():
        answers = [a for a in answers if normalize_answer(a)] or [""]  # official: no gold text -> the empty one
        exact[qid] = max(exact_match(predictions[qid], a) for a in answers)
        f1[qid] = max(token_f1(predictions[qid], a) for a in answers)
    return exact, f1


def squad_v1_metrics(golds: Mapping[str, Sequence[str]], predictions: Mapping[str, str]) -> dict[str, float]:
    """exact_match and f1 in percent, as the v1.1 script reports them."""
    exact, f1 = _raw_scores(golds, predictions)
    n = len(golds)
    return {"exact_match": 100.0 * sum(exact.values()) / n, "f1": 100.0 * sum(f1.values()) / n}


def _apply_threshold(scores, na_probs, has_answer, threshold):
    return {qid: (float(not has_answer[qid]) if na_probs[qid] > threshold else s) for qid, s in scores.items()}


def _best_threshold(predictions, scores, na_probs, has_answer):
    """The v2.0 script's find_best_thresh: sweep na_prob upward, starting with every question unanswered."""
    current = best = sum(1 for qid in has_answer if not has_answer[qid])
    best_threshold = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        if has_answer[qid]:
            diff = scores[qid]
        else:
            diff = -1 if predictions[qid] else 0
        current += diff
        if current > best:
            best, best_threshold = current, na_probs[qid]
    return 100.0 * best / len(scores), best_threshold


def squad_v2_metrics(golds: Mapping[str, Sequence[str]], predictions: Mapping[str, str],
                     na_probs: Mapping[str, float] | None = None, threshold: float = 1.0) -> dict[str, float]:
    """The v2.0 script's numbers: exact, f1, HasAns_* and NoAns_* breakdown, best_exact / best_f1 (+ thresholds).

    ``golds`` maps an id to its gold texts (empty for an unanswerable question); ``na_probs`` to the model's
    no-answer probability (0 everywhere when omitted, as in the script). A question whose na_prob exceeds
    ``threshold`` counts as answered "no answer" (the script's default threshold is 1.0).
    """
    na_probs = {qid: 0.0 for qid in golds} if na_probs is None else dict(na_probs)
    has_answer = {qid: bool(answers) for qid, answers in golds.items()}  # the script's make_qid_to_has_ans
    exact_raw, f1_raw = _raw_scores(golds, predictions)
    exact = _apply_threshold(exact_raw, na_probs, has_answer, threshold)
    f1 = _apply_threshold(f1_raw, na_probs, has_answer, threshold)
    out = {"exact": 100.0 * sum(exact.values()) / len(exact), "f1": 100.0 * sum(f1.values()) / len(f1),
           "total": float(len(exact))}
    for name, keep in (("HasAns", True), ("NoAns", False)):
        ids = [qid for qid in golds if has_answer[qid] == keep]
        if ids:
            out[f"{name}_exact"] = 100.0 * sum(exact[q] for q in ids) / len(ids)
            out[f"{name}_f1"] = 100.0 * sum(f1[q] for q in ids) / len(ids)
            out[f"{name}_total"] = float(len(ids))
    out["best_exact"], out["best_exact_thresh"] = _best_threshold(predictions, exact_raw, na_probs, has_answer)
    out["best_f1"], out["best_f1_thresh"] = _best_threshold(predictions, f1_raw, na_probs, has_answer)
    return out
