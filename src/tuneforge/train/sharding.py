"""Sharded training: FSDP2 from the Hugging Face keys (`fsdp`, `fsdp_config`, `fsdp_transformer_layer_cls_to_wrap`)
as LLaMA-Factory passes them through; DeepSpeed's `deepspeed` is zero.py's.

FSDP shards weights, gradients and optimizer state across processes; the updates are those of unsharded training
on the same global batch. Who shards: on GPUs, accelerate (its FullyShardedDataParallelPlugin, in
`accelerator.prepare(model, optimizer)`). accelerate never enables FSDP for CPU processes (it keeps them in its
MULTI_CPU mode, which wraps models in DDP), so on CPUs the same settings go to torch's own FSDP2 `fully_shard`, the
function accelerate calls on GPUs: one unit per decoder layer, then the whole model. Checkpoints are always full
state dicts gathered on the main process (normal model files), so they resume at any world size, FSDP or not.
An accelerate config with `distributed_type: FSDP` (LLaMA-Factory's examples/accelerate/fsdp*_config.yaml) reaches
the processes as FSDP_* variables, which become the run's `fsdp` and `fsdp_config` when the YAML has no `fsdp`.
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
    # only the main process reads the weights; the others build the model empty and get them when it is sharded
    ram_efficient_loading: bool = False
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
        _apply_fsdp_key(s, key, value, f"fsdp_config `{key}: {value}`")
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


# accelerate launch's FSDP_* variables (accelerate/utils/launch.py) -> the fsdp_config keys they stand for. It sets
# some for every launch whatever they apply to, so those are not read: FSDP1's own switches (BACKWARD_PREFETCH,
# FORWARD_PREFETCH, USE_ORIG_PARAMS, SYNC_MODULE_STATES; the version's note covers them) and MIN_NUM_PARAMS (only
# size-based wrapping, refused by its policy, reads it).
ACCELERATE_FSDP = {"VERSION": "version", "OFFLOAD_PARAMS": "offload_params", "AUTO_WRAP_POLICY": "auto_wrap_policy",
                   "TRANSFORMER_CLS_TO_WRAP": "transformer_layer_cls_to_wrap", "STATE_DICT_TYPE": "state_dict_type",
                   "CPU_RAM_EFFICIENT_LOADING": "cpu_ram_efficient_loading",
                   "ACTIVATION_CHECKPOINTING": "activation_checkpointing",
                   "ACTIVATION_CHECKPOINTING_OFFLOAD": "activation_checkpointing_offload",
                   "IGNORED_MODULES": "ignored_modules"}
FSDP1_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2")  # 1..5


def adopt_accelerate_fsdp(t, environ) -> list[str]:
    """An accelerate config with `distributed_type: FSDP` becomes the run's `fsdp` and `fsdp_config` when the YAML
    sets no `fsdp` (so its checkpoints record it); the notes to print. Called once, when the config loads."""
    if environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return []
    if t.fsdp:
        return ["note: the YAML's `fsdp` applies, not the FSDP settings of accelerate's config"]
    s = from_accelerate(environ)
    t.fsdp = ("full_shard" if s.reshard_after_forward else "shard_grad_op") + (" offload" if s.offload else "")
    t.fsdp_config = {"auto_wrap_policy": "TRANSFORMER_BASED_WRAP" if s.auto_wrap else "NO_WRAP",
                     "cpu_ram_efficient_loading": s.ram_efficient_loading,
                     "activation_checkpointing": s.activation_checkpointing,
                     **({"transformer_layer_cls_to_wrap": s.wrap_classes} if s.wrap_classes else {})}
    return [*s.notes, f"note: sharding as accelerate's config asks: fsdp: {t.fsdp}, fsdp_config: {t.fsdp_config}"]


def from_accelerate(environ) -> FsdpSettings:
    """The settings of an accelerate config with `distributed_type: FSDP`, as `accelerate launch` passes them to
    the processes (ACCELERATE_USE_FSDP, FSDP_*), read with accelerate's defaults (no wrapping unless a policy is
    named)."""
    s = FsdpSettings(auto_wrap=False)
    for name, key in ACCELERATE_FSDP.items():
        if f"FSDP_{name}" in environ:
            value = environ[f"FSDP_{name}"]
            _apply_fsdp_key(s, key, value, f"accelerate's FSDP_{name}={value}")
    if environ.get("FSDP_VERSION", "1") == "1":  # FSDP1 shards by strategy; FSDP2 by RESHARD_AFTER_FORWARD
        strategy = environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
        word = FSDP1_STRATEGIES[int(strategy) - 1] if strategy in ("1", "2", "3", "4", "5") else strategy
        if word not in FSDP1_STRATEGIES[:2]:
            raise ConfigError(f"accelerate's fsdp_sharding_strategy {strategy}: use FULL_SHARD or SHARD_GRAD_OP "
                              "(NO_SHARD is plain DDP: use a multi-GPU config; hybrid sharding is not built)")
        s.reshard_after_forward = word == "FULL_SHARD"
    elif "FSDP_RESHARD_AFTER_FORWARD" in environ:
        value = environ["FSDP_RESHARD_AFTER_FORWARD"]
        s.reshard_after_forward = _bool(value, f"accelerate's FSDP_RESHARD_AFTER_FORWARD={value}")
    return s


def _apply_fsdp_key(s: FsdpSettings, key: str, value, where: str) -> None:
    if key == "version":
        if str(value) not in ("1", "2"):
            raise ConfigError(f"{where}: FSDP's versions are 1 and 2")
        if str(value) == "1":
            s.notes.append(f"note: {where} asks for FSDP1; tuneforge runs FSDP2 (torch's fully_shard), which makes "
                           "the same updates; FSDP1's own switches (prefetching, use_orig_params, "
                           "sync_module_states) have no FSDP2 counterpart")
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
    elif key == "cpu_ram_efficient_loading":
        s.ram_efficient_loading = _bool(value, where)
    elif key in ("activation_checkpointing_offload", "ignored_modules") or key.startswith("xla"):
        if value and (isinstance(value, dict) or str(value).lower() not in ("false", "none")):
            raise ConfigError(f"{where}: not built (offloading recomputed activations, modules left unsharded, "
                              "XLA / TPU); remove it")
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
    if t.ddp_static_graph and t.gradient_accumulation_steps > 1:
        # measured with torch 2.13: an internal assertion on the first micro-batch (the fix, PyTorch PR 187732, also
        # found that the gradients would stop being all-reduced from the second step)
        out.append("`ddp_static_graph: true` does not work with gradient accumulation in this torch: DDP fails on "
                   "the first micro-batch it does not sync (PyTorch issue 143580); remove it or set "
                   "gradient_accumulation_steps: 1")
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
                ("bf16_full_eval / fp16_full_eval", t.bf16_full_eval or t.fp16_full_eval, "sharded parameters are "
                 "not cast in place"),
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
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not t.deepspeed:
        raise ConfigError("the accelerate config asks for deepspeed (ACCELERATE_USE_DEEPSPEED); tuneforge reads "
                          "DeepSpeed's settings from its own YAML: use a plain multi-GPU accelerate config and set "
                          "`deepspeed: ds_config.json` in the YAML (docs/distributed.md)")
    if not fsdp or not torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return {}  # one process: nothing to shard (accelerate would still want the model in FSDP form)
    from accelerate.utils import FullyShardedDataParallelPlugin

    return {"fsdp_plugin": FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=fsdp.reshard_after_forward, cpu_offload=fsdp.offload,
        auto_wrap_policy="transformer_based_wrap" if fsdp.auto_wrap else "no_wrap",
        transformer_cls_names_to_wrap=fsdp.wrap_classes, state_dict_type="FULL_STATE_DICT",  # (checkpoints: ours)
        cpu_ram_efficient_loading=fsdp.ram_efficient_loading,
        activation_checkpointing=False)}  # prepare_model recomputes layers (else accelerate would read FSDP_*)


def _ddp_settings(t) -> dict:
    """HF's ddp_* keys that are set, under DistributedDataParallel's names (HF's with the ddp_ prefix)."""
    return {name: value for name, value in (
        ("find_unused_parameters", t.ddp_find_unused_parameters), ("static_graph", t.ddp_static_graph),
        ("bucket_cap_mb", t.ddp_bucket_cap_mb), ("broadcast_buffers", t.ddp_broadcast_buffers)) if value is not None}


def ddp_handlers(t) -> list:
    """For the DistributedDataParallel wrapper accelerate puts around a model that is not sharded (the keys left
    unset keep accelerate's defaults)."""
    from accelerate.utils import DistributedDataParallelKwargs

    chosen = _ddp_settings(t)
    return [DistributedDataParallelKwargs(**chosen)] if chosen else []


def notices(cfg) -> list[str]:
    t = cfg.train
    one_process = int(os.environ.get("WORLD_SIZE", "1")) < 2
    out = []
    if one_process and not t.average_tokens_across_devices:
        out.append("note: `average_tokens_across_devices: false` divides each process's loss by its own target "
                   "tokens, which one process does either way: no effect")
    chosen = ", ".join(f"`ddp_{name}`" for name in _ddp_settings(t))
    if not chosen:
        return out
    zero_shards = t.deepspeed and zero.stage(zero.read_config(t)) > 0  # (stage 0 trains with DDP)
    instead = ("`fsdp` shards the model" if t.fsdp else "`deepspeed` shards the model" if zero_shards
               else "it trains in one process" if one_process else None)
    if instead:
        out.append(f"note: {chosen} tune DistributedDataParallel, which this run does not use ({instead}): no effect")
    return out


def sent_by_main_process(fsdp: FsdpSettings | None, accelerator) -> bool:
    """Whether this process builds the model empty and gets its weights from the main process when it is sharded
    (cpu_ram_efficient_loading), rather than reading them itself."""
    return bool(fsdp and fsdp.ram_efficient_loading and accelerator.num_processes > 1
                and not accelerator.is_main_process)


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

    # the main process's weights, held until sent: fully_shard replaces each parameter by this process's shard
    weights = module.state_dict() if fsdp.ram_efficient_loading and accelerator.is_main_process else {}
    options = {"reshard_after_forward": fsdp.reshard_after_forward,
               "offload_policy": CPUOffloadPolicy() if fsdp.offload else OffloadPolicy()}
    layers = [m for m in module.modules() if type(m).__name__ in classes] if fsdp.auto_wrap else []
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(module, **options)
    if fsdp.ram_efficient_loading:
        _send_weights(module, weights, accelerator)
    accelerator.print(f"[tuneforge] fsdp: sharded across {accelerator.num_processes} processes "
                      f"({len(layers)} layer units and the root)"
                      + (", weights read by the main process only" if fsdp.ram_efficient_loading else ""))
    return module, make_optimizer(module)  # after sharding: it steps the sharded parameters


def _send_weights(module, weights: dict, accelerator) -> None:
    """cpu_ram_efficient_loading: each process's shards of the main process's `weights` (the others' parameters
    are empty until now), and the main process's buffers, which no state dict carries when non-persistent."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not accelerator.is_main_process:
        module.to_empty(device=accelerator.device)
    set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in module.buffers():
        torch.distributed.broadcast(buffer, src=0)


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
