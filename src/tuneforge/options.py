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
    # New tokens (models/vocab.py). Comma lists; each new token gets an embedding row, initialised as
    # init_special_tokens says, and with LoRA the new rows train (trainable_token_indices) while the rest stays frozen
    add_tokens: str | None = None  # ordinary tokens, e.g. words the tokenizer splits badly
    add_special_tokens: str | None = None  # special tokens, e.g. <think>,</think>: never split, skippable in output
    new_special_tokens_config: str | None = None  # YAML {token: description}: its tokens replace add_special_tokens
    # noise_init: the mean of the old rows plus N(0, 1/dim) noise (LLaMA-Factory's default); desc_init: the mean of
    # the rows of the description's tokens (needs new_special_tokens_config); desc_init_w_noise: that plus the noise
    init_special_tokens: Literal["noise_init", "desc_init", "desc_init_w_noise"] = "noise_init"
    resize_vocab: bool = False  # grow the embeddings to the tokenizer's length even without new tokens listed
    flash_attn: str = "auto"  # auto | sdpa | eager | fa2
    disable_gradient_checkpointing: bool = False
    use_reentrant_gc: bool = True  # LLaMA-Factory's checkpointing flavour; see NO_EFFECT_YET
    print_param_status: bool = False  # training also prints each parameter's name, shape, dtype, device, trainable
    # normalisation weights (1-D, named *norm* or *ln*) in fp32 in a 16-bit model (pure_bf16, quantization_bit), as
    # LLaMA-Factory does: their small updates are not rounded away; the norm's output goes on in fp32 until autocast
    upcast_layernorm: bool = False
    # RoPE scaling for inputs longer than the model's pretrained positions (models/rope.py): training scales by
    # ceil(cutoff_len / positions) when cutoff_len exceeds them; inference by that, or else by 2
    rope_scaling: Literal["linear", "dynamic", "yarn", "llama3"] | None = None
    upcast_lmhead_output: bool = False  # accepted with a notice: see NO_EFFECT_YET
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
    # templates that drop the <think> blocks of answers before the last user turn, as Qwen3's does (qwen3): keep
    # them, in training data and in chat history
    preserve_thinking: bool = False
    tokenized_path: str | None = None
    # several processes (torchrun): one tokenises and caches, the others then read its cache; false: the first
    # process of each machine (LOCAL_RANK 0), true: only the first of all (RANK 0), when every machine sees the same
    # cache folder (TUNEFORGE_CACHE or tokenized_path on a shared file system)
    data_shared_file_system: bool = False
    skip_bad_records: bool = False  # drop malformed records (counted, first reasons printed) instead of failing
    # ours: fill `{{name}}` placeholders in the data's text, e.g. "name=Forgewright,author=Anvil Labs"; placeholders
    # left unfilled are trained as written, with a warning
    fill_placeholders: str | None = None


@dataclass
class FinetuneArgs:
    stage: str = "sft"
    finetuning_type: str = "lora"  # full | freeze | lora | oft
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
    pissa_init: bool = False  # LoRA starts from the principal singular vectors of each target (PEFT's PiSSA)
    pissa_iter: int = 16  # fast SVD iterations for pissa_init; -1: the exact SVD
    pissa_convert: bool = False  # save the trained PiSSA adapter as a plain LoRA adapter on the original base
    loraplus_lr_embedding: float = 1e-6  # LoRA+: the learning rate of LoRA embedding matrices
    # OFT (finetuning_type: oft): orthogonal fine-tuning through PEFT's OFTConfig; give oft_rank or oft_block_size
    oft_rank: int = 0
    oft_block_size: int = 32
    oft_target: str = "all"  # like lora_target
    module_dropout: float = 0.0  # OFT's multiplicative dropout
    use_llama_pro: bool = False  # freeze: train the evenly spaced blocks that scripts/llama_pro.py-style expansion
    # added (every (layers / freeze_trainable_layers)-th block) instead of the last ones
    use_dft_loss: bool = False  # pt / sft: each target token's loss weighted by its own (detached) probability
    # pt / sft: each target token's loss weighted by (H / 3) ** eaft_alpha, detached, where H is the entropy of the
    # model's prediction renormalised over its 20 likeliest tokens (3 is about ln 20, their largest entropy)
    use_eaft_loss: bool = False
    eaft_alpha: float = 1.0
    # pt / sft: DFT's weighted token loss plus asft_alpha * KL(reference || model) per target token, the reference
    # being the starting model (train/asft.py)
    use_asft_loss: bool = False
    asft_alpha: float = 0.1
    # pt / sft on a mixture-of-experts model: add moe_aux_loss_coef x the router load-balancing loss (Switch
    # Transformer's, as transformers computes it for the model) to the training loss; None or 0: off (train/moe.py)
    moe_aux_loss_coef: float | None = None
    # Optimizer extras (galore-torch, apollo-torch, adam-mini, badam packages; Muon from torch). GaLore / APOLLO
    # project the gradients of the 2-D weights of `*_target` modules (all: every linear layer) to `*_rank`.
    use_galore: bool = False
    galore_target: str = "all"
    galore_rank: int = 16
    galore_update_interval: int = 200
    galore_scale: float = 2.0
    galore_proj_type: Literal["std", "reverse_std", "right", "left", "full"] = "std"
    galore_layerwise: bool = False
    use_apollo: bool = False
    apollo_target: str = "all"
    apollo_rank: int = 16
    apollo_update_interval: int = 200
    apollo_scale: float = 32.0
    apollo_proj: Literal["svd", "random"] = "random"
    apollo_proj_type: Literal["std", "right", "left"] = "std"
    apollo_scale_type: Literal["channel", "tensor"] = "channel"
    apollo_layerwise: bool = False
    apollo_scale_front: bool = False
    use_badam: bool = False
    badam_mode: Literal["layer", "ratio"] = "layer"
    badam_start_block: int | None = None
    badam_switch_mode: str | None = "ascending"  # ascending | descending | random | fixed
    badam_switch_interval: int | None = 50
    badam_update_ratio: float = 0.05
    badam_mask_mode: Literal["adjacent", "scatter"] = "adjacent"
    badam_verbose: int = 0
    use_adam_mini: bool = False
    use_muon: bool = False
    create_new_adapter: bool = False
    pref_beta: float = 0.1
    pref_ftx: float = 0.0
    pref_loss: str = "sigmoid"
    dpo_label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    # dpo (LD-DPO): each answer's log-probability counts its first min(chosen, rejected) target tokens whole and the
    # rest of the longer answer times ld_alpha (0-1), so length alone moves the margin less; the reference's are whole
    ld_alpha: float | None = None
    # dpo (BCO term): each answer's implicit reward beta * (log pi - log pi_ref) classified against a running mean of
    # the rewards, chosen above and rejected below; the pair's loss is (loss + w * bco) / (1 + w)
    pref_bco_weight: float = 0.0
    kto_chosen_weight: float = 1.0
    kto_rejected_weight: float = 1.0
    precompute_ref_log_probs: bool = False  # dpo: run the reference once over the data before training
    ref_model: str | None = None
    ref_model_adapters: str | None = None
    # ppo (LLaMA-Factory's keys): the reward model is a `stage: rm` output_dir (or, for api, a URL); see docs/rl.md
    reward_model: str | None = None
    reward_model_adapters: str | None = None  # full: the reward model's adapters (default: none, or reward_model)
    reward_model_type: Literal["lora", "full", "api"] = "lora"  # lora: the reward adapter on the policy's base
    ppo_buffer_size: int = 1  # rollout batches (batch size x accumulation prompts each) per rollout
    ppo_epochs: int = 4  # optimisation passes over each rollout
    ppo_score_norm: bool = False  # normalise scores by their running mean and std
    ppo_target: float = 6.0  # the KL (summed over a completion) the adaptive KL controller aims at
    ppo_whiten_rewards: bool = False  # whiten the per-token rewards of each rollout (keeping their mean)
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
    do_train: bool = False  # LLaMA-Factory's default: a config that trains says `do_train: true`
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
    # ours: a step whose loss or gradient norm is NaN/inf skips its update (counted, logged) instead of stopping
    skip_nonfinite_steps: bool = False
    num_train_epochs: float = 3.0
    max_steps: int = -1
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    logging_steps: int = 10
    save_steps: int = 500
    save_strategy: Literal["no", "steps", "epoch"] = "steps"
    save_total_limit: int | None = None
    save_only_model: bool = False
    eval_strategy: Literal["no", "steps", "epoch"] = "no"
    eval_steps: int | None = None
    load_best_model_at_end: bool = False
    metric_for_best_model: str | None = None
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    # ours: what gradient_checkpointing recomputes in backward. layers: whole decoder layers (LLaMA-Factory's; least
    # memory, 30-40% slower). selective: everything in a layer but its projections' outputs (norms, activations,
    # attention's core; no projection is run twice). attention: only eager attention's core (flash_attn: eager),
    # whose probabilities are the largest thing a short-sequence layer keeps. All give the same gradients; see
    # models/recompute.py, losses.head_chunk_size and docs/benchmarks.md (Memory; Compile and selective) for costs
    gradient_checkpointing_scope: Literal["layers", "selective", "attention"] = "layers"
    gradient_checkpointing_every: int = 1  # ours: with scope layers or selective, checkpoint every k-th layer (1: all)
    torch_compile: bool = False
    # adamw_torch_fused (HF's default with torch >= 2.8, so LLaMA-Factory's too: one fused kernel per step, 7x faster
    # than adamw_torch's per-tensor loop on a CPU; the same update to rounding) | adamw_torch | sgd (no momentum) |
    # the 8-bit and paged AdamW of bitsandbytes (train/optimizers.py)
    optim: str = "adamw_torch_fused"
    # also send the logged scalars to: tensorboard (event files in <output_dir>/runs), wandb, mlflow; a comma list,
    # `all` (every one installed) or none; trainer_log.jsonl is always written. `run_name` names wandb/mlflow runs.
    report_to: str = "none"
    resume_from_checkpoint: str | None = None
    ddp_timeout: int = 1800
    # sharding across processes (train/sharding.py, docs/distributed.md). deepspeed: a ds_config.json path or a
    # mapping (CUDA only). fsdp: Hugging Face's words, "full_shard auto_wrap", "shard_grad_op", "... offload";
    # fsdp_config: a JSON path or a mapping of HF's fsdp_config keys (fsdp_version, transformer_layer_cls_to_wrap,
    # reshard_after_forward, ...); fsdp_transformer_layer_cls_to_wrap: the older key for the layer classes
    deepspeed: str | dict | None = None
    fsdp: str | None = None
    fsdp_config: str | dict | None = None
    fsdp_transformer_layer_cls_to_wrap: str | None = None
    dataloader_num_workers: int = 0
    # HF's (transformers 5), the order of training rows. random: shuffled every epoch. sequential: in data order, as
    # LLaMA-Factory's disable_shuffling. group_by_length: micro-batches of rows of about the same length (shuffled,
    # then sorted by length within groups of up to 50 global batches; the group holding the longest row first):
    # less padding without packing, for stages that cannot pack; changes which rows share a micro-batch
    train_sampling_strategy: Literal["random", "sequential", "group_by_length"] = "random"
    group_by_length: bool = False  # transformers 4's spelling of train_sampling_strategy: group_by_length
    run_name: str | None = None
    # torch.profiler over training steps (train/profiling.py): each cycle skips `wait` steps, warms up for `warmup`
    # and records `active`; `repeat` cycles (0: until training ends). Chrome / TensorBoard traces go to
    # <profiler_output_dir or output_dir/profiler>/rank_<process>/
    enable_torch_profiler: bool = False
    profiler_output_dir: str | None = None
    profiler_wait_steps: int = 1
    profiler_warmup_steps: int = 1
    profiler_active_steps: int = 1
    profiler_repeat: int = 1
    profiler_record_shapes: bool = True
    profiler_profile_memory: bool = True
    profiler_with_stack: bool = True

    @property
    def length_grouped(self) -> bool:
        return self.group_by_length or self.train_sampling_strategy == "group_by_length"

    @property
    def length_grouping_key(self) -> str:
        """How the YAML asked for length grouping, for messages."""
        return "`group_by_length`" if self.group_by_length else "`train_sampling_strategy: group_by_length`"


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
    # answer by its log-probability (lm-evaluation-harness's acc), for models too small to answer by letter;
    # cloze: as option, but the question is asked bare, without the listed options (a chat question, scored by which
    # answer the model would rather give)
    scoring: Literal["letter", "option", "cloze"] = "letter"
    save_dir: str | None = None  # where results.json / results.log go; must not exist yet


# LLaMA-Factory 0.9.5 keys for features tuneforge does not have (or that need hardware this machine lacks), and the
# Hugging Face training keys its examples use: each is accepted at LLaMA-Factory's default so its configs load, and
# any other value is refused with the reason and what to use instead. (key, type, LLaMA-Factory's default, reason)
_MULTIMODAL = "multimodal training is not built yet (tuneforge trains text models); remove the image/video/audio keys"
_ENGINES = "inference runs on transformers (infer_backend: huggingface); vLLM and SGLang are not built"
_KT = "KTransformers (MoE CPU/GPU offload with its own CUDA kernels) is not built; use finetuning_type: lora"
_RAY = "Ray is not built; run several processes with `torchrun` or `accelerate launch`"
_PROFILER = ("per-module timing is not built; `enable_torch_profiler: true` records every operator's time and "
             "memory in a trace, and bench/profile_step.py sums one step's time by module")
_SWANLAB = "SwanLab logging is not built; metrics go to trainer_log.jsonl (plot_loss: true draws them)"
_GPU = "needs a CUDA GPU (Triton kernels), which this build does not target; remove it"
_GPTQ = "GPTQ export is not built; for a quantised model use `export_gguf: q8_0` or `q4_0` (llama.cpp / Ollama)"
_NOT_BUILT = "is not built yet; remove it"
LLAMAFACTORY_ONLY = [
    ("media_dir", "str | None", None, _MULTIMODAL),
    ("image_max_pixels", "int", 768 * 768, _MULTIMODAL),
    ("image_min_pixels", "int", 32 * 32, _MULTIMODAL),
    ("image_do_pan_and_scan", "bool", False, _MULTIMODAL),
    ("crop_to_patches", "bool", False, _MULTIMODAL),
    ("video_max_pixels", "int", 256 * 256, _MULTIMODAL),
    ("video_min_pixels", "int", 16 * 16, _MULTIMODAL),
    ("video_fps", "float", 2.0, _MULTIMODAL),
    ("video_maxlen", "int", 128, _MULTIMODAL),
    ("use_audio_in_video", "bool", False, _MULTIMODAL),
    ("audio_sampling_rate", "int", 16000, _MULTIMODAL),
    ("freeze_vision_tower", "bool", True, _MULTIMODAL),
    ("freeze_multi_modal_projector", "bool", True, _MULTIMODAL),
    ("freeze_language_model", "bool", False, _MULTIMODAL),
    ("eval_num_beams", "int | None", None, "do_predict generates with the generation keys: set `num_beams` instead"),
    ("ignore_pad_token_for_loss", "bool", True, "tuneforge never trains on padding; remove it"),
    ("tool_format", "str | None", None, "the template (or the tokenizer's chat template) renders tools; a separate "
     "tool_format is not built"),
    ("download_mode", "str", "reuse_dataset_if_exists", "tuneforge eval reads local task folders; nothing is "
     "downloaded"),
    ("ref_model_quantization_bit", "int | None", None, "a quantised reference model " + _NOT_BUILT),
    ("reward_model_quantization_bit", "int | None", None, "a quantised reward model " + _NOT_BUILT),
    ("use_swanlab", "bool", False, _SWANLAB),
    ("swanlab_project", "str | None", "llamafactory", _SWANLAB),
    ("swanlab_workspace", "str | None", None, _SWANLAB),
    ("swanlab_run_name", "str | None", None, _SWANLAB),
    ("swanlab_mode", "str", "cloud", _SWANLAB),
    ("swanlab_api_key", "str | None", None, _SWANLAB),
    ("swanlab_logdir", "str | None", None, _SWANLAB),
    ("swanlab_lark_webhook_url", "str | None", None, _SWANLAB),
    ("swanlab_lark_secret", "str | None", None, _SWANLAB),
    ("use_mca", "bool", False, "Megatron-Core training (mcore_adapter) needs NVIDIA GPUs; not built"),
    ("use_hyper_parallel", "bool", False, "HyperParallel " + _NOT_BUILT),
    ("hyper_parallel_args", "str | None", None, "HyperParallel " + _NOT_BUILT),
    ("include_effective_tokens_per_second", "bool", False, "trainer_log.jsonl reports tokens/s already; remove it"),
    ("max_length", "int", 1024, "generation length is `max_new_tokens`; use it instead"),
    ("adapter_folder", "str | None", None, "adapter_folder " + _NOT_BUILT + "; use adapter_name_or_path"),
    ("split_special_tokens", "bool", False, "tokenizing special tokens as text " + _NOT_BUILT),
    ("low_cpu_mem_usage", "bool", True, "transformers always loads weights with low memory use here"),
    ("shift_attn", "bool", False, "LongLoRA's shift short attention " + _NOT_BUILT),
    ("mixture_of_depths", "str | None", None, "mixture-of-depths " + _NOT_BUILT),
    ("use_unsloth", "bool", False, "Unsloth " + _GPU),
    ("use_unsloth_gc", "bool", False, "Unsloth's gradient checkpointing " + _GPU),
    ("enable_liger_kernel", "bool", False, "Liger kernels " + _GPU),
    ("infer_backend", "str", "huggingface", _ENGINES),
    ("offload_folder", "str", "offload", "offloading weights to disk " + _NOT_BUILT),
    ("use_kv_cache", "bool", True, "generation always uses the KV cache; remove it"),
    ("use_v1_kernels", "bool", False, "LLaMA-Factory's v1 kernels do not exist here; remove it"),
    ("ms_hub_token", "str | None", None, "models load from local folders, bundled aliases and the Hugging Face hub "
     "only (not ModelScope / Modelers)"),
    ("om_hub_token", "str | None", None, "models load from local folders, bundled aliases and the Hugging Face hub "
     "only (not ModelScope / Modelers)"),
    ("quantization_device_map", "str | None", None, "quantization_device_map " + _NOT_BUILT),
    ("export_quantization_dataset", "str | None", None, _GPTQ),
    ("export_quantization_nsamples", "int", 128, _GPTQ),
    ("export_quantization_maxlen", "int", 1024, _GPTQ),
    ("export_hub_model_id", "str | None", None, "pushing to the hub is not built; upload export_dir yourself"),
    ("vllm_maxlen", "int", 4096, _ENGINES),
    ("vllm_gpu_util", "float", 0.7, _ENGINES),
    ("vllm_enforce_eager", "bool", False, _ENGINES),
    ("vllm_max_lora_rank", "int", 32, _ENGINES),
    ("vllm_config", "str | None", None, _ENGINES),
    ("sglang_maxlen", "int", 4096, _ENGINES),
    ("sglang_mem_fraction", "float", 0.7, _ENGINES),
    ("sglang_tp_size", "int", -1, _ENGINES),
    ("sglang_config", "str | None", None, _ENGINES),
    ("sglang_lora_backend", "str", "triton", _ENGINES),
    ("use_kt", "bool", False, _KT),
    ("kt_weight_path", "str | None", None, _KT),
    ("kt_expert_checkpoint_path", "str | None", None, _KT),
    ("kt_use_lora_experts", "bool | None", None, _KT),
    ("kt_lora_expert_num", "int | None", None, _KT),
    ("kt_lora_expert_intermediate_size", "int | None", None, _KT),
    ("ray_num_workers", "int", 1, _RAY),
    ("ray_init_kwargs", "str | None", None, _RAY),
    ("master_addr", "str | None", None, _RAY + " (torchrun takes --master_addr)"),
    ("master_port", "str | None", None, _RAY + " (torchrun takes --master_port)"),
    ("profile_modules", "str | None", None, _PROFILER),
    ("fp8", "bool", False, "FP8 training needs an FP8 GPU (Hopper or newer); use bf16: true"),
    ("fp8_backend", "str", "auto", "FP8 training needs an FP8 GPU (Hopper or newer); use bf16: true"),
    ("fp8_enable_fsdp_float8_all_gather", "bool", False, "FP8 training needs an FP8 GPU (Hopper or newer)"),
]
LlamaFactoryOnlyArgs = dataclasses.make_dataclass(
    "LlamaFactoryOnlyArgs", [(key, kind, field(default=default)) for key, kind, default, _ in LLAMAFACTORY_ONLY])


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    finetune: FinetuneArgs = field(default_factory=FinetuneArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    generate: GenerateArgs = field(default_factory=GenerateArgs)
    evaluation: EvalArgs = field(default_factory=EvalArgs)
    llamafactory_only: LlamaFactoryOnlyArgs = field(default_factory=LlamaFactoryOnlyArgs)
    source: str = "command line"  # the file the config came from, for error messages
    cli_keys: frozenset = frozenset()  # keys set on the command line (over the file's), for error messages


GROUPS = {"model": ModelArgs, "data": DataArgs, "finetune": FinetuneArgs, "train": TrainArgs, "generate": GenerateArgs,
          "evaluation": EvalArgs, "llamafactory_only": LlamaFactoryOnlyArgs}
KEY_GROUP = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
# Keys accepted so LLaMA-Factory configs load, whose feature is not built yet: any non-default value is refused
# (never silently ignored). Each entry says what the user can do instead.
NOT_YET = {
    "export_quantization_bit": "GPTQ export is not built; for a quantised model use `export_gguf: q8_0` or "
                               "`export_gguf: q4_0` (llama.cpp / Ollama)",
    "use_fast_tokenizer": "tuneforge uses the fast (tokenizers) tokenizers only",
    **{key: why for key, _, _, why in LLAMAFACTORY_ONLY},
}
# Keys LLaMA-Factory configs often set that have no effect in tuneforge yet: accepted with a printed notice, so
# those configs run and nothing is skipped silently.
NO_EFFECT_YET = {
    "upcast_lmhead_output": "the losses always take the output head's logits in fp32, which is what this makes "
                            "LLaMA-Factory do",
    "use_reentrant_gc": "gradient checkpointing here is always non-reentrant (the same gradients, and it works with "
                        "frozen embeddings)",
}
