"""The learning-rate schedule: transformers' schedulers under Hugging Face's names (`lr_scheduler_type`), each with
its own arguments from `lr_scheduler_kwargs`, built as HF's Trainer builds them, and stepped once per optimizer
step by the training loop."""

from __future__ import annotations

import json
import math

import torch

from ..options import SCHEDULERS
from .intervals import every

# HF's schedules that follow a measured value rather than the step count: the loop steps every schedule by steps
_MEASURED = {"reduce_lr_on_plateau": "lowers the rate when an evaluation metric stops improving",
             "greedy": "moves the rate by the training loss"}
# transformers' get_scheduler passes these no lr_scheduler_kwargs: arguments for them would be ignored
_NO_ARGUMENTS = ("constant", "constant_with_warmup")


def scheduler_kwargs(t) -> dict:
    """lr_scheduler_kwargs as a mapping: the YAML's mapping, or a JSON object (the command line's form, as in
    transformers). Raises ValueError for anything else."""
    value = t.lr_scheduler_kwargs
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"{value!r} is not JSON ({err.msg})") from None
    if not isinstance(value, dict | None):
        raise ValueError(f"got a {type(value).__name__}")
    return dict(value or {})


def build_scheduler(optimizer, t, total_steps: int):
    from transformers import get_scheduler

    warmup = every(t.warmup_steps, total_steps) if t.warmup_steps > 0 else math.ceil(t.warmup_ratio * total_steps)
    return get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         scheduler_specific_kwargs=scheduler_kwargs(t))


def problems(t) -> list[str]:
    name = t.lr_scheduler_type
    if t.warmup_steps < 0 or (t.warmup_steps > 1 and t.warmup_steps != int(t.warmup_steps)):
        return [f"`warmup_steps` is a whole number of steps, or below 1 a share of all steps; got {t.warmup_steps:g}"]
    if name in _MEASURED:
        return [f"`lr_scheduler_type: {name}` {_MEASURED[name]}, which is not built: the schedules here follow the "
                f"step count ({', '.join(SCHEDULERS)})"]
    if name not in SCHEDULERS:
        return [f"`lr_scheduler_type` must be one of {', '.join(SCHEDULERS)}; got {name!r}"]
    try:
        kwargs = scheduler_kwargs(t)
    except ValueError as err:
        return [f"`lr_scheduler_kwargs` must be a mapping of the schedule's arguments (or a JSON object): {err}"]
    if kwargs and name in _NO_ARGUMENTS:
        return [f"`lr_scheduler_type: {name}` takes no lr_scheduler_kwargs; remove them"]
    if kwargs or name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay"):
        try:  # the schedule's own check of its arguments, on a stand-in optimizer (some have required ones)
            build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), t, total_steps=100)
        except (TypeError, ValueError) as err:
            return [f"`lr_scheduler_kwargs` {kwargs} do not fit `lr_scheduler_type: {name}`: {err}"]
    return []
