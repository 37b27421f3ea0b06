"""The quickstart's before/after check (predict_metric for data/demo_check.json): did the model learn its new name,
and does it still answer general questions?

Each reference is `identity: NAME` (the answer must contain NAME) or `general: a | b & c` (the answer must contain
one of a, b and also c, as whole words, in any case, and must not claim the new identity). Returns the percentage
of identity and of general questions answered right, and of general questions answered with the new name (how the
quickstart forgot when it trained on identity data alone): predict_identity, predict_general, predict_general_named.
"""

import re

NAME = "Forgewright"


def _contains(answer: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word.strip())}(?!\w)", answer, re.IGNORECASE) is not None


def right(answer: str, reference: str) -> bool:
    kind, _, wanted = reference.partition(":")
    if kind == "identity":
        return _contains(answer, wanted)
    groups = [[alt for alt in group.split("|")] for group in wanted.split("&")]
    return all(any(_contains(answer, alt) for alt in group) for group in groups) and not _contains(answer, NAME)


def demo_scores(predictions: list[str], references: list[str]) -> dict:
    scores = {}
    for kind in ("identity", "general"):
        pairs = [(p, r) for p, r in zip(predictions, references) if r.startswith(kind + ":")]
        scores[kind] = 100 * sum(right(p, r) for p, r in pairs) / max(len(pairs), 1)
    general = [p for p, r in zip(predictions, references) if r.startswith("general:")]
    scores["general_named"] = 100 * sum(_contains(p, NAME) for p in general) / max(len(general), 1)
    return scores
