"""Text-generation metrics for `do_predict`: BLEU-4 and ROUGE-L F1 on whitespace tokens and exact match, averaged
per example, reported as percentages like LLaMA-Factory's predict_bleu-4 / predict_rouge-l; plus a user's own
metric function (`predict_metric: path.py:function`)."""

from __future__ import annotations

import importlib.util
import numbers
from pathlib import Path
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


def load_user_metric(spec: str) -> Callable:
    """The function named by `path.py:function` (path relative to the working directory)."""
    path, _, name = spec.rpartition(":")
    where = f"`predict_metric: {spec}`"
    if not path.endswith(".py") or not name.isidentifier():
        raise ConfigError(f"{where}: expected path.py:function, e.g. metrics.py:f1")
    if not Path(path).is_file():
        raise ConfigError(f"{where}: file {Path(path).resolve()} not found")
    module_spec = importlib.util.spec_from_file_location(f"tuneforge_user_metric_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # the user's file: any error in it is theirs to see, in one line
        raise ConfigError(f"{where}: importing {path} failed: {type(err).__name__}: {err}") from None
    function = getattr(module, name, None)
    if not callable(function):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ConfigError(f"{where}: {path} has no function {name!r} (it defines: {', '.join(found) or 'none'})")
    return function


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
