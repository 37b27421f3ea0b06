"""Sharded training: FSDP2 from the Hugging Face keys (`fsdp`, `fsdp_config`, `fsdp_transformer_layer_cls_to_wrap`)
as LLaMA-Factory passes them through; DeepSpeed's `deepspeed` is zero.py's.

FSDP shards weights, gradients and optimizer state across processes; the updates are those of unsharded training
on the same global batch. Who shards: on GPUs, accelerate (its FullyShardedDataParallelPlugin, in
`accelerator.prepare(model, optimizer)`). accelerate never enables FSDP for CPU processes (it keeps them in its
MULTI_CPU mode, which wraps models in DDP), so on CPUs the same settings go to torch's own FSDP2 `fully_shard`, the
function accelerate calls on GPUs: one unit per decoder layer, then the whole model. Checkpoints are always full
state dicts gathered on the main process (normal model files), so they resume at any world size, FSDP or not.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ConfigError
from . import zero

SHARDING = {"full_shard": True, "shard_grad_op": False}  # `fsdp` word -> FSDP2's reshard_after_forward
# FSDP1 switches HF fsdp_configs often carry; FSDP2 has no such setting (it always uses the original parameters,
# prefetches by itself, needs no module-state sync): accepted with a note
FSDP1_ONLY = ("backward_prefetch", "forward_prefetch", "use_orig_params", "sync_module_states", "limit_all_gathers")


@dataclass
class FsdpSettings:
    reshard_after_forward: bool = True  # full_shard (ZeRO-3-like); shard_grad_op keeps gathered weights (ZeRO-2)
    auto_wrap: bool = True  # one FSDP unit per decoder layer (transformers' default); False: one unit, the model
    wrap_classes: list[str] | None = None  # the layer classes auto_wrap shards; None: the model's _no_split_modules
    offload: bool = False  # keep sharded weights in CPU memory between uses (GPUs only)
    activation_checkpointing: bool = False  # recompute each layer in the backward (as gradient_checkpointing)
    notes: list[str] = field(default_factory=list)


def fsdp_settings(t) -> FsdpSettings | None:
    """The FSDP settings the train options ask for, or None; a ConfigError names the key and value at fault.
    Read as transformers 5 reads them: `fsdp: true` with `fsdp_config`, or the older words (full_shard ...)."""
    words = (t.fsdp or "").replace(",", " ").lower().split()
    if words in ([], ["false"]):
        for key in ("fsdp_config", "fsdp_transformer_layer_cls_to_wrap"):
            if getattr(t, key):
                raise ConfigError(f"`{key}` configures FSDP, which is off: set `fsdp: full_shard auto_wrap` too")
        return None
    s = FsdpSettings()
    for word in words:
        if word in SHARDING:
            s.reshard_after_forward = SHARDING[word]
        elif word == "offload":
            s.offload = True
        elif word in ("no_shard", "hybrid_shard", "hybrid_shard_zero2"):
            raise ConfigError(f"`fsdp: {t.fsdp}`: {word} is not built (no_shard is plain DDP: remove `fsdp`; "
                              "hybrid sharding needs a 2-D device mesh); use full_shard or shard_grad_op")
        elif word not in ("true", "auto_wrap"):  # auto_wrap: wrapping layers is the default
            raise ConfigError(f"`fsdp: {t.fsdp}`: unknown option {word!r}; use true, or full_shard / shard_grad_op "
                              "optionally with auto_wrap and offload (e.g. `fsdp: full_shard auto_wrap`)")
    for key, value in _fsdp_config(t.fsdp_config).items():
        _apply_fsdp_key(s, key, value)
    if t.fsdp_transformer_layer_cls_to_wrap:
        s.wrap_classes = _names(t.fsdp_transformer_layer_cls_to_wrap)
    return s


def _fsdp_config(value) -> dict:
    if not value:
        return {}
    if isinstance(value, dict):
        config = value
    else:
        config = read_json(value, "fsdp_config")
    # HF accepts the keys with and without their `fsdp_` prefix
    return {key.removeprefix("fsdp_"): item for key, item in config.items()}


def _apply_fsdp_key(s: FsdpSettings, key: str, value) -> None:
    where = f"fsdp_config `{key}: {value}`"
    if key == "version":
        if int(value) != 2:
            raise ConfigError(f"{where}: tuneforge runs FSDP2 (torch's fully_shard), not FSDP1; set fsdp_version: 2 "
                              "or remove it")
    elif key == "transformer_layer_cls_to_wrap":
        s.wrap_classes = _names(value)
    elif key == "auto_wrap_policy":
        if str(value).upper() not in ("TRANSFORMER_BASED_WRAP", "NO_WRAP"):
            raise ConfigError(f"{where}: use TRANSFORMER_BASED_WRAP (one unit per decoder layer) or NO_WRAP (the "
                              "whole model as one unit); size-based wrapping is not built")
        s.auto_wrap = str(value).upper() == "TRANSFORMER_BASED_WRAP"
    elif key == "min_num_params":  # transformers sets 0 itself; it only matters for size-based wrapping
        if int(value):
            raise ConfigError(f"{where}: size-based wrapping is not built; remove it (layers are wrapped by class)")
    elif key == "reshard_after_forward":
        s.reshard_after_forward = _bool(value, where)
    elif key in ("cpu_offload", "offload_params"):  # transformers' name, accelerate's name
        s.offload = _bool(value, where)
    elif key == "activation_checkpointing":
        s.activation_checkpointing = _bool(value, where)
    elif key == "state_dict_type":
        if str(value).upper() != "FULL_STATE_DICT":
            raise ConfigError(f"{where}: tuneforge saves full state dicts only (normal model files, gathered on the "
                              "main process, which resume at any world size); set FULL_STATE_DICT or remove it")
    elif key == "cpu_ram_efficient_loading" or key.startswith("xla"):
        if _bool(value, where) if not isinstance(value, dict) else value:
            raise ConfigError(f"{where}: not built (every process loads the model, then FSDP shards it; XLA / TPU "
                              "is not targeted); remove it")
    elif key in FSDP1_ONLY:
        s.notes.append(f"note: fsdp_config `{key}` is an FSDP1 setting; FSDP2, which tuneforge runs, has none "
                       "(it always shards the original parameters)")
    else:
        raise ConfigError(f"{where}: unknown key; tuneforge reads fsdp_version, transformer_layer_cls_to_wrap, "
                          "auto_wrap_policy, reshard_after_forward, cpu_offload (offload_params), "
                          "activation_checkpointing, state_dict_type, cpu_ram_efficient_loading")


def _names(value) -> list[str]:
    return [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]


def _bool(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ConfigError(f"{where}: expected true or false")


def read_json(value, key: str) -> dict:
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"`{key}: {value}`: no such file; give the path of a JSON config (or the settings as a "
                          "mapping in the YAML)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"`{key}: {value}`: not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"`{key}: {value}`: expected a JSON object, got a {type(config).__name__}")
    return config


def problems(cfg) -> list[str]:
    """What the gate reports about sharding: bad values, and what cannot run sharded."""
    t, out = cfg.train, []
    fsdp, ds = _read(fsdp_settings, t, out), _read(zero.read_config, t, out)
    if fsdp and t.deepspeed:
        out.append("`fsdp` and `deepspeed` both shard the model; set one of them")
    out += zero.problems(cfg, ds)
    if fsdp:
        if fsdp.offload and not torch.cuda.is_available():
            out.append("`fsdp: ... offload` moves sharded weights to CPU memory between uses; on a CPU run they "
                       "are there already: remove offload")
        for what, on, why in (
                (f"stage: {cfg.finetune.stage}", cfg.finetune.stage in ("ppo", "grpo"),
                 "rollouts generate on each process separately"),
                ("stage: cls", cfg.finetune.stage == "cls", "a classifier is evaluated on the main process alone"),
                ("do_predict", t.do_predict, "prediction generates on the main process alone"),
                ("load_best_model_at_end", t.load_best_model_at_end, "the best model is kept and reloaded "
                 "unsharded"),
                ("quantization_bit", cfg.model.quantization_bit, "bitsandbytes' quantised layers are not sharded"),
                ("torch_compile", t.torch_compile, "compiled layers would have to trace FSDP's gathers"),
                ("upcast_layernorm", cfg.model.upcast_layernorm and cfg.finetune.pure_bf16,
                 "FSDP shards a layer's parameters as one dtype, and the norms would be fp32 in bf16 layers")):
            if on:
                out.append(f"`{what}` with `fsdp` is not built ({why}); train with DDP (remove `fsdp`) for it")
    return out


def _read(read, t, out: list[str]):
    try:
        return read(t)
    except ConfigError as err:
        out.append(str(err))
        return None


def accelerator_kwargs(t) -> dict:
    """What accelerate's Accelerator needs for sharding on GPUs (on CPUs, `shard` below does it)."""
    fsdp = fsdp_settings(t)
    for variable, key in (("ACCELERATE_USE_FSDP", "fsdp"), ("ACCELERATE_USE_DEEPSPEED", "deepspeed")):
        if os.environ.get(variable, "").lower() == "true" and not getattr(t, key):
            raise ConfigError(f"the accelerate config asks for {key} ({variable}); tuneforge reads sharding from "
                              f"its own YAML: use a plain multi-GPU accelerate config and set `{key}` in the YAML "
                              "(docs/distributed.md)")
    if not fsdp or not torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return {}  # one process: nothing to shard (accelerate would still want the model in FSDP form)
    from accelerate.utils import FullyShardedDataParallelPlugin

    return {"fsdp_plugin": FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=fsdp.reshard_after_forward, cpu_offload=fsdp.offload,
        auto_wrap_policy="transformer_based_wrap" if fsdp.auto_wrap else "no_wrap",
        transformer_cls_names_to_wrap=fsdp.wrap_classes, state_dict_type="FULL_STATE_DICT")}  # (checkpointing: ours)


def is_sharded(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard(module, fsdp: FsdpSettings, accelerator, make_optimizer):
    """(the loss module sharded across the processes, its optimizer from `make_optimizer(module)`). Each
    `wrap_classes` layer (auto_wrap) is one FSDP unit, gathered only while it computes; the rest is the root unit."""
    classes = fsdp.wrap_classes or list(getattr(module.model, "_no_split_modules", None) or [])
    if fsdp.auto_wrap:
        found = {type(m).__name__ for m in module.modules()}
        unknown = [name for name in classes if name not in found]
        if unknown or not classes:
            from ..models.load import ModelError

            raise ModelError(f"fsdp auto_wrap: the model has no layer class {', '.join(unknown) or '(none named)'};"
                             f" set `fsdp_transformer_layer_cls_to_wrap` to its decoder layer class, e.g. "
                             f"{type(module.model).__name__.replace('ForCausalLM', 'DecoderLayer')}")
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None:  # GPUs: accelerate shards when it prepares the model (with its optimizer)
        plugin.transformer_cls_names_to_wrap = classes
        accelerator.print(f"[tuneforge] fsdp: accelerate shards across {accelerator.num_processes} processes")
        return accelerator.prepare(module, make_optimizer(module))
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    options = {"reshard_after_forward": fsdp.reshard_after_forward,
               "offload_policy": CPUOffloadPolicy() if fsdp.offload else OffloadPolicy()}
    layers = [m for m in module.modules() if type(m).__name__ in classes] if fsdp.auto_wrap else []
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(module, **options)
    accelerator.print(f"[tuneforge] fsdp: sharded across {accelerator.num_processes} processes "
                      f"({len(layers)} layer units and the root)")
    return module, make_optimizer(module)  # after sharding: it steps the sharded parameters


def full_state(module, optimizer, with_optimizer: bool = True) -> tuple[dict, dict | None]:
    """A sharded loss module's full state dict and its optimizer's, gathered on the main process (elsewhere
    empty). Every process must call it. The optimizer state comes in `optimizer.state_dict()`'s own form, so an
    unsharded run loads it as it is."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(module, options=options)
    if not with_optimizer:
        return weights, None
    named = get_optimizer_state_dict(module, getattr(optimizer, "optimizer", optimizer), options=options)
    if not named:
        return weights, None
    index: dict[str, int] = {}
    groups = [{**g, "params": [index.setdefault(n, len(index)) for n in g["params"]]} for g in named["param_groups"]]
    return weights, {"state": {index[n]: s for n, s in named["state"].items()}, "param_groups": groups}


def load_optimizer_state(module, optimizer, state: dict) -> None:
    """Put a full `optimizer.state_dict()` (from any world size) into the optimizer of a sharded module: each
    process keeps its own shard of it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    optimizer = getattr(optimizer, "optimizer", optimizer)
    names = {id(p): n for n, p in module.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
    named = {"state": {order[i]: s for i, s in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(module, optimizer, named, options=StateDictOptions(full_state_dict=True))


def part_of(weights: dict, module, part) -> dict:
    """The entries of a loss module's state dict that belong to its submodule `part`, named as in `part`."""
    prefix = next(name for name, child in module.named_modules() if child is part) + "."
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
