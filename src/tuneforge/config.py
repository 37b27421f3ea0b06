"""The one config gate: a flat YAML/JSON file plus `key=value` overrides read into the option groups of
options.py, and validation.

Key names and defaults follow LLaMA-Factory (see docs/config.md), so its configs run unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
from pathlib import Path
from typing import Literal, get_args

import yaml

from .options import (  # noqa: F401 (re-exported: `from tuneforge.config import Config` keeps working)
    GROUPS, KEY_GROUP, NO_EFFECT_YET, NOT_YET, SCHEDULERS, Config, DataArgs, EvalArgs, FinetuneArgs, GenerateArgs,
    ModelArgs, TrainArgs, spelled_otherwise)


class ConfigError(ValueError):
    """A config problem, worded for the person who wrote the config."""


def notices(cfg: Config) -> list[str]:
    """The notes a run prints before it starts: what loading decided beyond the keys, keys that have no effect
    (yet, or in this combination), and what a setting costs or would gain."""
    from .train.trackers import requested as requested_trackers

    out = list(cfg.notes)
    for key, why in NO_EFFECT_YET.items():
        group = getattr(cfg, KEY_GROUP[key])
        if getattr(group, key) != getattr(type(group)(), key):
            out.append(f"note: `{key}` has no effect yet: {why}")
    d, stage = cfg.data, _stage(cfg)
    if cfg.train.tf32 is not None and not _cuda_available():
        out.append("note: `tf32` sets how NVIDIA GPUs multiply float32; this machine has none, so it has no effect")
    if cfg.train.fp16 and not _cuda_available():
        from .machine import fp16_notice

        out.append(fp16_notice())
    if (d.preprocessing_num_workers or 1) > 1 and stage and not stage.language_modelling:
        from .train.stages import names

        out.append(f"note: `preprocessing_num_workers` applies to stages {names(lambda s: s.language_modelling)}; "
                   f"stage {stage.name} preprocesses in one process")
    if cfg.train.run_name and not {"wandb", "mlflow"} & set(requested_trackers(cfg.train.report_to)):
        out.append("note: `run_name` has no effect here: it names wandb and mlflow runs (report_to)")
    if cfg.finetune.pissa_init and not cfg.finetune.pissa_convert:
        out.append("note: a PiSSA adapter applies to the residual base PiSSA leaves, not to the original model: "
                   "set `pissa_convert: true` for one that does (output_dir/pissa_converted)")
    t = cfg.train
    selective = t.gradient_checkpointing_scope != "layers" or t.gradient_checkpointing_every != 1
    if not t.gradient_checkpointing and selective:
        out.append("note: `gradient_checkpointing_scope` and `gradient_checkpointing_every` have no effect without "
                   "`gradient_checkpointing: true`")
    elif t.gradient_checkpointing and t.gradient_checkpointing_scope == "layers" and cfg.model.flash_attn == "eager":
        out.append("note: with eager attention, `gradient_checkpointing_scope: attention` recomputes only attention: "
                   "faster steps for more memory (SmolLM2-135M, cutoff 256: ~15% less time, 2.0 instead of 1.2 GB)")
    from .models import adapters, vocab

    out += vocab.notices(cfg) + adapters.notices(cfg)
    from .train import evaluation, optimizers, sharding, steps

    out += (optimizers.notices(cfg) + sharding.notices(cfg) + steps.loader_notices(cfg)
            + evaluation.full_eval_notices(cfg))
    if cfg.model.upcast_layernorm and not (cfg.finetune.pure_bf16 or cfg.model.quantization_bit):
        out.append("note: `upcast_layernorm` has no effect here: the weights are fp32 already (it keeps the norms "
                   "in fp32 under `pure_bf16` or `quantization_bit`)")
    if cfg.finetune.plot_loss and cfg.train.logging_strategy == "no":
        out.append("note: `plot_loss` draws the logged training losses, and `logging_strategy: no` logs none")
    if cfg.train.eval_delay and cfg.train.eval_strategy == "no":
        out.append("note: `eval_delay` has no effect without evaluations during training (eval_strategy)")
    if cfg.train.eval_on_start and not cfg.train.do_train:
        out.append("note: `eval_on_start` evaluates before training's first step; without do_train it has no effect")
    if d.buffer_size != DataArgs.buffer_size and not d.streaming:
        out.append("note: `buffer_size` has no effect without streaming: in-memory data is shuffled whole")
    if d.streaming:
        for key, value, why in (
                ("preprocessing_num_workers", (d.preprocessing_num_workers or 1) > 1, "streamed rows are encoded in "
                 "the training process, a batch at a time, as training reads them"),
                ("overwrite_cache", d.overwrite_cache, "streamed data is never cached")):
            if value:
                out.append(f"note: `{key}` has no effect with streaming: {why}")
    return out


def speed_hint(cfg: Config) -> str | None:
    """On a CPU, the fast-path settings a language-modelling run leaves off. They stay opt-in because each changes
    results a little (bf16 rounding, which examples share a row); the line says what each would gain."""
    t, f, stage = cfg.train, cfg.finetune, _stage(cfg)
    if not t.do_train or stage is None or not stage.language_modelling or _cuda_available():
        return None
    from .machine import multiplies_bf16_natively

    gains, native = [], multiplies_bf16_natively()  # without bf16 units bf16 is slower: bf16_cost says so
    if not (t.bf16 or t.fp16) and native:
        gains.append("`bf16: true` (this CPU multiplies bf16 natively: steps 2x to 3x faster)")
    frozen_base = f.finetuning_type in ("lora", "oft") and not cfg.model.quantization_bit
    if frozen_base and (t.bf16 or t.fp16) and not f.pure_bf16 and native:
        gains.append("`pure_bf16: true` (the frozen base held in bf16: about 0.6 GB less for a 135M model)")
    if not _packs(cfg):
        gains.append("`packing: true` (several examples per row: no compute spent on padding)")
    if not gains:
        return None
    return "note: faster on this CPU, opt-in as they change results slightly: " + "; ".join(gains) + \
        " (docs/benchmarks.md)"


def bf16_cost(cfg: Config) -> str | None:
    """On a CPU without bf16 matrix units, what the 16-bit keys a training run sets cost (machine.bf16_notice)."""
    if _cuda_available():
        return None
    from .machine import bf16_notice

    t = cfg.train
    return bf16_notice([key for key, on in (("bf16", t.bf16), ("fp16", t.fp16), ("pure_bf16", cfg.finetune.pure_bf16))
                        if on])


def shuffles_rows(cfg: Config) -> bool:
    """Whether training rows are shuffled every epoch: not with LLaMA-Factory's `disable_shuffling` or HF's
    `train_sampling_strategy: sequential`."""
    return not (cfg.finetune.disable_shuffling or cfg.train.train_sampling_strategy == "sequential")


def order_seed(t: TrainArgs) -> int:
    """The seed of the training rows' order (each epoch's shuffle): HF's data_seed, else seed."""
    return t.seed if t.data_seed is None else t.data_seed


def _packs(cfg: Config) -> bool:
    """Whether training rows are packed: asked for, or stage pt (raw text always cut into cutoff_len blocks)."""
    d, stage = cfg.data, _stage(cfg)
    return bool(d.packing or d.neat_packing or (stage is not None and stage.data == "pt"))


def _coerce(value, annotation: str, key: str, source: str):
    """Turn a YAML or command-line value into the declared type, or explain what was expected."""
    optional = "None" in annotation
    base = annotation.replace("| None", "").strip()
    if value is None or (optional and isinstance(value, str) and value.lower() in ("null", "none", "")):
        if optional:
            return None
        raise ConfigError(f"{source}: `{key}` needs a value of type {base}, got nothing")
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if base == "int":
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if number != int(number):
                raise ValueError
            return int(number)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if value is False and base.startswith("Literal") and re.search(r"['\"]no['\"]", base):
            return "no"  # YAML reads a bare no as false: `eval_strategy: no` means the choice "no"
        if isinstance(value, (list, tuple)):  # `dataset: [a, b]` is the same as `dataset: a,b`
            return ",".join(str(v) for v in value)
        if isinstance(value, dict):
            if "dict" in base:  # a mapping written inline in the YAML (deepspeed, fsdp_config)
                return value
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: `{key}` expects {base}, got {value!r}") from None


def _read_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        where = getattr(err, "problem_mark", None)
        line = f" line {where.line + 1}" if where else (f" line {err.lineno}" if hasattr(err, "lineno") else "")
        raise ConfigError(f"{path}{line}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: "
                          f"{getattr(err, 'problem', None) or err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of `key: value` lines, got a {type(data).__name__}")
    return data


def build_config(values: dict, source: str = "command line", cli_values: dict | None = None) -> Config:
    """The config from a file's `values` (named `source` in messages) with `cli_values` from the command line
    applied over them. Every unknown key and mistyped value is reported at once, each named by where it came from."""
    from .cmdline import suggest
    from .lf_options import other_engines

    cfg, problems = Config(source=source, cli_keys=frozenset(cli_values or ())), []
    for where, items in ((source, values), ("command line", cli_values or {})):
        engine_problems, named = other_engines(where, items)
        problems += engine_problems
        for key, value in items.items():
            if key not in KEY_GROUP:
                if key not in named:  # (named together above)
                    problems.append(f"{where}: unknown key `{key}`{suggest(key)}")
                continue
            group = KEY_GROUP[key]
            annotation = next(f.type for f in dataclasses.fields(GROUPS[group]) if f.name == key)
            try:
                setattr(getattr(cfg, group), key, _coerce(value, annotation, key, where))
            except ConfigError as err:
                problems.append(str(err))
    problems += _apply_adapter_folder(cfg, source)
    if cfg.train.torch_compile_backend or cfg.train.torch_compile_mode:  # HF's rule: naming either asks to compile
        cfg.train.torch_compile = True
    if str(cfg.train.include_num_input_tokens_seen).lower() in ("true", "yes", "1"):  # HF's rule: true means all
        cfg.train.include_num_input_tokens_seen = "all"
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else f"{len(problems)} problems:\n" +
                          "\n".join(f"  - {p}" for p in problems))
    return cfg


def _apply_adapter_folder(cfg: Config, source: str) -> list[str]:
    """LLaMA-Factory's `adapter_folder`: each adapter sits in this sub-folder of its folder; as there, that holds
    for the reference's and the reward model's adapters too (they copy the model arguments)."""
    m, f = cfg.model, cfg.finetune
    if not m.adapter_folder:
        return []
    if not m.adapter_name_or_path:
        return [f"{source}: `adapter_folder` names a sub-folder of each adapter_name_or_path folder, which is unset: "
                "set adapter_name_or_path or remove it"]
    for group, key in ((m, "adapter_name_or_path"), (f, "ref_model_adapters"), (f, "reward_model_adapters")):
        paths = [p.strip() for p in (getattr(group, key) or "").split(",") if p.strip()]
        remote = [p for p in paths if not Path(p).exists() and p.count("/") == 1 and not p.startswith((".", "~"))]
        if remote:
            return [f"{source}: `adapter_folder`: {key} {remote[0]} is no local folder (a hub adapter with "
                    "adapter_folder is not built): download it and set the local folder instead"]
        if paths:
            setattr(group, key, ",".join(str(Path(p) / m.adapter_folder) for p in paths))
    m.adapter_folder = None
    return []


def load_config(path: str | None, overrides: list[str] | None = None, validate_for: str | None = "train") -> Config:
    """The file's keys first, then the command line's over them (LLaMA-Factory's rule; later ones win)."""
    from .cmdline import parse_overrides

    cfg = build_config(_read_file(path) if path else {}, source=path or "command line",
                       cli_values=parse_overrides(overrides or []))
    if validate_for == "train":
        from .launch import launcher_compile, launcher_precision
        from .train.sharding import adopt_accelerate_fsdp

        key, note = launcher_precision(os.environ, cfg.train.bf16, cfg.train.fp16)
        if key:
            setattr(cfg.train, key, True)
        notes = [note, launcher_compile(os.environ, cfg.train), *adopt_accelerate_fsdp(cfg.train, os.environ)]
        cfg.notes += tuple(n for n in notes if n)
    if validate_for:
        validate(cfg, validate_for)
    return cfg


def _stage(cfg: Config):
    """The config's Stage from the table, or None for a name it does not hold."""
    from .train.stages import STAGES

    return STAGES.get(cfg.finetune.stage)


def _raise_problems(cfg: Config, problems: list[str]) -> None:
    """One problem: its own line (`<source>: <problem>`); several: all at once. Keys set on the command line say so."""
    def where(problem: str) -> str:
        key = problem.split("`")[1].split(":")[0] if problem.count("`") >= 2 else ""
        return " (set on the command line)" if key in cfg.cli_keys and cfg.source != "command line" else ""

    if len(problems) == 1:
        raise ConfigError(f"{cfg.source}: {problems[0]}{where(problems[0])}")
    if problems:
        raise ConfigError(f"{cfg.source}: {len(problems)} problems:\n" +
                          "\n".join(f"  - {p}{where(p)}" for p in problems))


def validate(cfg: Config, command: str = "train") -> None:
    """Every problem of the config, explained in plain words, raised together as one ConfigError."""
    _raise_problems(cfg, problems(cfg, command))


def problems(cfg: Config, command: str = "train") -> list[str]:
    """Every problem of the config for `command`. The generic rules live here; each stage's recipe checks its own
    options (`check(cfg)` in train/<recipe>.py)."""
    problems = _model_problems(cfg) + _literal_problems(cfg) + _generate_problems(cfg)  # every command
    if command == "export":  # the commands beside train check their own options, as recipes do
        from .export import check
        problems += check(cfg)
    if command == "eval":
        from .evaluate import check
        problems += check(cfg)
    if command == "train":
        problems += _train_problems(cfg)
        stage = _stage(cfg)
        if stage is not None and stage.built:
            problems += stage.recipe_module().check(cfg)
    return problems


def _model_problems(cfg: Config) -> list[str]:
    m, out = cfg.model, []
    if not m.model_name_or_path:
        out.append("`model_name_or_path` is required (a local folder, a hub id, a .gguf file or a bundled alias "
                   "such as smollm2-135m-instruct)")
    defaults = {k: getattr(GROUPS[g](), k) for k, g in KEY_GROUP.items()}
    for key, why in NOT_YET.items():
        value = getattr(getattr(cfg, KEY_GROUP[key]), key)
        if value != defaults[key]:
            out.append(f"`{key}: {value}` is not supported yet: {why}")
    from .models import rope, vocab
    from .models.load import quantization_problems

    out += quantization_problems(m) + vocab.check(cfg) + rope.check(cfg)
    return out


def _train_problems(cfg: Config) -> list[str]:
    from .models.adapters import ADAPTER_TYPES, check as check_adapters
    from .train.optimizers import check as check_optimizer
    from .train.profiling import check as check_profiler
    from .train.stages import STAGES, names

    m, d, f, t, stage, out = cfg.model, cfg.data, cfg.finetune, cfg.train, _stage(cfg), []
    if stage is None:
        out.append(f"unknown stage `{f.stage}`; choose one of {', '.join(STAGES)}{spelled_otherwise('stage', f.stage)}")
    elif not stage.built:
        out.append(f"stage `{f.stage}` is not built yet; the stages available now are "
                   f"{', '.join(s.name for s in STAGES.values() if s.built)}")
    if not (t.do_train or t.do_eval or t.do_predict):
        out.append("nothing to do: set `do_train: true` (false by default, as in LLaMA-Factory), `do_eval` or "
                   "`do_predict`")
    if t.do_train and not d.dataset:
        out.append("`dataset` is required for training (a name from dataset_info.json or a file path)")
    if not t.output_dir:
        out.append("`output_dir` is required: where the trained model, logs and checkpoints go")
    if t.gradient_checkpointing_every < 1 or (t.gradient_checkpointing_every > 1
                                              and t.gradient_checkpointing_scope == "attention"):
        out.append("`gradient_checkpointing_every` must be 1 or more, and above 1 only with "
                   f"gradient_checkpointing_scope layers or selective; got {t.gradient_checkpointing_every}")
    out += _data_problems(cfg) + _evaluation_problems(cfg)
    known = stage is not None and stage.built  # the rules below ask the table about the stage
    lm_stages = names(lambda s: s.language_modelling)
    if t.bf16 and t.fp16:
        out.append("`bf16` and `fp16` are both true; pick one mixed-precision mode")
    if m.upcast_layernorm and f.pure_bf16 and not (t.bf16 or t.fp16 or m.quantization_bit):
        out.append("`upcast_layernorm` with `pure_bf16` needs `bf16: true`: the fp32 norms' outputs reach bf16 "
                   "weights, which only autocast multiplies")
    out += _schedule_problems(t) + _compile_problems(t)
    weightings = [key for key, on in (("use_dft_loss", f.use_dft_loss), ("use_eaft_loss", f.use_eaft_loss),
                                      ("use_asft_loss", f.use_asft_loss)) if on]
    for key in weightings:
        if known and not stage.language_modelling:
            out.append(f"`{key}` weights token losses of stages {lm_stages}; stage {f.stage} has none")
    if len(weightings) > 1:
        out.append(f"{' and '.join(f'`{k}`' for k in weightings)} weight the same token losses in different ways; "
                   "set one")
    if t.label_smoothing_factor and known and not stage.language_modelling:
        out.append(f"`label_smoothing_factor` smooths the token losses of stages {lm_stages}; stage {f.stage} has none")
    if not 0 <= t.label_smoothing_factor < 1:
        out.append(f"`label_smoothing_factor` must be at least 0 and below 1; got {t.label_smoothing_factor}")
    if f.neftune_noise_alpha is not None and f.neftune_noise_alpha <= 0:
        out.append(f"`neftune_noise_alpha` scales NEFTune's embedding noise, above 0 (unset: off); got "
                   f"{f.neftune_noise_alpha}")
    if f.use_eaft_loss and f.eaft_alpha < 0:
        out.append(f"`eaft_alpha` is the exponent of EAFT's entropy weight, 0 or more; got {f.eaft_alpha}")
    if f.use_asft_loss and f.asft_alpha < 0:
        out.append(f"`asft_alpha` weighs ASFT's KL term to the starting model, 0 or more; got {f.asft_alpha}")
    if f.moe_aux_loss_coef and known and not stage.language_modelling:
        out.append(f"`moe_aux_loss_coef` adds the router balancing loss to the token loss of stages {lm_stages}; "
                   f"stage {f.stage} does not add it: remove it")
    if f.moe_aux_loss_coef and f.use_asft_loss:
        out.append("`moe_aux_loss_coef` with `use_asft_loss` is not built yet (ASFT's loss does not add the router "
                   "balancing loss); set one")
    if f.moe_aux_loss_coef is not None and f.moe_aux_loss_coef < 0:
        out.append(f"`moe_aux_loss_coef` weighs the router balancing loss, 0 or more; got {f.moe_aux_loss_coef}")
    if known and f.compute_accuracy and not stage.language_modelling:
        out.append(f"`compute_accuracy` is token accuracy for stages {lm_stages}; stage {f.stage} reports its own "
                   "accuracy metrics, so remove it")
    if f.layerwise_lr_decay is not None and not 0 < f.layerwise_lr_decay <= 1:
        out.append(f"`layerwise_lr_decay` must be in (0, 1]; got {f.layerwise_lr_decay}")
    for item in (f.layer_lr or "").split(","):
        if item.strip() and ("=" not in item or not _is_number(item.split("=", 1)[1])):
            out.append(f"`layer_lr` entries look like `pattern=rate` (e.g. classifier=5e-4); got {item.strip()!r}")
    if f.finetuning_type not in ADAPTER_TYPES and f.create_new_adapter:
        out.append("`create_new_adapter` only applies to `finetuning_type: lora` or `oft`")
    if m.quantization_bit and f.finetuning_type not in ADAPTER_TYPES:
        out.append(f"`quantization_bit` trains adapters on a frozen quantised base (QLoRA, QOFT): set "
                   f"`finetuning_type: lora` or `oft`; you set {f.finetuning_type}")
    for key in ("ref_model_quantization_bit", "reward_model_quantization_bit"):
        if getattr(f, key) not in (None, 4, 8):
            out.append(f"`{key}` must be 4 or 8 (bitsandbytes); got {getattr(f, key)}")
    for key, does in (("ref_model_quantization_bit", "quantises"), ("ref_model_adapters", "adds adapters to")):
        if getattr(f, key) and not f.ref_model:
            out.append(f"`{key}` {does} `ref_model`, which is unset (the reference is then the starting model "
                       "itself): set ref_model or remove it")
    if m.adapter_name_or_path and f.finetuning_type not in ADAPTER_TYPES:
        out.append("`adapter_name_or_path` needs `finetuning_type: lora` or `oft`")
    from .train import sharding, steps

    return (out + _foreign_key_problems(cfg) + check_adapters(cfg) + check_optimizer(cfg) + sharding.problems(cfg)
            + steps.auto_batch_problems(cfg) + check_profiler(t))


def _data_problems(cfg: Config) -> list[str]:
    """The data keys' rules for training: masking, lengths, mixing, grouping, streaming, the validation split."""
    d, t, stage, out = cfg.data, cfg.train, _stage(cfg), []
    known = stage is not None and stage.built  # the rules below ask the table about the stage
    if d.train_on_prompt and d.mask_history:
        out.append("`train_on_prompt` and `mask_history` contradict each other; set only one")
    if d.cutoff_len < 2:
        out.append(f"`cutoff_len` must be at least 2; got {d.cutoff_len}")
    out += _interleave_problems(d)
    if t.length_grouped and (_packs(cfg) or d.streaming):
        key, pt = t.length_grouping_key, stage is not None and stage.data == "pt"
        out.append(f"{key} sorts the dataset's rows by length, which " +
                   (f"a stream never holds whole: remove {key} or `streaming`" if d.streaming else
                    f"stage pt's blocks of cutoff_len tokens all share: remove {key}" if pt else
                    f"packed rows all share (about cutoff_len): set `packing: false` or remove {key}"))
    if t.group_by_length and t.train_sampling_strategy == "sequential":
        out.append("`group_by_length: true` and `train_sampling_strategy: sequential` contradict each other; set one")
    if known and d.streaming:
        from .data.stream import check_options

        out += check_options(cfg, stage)
    if not 0 <= d.val_size:
        out.append(f"`val_size` must be a fraction in [0, 1) or a count of examples; got {d.val_size}")
    return out


def _evaluation_problems(cfg: Config) -> list[str]:
    """Evaluation during and after training and prediction: each needs evaluation data and a stage that has it."""
    from .train.evaluation import full_eval_problems
    from .train.stages import STAGES, names

    d, f, t, stage, out = cfg.data, cfg.finetune, cfg.train, _stage(cfg), full_eval_problems(cfg)
    known = stage is not None and stage.built
    lm_stages = names(lambda s: s.language_modelling)
    if known and d.eval_on_each_dataset and not stage.language_modelling:
        out.append(f"`eval_on_each_dataset` is built for stages {lm_stages}; stage {f.stage} evaluates all sets "
                   "together")
    if d.eval_on_each_dataset and (t.load_best_model_at_end or f.early_stopping_steps) and \
            not (t.metric_for_best_model or "").startswith("eval_"):
        out.append("with `eval_on_each_dataset` every set reports its own metrics (eval_<dataset>_loss, ...); set "
                   "`metric_for_best_model` to one of them, e.g. eval_<dataset>_loss")
    has_eval_data = bool(d.val_size or d.eval_dataset)
    if t.load_best_model_at_end and t.eval_strategy == "no":
        out.append("`load_best_model_at_end` needs evaluations during training: set `eval_strategy: steps` or "
                   "`epoch`, and `val_size` or `eval_dataset`")
    if f.early_stopping_steps and t.eval_strategy == "no":
        out.append("`early_stopping_steps` needs evaluations during training: set `eval_strategy: steps` (with "
                   "`eval_steps`) or `epoch`, and `val_size` or `eval_dataset`")
    for key, wanted in (("eval_strategy", t.eval_strategy != "no"), ("do_eval", t.do_eval),
                        ("do_predict", t.do_predict), ("eval_on_start", t.eval_on_start and t.do_train)):
        if wanted and not has_eval_data:
            out.append(f"`{key}` needs evaluation data: set `val_size` (e.g. 0.1) or `eval_dataset`")
    if known and t.do_predict and not stage.predicts:
        built = [s for s in STAGES.values() if s.predicts]
        out.append("`do_predict` is built for stages " + ", ".join(f"{s.name} ({s.predicts})" for s in built[:-1])
                   + f" and {built[-1].name} ({built[-1].predicts}), not {f.stage}")
    if known and t.predict_metric and stage.data != "lm":
        out.append(f"`predict_metric` scores the answers that stage sft generates with do_predict; stage {f.stage} "
                   "generates none, so remove it")
    return out


def _generate_problems(cfg: Config) -> list[str]:
    """The sampling keys, for every command that decodes (chat, api, predict, the ppo and grpo rollouts)."""
    g = cfg.generate
    if not g.do_sample:
        return []
    out = [] if g.temperature > 0 else [f"`temperature` must be above 0 when sampling; got {g.temperature} (for "
                                         "greedy decoding set `do_sample: false`)"]
    if not 0 < g.top_p <= 1:
        out.append(f"`top_p` is a share of probability in (0, 1]; got {g.top_p}")
    if g.top_k < 0:
        out.append(f"`top_k` must be 0 (off) or more; got {g.top_k}")
    return out


def _literal_problems(cfg: Config) -> list[str]:
    """Keys declared with Literal choices hold one of them (or None, where declared `Literal[...] | None`), for every
    command."""
    import typing

    out = []
    for group, cls in GROUPS.items():
        for key, hint in typing.get_type_hints(cls).items():
            value = getattr(getattr(cfg, group), key)
            optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in get_args(hint)
            if optional:
                hint = next((a for a in get_args(hint) if typing.get_origin(a) is Literal), hint)
            if typing.get_origin(hint) is Literal and value not in get_args(hint) and not (optional and value is None):
                out.append(f"`{key}` must be one of {', '.join(get_args(hint))}; got {value!r}"
                           + spelled_otherwise(key, value))
    return out


def _foreign_key_problems(cfg: Config) -> list[str]:
    """A key that only another stage reads would be ignored: refuse it."""
    from .train.stages import STAGES

    out = []
    for stage in STAGES.values():
        for key in stage.own_keys if stage.name != cfg.finetune.stage else ():
            group = getattr(cfg, KEY_GROUP[key])
            if getattr(group, key) != getattr(type(group)(), key):
                out.append(f"`{key}` applies to stage {stage.name} only; remove it or set `stage: {stage.name}`")
    return out


def _interleave_problems(d: DataArgs) -> list[str]:
    if not d.interleave_probs:
        return []
    out = []
    count = len([n for n in (d.dataset or "").split(",") if n.strip()])
    try:
        probs = [float(p) for p in d.interleave_probs.split(",")]
    except ValueError:
        probs = []
    if len(probs) != count or any(p < 0 for p in probs) or not sum(probs):
        out.append(f"`interleave_probs` needs one non-negative number per dataset ({count}), comma-separated; got "
                   f"{d.interleave_probs!r}")
    if d.mix_strategy == "concat":
        out.append("`interleave_probs` applies to mix_strategy interleave_under / interleave_over / "
                   "interleave_once, not concat")
    return out


def _schedule_problems(t: TrainArgs) -> list[str]:
    from .train import intervals, schedules, trackers

    out = schedules.problems(t) + trackers.problems(t.report_to) + intervals.problems(t)
    if t.per_device_train_batch_size < 1 or t.gradient_accumulation_steps < 1:
        out.append("`per_device_train_batch_size` and `gradient_accumulation_steps` must be at least 1")
    if t.max_steps <= 0 and t.num_train_epochs <= 0:
        out.append("set `num_train_epochs` > 0 or `max_steps` > 0")
    return out


def _compile_problems(t: TrainArgs) -> list[str]:
    out, mode = [], t.torch_compile_mode
    if mode not in (None, "default") and t.torch_compile_backend not in (None, "inductor"):
        out.append(f"`torch_compile_mode: {mode}` is an inductor mode; backend {t.torch_compile_backend} takes none: "
                   "remove it or set `torch_compile_backend: inductor`")
    if mode in ("reduce-overhead", "max-autotune") and _cuda_available():
        out.append(f"`torch_compile_mode: {mode}` captures CUDA graphs, which tuneforge's layer-wise compile in "
                   "training does not support yet: set max-autotune-no-cudagraphs or default")
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def all_keys() -> dict[str, list[tuple[str, str, object]]]:
    """For --help: each group's keys with type and default."""
    return {g: [(f.name, f.type, getattr(cls(), f.name)) for f in dataclasses.fields(cls)]
            for g, cls in GROUPS.items()}


def flat_config(cfg: Config) -> dict:
    """Every key and its effective value, as one flat mapping (the YAML form)."""
    flat = {}
    for group in GROUPS:
        if group not in ("llamafactory_only", "hf_only"):  # at their defaults or without effect: no information
            flat.update(dataclasses.asdict(getattr(cfg, group)))
    return flat


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the effective config back as flat YAML (used for reproducibility in output_dir)."""
    Path(path).write_text(yaml.safe_dump(flat_config(cfg), sort_keys=False), encoding="utf-8")
