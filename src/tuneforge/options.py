"""Every option tuneforge reads, grouped as LLaMA-Factory groups them: typed dataclasses with their defaults, and the
keys accepted only at their default (NOT_YET) or accepted with a notice (NO_EFFECT_YET). config.py parses and
validates them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal


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
