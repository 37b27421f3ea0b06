"""Reward functions for the RL stages. A reward function takes `(prompts, completions, **extra_columns)` (lists
of texts, and each extra column of the prompt data as a list) and returns one float per completion, or None to
give that completion nothing from this function. `reward_funcs` names built-ins or `path/to/file.py:function`.

Built-ins:
- accuracy: 1 when the completion's answer matches the record's `answer` column (or `solution`, TRL's name):
  for a numeric answer, the last number in the completion; otherwise the whole completion (trimmed, any case);
- format: 1 when the whole completion (trimmed) matches the regex `reward_format_pattern`;
- length: the completion's length in tokens / max_completion_length (give it a negative weight to prefer short).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..data.registry import DataError
from ..user_code import load_user_function

RewardFn = Callable[..., list]
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class Reward:
    name: str
    function: RewardFn
    weight: float


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").strip())
    except ValueError:
        return None


def accuracy(prompts, completions, answer=None, solution=None, **_) -> list[float | None]:
    gold = answer if answer is not None else solution
    if gold is None:
        raise DataError("the `accuracy` reward compares completions with an `answer` (or `solution`) column, and "
                        "the prompt data has neither; add one, or use another reward function")
    out = []
    for completion, expected in zip(completions, gold):
        if expected is None:
            out.append(None)
            continue
        number = _as_number(str(expected))
        if number is None:
            out.append(float(completion.strip().lower() == str(expected).strip().lower()))
        else:
            found = NUMBER.findall(completion)
            out.append(float(bool(found) and _as_number(found[-1]) == number))
    return out


def format_reward(pattern: str) -> RewardFn:
    compiled = re.compile(pattern, re.DOTALL)

    def reward(prompts, completions, **_) -> list[float]:
        return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]
    return reward


def length_reward(tokenizer, max_length: int) -> RewardFn:
    def reward(prompts, completions, **_) -> list[float]:
        return [len(tokenizer(c, add_special_tokens=False)["input_ids"]) / max_length for c in completions]
    return reward


def load_rewards(cfg, tokenizer) -> list[Reward]:
    f = cfg.finetune
    specs = [s.strip() for s in (f.reward_funcs or "").split(",") if s.strip()]
    weights = [float(w) for w in f.reward_weights.split(",")] if f.reward_weights else [1.0] * len(specs)
    out = []
    for spec, weight in zip(specs, weights):
        if spec == "accuracy":
            function = accuracy
        elif spec == "format":
            function = format_reward(f.reward_format_pattern)
        elif spec == "length":
            function = length_reward(tokenizer, f.max_completion_length)
        else:
            function = load_user_function(spec, "reward_funcs")
        out.append(Reward(spec, function, weight))
    return out


def check(f) -> list[str]:
    """Problems with reward_funcs / reward_weights / reward_format_pattern, worded for config errors."""
    specs = [s.strip() for s in (f.reward_funcs or "").split(",") if s.strip()]
    out = [] if specs else ["stage grpo needs `reward_funcs`: accuracy, format, length or path/to/file.py:function "
                            "(comma list)"]
    for spec in specs:
        if spec not in ("accuracy", "format", "length") and not re.fullmatch(r".+\.py:\w+", spec):
            out.append(f"reward_funcs: `{spec}` is neither accuracy, format, length nor path/to/file.py:function")
    if f.reward_weights:
        try:
            weights = [float(w) for w in f.reward_weights.split(",")]
        except ValueError:
            weights = []
        if len(weights) != len(specs):
            out.append(f"`reward_weights` needs one number per reward function ({len(specs)}), comma-separated; got "
                       f"{f.reward_weights!r}")
    if "format" in specs:
        if not f.reward_format_pattern:
            out.append("the `format` reward needs `reward_format_pattern`, the regex a completion must match, e.g. "
                       "'<answer>\\d+</answer>'")
        else:
            try:
                re.compile(f.reward_format_pattern)
            except re.error as err:
                out.append(f"`reward_format_pattern` is not a valid regex: {err}")
    return out


def score(rewards: list[Reward], prompts: list[str], completions: list[str], extras: list[dict]
          ) -> tuple[torch.Tensor, dict[str, float]]:
    """(each completion's weighted reward, each function's mean over the completions it scored)."""
    columns = {key: [e.get(key) for e in extras] for key in dict.fromkeys(k for e in extras for k in e)}
    total = torch.zeros(len(completions))
    means = {}
    for reward in rewards:
        values = reward.function(prompts, completions, **columns)
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            raise DataError(f"reward function `{reward.name}` returned {type(values).__name__} of length "
                            f"{len(values) if hasattr(values, '__len__') else '?'}; it must return a list of "
                            f"{len(completions)} floats (or None)")
        scored = [(i, float(v)) for i, v in enumerate(values) if v is not None]
        for i, value in scored:
            total[i] += reward.weight * value
        if scored:
            means[f"rewards/{Path(reward.name.split(':')[-1]).name}"] = sum(v for _, v in scored) / len(scored)
    return total, means
