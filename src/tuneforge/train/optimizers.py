"""The optimizer `optim` and the optimizer extras name, from maintained packages: AdamW, SGD, Adagrad and RMSprop
from torch, Adafactor from transformers, AdamW, Lion, AdEMAMix and RMSprop in 8 or 32 bits (paged or not) from
bitsandbytes (CPU too), GaLore (galore-torch), APOLLO (apollo-torch), Adam-mini (adam-mini), BAdam
(badam), Muon (torch.optim.Muon, with AdamW for what Muon cannot take). GaLore and APOLLO can also step per layer
inside backward (Layerwise). build_optimizer groups the parameters by learning rate and weight decay; make_optimizer
turns those groups into the optimizer."""

from __future__ import annotations

import functools
import re

import torch

from ..models.adapters import all_linear_names
from ..models.load import ModelError

# bitsandbytes' optimizers under transformers' names: (class, bits of state, paged)
_BNB = {"adamw_8bit": ("AdamW", 8, False), "adamw_bnb_8bit": ("AdamW", 8, False),
        "paged_adamw_8bit": ("AdamW", 8, True), "paged_adamw_32bit": ("AdamW", 32, True),
        "lion_8bit": ("Lion", 8, False), "lion_32bit": ("Lion", 32, False),
        "paged_lion_8bit": ("Lion", 8, True), "paged_lion_32bit": ("Lion", 32, True),
        "ademamix": ("AdEMAMix", 32, False), "ademamix_8bit": ("AdEMAMix", 8, False),
        "paged_ademamix_8bit": ("AdEMAMix", 8, True), "paged_ademamix_32bit": ("AdEMAMix", 32, True),
        "rmsprop_bnb": ("RMSprop", 32, False), "rmsprop_bnb_8bit": ("RMSprop", 8, False),
        "rmsprop_bnb_32bit": ("RMSprop", 32, False)}
_TORCH = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop}
OPTIMS = ("adamw_torch", "adamw_torch_fused", "adafactor", *_TORCH, *_BNB)


def _flag(text: str) -> bool:
    """A boolean in optim_args: what transformers reads as true, or a plain false (anything else is refused, where
    transformers would read it as false)."""
    if text.lower() not in ("true", "1", "yes", "false", "0", "no"):
        raise ValueError(text)
    return text.lower() in ("true", "1", "yes")


# What `optim_args` may set for each optimizer: the keys transformers reads for it, with their types. weight_decay
# is not one of them: the parameter groups carry it (none for biases and norms), so `weight_decay` sets it.
_RMSPROP_ARGS = {"momentum": float, "alpha": float, "eps": float}
_ADEMAMIX_ARGS = {"beta1": float, "beta2": float, "beta3": float, "alpha": float, "eps": float, "t_alpha": int,
                  "t_beta3": int}
OPTIM_ARGS = {"sgd": {"momentum": float, "dampening": float, "nesterov": _flag},
              "adagrad": {"lr_decay": float, "eps": float},
              "rmsprop": {**_RMSPROP_ARGS, "centered": _flag},
              **{name: _RMSPROP_ARGS for name, spec in _BNB.items() if spec[0] == "RMSprop"},
              **{name: _ADEMAMIX_ARGS for name, spec in _BNB.items() if spec[0] == "AdEMAMix"}}
_BNB_ADAMW = [name for name, spec in _BNB.items() if spec[0] == "AdamW"]
_EXTRAS = ("use_galore", "use_apollo", "use_adam_mini", "use_badam", "use_muon")


def check(cfg) -> list[str]:
    """Problems with `optim` and the optimizer extras."""
    t, f, out = cfg.train, cfg.finetune, []
    if t.optim not in OPTIMS:
        out.append(f"`optim: {t.optim}` is not supported; use one of {', '.join(OPTIMS)}")
    out += _optim_args_problems(t)
    chosen = [key for key in _EXTRAS if getattr(f, key)]
    if len(chosen) > 1:
        out.append(f"{' and '.join(f'`{k}`' for k in chosen)} each choose the optimizer; set only one")
    if chosen and (t.optim not in ("adamw_torch", "adamw_torch_fused") and
                   not (t.optim in _BNB_ADAMW and f.use_galore)):
        out.append(f"`{chosen[0]}` brings its own optimizer; leave `optim` at adamw_torch_fused or adamw_torch "
                   "(GaLore also takes adamw_8bit)")
    if chosen and (f.layer_lr or f.layerwise_lr_decay or f.loraplus_lr_ratio) and chosen[0] != "use_galore":
        out.append(f"`{chosen[0]}` uses one learning rate for all parameters; remove layer_lr, layerwise_lr_decay "
                   "and loraplus_lr_ratio")
    if f.use_galore and t.optim in _BNB_ADAMW and not torch.cuda.is_available():
        out.append("GaLore's 8-bit AdamW (galore-torch) runs on CUDA only; on this machine set `optim: adamw_torch`")
    out += _layerwise_problems(cfg)
    if (f.use_galore or f.use_apollo) and f.finetuning_type != "full":
        out.append("GaLore and APOLLO project the gradients of full weight matrices: they need "
                   "`finetuning_type: full`")
    if (f.use_badam or f.use_adam_mini) and f.finetuning_type not in ("full",):
        out.append("BAdam and Adam-mini optimise whole models: they need `finetuning_type: full`")
    if f.use_badam and f.badam_mode == "layer" and f.badam_switch_mode is None:
        out.append("`badam_switch_mode` must be ascending, descending, random or fixed with badam_mode layer")
    return out


def _layerwise(f) -> str | None:
    """The layerwise key that is on (galore_layerwise / apollo_layerwise), if any."""
    return "galore_layerwise" if f.galore_layerwise else "apollo_layerwise" if f.apollo_layerwise else None


def _layerwise_problems(cfg) -> list[str]:
    """A layerwise optimizer steps each parameter inside backward, as soon as its gradient is complete, and frees
    that gradient: whatever needs a step's gradients together, or later, cannot come with it."""
    t, f = cfg.train, cfg.finetune
    key = _layerwise(f)
    if key is None:
        return []
    out, needs = [], key.replace("_layerwise", "")
    if not getattr(f, f"use_{needs}"):
        out.append(f"`{key}` steps {needs.capitalize()}'s optimizer per layer: set `use_{needs}: true` too")
    why = "each layer's update runs as soon as backward has its gradient"
    if t.gradient_accumulation_steps != 1:
        out.append(f"`{key}` needs `gradient_accumulation_steps: 1` ({why}, so every micro-batch would be a step); "
                   f"got {t.gradient_accumulation_steps}: raise per_device_train_batch_size instead")
    if t.skip_nonfinite_steps:
        out.append(f"`{key}` cannot skip a step whose gradient norm is not finite ({why}, before the norm is "
                   "known): remove skip_nonfinite_steps")
    if t.fp16:
        out.append(f"`{key}` does not work with fp16's loss scaling (the gradients would be unscaled after the "
                   "updates): use bf16")
    if t.fsdp:
        out.append(f"`{key}` is for one process: FSDP shards the gradients the layers would step on; set it to false")
    return out


def notices(cfg) -> list[str]:
    """What the layerwise optimizer leaves without effect, one line each."""
    key = _layerwise(cfg.finetune)
    if key and cfg.train.max_grad_norm and cfg.train.max_grad_norm > 0:
        return [f"note: `max_grad_norm` has no effect with `{key}`: clipping needs the whole gradient, and each "
                "layer steps as soon as backward has its own (a gradient norm that is not finite still stops the run)"]
    return []


def learning_rate_of(name: str, t, f, n_layers: int | None) -> float:
    """A parameter's learning rate: `layer_lr` patterns (last match wins), then layer-wise decay."""
    rate = t.learning_rate
    for item in (f.layer_lr or "").split(","):
        if item.strip():
            pattern, value = item.split("=", 1)
            if pattern.strip() in name:
                rate = float(value)
    if f.layerwise_lr_decay and n_layers:
        layer = re.search(r"\.(\d+)\.", name)
        if layer:
            rate *= f.layerwise_lr_decay ** (n_layers - 1 - int(layer.group(1)))
        elif "embed" in name:
            rate *= f.layerwise_lr_decay ** n_layers
    if f.loraplus_lr_ratio and "lora_B" in name:  # LoRA+: the B matrices learn faster
        rate *= f.loraplus_lr_ratio
    if f.loraplus_lr_ratio and "lora_embedding" in name:  # LoRA+ gives embedding adapters their own rate
        rate = f.loraplus_lr_embedding
    return rate


def build_optimizer(model, t, f, report=None):
    """The optimizer (optimizers.py) over the trainable parameters, grouped by learning rate and by weight decay
    (none for biases and norms). `report` receives one line per group with its effective rate."""
    n_layers = _num_layers(model)
    groups: dict[tuple[float, bool], list] = {}
    names: dict[tuple[float, bool], list[str]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (learning_rate_of(name, t, f, n_layers), param.ndim >= 2 and "norm" not in name.lower())
        groups.setdefault(key, []).append(param)
        names.setdefault(key, []).append(name)
    if not groups:
        raise ModelError("no parameter is trainable; check finetuning_type and its options")
    if report and (f.layer_lr or f.layerwise_lr_decay or f.loraplus_lr_ratio):
        for (rate, decays), members in sorted(names.items(), key=lambda kv: -kv[0][0]):
            report(f"[tuneforge] lr {rate:.3e}{'' if decays else ' (no weight decay)'}: {len(members)} tensors, "
                   f"e.g. {members[0]}")
    param_groups = [{"params": params, "lr": rate, "weight_decay": t.weight_decay if decays else 0.0}
                    for (rate, decays), params in groups.items()]
    return make_optimizer(model, param_groups, t, f)


def _num_layers(module) -> int | None:
    """num_hidden_layers of a model or of the model inside a loss module."""
    config = getattr(module, "config", None) or getattr(getattr(module, "model", None), "config", None)
    return getattr(config, "num_hidden_layers", None)


def make_optimizer(model, param_groups: list[dict], t, f) -> torch.optim.Optimizer:
    """The optimizer over `param_groups` (each with its lr and weight_decay). `model` may be a recipe's loss module
    that holds the model as `.model`."""
    model = model if hasattr(model, "config") else model.model
    betas, eps = (t.adam_beta1, t.adam_beta2), t.adam_epsilon
    if f.use_galore or f.use_apollo:
        return _projected(model, param_groups, t, f)
    if f.use_adam_mini:
        from adam_mini import Adam_mini

        c = model.config
        return Adam_mini(named_parameters=[(n, p) for n, p in model.named_parameters() if p.requires_grad],
                         lr=t.learning_rate, betas=betas, eps=eps, weight_decay=t.weight_decay, model_sharding=False,
                         dim=c.hidden_size, n_heads=c.num_attention_heads,
                         n_kv_heads=getattr(c, "num_key_value_heads", None), verbose=False)
    if f.use_badam:
        return _badam(model, param_groups, t, f)
    if f.use_muon:
        return _muon(model, param_groups, t)
    if t.optim in _TORCH:  # at torch's defaults (SGD: no momentum), which optim_args change
        return _TORCH[t.optim](param_groups, lr=t.learning_rate, **optim_args(t))
    if t.optim == "adafactor":
        from transformers.optimization import Adafactor

        # as transformers sets it up: the schedule's rate, not Adafactor's own relative step and parameter scaling
        return Adafactor(param_groups, lr=t.learning_rate, scale_parameter=False, relative_step=False)
    if t.optim in _BNB:
        return _bitsandbytes(param_groups, t)
    return torch.optim.AdamW(param_groups, lr=t.learning_rate, betas=betas, eps=eps, fused=_fused(t))


def _bitsandbytes(param_groups: list[dict], t):
    """A bitsandbytes optimizer with the arguments transformers gives it: Adam's betas and epsilon to AdamW, the
    betas to Lion, optim_args (over Adam's) to AdEMAMix and RMSprop. On a CPU bitsandbytes keeps the paged
    variants' state in ordinary memory (it warns once)."""
    import bitsandbytes as bnb

    family, bits, paged = _BNB[t.optim]
    kwargs, given = {"optim_bits": bits}, optim_args(t)
    if family != "RMSprop":
        kwargs["is_paged"] = paged
    if family == "AdamW":
        kwargs.update(betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
    elif family == "Lion":
        kwargs.update(betas=(t.adam_beta1, t.adam_beta2))
    elif family == "AdEMAMix":
        kwargs.update(betas=(given.pop("beta1", t.adam_beta1), given.pop("beta2", t.adam_beta2),
                             given.pop("beta3", 0.9999)), alpha=5.0, eps=t.adam_epsilon)
    return getattr(bnb.optim, family)(param_groups, lr=t.learning_rate, **{**kwargs, **given})


def optim_args(t) -> dict:
    """`optim_args` ("momentum=0.9,nesterov=true", transformers' format) as typed keyword arguments of `optim`;
    check() has made sure every key is one the optimizer reads."""
    types = OPTIM_ARGS.get(t.optim, {})
    return {key: types[key](value) for key, value in _pairs(t.optim_args)}


def _pairs(text: str | None) -> list[tuple[str, str]]:
    """optim_args split as transformers splits it (spaces removed, then commas, then the first `=`)."""
    if not text:
        return []
    return [tuple(item.split("=", 1)) if "=" in item else (item, "") for item in text.replace(" ", "").split(",")]


def _optim_args_problems(t) -> list[str]:
    if not t.optim_args:
        return []
    types = OPTIM_ARGS.get(t.optim)
    if types is None:
        readers = ", ".join(OPTIM_ARGS)
        return [f"`optim_args` is read by {readers} (as in transformers); `optim: {t.optim}` takes none: remove it"
                + (" and set adam_beta1, adam_beta2 and adam_epsilon" if "adam" in t.optim else "")]
    out = []
    for key, value in _pairs(t.optim_args):
        if key == "weight_decay":
            out.append("`optim_args`: set weight_decay with the `weight_decay` key (the parameter groups carry it, "
                       "so biases and norms get none)")
        elif key not in types:
            out.append(f"`optim_args`: `{key}` is not an argument of {t.optim}; it takes {', '.join(types)} "
                       "(key=value, comma-separated)")
        else:
            try:
                types[key](value)
            except ValueError:
                what = {float: "a number", int: "a whole number", _flag: "true or false"}[types[key]]
                out.append(f"`optim_args`: `{key}={value}` is not {what}")
    if not out:  # the optimizer's own range checks (nesterov needs momentum, ...), on a stand-in parameter
        stand_in = [{"params": [torch.zeros(1, requires_grad=True)], "weight_decay": 0.0}]
        try:
            if t.optim in _TORCH:
                _TORCH[t.optim](stand_in, lr=1.0, **optim_args(t))
            else:
                _bitsandbytes(stand_in, t)
        except (ValueError, NotImplementedError) as err:
            out.append(f"`optim_args`: {t.optim} refuses {t.optim_args!r}: {err}")
    return out


def _fused(t) -> bool | None:
    """torch AdamW's `fused` for `optim` (None: torch's own choice, a per-tensor loop on CPUs)."""
    return True if t.optim == "adamw_torch_fused" else None


def _projected(model, param_groups: list[dict], t, f):
    """GaLore / APOLLO: the 2-D weights of the target linear layers get low-rank projected gradient states (the
    group keys those packages read); everything else is plain AdamW."""
    target = f.galore_target if f.use_galore else f.apollo_target
    names = all_linear_names(model) if target.strip() == "all" else [n.strip() for n in target.split(",")]
    projected = {id(p) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
                 and name.split(".")[-1] in names for p in (module.weight,) if p.requires_grad}
    if f.use_galore:
        extra = dict(rank=f.galore_rank, update_proj_gap=f.galore_update_interval, scale=f.galore_scale,
                     proj_type=f.galore_proj_type)
    else:
        extra = dict(rank=f.apollo_rank, proj=f.apollo_proj, update_proj_gap=f.apollo_update_interval,
                     scale=f.apollo_scale, proj_type=f.apollo_proj_type, scale_type=f.apollo_scale_type)
    groups = []
    for group in param_groups:
        inside = [p for p in group["params"] if id(p) in projected]
        outside = [p for p in group["params"] if id(p) not in projected]
        groups += [{**group, "params": inside, **extra}] if inside else []
        groups += [{**group, "params": outside}] if outside else []
    betas, eps = (t.adam_beta1, t.adam_beta2), t.adam_epsilon
    if f.use_apollo:
        from apollo_torch import APOLLOAdamW

        def build(groups):
            return APOLLOAdamW(groups, lr=t.learning_rate, betas=betas, eps=eps, scale_front=f.apollo_scale_front)
    else:
        import galore_torch

        def build(groups):
            if t.optim in _BNB_ADAMW:
                return galore_torch.GaLoreAdamW8bit(groups, lr=t.learning_rate, betas=betas, eps=eps)
            return galore_torch.GaLoreAdamW(groups, lr=t.learning_rate, betas=betas, eps=eps,
                                            no_deprecation_warning=True)
    if not _layerwise(f):
        return build(groups)
    parts = {p: build([{**group, "params": [p]}]) for group in groups for p in group["params"]}
    if f.use_apollo:  # APOLLO seeds a parameter's random projection with its place in the optimizer: keep the places
        for place, (param, part) in enumerate(parts.items(), start=1):
            part.state[param]["seed"] = place
    return Layerwise(parts)


class Parts(torch.optim.Optimizer):
    """Several optimizers stepped as one, with one state_dict for checkpoints. param_groups are the parts' own
    dicts, read afresh each time: a part's load_state_dict replaces its dicts, and the learning-rate scheduler must
    reach the ones the part steps with."""

    def __init__(self, parts: list[torch.optim.Optimizer]):
        self.parts = parts
        self.defaults = parts[0].defaults
        self.state = {}

    @property
    def param_groups(self) -> list[dict]:
        return [group for part in self.parts for group in part.param_groups]

    def step(self, closure=None):
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True):
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict):
        for part, saved in zip(self.parts, state_dict["parts"], strict=True):
            part.load_state_dict(saved)


class Layerwise(Parts):
    """One optimizer per parameter, stepped by a hook as soon as backward has accumulated that parameter's
    gradient, which is then freed: a full set of gradients is never held (galore_layerwise / apollo_layerwise).
    step() and zero_grad() find nothing left to do; grad_norm() is the norm of the gradients the hooks used since
    its last call."""

    def __init__(self, parts: dict[torch.nn.Parameter, torch.optim.Optimizer]):
        super().__init__(list(parts.values()))
        self._squares = torch.zeros((), device=next(iter(parts)).device)
        for param, part in parts.items():
            param.register_post_accumulate_grad_hook(functools.partial(self._step, part))

    def _step(self, part: torch.optim.Optimizer, param: torch.nn.Parameter) -> None:
        self._squares += torch.linalg.vector_norm(param.grad, dtype=torch.float32).square()
        part.step()
        param.grad = None

    def grad_norm(self) -> torch.Tensor:
        norm, self._squares = self._squares.sqrt(), torch.zeros_like(self._squares)
        return norm

    def step(self, closure=None):
        pass

    def zero_grad(self, set_to_none: bool = True):
        pass


def _badam(model, param_groups: list[dict], t, f):
    """BAdam: block coordinate descent, one block of layers trained at a time with Adam (package `badam`)."""
    named = list(model.named_parameters())
    betas, eps = (t.adam_beta1, t.adam_beta2), t.adam_epsilon
    if f.badam_mode == "ratio":
        from badam import BlockOptimizerRatio

        return BlockOptimizerRatio(param_groups=param_groups, named_parameters_list=named,
                                   update_ratio=f.badam_update_ratio, mask_mode=f.badam_mask_mode,
                                   verbose=f.badam_verbose, include_embedding=False, lr=t.learning_rate,
                                   betas=betas, eps=eps)
    from badam import BlockOptimizer

    return _Blocks([BlockOptimizer(
        base_optimizer=torch.optim.AdamW(param_groups, lr=t.learning_rate, betas=betas, eps=eps),
        named_parameters_list=named, block_prefix_list=None, switch_block_every=f.badam_switch_interval,
        start_block=f.badam_start_block, switch_mode=f.badam_switch_mode, verbose=f.badam_verbose)])


class _Blocks(Parts):
    """BAdam's BlockOptimizer with a checkpoint that resumes it exactly: its own state_dict is only the Adam state
    of the block being trained, so a resumed run would start the block schedule over (training the wrong block),
    pair that state with another block's parameters, and step at the first learning rate until the scheduler's
    next step. This one adds where the schedule is and the current rate."""

    def state_dict(self):
        block = self.parts[0]
        active = next(i for i, prefixes in enumerate(block.block_prefix_list)
                      if prefixes + block.active_modules == block.active_param_prefixs)
        return {"adam": block.base_optimizer.state_dict(), "global_step": block.global_step, "active": active,
                "next": block.current_block_idx, "order": list(getattr(block, "block_order", [])),
                "lr": [group["lr"] for group in block.param_groups]}

    def load_state_dict(self, state_dict):
        block = self.parts[0]
        block.global_step = state_dict["global_step"]
        block.current_block_idx = state_dict["active"]
        block.switch_trainable_params(verbose=0)  # the saved block's parameters, trainable, with fp32 copies
        block.current_block_idx, block.block_order = state_dict["next"], list(state_dict["order"])
        block.base_optimizer.load_state_dict(state_dict["adam"])
        for group, lr in zip(block.param_groups, state_dict["lr"], strict=True):  # BAdam copies it to Adam's groups
            group["lr"] = lr


def _muon(model, param_groups: list[dict], t):
    """Muon (torch.optim.Muon) for the hidden 2-D weight matrices; AdamW for embeddings, the output head, norms
    and biases, which Muon's orthogonalised update does not suit (LLaMA-Factory splits them the same way)."""
    hidden = {id(p) for name, p in model.named_parameters()
              if p.ndim == 2 and "embed" not in name and "lm_head" not in name}
    muon_groups, adam_groups = [], []
    for group in param_groups:
        inside = [p for p in group["params"] if id(p) in hidden]
        outside = [p for p in group["params"] if id(p) not in hidden]
        muon_groups += [{**group, "params": inside}] if inside else []
        adam_groups += [{**group, "params": outside}] if outside else []
    # Muon scales its orthogonalised update to AdamW's RMS, so one learning rate suits both halves
    muon = torch.optim.Muon(muon_groups, lr=t.learning_rate, adjust_lr_fn="match_rms_adamw")
    if not adam_groups:
        return muon
    return Parts([muon, torch.optim.AdamW(adam_groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                          eps=t.adam_epsilon, fused=_fused(t))])
