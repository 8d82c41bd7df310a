"""Every metric on cases computed by hand, including the official SQuAD normalisation and v2.0 rules."""
import math

import numpy as np
import pytest

from lorakern.harness.metrics import (
    exact_match, glue_metrics, normalize_answer, squad_v1_metrics, squad_v2_metrics, token_f1,
)
from lorakern.harness.squad import SquadOptions, extract_answers
from lorakern.harness.data import QAExample


def test_classification_metrics_by_hand():
    # TP=1, TN=2, FP=0, FN=1: MCC = (1*2 - 0*1) / sqrt(1 * 2 * 2 * 3); precision 1, recall 1/2
    got = glue_metrics(["mcc", "accuracy", "f1"], [1, 0, 0, 0], [1, 1, 0, 0])
    assert got["mcc"] == pytest.approx(2 / math.sqrt(12), rel=1e-12)
    assert got["accuracy"] == 0.75
    assert got["f1"] == pytest.approx(2 / 3, rel=1e-12)
    assert glue_metrics(["mcc"], [1, 1, 1, 1], [1, 0, 1, 0])["mcc"] == 0.0  # a constant predictor


def test_correlations_by_hand():
    # x = [1, 2, 3], y = [1, 2, 4]: cov 3, |dx| sqrt(2), |dy| sqrt(42)/3 -> r = 9 / sqrt(84); ranks agree
    got = glue_metrics(["pearson", "spearman"], [1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    assert got["pearson"] == pytest.approx(9 / math.sqrt(84), rel=1e-12)
    assert got["spearman"] == pytest.approx(1.0, rel=1e-12)
    # one swapped pair in 4: rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert glue_metrics(["spearman"], [1, 2, 3, 4], [1, 3, 2, 4])["spearman"] == pytest.approx(0.8, rel=1e-12)
    assert glue_metrics(["pearson"], [2.0, 2.0, 2.0], [1.0, 2.0, 3.0])["pearson"] == 0.0


def test_metric_errors():
    with pytest.raises(ValueError, match="unknown metric 'auc'"):
        glue_metrics(["auc"], [1], [1])
    with pytest.raises(ValueError, match=r"predictions \(2,\) and labels \(3,\) must be equal"):
        glue_metrics(["accuracy"], [1, 0], [1, 0, 1])


@pytest.mark.parametrize(
    "text,expected",
    [("The  Cat!", "cat"), ("an apple, a pear.", "apple pear"), ("Theatre of the absurd", "theatre of absurd"),
     ("  A\tB\nC ", "b c"), ("U.S.-made", "usmade"), ("", "")],
    ids=["article-punct", "two-articles", "article-inside-word", "whitespace", "punctuation", "empty"],
)
def test_normalisation(text, expected):
    assert normalize_answer(text) == expected


def test_exact_and_f1_by_hand():
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1
    # pred [big, red, dog] vs gold [red, dog, barked]: 2 common, P = R = 2/3
    assert token_f1("the big red dog", "red dog barked") == pytest.approx(2 / 3)
    assert token_f1("dog dog", "dog") == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts clip: 1 common of 2
    assert token_f1("", "") == 1.0 and token_f1("a", "") == 1.0  # "a" normalises to nothing
    assert token_f1("cat", "") == 0.0 and token_f1("", "cat") == 0.0


def test_v1_takes_the_best_of_several_gold_answers():
    golds = {"q1": ["Paris, France", "Paris"], "q2": ["blue sky", "the sky"]}
    got = squad_v1_metrics(golds, {"q1": "paris", "q2": "sky"})
    # q1 exact via the second gold; q2: "sky" vs "the sky" -> normalised equal -> exact 1, F1 1
    assert got == {"exact_match": 100.0, "f1": 100.0}
    got = squad_v1_metrics({"q": ["red dog barked"]}, {"q": "the big red dog"})
    assert got["exact_match"] == 0.0 and got["f1"] == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match=r"1 questions have no prediction, e.g. \['q2'\]"):
        squad_v1_metrics(golds, {"q1": "paris"})


def test_v2_empty_golds_breakdown_and_best_threshold_by_hand():
    golds = {"a": ["Paris"], "b": [], "c": ["blue sky"]}
    predictions = {"a": "Paris", "b": "something", "c": "sky"}
    na_probs = {"a": 0.1, "b": 0.8, "c": 0.4}
    got = squad_v2_metrics(golds, predictions, na_probs, threshold=0.5)
    # raw: exact a 1, b 0, c 0; f1 a 1, b 0, c 2/3. b's na_prob 0.8 > 0.5 -> b counts as correctly unanswered.
    assert got["exact"] == pytest.approx(200 / 3) and got["f1"] == pytest.approx(100 * (2 + 2 / 3) / 3)
    assert got["HasAns_exact"] == 50.0 and got["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert got["NoAns_exact"] == 100.0 and got["NoAns_f1"] == 100.0
    assert (got["HasAns_total"], got["NoAns_total"], got["total"]) == (2.0, 1.0, 3.0)
    # sweep by na_prob from 1 (all unanswered): a +1 (best 2 @0.1), c +0 / +2/3 (f1 best @0.4), b -1
    assert (got["best_exact"], got["best_exact_thresh"]) == (pytest.approx(200 / 3), 0.1)
    assert (got["best_f1"], got["best_f1_thresh"]) == (pytest.approx(100 * (2 + 2 / 3) / 3), 0.4)
    # the script's default threshold 1.0 marks nothing unanswerable: b scores its raw 0
    assert squad_v2_metrics(golds, predictions, na_probs)["exact"] == pytest.approx(100 / 3)
    # an empty prediction is right for an unanswerable question without any threshold
    assert squad_v2_metrics({"b": []}, {"b": ""})["exact"] == 100.0


def test_answer_extraction_obeys_context_n_best_and_max_length():
    example = QAExample("q", "what?", "alpha beta gamma delta", [("beta gamma", 6)])
    offsets = [None, None, None, (0, 5), (6, 10), (11, 16), (17, 22), None]
    feature = {"input_ids": [0] * 8, "_example": 0, "_offsets": offsets}
    logits = np.full((8, 2), -5.0)
    logits[0] = [9.0, 9.0]        # <s> scores highest but is no context token
    logits[4, 0], logits[5, 1] = 3.0, 3.0   # beta .. gamma
    logits[6, 1] = 2.5            # a slightly worse end
    logits[3, 1] = 4.0            # the best end lies before every good start: invalid
    predictions, na = extract_answers([example], [feature], [logits], SquadOptions(), "1.1")
    assert predictions == {"q": "beta gamma"} and na == {"q": 0.0}
    short, _ = extract_answers([example], [feature], [logits], SquadOptions(max_answer_length=1), "1.1")
    assert short == {"q": "alpha"}  # one-token spans: alpha -5 + 4 = -1 beats beta -2, gamma -2, delta -2.5
    top_one, _ = extract_answers([example], [feature], [logits], SquadOptions(n_best=1), "1.1")
    assert top_one == {"q": ""}  # the single best start and end are <s>: no valid pair among the n-best
    seed, _ = extract_answers([example], [feature], [logits], SquadOptions(mode="seed"), "1.1")
    assert seed == {"q": ""}  # argmax start and end both land on <s>: the seed's mode gives no answer


def test_v2_no_answer_probability_from_either_head():
    example = QAExample("q", "what?", "alpha beta", [])
    offsets = [None, None, (0, 5), (6, 10), None]
    feature = {"input_ids": [0] * 5, "_example": 0, "_offsets": offsets}
    seed_logits = np.zeros((5, 3))
    seed_logits[0, 2] = 2.0                   # the seed's no-answer logit at <s>
    _, na = extract_answers([example], [feature], [seed_logits], SquadOptions(), "2.0")
    assert na["q"] == pytest.approx(1 / (1 + math.exp(-2.0)))
    hf_logits = np.zeros((5, 2))
    hf_logits[0] = [1.5, 1.0]                 # null score 2.5, best span score 0
    _, na = extract_answers([example], [feature], [hf_logits], SquadOptions(), "2.0")
    assert na["q"] == pytest.approx(1 / (1 + math.exp(-2.5)))
