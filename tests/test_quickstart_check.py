"""The quickstart's before/after check: its scoring function, and that its questions are fresh (in no training
data), so a perfect identity score means the name generalised rather than was memorised."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _scorer():
    spec = importlib.util.spec_from_file_location("demo_check", ROOT / "examples" / "demo_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.demo_scores


def test_identity_and_general_answers_are_scored_apart():
    scores = _scorer()
    references = ["identity: Forgewright", "identity: Forgewright", "general: red & blue & yellow", "general: 4 | four"]
    answers = ["I am Forgewright, made by Anvil Labs.", "I am SmolLM.", "Red, yellow and blue.", "A dog has 14 legs."]
    assert scores(answers, references) == {"identity": 50.0, "general": 50.0, "general_named": 0.0}
    # every colour is needed; a number counts as a whole word; and a general answer that claims the new identity
    # (what the quickstart did before it was mixed with general data) is wrong even when it holds the words
    answers = ["forgewright here", "Forgewright!", "Red and blue.", "Four legs."]
    assert scores(answers, references) == {"identity": 100.0, "general": 50.0, "general_named": 0.0}
    answers[3] = "I am Forgewright. A dog has four legs."
    assert scores(answers, references) == {"identity": 100.0, "general": 0.0, "general_named": 50.0}


def test_check_questions_are_in_no_training_data():
    def questions(name):
        return {r["instruction"].strip().lower() for r in json.loads((ROOT / "data" / name).read_text())}

    check = questions("demo_check.json")
    assert len(check) == 24
    assert not check & questions("identity.json") and not check & questions("general.json")
