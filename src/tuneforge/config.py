"""The one config gate: typed option groups, a flat YAML/JSON file plus `key=value` overrides, and validation.

Key names and defaults follow LLaMA-Factory (see docs/config.md), so its configs run unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import yaml


class ConfigError(ValueError):
    """A config problem, worded for the person who wrote the config."""


@dataclass
class ModelArgs:
    model_name_or_path: str | None = None
    adapter_name_or_path: str | None = None  # comma list; all but the last are merged
    cache_dir: str | None = None
    model_revision: str = "main"
    hf_hub_token: str | None = None
    trust_remote_code: bool = False
    use_fast_tokenizer: bool = True
    resize_vocab: bool = False
    add_special_tokens: str | None = None
    flash_attn: str = "auto"  # auto | sdpa | eager | fa2
    disable_gradient_checkpointing: bool = False
    upcast_layernorm: bool = False
    train_from_scratch: bool = False
    infer_dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    quantization_bit: int | None = None
    quantization_method: str = "bnb"
    quantization_type: str = "nf4"
    double_quantization: bool = True
    export_dir: str | None = None
    export_size: float = 5  # GB per safetensors shard (a float, so small models can be sharded too)
    export_device: str = "cpu"  # cpu | auto (a GPU when there is one)
    export_quantization_bit: int | None = None
    export_legacy_format: bool = False
    export_gguf: str | None = None  # ours: also write a GGUF file (f16 | bf16 | q8_0 | q4_0) and an Ollama Modelfile


@dataclass
class DataArgs:
    template: str | None = None
    dataset: str | None = None
    eval_dataset: str | None = None
    dataset_dir: str = "data"
    cutoff_len: int = 2048
    # stage cls, texts longer than cutoff_len: head keeps the first tokens; head_tail keeps the first quarter of the
    # budget and the last three quarters (Sun et al. 2019: a review's verdict is often at its end)
    cls_truncation: Literal["head", "head_tail"] = "head"
    train_on_prompt: bool = False
    mask_history: bool = False
    streaming: bool = False
    buffer_size: int = 16384
    mix_strategy: str = "concat"
    interleave_probs: str | None = None
    overwrite_cache: bool = False
    preprocessing_batch_size: int = 1000
    preprocessing_num_workers: int | None = None
    max_samples: int | None = None
    val_size: float = 0.0
    eval_on_each_dataset: bool = False
    packing: bool | None = None
    neat_packing: bool = False
    default_system: str | None = None
    enable_thinking: bool = True
    tokenized_path: str | None = None
    skip_bad_records: bool = False  # drop malformed records (counted, first reasons printed) instead of failing


@dataclass
class FinetuneArgs:
    stage: str = "sft"
    finetuning_type: str = "lora"
    plot_loss: bool = False
    compute_accuracy: bool = False
    early_stopping_steps: int | None = None
    disable_shuffling: bool = False
    pure_bf16: bool = False
    freeze_trainable_layers: int = 2
    freeze_trainable_modules: str = "all"
    freeze_extra_modules: str | None = None
    lora_rank: int = 8
    lora_alpha: int | None = None
    lora_dropout: float = 0.0
    lora_target: str = "all"
    additional_target: str | None = None
    loraplus_lr_ratio: float | None = None
    # stage cls: what the head reads; auto = the sentence-transformers pooling config of the model when it has one
    # (mean for all-MiniLM-L6-v2), else cls for encoders and last for decoders (models/pooling.py)
    cls_pooling: Literal["auto", "cls", "mean", "last"] = "auto"
    layer_lr: str | None = None  # per-module learning rates: "classifier=5e-4,encoder=1e-5" (last match wins)
    layerwise_lr_decay: float | None = None  # each lower layer's rate x this factor (embeddings lowest)
    use_rslora: bool = False
    use_dora: bool = False
    pissa_init: bool = False
    create_new_adapter: bool = False
    pref_beta: float = 0.1
    pref_ftx: float = 0.0
    pref_loss: str = "sigmoid"
    dpo_label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    kto_chosen_weight: float = 1.0
    kto_rejected_weight: float = 1.0
    precompute_ref_log_probs: bool = False  # dpo: run the reference once over the data before training
    ref_model: str | None = None
    ref_model_adapters: str | None = None
    reward_model: str | None = None
    reward_model_adapters: str | None = None
    reward_model_type: str = "lora"
    ppo_buffer_size: int = 1
    ppo_epochs: int = 4
    ppo_score_norm: bool = False
    ppo_target: float = 6.0
    ppo_whiten_rewards: bool = False
    # grpo (TRL's key names): each prompt gets `num_generations` sampled completions, scored by `reward_funcs`;
    # a completion's advantage is its reward minus its group's mean (scaled by `scale_rewards`)
    num_generations: int = 8  # group size; a step's completions (batch size x accumulation) hold whole groups
    beta: float = 0.0  # weight of the per-token KL to the reference; 0 runs no reference forward at all
    # clip range of the probability ratio to the rollout policy, [1 - epsilon, 1 + epsilon_high]: only the defaults
    # are accepted while grpo optimises once per rollout, where the ratio is always 1
    epsilon: float = 0.2
    epsilon_high: float | None = None  # upper clip (DAPO's clip-higher); None: the same as epsilon
    # how token losses become the step's loss: grpo averages each completion's tokens, then completions; dr_grpo
    # divides every completion's token sum by max_completion_length; dapo divides by all completion tokens of the
    # step; bnpo by the completion tokens of each micro-batch
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"  # divide advantages by the group's or batch's std
    max_completion_length: int = 256  # new tokens per completion (grpo's own; max_new_tokens is for inference)
    mask_truncated_completions: bool = False  # completions cut at max_completion_length get no loss
    reward_funcs: str | None = None  # comma list: accuracy, format, length, or path/to/file.py:function
    reward_weights: str | None = None  # comma list, one weight per reward function; default 1 each
    reward_format_pattern: str | None = None  # the regex the `format` reward wants a whole completion to match


@dataclass
class TrainArgs:
    output_dir: str | None = None
    overwrite_output_dir: bool = False
    do_train: bool = True
    do_eval: bool = False
    do_predict: bool = False
    predict_with_generate: bool = False
    predict_metric: str | None = None  # sft do_predict: a user metric "path.py:function", called as
    # function(predictions, references) with two lists of strings; returns a number or a dict of name -> number
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    num_train_epochs: float = 3.0
    max_steps: int = -1
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    logging_steps: int = 10
    save_steps: int = 500
    save_strategy: str = "steps"
    save_total_limit: int | None = None
    save_only_model: bool = False
    eval_strategy: str = "no"
    eval_steps: int | None = None
    load_best_model_at_end: bool = False
    metric_for_best_model: str | None = None
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    optim: str = "adamw_torch"  # adamw_torch | adamw_torch_fused | sgd (no momentum)
    report_to: str = "none"
    resume_from_checkpoint: str | None = None
    ddp_timeout: int = 1800
    deepspeed: str | None = None
    dataloader_num_workers: int = 0
    run_name: str | None = None


@dataclass
class GenerateArgs:
    do_sample: bool = True
    temperature: float = 0.95
    top_p: float = 0.7
    top_k: int = 50
    num_beams: int = 1
    max_new_tokens: int = 1024
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    skip_special_tokens: bool = True


@dataclass
class EvalArgs:
    """`tuneforge eval`: multiple-choice benchmarks (the MMLU / C-Eval / CMMLU family); see docs/evaluation.md."""

    task: str | None = None  # <folder>_<split>, e.g. basics_test, mmlu_test, ceval_validation
    task_dir: str = "evaluation"  # the folder that holds task folders
    n_shot: int = 5  # solved examples from the task's dev split shown before each question, as earlier chat turns
    lang: Literal["en", "zh"] = "en"  # prompt wording
    batch_size: int = 4  # questions per forward pass
    # letter: the option letters' next-token logits (LLaMA-Factory's way); option: each option's text scored as the
    # answer by its log-probability (lm-evaluation-harness's acc), for models too small to answer by letter
    scoring: Literal["letter", "option"] = "letter"
    save_dir: str | None = None  # where results.json / results.log go; must not exist yet


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    finetune: FinetuneArgs = field(default_factory=FinetuneArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    generate: GenerateArgs = field(default_factory=GenerateArgs)
    evaluation: EvalArgs = field(default_factory=EvalArgs)
    source: str = "<command line>"  # the file the config came from, for error messages


GROUPS = {"model": ModelArgs, "data": DataArgs, "finetune": FinetuneArgs, "train": TrainArgs, "generate": GenerateArgs,
          "evaluation": EvalArgs}
KEY_GROUP = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
# Keys accepted so LLaMA-Factory configs load, whose feature is not built yet: any non-default value is refused
# (never silently ignored). Each entry says what the user can do instead.
NOT_YET = {
    "quantization_bit": "QLoRA is not built yet; remove quantization_bit to train in full precision",
    "resize_vocab": "resizing the vocabulary is not built yet",
    "add_special_tokens": "adding special tokens is not built yet",
    "upcast_layernorm": "upcast_layernorm is not built yet",
    "pissa_init": "PiSSA initialisation is not built yet",
    "deepspeed": "DeepSpeed configs are not wired in yet; use `accelerate launch` or torchrun for DDP",
    "export_quantization_bit": "GPTQ export is not built; for a quantised model use `export_gguf: q8_0` or "
                               "`export_gguf: q4_0` (llama.cpp / Ollama)",
    "use_fast_tokenizer": "tuneforge uses the fast (tokenizers) tokenizers only",
}
# Keys LLaMA-Factory configs often set that have no effect in tuneforge yet: accepted with a printed notice, so
# those configs run and nothing is skipped silently.
NO_EFFECT_YET = {
    "run_name": "it names runs for report_to, which is not built",
}


def notices(cfg: Config) -> list[str]:
    """One line per key that is set but has no effect yet."""
    out = []
    for key, why in NO_EFFECT_YET.items():
        group = getattr(cfg, KEY_GROUP[key])
        if getattr(group, key) != getattr(type(group)(), key):
            out.append(f"note: `{key}` has no effect yet: {why}")
    d, stage = cfg.data, _stage(cfg)
    if (d.preprocessing_num_workers or 1) > 1 and stage and not stage.language_modelling:
        from .train.stages import names

        out.append(f"note: `preprocessing_num_workers` applies to stages {names(lambda s: s.language_modelling)}; "
                   f"stage {stage.name} preprocesses in one process")
    if d.buffer_size != DataArgs.buffer_size and not d.streaming:
        out.append("note: `buffer_size` has no effect without streaming: in-memory data is shuffled whole")
    if d.streaming:
        for key, value, why in (
                ("preprocessing_num_workers", (d.preprocessing_num_workers or 1) > 1, "streamed rows are encoded in "
                 "the training process, a batch at a time, as training reads them"),
                ("dataloader_num_workers", cfg.train.dataloader_num_workers > 0, "streamed rows are collated in the "
                 "training process"),
                ("overwrite_cache", d.overwrite_cache, "streamed data is never cached")):
            if value:
                out.append(f"note: `{key}` has no effect with streaming: {why}")
    return out


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
        if isinstance(value, (list, tuple)):  # `dataset: [a, b]` is the same as `dataset: a,b`
            return ",".join(str(v) for v in value)
        if isinstance(value, dict):
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


def parse_overrides(items: list[str]) -> dict:
    """`key=value` strings from the command line; values are read as YAML scalars (so 3e-4, true, null work)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"command-line argument {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        out[key.strip().lstrip("-")] = yaml.safe_load(value) if value != "" else None
    return out


def suggest(key: str) -> str:
    close = difflib.get_close_matches(key, list(KEY_GROUP), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else "; run `tuneforge train --help` for the list of keys"


def build_config(values: dict, source: str = "<command line>") -> Config:
    cfg = Config(source=source)
    for key, value in values.items():
        if key not in KEY_GROUP:
            raise ConfigError(f"{source}: unknown key `{key}`{suggest(key)}")
        group = KEY_GROUP[key]
        annotation = next(f.type for f in dataclasses.fields(GROUPS[group]) if f.name == key)
        setattr(getattr(cfg, group), key, _coerce(value, annotation, key, source))
    return cfg


def load_config(path: str | None, overrides: list[str] | None = None, validate_for: str | None = "train") -> Config:
    values = _read_file(path) if path else {}
    values.update(parse_overrides(overrides or []))
    cfg = build_config(values, source=path or "<command line>")
    if validate_for:
        validate(cfg, validate_for)
    return cfg


def _stage(cfg: Config):
    """The config's Stage from the table, or None for a name it does not hold."""
    from .train.stages import STAGES

    return STAGES.get(cfg.finetune.stage)


def _raise_problems(cfg: Config, problems: list[str]) -> None:
    """One problem: its own line (tests and people read `<source>: <problem>`); several: all of them at once."""
    if len(problems) == 1:
        raise ConfigError(f"{cfg.source}: {problems[0]}")
    if problems:
        raise ConfigError(f"{cfg.source}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))


def validate(cfg: Config, command: str = "train") -> None:
    """Every problem of the config, explained in plain words, raised together as one ConfigError. The generic
    rules live here; each stage's recipe checks its own options (`check(cfg)` in train/<recipe>.py)."""
    problems = _model_problems(cfg) + _literal_problems(cfg)  # Literal keys: every command
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
    _raise_problems(cfg, problems)


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
    if m.flash_attn not in ("auto", "sdpa", "eager", "fa2", "disabled"):
        out.append(f"`flash_attn` must be auto, sdpa, eager, fa2 or disabled; got {m.flash_attn!r}")
    if m.infer_dtype not in ("auto", "float32", "bfloat16", "float16"):
        out.append(f"`infer_dtype` must be auto, float32, bfloat16 or float16; got {m.infer_dtype!r}")
    return out


def _train_problems(cfg: Config) -> list[str]:
    from .train.stages import STAGES, names

    m, d, f, t, stage, out = cfg.model, cfg.data, cfg.finetune, cfg.train, _stage(cfg), []
    if stage is None:
        out.append(f"unknown stage `{f.stage}`; choose one of {', '.join(STAGES)}")
    elif not stage.built:
        out.append(f"stage `{f.stage}` is not built yet; the stages available now are "
                   f"{', '.join(s.name for s in STAGES.values() if s.built)}")
    if f.finetuning_type not in ("full", "freeze", "lora"):
        out.append(f"`finetuning_type` must be full, freeze or lora; got {f.finetuning_type!r}")
    if t.do_train and not d.dataset:
        out.append("`dataset` is required for training (a name from dataset_info.json or a file path)")
    if not t.output_dir:
        out.append("`output_dir` is required: where the trained model, logs and checkpoints go")
    if d.train_on_prompt and d.mask_history:
        out.append("`train_on_prompt` and `mask_history` contradict each other; set only one")
    if d.cutoff_len < 2:
        out.append(f"`cutoff_len` must be at least 2; got {d.cutoff_len}")
    if d.mix_strategy not in ("concat", "interleave_under", "interleave_over", "interleave_once"):
        out.append(f"`mix_strategy` must be concat, interleave_under, interleave_over or interleave_once; got "
                   f"{d.mix_strategy!r}")
    out += _interleave_problems(d)
    known = stage is not None and stage.built  # the rules below ask the table about the stage
    lm_stages = names(lambda s: s.language_modelling)
    if known and d.eval_on_each_dataset and not stage.language_modelling:
        out.append(f"`eval_on_each_dataset` is built for stages {lm_stages}; stage {f.stage} evaluates all sets "
                   "together")
    if d.eval_on_each_dataset and (t.load_best_model_at_end or f.early_stopping_steps) and \
            not (t.metric_for_best_model or "").startswith("eval_"):
        out.append("with `eval_on_each_dataset` every set reports its own metrics (eval_<dataset>_loss, ...); set "
                   "`metric_for_best_model` to one of them, e.g. eval_<dataset>_loss")
    if known and d.streaming:
        from .data.stream import check_options

        out += check_options(cfg, stage)
    if not 0 <= d.val_size:
        out.append(f"`val_size` must be a fraction in [0, 1) or a count of examples; got {d.val_size}")
    if t.bf16 and t.fp16:
        out.append("`bf16` and `fp16` are both true; pick one mixed-precision mode")
    if f.pure_bf16 and f.finetuning_type != "lora":
        out.append("`pure_bf16` keeps the frozen base in bf16 and needs `finetuning_type: lora`")
    out += _schedule_problems(t)
    has_eval_data = bool(d.val_size or d.eval_dataset)
    if t.load_best_model_at_end and t.eval_strategy == "no":
        out.append("`load_best_model_at_end` needs evaluations during training: set `eval_strategy: steps` or "
                   "`epoch`, and `val_size` or `eval_dataset`")
    if f.early_stopping_steps and t.eval_strategy == "no":
        out.append("`early_stopping_steps` needs evaluations during training: set `eval_strategy: steps` (with "
                   "`eval_steps`) or `epoch`, and `val_size` or `eval_dataset`")
    for key, wanted in (("eval_strategy", t.eval_strategy != "no"), ("do_eval", t.do_eval),
                        ("do_predict", t.do_predict)):
        if wanted and not has_eval_data:
            out.append(f"`{key}` needs evaluation data: set `val_size` (e.g. 0.1) or `eval_dataset`")
    if known and t.do_predict and not stage.predicts:
        built = [s for s in STAGES.values() if s.predicts]
        out.append("`do_predict` is built for stages " + ", ".join(f"{s.name} ({s.predicts})" for s in built[:-1])
                   + f" and {built[-1].name} ({built[-1].predicts}), not {f.stage}")
    if known and t.predict_metric and stage.data != "lm":
        out.append(f"`predict_metric` scores the answers that stage sft generates with do_predict; stage {f.stage} "
                   "generates none, so remove it")
    if known and f.compute_accuracy and not stage.language_modelling:
        out.append(f"`compute_accuracy` is token accuracy for stages {lm_stages}; stage {f.stage} reports its own "
                   "accuracy metrics, so remove it")
    if f.layerwise_lr_decay is not None and not 0 < f.layerwise_lr_decay <= 1:
        out.append(f"`layerwise_lr_decay` must be in (0, 1]; got {f.layerwise_lr_decay}")
    for item in (f.layer_lr or "").split(","):
        if item.strip() and ("=" not in item or not _is_number(item.split("=", 1)[1])):
            out.append(f"`layer_lr` entries look like `pattern=rate` (e.g. classifier=5e-4); got {item.strip()!r}")
    if f.finetuning_type != "lora" and f.create_new_adapter:
        out.append("`create_new_adapter` only applies to `finetuning_type: lora`")
    if m.adapter_name_or_path and f.finetuning_type != "lora":
        out.append("`adapter_name_or_path` needs `finetuning_type: lora`")
    if t.fp16 and not _cuda_available():
        out.append("`fp16: true` needs a CUDA GPU; on CPU use `bf16: true`")
    return out + _foreign_key_problems(cfg)


def _literal_problems(cfg: Config) -> list[str]:
    """Keys declared with Literal choices hold one of them."""
    import typing

    out = []
    for group, cls in GROUPS.items():
        for key, hint in typing.get_type_hints(cls).items():
            value = getattr(getattr(cfg, group), key)
            if typing.get_origin(hint) is Literal and value not in get_args(hint):
                out.append(f"`{key}` must be one of {', '.join(get_args(hint))}; got {value!r}")
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
    out = []
    if t.lr_scheduler_type not in SCHEDULERS:
        out.append(f"`lr_scheduler_type` must be one of {', '.join(SCHEDULERS)}; got {t.lr_scheduler_type!r}")
    if t.optim not in ("adamw_torch", "adamw_torch_fused", "sgd"):
        out.append(f"`optim: {t.optim}` is not supported yet; use adamw_torch, adamw_torch_fused or sgd")
    if t.report_to not in ("none", None, ""):
        out.append(f"`report_to: {t.report_to}` is not supported yet; metrics go to trainer_log.jsonl "
                   "(set report_to: none)")
    if t.eval_strategy not in ("no", "steps", "epoch"):
        out.append(f"`eval_strategy` must be no, steps or epoch; got {t.eval_strategy!r}")
    if t.save_strategy not in ("no", "steps", "epoch"):
        out.append(f"`save_strategy` must be no, steps or epoch; got {t.save_strategy!r}")
    if t.per_device_train_batch_size < 1 or t.gradient_accumulation_steps < 1:
        out.append("`per_device_train_batch_size` and `gradient_accumulation_steps` must be at least 1")
    if t.max_steps <= 0 and t.num_train_epochs <= 0:
        out.append("set `num_train_epochs` > 0 or `max_steps` > 0")
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


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the effective config back as flat YAML (used for reproducibility in output_dir)."""
    flat = {}
    for group in GROUPS:
        flat.update(dataclasses.asdict(getattr(cfg, group)))
    Path(path).write_text(yaml.safe_dump(flat, sort_keys=False), encoding="utf-8")
