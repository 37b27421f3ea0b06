"""Checkpoints: model (adapter or full), optimizer, scheduler, RNG and data position, for exact resume."""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
FINISHED_MARKERS = ("train_results.json", "adapter_config.json", "model.safetensors", "model.safetensors.index.json")


@dataclass
class TrainerState:
    global_step: int = 0
    epoch: int = 0  # index of the epoch in progress
    step_in_epoch: int = 0  # optimizer steps already done in that epoch
    total_steps: int = 0
    num_train_examples: int = 0
    trained_units: int = 0  # target tokens, pairs or examples, as the stage's loss counts them
    loss_sum: float = 0.0  # unit-weighted, for the final train_loss
    best_metric: float | None = None  # of metric_for_best_model (eval_loss by default)
    best_step: int | None = None
    evals_without_improvement: int = 0
    stream_position: list[int] | None = None  # streaming: [epoch, batch, row] of the next training row
    stream_data: str | None = None  # streaming: signature of the streamed files
    extra: dict = field(default_factory=dict)


def checkpoints_in(output_dir: str | Path) -> list[Path]:
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)))


def check_output_dir(output_dir: str, overwrite: bool, resume_from_checkpoint: str | None) -> str | None:
    """Decide what to do with an existing output_dir; returns the checkpoint to resume from, if any.

    Never deletes anything a user made: with `overwrite_output_dir`, only tuneforge's own checkpoint folders go.
    """
    folder = Path(output_dir)
    if resume_from_checkpoint:
        if not (Path(resume_from_checkpoint) / "trainer_state.json").is_file():
            raise FileNotFoundError(f"resume_from_checkpoint: {resume_from_checkpoint} is not a tuneforge checkpoint "
                                    "(no trainer_state.json)")
        return resume_from_checkpoint
    checkpoints = checkpoints_in(folder)
    if overwrite:
        return None
    if checkpoints:
        return str(checkpoints[-1])
    finished = [m for m in FINISHED_MARKERS if (folder / m).exists()]
    if finished:
        raise FileExistsError(f"output_dir {folder} already holds a trained model ({finished[0]}); choose another "
                              "output_dir, or set overwrite_output_dir: true to replace it")
    return None


def clear_old_checkpoints(output_dir: str) -> None:
    for path in checkpoints_in(output_dir):
        shutil.rmtree(path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model(module, tokenizer, folder: Path) -> None:  # tokenizer None: weights only
    """A loss module's model: an adapter (PEFT format) for LoRA, else the full model as safetensors; plus the
    tokenizer and the extra modules the stage trains besides the model (e.g. a reward model's value head)."""
    model = module.model
    # a PPO policy also holds the reward adapter (reward_model_type lora): only the trained one is the model
    selected = {"selected_adapters": [model.active_adapter]} if len(getattr(model, "peft_config", {})) > 1 else {}
    model.save_pretrained(folder, safe_serialization=True, **selected)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    for file, part in module.extra.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in part.state_dict().items()}, str(Path(folder) / file))


def load_extra_weights(module, folder: str | Path) -> None:
    """Put the extra modules of a loss module (see save_model) back from `folder`."""
    for file, part in module.extra.items():
        part.load_state_dict(load_file(Path(folder) / file))


def save_checkpoint(folder: Path, module, tokenizer, optimizer, scheduler, state: TrainerState,
                    model_only: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_model(module, tokenizer, folder)
    if not model_only:
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        torch.save(scheduler.state_dict(), folder / "scheduler.pt")
        torch.save(rng_state(), folder / "rng_state.pt")
    (folder / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")


def load_trainable_weights(model, folder: Path) -> None:
    """Put the checkpoint's weights back into a model built the same way (adapter or full)."""
    adapter = folder / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(adapter))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{adapter} does not match this LoRA setup: unexpected {result.unexpected_keys[:3]}")
        return
    weights = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(file))
    if not weights:
        raise FileNotFoundError(f"{folder} holds no model weights (*.safetensors)")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {name for name in missing if "lm_head" in name or "embed" in name}
    if unexpected or set(missing) - tied:
        raise ValueError(f"{folder} does not match the model: missing {sorted(set(missing) - tied)[:3]}, "
                         f"unexpected {unexpected[:3]}")


def load_checkpoint(folder: str | Path, module, optimizer, scheduler) -> TrainerState:
    folder = Path(folder)
    load_trainable_weights(module.model, folder)
    load_extra_weights(module, folder)
    if not (folder / "optimizer.pt").is_file():
        raise FileNotFoundError(f"{folder} was saved with save_only_model: it has no optimizer state to resume from")
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(folder / "rng_state.pt", weights_only=False))
    return TrainerState(**json.loads((folder / "trainer_state.json").read_text(encoding="utf-8")))


def rotate_checkpoints(output_dir: str, limit: int | None) -> None:
    if not limit:
        return
    for path in checkpoints_in(output_dir)[:-limit]:
        shutil.rmtree(path)
