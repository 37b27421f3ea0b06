"""Checkpoints: model (adapter or full), optimizer, scheduler, RNG and data position, for exact resume.

Crash-consistent: a checkpoint is written into `checkpoint-N.partial`, flushed to disk, given its marker file
(MARKER: step, tuneforge version, the settings that change training, a signature of the data) and only then renamed
to `checkpoint-N`. A folder without the marker is incomplete (a save that was killed) and is never resumed from
nor counted by save_total_limit.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..config import ConfigError
from ..models.load import save_tokenizer
from .faults import SaveFailed

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
MARKER = "tuneforge_checkpoint.json"  # written last: a checkpoint without it is incomplete
PARTIAL = ".partial"  # suffix of a checkpoint being written
PARTITIONS = "deepspeed"  # a checkpoint's folder of DeepSpeed's optimizer partitions (train/zero.py)
FINISHED = "train_results.json"  # written after the final model: the run is done
RUN_CONFIG = "tuneforge_config.yaml"  # written into output_dir when training starts
MODEL_FILES = ("adapter_config.json", "model.safetensors", "model.safetensors.index.json")


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
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite loss or gradient (skip_nonfinite_steps)
    num_input_tokens_seen: int = 0  # by every process since step 0 (include_num_input_tokens_seen)
    extra: dict = field(default_factory=dict)


def _step(path: Path) -> int:
    return int(CHECKPOINT.match(path.name.removesuffix(PARTIAL)).group(1))


def checkpoints_in(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints in output_dir, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=_step)


def incomplete_in(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders whose save did not finish: killed mid-write (a .partial folder, even one that got its
    marker, killed just before the rename), or written before markers existed (no marker)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT.match(p.name.removesuffix(PARTIAL))
             and (p.name.endswith(PARTIAL) or not (p / MARKER).is_file())]
    return sorted(found, key=_step)


def check_output_dir(output_dir: str, overwrite: bool, resume_from_checkpoint: str | None,
                     report=print) -> str | None:
    """Decide what to do with an existing output_dir; returns the checkpoint to resume from, if any: the one named
    by resume_from_checkpoint, else the latest complete one in output_dir (so a stopped run resumes when the same
    command runs again), unless overwrite_output_dir starts over.

    Never deletes anything a user made: with `overwrite_output_dir`, only tuneforge's own checkpoint folders go.
    """
    folder = Path(output_dir)
    # true / false, as Hugging Face's Trainer reads them: the latest checkpoint of output_dir (which must have one),
    # or none named (here the latest is resumed anyway, unless overwrite_output_dir starts over)
    latest = str(resume_from_checkpoint).lower() == "true"
    if latest or str(resume_from_checkpoint).lower() == "false":
        resume_from_checkpoint = None
    if resume_from_checkpoint:
        chosen = Path(resume_from_checkpoint)
        if not (chosen / "trainer_state.json").is_file():
            raise FileNotFoundError(f"resume_from_checkpoint: {resume_from_checkpoint} is not a tuneforge checkpoint "
                                    "(no trainer_state.json)")
        if not (chosen / MARKER).is_file() or chosen.name.endswith(PARTIAL):
            raise FileNotFoundError(f"resume_from_checkpoint: {resume_from_checkpoint} is incomplete (its save was "
                                    f"interrupted: no {MARKER}, or a {PARTIAL} folder never renamed); choose a "
                                    "complete checkpoint")
        return resume_from_checkpoint
    if overwrite:
        if latest:
            raise FileExistsError("resume_from_checkpoint: true resumes output_dir's latest checkpoint, and "
                                  "overwrite_output_dir: true trains from the start: remove one of them")
        return None
    if (folder / FINISHED).exists():
        raise FileExistsError(f"output_dir {folder} already holds a trained model ({FINISHED}); choose another "
                              "output_dir, or set overwrite_output_dir: true to replace it")
    incomplete = incomplete_in(folder)
    if incomplete:
        report(f"[tuneforge] ignoring incomplete checkpoint folders (their save was interrupted): "
               f"{', '.join(p.name for p in incomplete)}")
    checkpoints = checkpoints_in(folder)
    if checkpoints:
        return str(checkpoints[-1])
    if latest:
        raise FileNotFoundError(f"resume_from_checkpoint: true resumes the latest checkpoint of output_dir, and "
                                f"{folder} holds no complete one; remove the key to train from the start")
    finished = [m for m in MODEL_FILES if (folder / m).exists()]
    if finished and (folder / RUN_CONFIG).is_file():  # ours, without FINISHED: stopped while saving its model
        raise FileExistsError(f"output_dir {folder} holds the model files of a run that stopped before they were "
                              f"complete (no {FINISHED}) and no checkpoint to resume from: set "
                              "overwrite_output_dir: true to train again")
    if finished:
        raise FileExistsError(f"output_dir {folder} already holds a trained model ({finished[0]}); choose another "
                              "output_dir, or set overwrite_output_dir: true to replace it")
    return None


def clear_old_checkpoints(output_dir: str) -> None:
    for path in checkpoints_in(output_dir) + incomplete_in(output_dir):
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


def save_model(module, tokenizer, folder: Path, weights: dict | None = None) -> None:  # tokenizer None: weights only
    """A loss module's model: an adapter (PEFT format) for LoRA, else the full model as safetensors; plus the
    tokenizer and the extra modules the stage trains besides the model (e.g. a reward model's value head).
    `weights`: the module's full state dict when the module itself holds only shards (FSDP; sharding.full_state)."""
    from ..models.vocab import save_settings
    from .sharding import part_of

    model = module.model
    # a PPO policy also holds the reward adapter (reward_model_type lora): only the trained one is the model
    selected = {"selected_adapters": [model.active_adapter]} if len(getattr(model, "peft_config", {})) > 1 else {}
    gathered = {} if weights is None else {"state_dict": part_of(weights, module, model)}
    model.save_pretrained(folder, safe_serialization=True, **selected, **gathered, **save_settings(model))
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder)
    for file, part in module.extra.items():
        tensors = part.state_dict() if weights is None else part_of(weights, module, part)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(Path(folder) / file))


def load_extra_weights(module, folder: str | Path) -> None:
    """Put the extra modules of a loss module (see save_model) back from `folder`."""
    for file, part in module.extra.items():
        part.load_state_dict(load_file(Path(folder) / file))


def save_checkpoint(folder: Path, module, tokenizer, optimizer, scheduler, state: TrainerState,
                    model_only: bool = False, identity: dict | None = None, weights: dict | None = None,
                    optimizer_state: dict | None = None, partitions: Path | None = None) -> None:
    """Write the checkpoint into `folder.partial`, flush it, add the marker (`identity`: what resume checks), and
    rename it to `folder`. A failure leaves the other checkpoints as they were and raises SaveFailed.
    `weights` / `optimizer_state`: full state dicts gathered from a sharded module (see save_model).
    `partitions`: a folder of DeepSpeed's optimizer partitions, written by every process, moved in for optimizer.pt."""
    temp = folder.with_name(folder.name + PARTIAL)
    needed = _expected_size(folder.parent, module, optimizer)
    free = shutil.disk_usage(folder.parent).free
    if free < needed:
        raise _save_failed(folder, folder.parent, "not enough free space", needed, free)
    parts = [("model and tokenizer", lambda: save_model(module, tokenizer, temp, weights))]
    if not model_only:
        parts += [("optimizer.pt", lambda: torch.save(optimizer_state or optimizer.state_dict(),
                                                      temp / "optimizer.pt")) if partitions is None else
                  (PARTITIONS, lambda: shutil.move(partitions, temp / PARTITIONS)),
                  ("scheduler.pt", lambda: torch.save(scheduler.state_dict(), temp / "scheduler.pt")),
                  ("rng_state.pt", lambda: torch.save(rng_state(), temp / "rng_state.pt"))]
    parts += [("trainer_state.json", lambda: _write_json(temp / "trainer_state.json", asdict(state))),
              ("flush to disk", lambda: _fsync_tree(temp)),
              (MARKER, lambda: _write_json(temp / MARKER, {"step": state.global_step, "tuneforge_version":
                                                           __version__, **(identity or {})}, sync=True))]
    shutil.rmtree(temp, ignore_errors=True)  # left by a save that was killed
    try:
        temp.mkdir(parents=True)
        for what, write in parts:
            write()
        if folder.exists():  # an incomplete folder of the same name, from before markers
            shutil.rmtree(folder)
        os.replace(temp, folder)
        _fsync_dir(folder.parent)
    except Exception as err:  # noqa: BLE001 - any failure to write (OSError, torch's and safetensors' own errors)
        shutil.rmtree(temp, ignore_errors=True)
        raise _save_failed(folder, temp / what, f"{type(err).__name__}: {err}", needed,
                           shutil.disk_usage(folder.parent).free) from err


def _save_failed(folder: Path, where: Path, why: str, needed: int, free: int) -> SaveFailed:
    previous = checkpoints_in(folder.parent)
    kept = f"{previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    return SaveFailed(f"could not save {folder}: writing {where} failed ({why.strip()}); a checkpoint needs about "
                      f"{needed / 2**20:.1f} MiB and {free / 2**20:.1f} MiB is free there. {kept}: free some space "
                      "(or choose another output_dir) and run the same command again to resume")


def _expected_size(output_dir: Path, module, optimizer) -> int:
    """The size of the last complete checkpoint, or (none yet) of the weights and optimizer state to write."""
    previous = checkpoints_in(output_dir)
    if previous:
        return sum(f.stat().st_size for f in previous[-1].rglob("*") if f.is_file())
    params = [p for p in module.model.parameters() if p.requires_grad or not hasattr(module.model, "peft_config")]
    weights = sum(p.numel() * p.element_size() for p in params)
    states = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                 if torch.is_tensor(t))  # (DeepSpeed's partitions are written already)
    return weights + states


def _write_json(path: Path, value, sync: bool = False) -> None:
    with open(path, "w", encoding="utf-8") as out:
        out.write(json.dumps(value, indent=2))
        if sync:
            out.flush()
            os.fsync(out.fileno())


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    for file in sorted(folder.glob("model*.safetensors")):  # not the stage's extra files beside them (save_model)
        weights.update(load_file(file))
    if not weights:
        raise FileNotFoundError(f"{folder} holds no model weights (model*.safetensors)")
    missing, unexpected = model.load_state_dict(_in_the_models_names(model, folder, weights), strict=False)
    tied = {name for name in missing if "lm_head" in name or "embed" in name}
    if unexpected or set(missing) - tied:
        raise ValueError(f"{folder} does not match the model: missing {sorted(set(missing) - tied)[:3]}, "
                         f"unexpected {unexpected[:3]}")


def _in_the_models_names(model, folder: Path, weights: dict) -> dict:
    """`weights` under the model's own parameter names. save_pretrained writes some architectures in another layout
    than the one they train in (transformers' conversion mapping: ViT under its legacy names, a MoE's fused experts
    one tensor per expert); transformers' own loader reads them back, into a copy whose tensors then go in place."""
    from transformers import PreTrainedModel

    if set(weights) <= set(model.state_dict()) or not isinstance(model, PreTrainedModel):
        return weights
    dtype = next(model.parameters()).dtype
    return type(model).from_pretrained(folder, dtype=dtype).state_dict()


def check_identity(folder: str | Path, identity: dict) -> None:
    """Refuse a checkpoint written by another tuneforge version, or with settings that change training."""
    marker = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    how = "resume with the same settings, or set overwrite_output_dir: true to start over"
    if marker.get("tuneforge_version") != __version__:
        raise ConfigError(f"{folder} was written by tuneforge {marker.get('tuneforge_version')}; this is tuneforge "
                          f"{__version__}, which may not continue it exactly; resume with that version, or set "
                          "overwrite_output_dir: true to start over")
    # a checkpoint may record keys declared resume-neutral since (e.g. include_effective_tokens_per_second)
    before = {k: v for k, v in marker.get("config", {}).items() if k not in RESUME_NEUTRAL}
    now = identity.get("config", {})
    if "global_batch" in marker:  # the same global batch may be split otherwise (another number of processes)
        _check_global_batch(folder, marker, identity)
        before, now = ({k: v for k, v in c.items() if k not in SPLIT} for c in (before, now))
    changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
               if before.get(k) != now.get(k)]
    if changed:
        raise ConfigError(f"{folder} was trained with other settings ({'; '.join(changed[:4])}); {how}")
    if marker.get("data") != identity.get("data"):
        was, count = marker.get("num_train_examples"), identity.get("num_train_examples")
        now_has = "other files" if not count or not was else \
            f"{count} examples" if count != was else "other examples (the same number)"
        raise ConfigError(f"{folder} was trained on {was or 'streamed'} examples but the data now has {now_has}; "
                          "resume with the same data, or set overwrite_output_dir: true")


SPLIT = ("per_device_train_batch_size", "gradient_accumulation_steps")  # with the process count: the global batch


def global_batch(t, world: int) -> dict:
    """What a checkpoint records of how its global batch was split."""
    return {"global_batch": t.per_device_train_batch_size * t.gradient_accumulation_steps * world,
            "world_size": world}


def _check_global_batch(folder, marker: dict, identity: dict) -> None:
    """A step is the same global batch of rows at any world size, so a checkpoint resumes with another number of
    processes if per_device_train_batch_size x gradient_accumulation_steps x processes stays the same."""
    was, now = marker["global_batch"], identity.get("global_batch")
    if was != now:
        processes = lambda n: f"{n} process{'es' if n != 1 else ''}"  # noqa: E731
        raise ConfigError(
            f"{folder} was trained with a global batch of {was} (per_device_train_batch_size x "
            f"gradient_accumulation_steps x {processes(marker['world_size'])}); this run's is {now} (with "
            f"{processes(identity.get('world_size'))}): choose per_device_train_batch_size and "
            f"gradient_accumulation_steps whose product x processes is {was}, or set overwrite_output_dir: true")


# Keys that do not change what training computes (where results go, how often it logs, saves and evaluates, how
# long it runs, inference and export): a checkpoint resumes under other values of these. Any other key that
# differs from the checkpoint's is refused on resume.
RESUME_NEUTRAL = frozenset((
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_steps", "logging_strategy", "save_steps",
    "save_strategy",
    "save_total_limit", "save_only_model", "eval_strategy", "eval_steps", "eval_delay", "eval_on_start",
    "per_device_eval_batch_size", "do_eval",
    "do_predict", "predict_with_generate", "predict_metric", "load_best_model_at_end", "metric_for_best_model",
    "early_stopping_steps", "plot_loss", "report_to", "run_name", "ddp_timeout", "dataloader_num_workers",
    "max_steps", "num_train_epochs", "skip_nonfinite_steps", "overwrite_cache", "preprocessing_num_workers",
    "tokenized_path", "cache_dir", "hf_hub_token", "eval_dataset", "eval_on_each_dataset",
    "include_effective_tokens_per_second", "include_num_input_tokens_seen", "logging_first_step",
    "dataloader_pin_memory", "dataloader_prefetch_factor", "dataloader_multiprocessing_context", "ignore_data_skip",
    "bf16_full_eval", "fp16_full_eval", "full_determinism",
    # how the same operations run (compiled kernels fuse them, rounding differently by ~1e-6), not what they compute
    "torch_compile", "torch_compile_backend", "torch_compile_mode",
    # how DDP moves gradients, not what they are
    "ddp_find_unused_parameters", "ddp_static_graph", "ddp_bucket_cap_mb", "ddp_broadcast_buffers",
    # sharding changes where the state lives, not the updates (the global batch is checked on its own)
    "fsdp", "fsdp_config", "fsdp_transformer_layer_cls_to_wrap", "deepspeed"))


def config_identity(cfg) -> dict:
    """The settings a checkpoint records and resume compares (everything but RESUME_NEUTRAL, inference, export)."""
    values = {}
    for group in ("model", "data", "finetune", "train"):
        values.update({k: v for k, v in vars(getattr(cfg, group)).items()
                       if k not in RESUME_NEUTRAL and not k.startswith("export_")})
    return json.loads(json.dumps(values, default=str))


def load_weights(folder: str | Path, module) -> None:
    """A checkpoint's weights, into a loss module built the same way (before any sharding)."""
    load_trainable_weights(module.model, Path(folder))
    load_extra_weights(module, folder)


def load_training_state(folder: str | Path, load_optimizer, scheduler) -> TrainerState:
    """The rest of a checkpoint: `load_optimizer(folder)` (optimizer.pt, or DeepSpeed's partitions), the
    scheduler, the random generators; returns the trainer state."""
    folder = Path(folder)
    if not (folder / "scheduler.pt").is_file():
        raise FileNotFoundError(f"{folder} was saved with save_only_model: it has no optimizer state to resume from")
    load_optimizer(folder)
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(folder / "rng_state.pt", weights_only=False))
    return TrainerState(**json.loads((folder / "trainer_state.json").read_text(encoding="utf-8")))


def rotate_checkpoints(output_dir: str, limit: int | None) -> None:
    if not limit:
        return
    for path in checkpoints_in(output_dir)[:-limit]:
        shutil.rmtree(path)
