"""DeepSpeed ZeRO from LLaMA-Factory's `deepspeed` key (a ds_config.json path or a mapping), on GPUs and on CPUs.

accelerate starts the processes and their process group (NCCL, or gloo on CPUs) as for DDP; the loss module and its
optimizer then go to `deepspeed.initialize` instead of DDP, which finds that process group and partitions optimizer
state (stage 1), gradients (2) and weights (3) over it. accelerate's own DeepSpeed mode is not used: it runs only
with CUDA-like devices (on CPUs it counts every process as process 0) and wants a model with a `.config`.

The engine does the backward pass, gradient averaging, clipping (`max_grad_norm`) and the optimizer step; the loop
keeps its loss normalisation (the sum of losses over all of the step's units, as without DeepSpeed), its schedule
and its checkpoints. A checkpoint holds normal model files (gathered weights) and `deepspeed/`, every process's
partition of the optimizer state, which is why it resumes only with the same number of processes.
"""

from __future__ import annotations

import importlib.util
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch

from ..config import ConfigError
from .checkpoint import PARTITIONS

TAG = "zero"  # DeepSpeed's name for one checkpoint inside that folder
# "auto" values transformers fills from the model's hidden size h, with its rules (h*h, 0.9*h*h, 10*h)
BY_HIDDEN_SIZE = {"reduce_bucket_size": lambda h: h * h, "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
                  "stage3_param_persistence_threshold": lambda h: 10 * h}
# set by the loop and the YAML; a value the config file gives must agree (`auto`: take ours)
FROM_YAML = {"train_micro_batch_size_per_gpu": "per_device_train_batch_size",
             "gradient_accumulation_steps": "gradient_accumulation_steps", "gradient_clipping": "max_grad_norm"}


def read_config(t) -> dict | None:
    """The DeepSpeed config `deepspeed` names, checked for what tuneforge runs; None when it is not set."""
    if not t.deepspeed:
        return None
    from .sharding import read_json

    config = t.deepspeed if isinstance(t.deepspeed, dict) else read_json(t.deepspeed, "deepspeed")
    zero = config.get("zero_optimization", {})
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ConfigError(f"`deepspeed`: zero_optimization.stage must be 0, 1, 2 or 3; got {zero.get('stage')!r}")
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ConfigError(f"`deepspeed`: remove its `{section}` section; tuneforge builds the {section} from the "
                              "YAML (optim, learning_rate, lr_scheduler_type, warmup_ratio)")
    for section in ("bf16", "fp16"):
        if config.get(section, {}).get("enabled", False) not in (False, "auto"):
            raise ConfigError(f"`deepspeed`: set {section}.enabled to auto or false; precision comes from the YAML "
                              "(bf16, pure_bf16), which runs autocast on the engine's weights as it does without "
                              "DeepSpeed")
    for section in ("offload_optimizer", "offload_param"):
        if str(zero.get(section, {}).get("device", "none")).lower() != "none":
            raise ConfigError(f"`deepspeed`: zero_optimization.{section} is not built (offloading needs "
                              "DeepSpeed's own CPU Adam in place of the YAML's optimizer); remove it")
    if int(config.get("tensor_parallel", {}).get("autotp_size", 1)) > 1:
        raise ConfigError("`deepspeed`: tensor_parallel.autotp_size is not built (the loop gives every process its "
                          "own rows, where tensor parallelism wants the same ones); remove it, or use ZeRO alone")
    return config


def problems(cfg, config: dict | None) -> list[str]:
    """What cannot run with `deepspeed` (the gate reports them with the rest)."""
    t, f, out = cfg.train, cfg.finetune, []
    if config is None:
        return out
    if importlib.util.find_spec("deepspeed") is None:
        out.append("`deepspeed` needs the deepspeed package: pip install --no-build-isolation deepspeed "
                   "(make install does)")
    for key, yaml_key in FROM_YAML.items():
        value = config.get(key, "auto")
        if value != "auto" and value != getattr(t, yaml_key):
            out.append(f"`deepspeed`: {key} is {value} and {yaml_key} is {getattr(t, yaml_key)}; set it to auto "
                       "(the YAML's value is used)")
    for what, on, why in (
            (f"stage: {f.stage}", f.stage in ("ppo", "grpo"), "rollouts generate on each process separately"),
            ("stage: cls", f.stage == "cls", "a classifier is evaluated on the main process alone"),
            ("do_predict", t.do_predict, "prediction generates on the main process alone"),
            ("load_best_model_at_end", t.load_best_model_at_end, "the best model is kept and reloaded unpartitioned"),
            ("quantization_bit", cfg.model.quantization_bit, "ZeRO does not partition bitsandbytes' layers"),
            ("torch_compile", t.torch_compile, "the engine's hooks would have to be traced"),
            ("bf16_full_eval / fp16_full_eval", t.bf16_full_eval or t.fp16_full_eval, "partitioned parameters are not "
             "cast in place"),
            ("fp16", t.fp16, "fp16's gradient scaler would have to be the engine's; use bf16"),
            ("skip_nonfinite_steps", t.skip_nonfinite_steps, "the engine takes the step before its gradient norm "
             "is known; a non-finite step stops the run")):
        if on:
            out.append(f"`{what}` with `deepspeed` is not built ({why}); train with DDP or fsdp for it")
    return out


def filled(config: dict, t, world: int, hidden_size: int | None) -> dict:
    """The config with its `auto` values set as transformers sets them, from the YAML and the model."""
    out = {**config, **{key: getattr(t, yaml_key) for key, yaml_key in FROM_YAML.items()}}
    out["train_batch_size"] = t.per_device_train_batch_size * t.gradient_accumulation_steps * world
    if config.get("train_batch_size", "auto") not in ("auto", out["train_batch_size"]):
        raise ConfigError(f"`deepspeed`: train_batch_size is {config['train_batch_size']}, and per_device_train_batch_"
                          f"size x gradient_accumulation_steps x {world} processes is {out['train_batch_size']}; set "
                          "it to auto (the YAML's global batch is used)")
    out["zero_allow_untested_optimizer"] = True  # the YAML's optimizer is a plain torch one (checked in `engine`)
    out.setdefault("steps_per_print", 2**31 - 1)  # the loop logs
    for section in ("bf16", "fp16"):
        if section in out:
            out[section] = {**out[section], "enabled": False}
    zero = dict(out.get("zero_optimization", {}))
    for key, rule in BY_HIDDEN_SIZE.items():
        if zero.get(key) == "auto":
            if hidden_size is None:
                raise ConfigError(f"`deepspeed`: zero_optimization.{key} is auto, and the model has no hidden_size "
                                  "to derive it from; give a number")
            zero[key] = rule(hidden_size)
    out["zero_optimization"] = zero
    left = [key for key, value in _items(out) if value == "auto"]
    if left:
        raise ConfigError(f"`deepspeed`: {', '.join(left)} is auto, which tuneforge does not fill; give a value")
    return out


def _items(config: dict, prefix: str = ""):
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def engine(module, optimizer, config: dict, t, accelerator):
    """The DeepSpeed engine around `module` and `optimizer` (a plain torch optimizer, which keeps stepping the
    partitions: the LR schedule is built on it)."""
    import deepspeed

    if not type(optimizer).__module__.startswith("torch.optim"):
        raise ConfigError(f"`deepspeed` partitions flattened parameters, which {type(optimizer).__name__} (optim: "
                          f"{t.optim}) cannot step; use adamw_torch, adamw_torch_fused or sgd, or train with fsdp")
    hidden = getattr(getattr(module.model, "config", None), "hidden_size", None)
    config = filled(config, t, accelerator.num_processes, hidden)
    wrapped, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    accelerator.print(f"[tuneforge] deepspeed: ZeRO stage {stage(config)} across {accelerator.num_processes} processes")
    return wrapped


def is_engine(module) -> bool:
    return type(module).__name__ == "DeepSpeedEngine"


def partitioned(module) -> bool:
    """Whether ZeRO-3 holds only this process's part of the weights (each forward gathers them from all)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def gathered(module):
    """A context in which a ZeRO-3 module holds its whole weights on every process (the ones a save reads: the
    trainable ones of an adapter, else all). Every process must enter it."""
    if not partitioned(module):
        return nullcontext()
    import deepspeed

    adapter = hasattr(module.model, "peft_config")
    params = [p for p in module.parameters() if p.requires_grad or not adapter]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def step(wrapped, micro: list[dict], scale, precision, unwrapped) -> tuple[list, dict, torch.Tensor]:
    """One optimizer step by the engine: (each micro-batch's loss sum, metric sums, the gradient norm). The engine
    averages gradients over processes as DDP does, so `scale` is the one DDP takes."""
    losses, sums = [], {}
    for i, batch in enumerate(micro):
        wrapped.set_gradient_accumulation_boundary(i == len(micro) - 1)  # a step may have fewer micro-batches
        with precision.lora_casts_off(unwrapped.model):
            with precision.autocast():
                loss_sum, metrics = wrapped(**batch)
            wrapped.backward(loss_sum * scale, scale_wrt_gas=False)  # the scale is the whole step's already
        losses.append(loss_sum.detach().float())
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0) + value.detach().float()
    wrapped.step()
    return losses, sums, torch.as_tensor(wrapped.get_global_grad_norm(), dtype=torch.float32)


def save_partitions(wrapped, folder: Path, accelerator) -> Path:
    """Every process writes its optimizer partition to a scratch folder beside checkpoint `folder`, which
    checkpoint.save_checkpoint then moves in as `deepspeed/`."""
    scratch = folder.parent / f".{folder.name}.{PARTITIONS}"
    if accelerator.is_main_process:
        shutil.rmtree(scratch, ignore_errors=True)  # left by a save that was killed
    accelerator.wait_for_everyone()
    wrapped.save_checkpoint(str(scratch), tag=TAG, save_latest=False, exclude_frozen_parameters=True)
    accelerator.wait_for_everyone()
    return scratch


def load_partitions(wrapped, folder: Path, processes: int) -> None:
    """A checkpoint's optimizer partitions back into the engine `wrapped` (its weights are loaded already); a
    checkpoint saved otherwise than this run trains (None: without the engine) is refused."""
    import json

    from .checkpoint import MARKER

    saved_by = json.loads((folder / MARKER).read_text(encoding="utf-8")).get("world_size")
    if wrapped is not None and not (folder / PARTITIONS).is_dir():
        raise ConfigError(f"{folder} was saved without DeepSpeed's partitions: resume it without `deepspeed` (or "
                          "with ZeRO stage 0), or set overwrite_output_dir: true")
    if wrapped is None or saved_by != processes:
        raise ConfigError(f"{folder} holds DeepSpeed's optimizer state in {saved_by} partitions: resume it with "
                          f"`deepspeed` (ZeRO stage 1-3) in {saved_by} processes, or set overwrite_output_dir: true")
    wrapped.load_checkpoint(str(folder / PARTITIONS), tag=TAG, load_module_strict=False,
                            load_optimizer_states=True, load_lr_scheduler_states=False)


def stage(config: dict) -> int:
    return config.get("zero_optimization", {}).get("stage", 0)


def unpartitioned_note(config: dict, processes: int) -> str:
    if processes > 1:  # stage 0
        return "[tuneforge] deepspeed: ZeRO stage 0 partitions nothing, so DDP trains it (the same updates)"
    return ("[tuneforge] deepspeed: one process holds the whole model, so training runs without the engine (the "
            "same updates); start several with torchrun --nproc_per_node N -m tuneforge.cli train ...")
