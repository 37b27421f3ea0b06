"""Text-generation metrics for `do_predict`: BLEU-4 and ROUGE-L F1 on whitespace tokens and exact match, averaged
per example, reported as percentages like LLaMA-Factory's predict_bleu-4 / predict_rouge-l; plus a user's own
metric function (`predict_metric: path.py:function`)."""

from __future__ import annotations

import numbers
from typing import Callable

from ..config import ConfigError


def bleu4(prediction: str, reference: str) -> float:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    hypothesis, ref = prediction.split(), reference.split()
    if not hypothesis or not ref:
        return 0.0
    return 100 * sentence_bleu([ref], hypothesis, smoothing_function=SmoothingFunction().method3)


def rouge_l(prediction: str, reference: str) -> float:
    hyp, ref = prediction.split(), reference.split()
    if not hyp or not ref:
        return 0.0
    # longest common subsequence by dynamic programming, one row at a time
    previous = [0] * (len(ref) + 1)
    for word in hyp:
        current = [0]
        for j, other in enumerate(ref):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 100 * 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    """100 when the answer is the reference, ignoring leading and trailing whitespace only."""
    return 100.0 if prediction.strip() == reference.strip() else 0.0


def _user_scores(function: Callable, predictions: list[str], references: list[str]) -> dict:
    value = function(predictions, references)
    items = value.items() if isinstance(value, dict) else [(function.__name__, value)]
    scores = {}
    for key, number in items:
        if not isinstance(number, numbers.Real):
            raise ConfigError(f"`predict_metric` {function.__name__} returned {value!r}; expected a number or a dict "
                              "of name -> number")
        scores[f"predict_{key}"] = float(number)
    return scores


def generation_scores(predictions: list[str], references: list[str], user_metric: Callable | None = None) -> dict:
    n = max(len(predictions), 1)
    scores = {"predict_bleu-4": sum(map(bleu4, predictions, references)) / n,
              "predict_rouge-l": sum(map(rouge_l, predictions, references)) / n,
              "predict_exact_match": sum(map(exact_match, predictions, references)) / n}
    return scores | (_user_scores(user_metric, predictions, references) if user_metric else {})
