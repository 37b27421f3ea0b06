"""Text-generation metrics for `do_predict`, as LLaMA-Factory 0.9.5 computes them, so that its predict_bleu-4 and
predict_rouge-* figures compare with ours: BLEU-4 on characters (nltk, smoothing method 3) and ROUGE-1/2/L F1 on
jieba's word segmentation (rouge_chinese), each per example, as percentages rounded to 4 decimals and averaged; plus
exact match and a user's own metric function (`predict_metric: path.py:function`)."""

from __future__ import annotations

import logging
import numbers
from typing import Callable

from ..config import ConfigError


def bleu4(prediction: str, reference: str) -> float:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    if not prediction or not reference:
        return 0.0
    # characters, not words: LLaMA-Factory's choice, which also scores Chinese text without segmenting it
    return round(100 * sentence_bleu([list(reference)], list(prediction),
                                     smoothing_function=SmoothingFunction().method3), 4)


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F1 of the two texts cut into words by jieba (spaces and punctuation are tokens
    of their own there), as rouge_chinese scores them."""
    import jieba
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.WARNING)  # not its "Building prefix dict ..." lines on every predict
    hypothesis, ref = (" ".join(jieba.cut(text)) for text in (prediction, reference))
    if not hypothesis.split() or not ref.split():
        return {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    return {name: round(100 * score["f"], 4) for name, score in Rouge().get_scores(hypothesis, ref)[0].items()}


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
    rouges = list(map(rouge, predictions, references))
    scores = {"predict_bleu-4": sum(map(bleu4, predictions, references)) / n,
              **{f"predict_{name}": sum(r[name] for r in rouges) / n for name in ("rouge-1", "rouge-2", "rouge-l")},
              "predict_exact_match": sum(map(exact_match, predictions, references)) / n}
    return scores | (_user_scores(user_metric, predictions, references) if user_metric else {})
