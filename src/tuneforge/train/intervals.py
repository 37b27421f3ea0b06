"""How often the loop logs, evaluates and saves: `logging_steps`, `eval_steps` and `save_steps` as Hugging Face's
Trainer reads them, a number of steps or, below 1, that share of the run's steps (rounded up)."""

from __future__ import annotations

import math

# each interval with the strategy that uses it
KEYS = {"logging_steps": "logging_strategy", "eval_steps": "eval_strategy", "save_steps": "save_strategy"}


def problems(t) -> list[str]:
    out = []
    for key, strategy in KEYS.items():
        value = getattr(t, key)
        if value is None or getattr(t, strategy) != "steps":
            continue
        if value <= 0:
            out.append(f"`{key}` must be above 0: a number of steps, or below 1 a share of the run's steps; got "
                       f"{value:g}")
        elif value > 1 and value != int(value):
            out.append(f"`{key}` above 1 is a number of steps and must be whole (below 1 it is a share of the "
                       f"run's steps); got {value:g}")
    return out


def every(value: float, total_steps: int) -> int:
    """The interval in steps: `value`, or below 1 that share of the run's `total_steps`, rounded up (HF's rule)."""
    return max(math.ceil(value * total_steps), 1) if value < 1 else int(value)
