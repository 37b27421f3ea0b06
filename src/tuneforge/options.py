"""Every option tuneforge reads, grouped as LLaMA-Factory groups them: typed dataclasses with their defaults, and the
keys accepted only at their default (NOT_YET) or accepted with a notice (NO_EFFECT_YET). config.py parses and
validates them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from .hf_options import GENERATION_KEYS_WIN, HF_NO_EFFECT, HF_REFUSED
from .lf_options import LLAMAFACTORY_ONLY


@dataclass
class ModelArgs:
    model_name_or_path: str | None = None  # required: a local folder, a hub id, a .gguf file or a bundled alias
    adapter_name_or_path: str | None = None  # comma list; all but the last are merged
    # special-token strings in the data and in users' messages are tokenised as ordinary text (a literal
    # `<|im_end|>` in a record does not end the turn); a named template's own markers stay special tokens. Kept in
    # an adapter's run config for inference (not in the saved tokenizer, whose chat template would split its markers)
    split_special_tokens: bool = False
    # the sub-folder of each adapter_name_or_path folder that holds its adapter: joined onto them when the config is
    # read (so every message names the real folder), then cleared
    adapter_folder: str | None = None
    cache_dir: str | None = None  # where hub downloads of the model and tokenizer are kept (transformers' cache)
    model_revision: str = "main"  # the hub branch, tag or commit of model_name_or_path
    hf_hub_token: str | None = None  # a Hugging Face token, for gated or private hub models
    trust_remote_code: bool = False  # run the model's own modelling / tokenizer code (from the hub or its folder)
    use_fast_tokenizer: bool = True  # accepted only true: the fast (tokenizers) tokenizer is always used (NOT_YET)
    # New tokens (models/vocab.py). Comma lists; each new token gets an embedding row, initialised as
    # init_special_tokens says, and with LoRA the new rows train (trainable_token_indices) while the rest stays frozen
    add_tokens: str | None = None  # ordinary tokens, e.g. words the tokenizer splits badly
    add_special_tokens: str | None = None  # special tokens, e.g. <think>,</think>: never split, skippable in output
    new_special_tokens_config: str | None = None  # YAML {token: description}: its tokens replace add_special_tokens
    # noise_init: the mean of the old rows plus N(0, 1/dim) noise (LLaMA-Factory's default); desc_init: the mean of
    # the rows of the description's tokens (needs new_special_tokens_config); desc_init_w_noise: that plus the noise
    init_special_tokens: Literal["noise_init", "desc_init", "desc_init_w_noise"] = "noise_init"
    resize_vocab: bool = False  # grow the embeddings to the tokenizer's length even without new tokens listed
    # attention implementation: auto (transformers' choice), sdpa, eager, fa2 (transformers' flash_attention_2);
    # disabled is LLaMA-Factory's name for eager. Eager runs as grouped eager where a model's eager attention is
    # llama's: the same products without copying keys and values per query head (models/attention.py)
    flash_attn: Literal["auto", "sdpa", "eager", "fa2", "disabled"] = "auto"
    # never checkpoint activations, even with gradient_checkpointing or fsdp_config's activation_checkpointing
    # (LLaMA-Factory checkpoints unless this is set; tuneforge only with `gradient_checkpointing: true`)
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
    low_cpu_mem_usage: bool = True  # LLaMA-Factory's loading switch; accepted with a notice: see NO_EFFECT_YET
    train_from_scratch: bool = False  # random weights from the model's config instead of its pretrained ones
    # the weights' dtype where a model is loaded for decoding or scoring (chat, api, eval); auto: bf16 on a GPU that
    # has it, else float32 (a CPU with bf16 units gets a note that bfloat16 decodes faster)
    infer_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # 4 or 8: the base is loaded quantised by bitsandbytes (QLoRA / QOFT: training needs finetuning_type lora or
    # oft; inference loads it so too; export refuses it)
    quantization_bit: int | None = None
    quantization_method: str = "bnb"  # only bnb (bitsandbytes) is built; others are refused with quantization_bit
    quantization_type: Literal["nf4", "fp4"] = "nf4"  # the 4-bit data type
    double_quantization: bool = True  # 4-bit: quantise the quantisation constants too (bitsandbytes' double quant)
    export_dir: str | None = None  # export (required): the new or empty folder the merged model is written to
    export_size: float = 5  # GB per safetensors shard (a float, so small models can be sharded too)
    export_device: str = "cpu"  # cpu | auto (a GPU when there is one)
    export_quantization_bit: int | None = None  # GPTQ export: accepted only unset (NOT_YET); see export_gguf
    export_legacy_format: bool = False  # export: PyTorch .bin shards instead of safetensors, for older loaders
    # ours: also write a GGUF file of this type and an Ollama Modelfile (export/gguf.py); export checks the value
    export_gguf: Literal["f16", "bf16", "q8_0", "q4_0"] | None = None


@dataclass
class DataArgs:
    # the chat format: a template of data/templates.py or data/template_table.py, LLaMA-Factory's names (default,
    # chatml, llama3, qwen3, smollm2, ...); unset: the tokenizer's own chat_template (inference and export first take
    # the template the adapter was trained with)
    template: str | None = None
    dataset: str | None = None  # the training data: a comma list of dataset_info.json names or file paths
    eval_dataset: str | None = None  # evaluation data, named as `dataset` is (val_size adds a share of dataset)
    dataset_dir: str = "data"  # the folder of dataset_info.json; its entries' files are relative to it
    # tokens per example at most (pt: per block; packing: per packed row); sft: a longer conversation keeps its
    # last turn's share first, then earlier turns from the start
    cutoff_len: int = 2048
    # stage cls, texts longer than cutoff_len: head keeps the first tokens; head_tail keeps the first quarter of the
    # budget and the last three quarters (Sun et al. 2019: a review's verdict is often at its end)
    cls_truncation: Literal["head", "head_tail"] = "head"
    train_on_prompt: bool = False  # sft: train on the prompt tokens too, not only on the answers
    mask_history: bool = False  # sft: train on the last answer only; earlier answers are context
    streaming: bool = False  # pt / sft (with max_steps): read the files record by record as training goes
    buffer_size: int = 16384  # streaming: examples in the shuffle buffer (1 keeps the files' order)
    # several datasets: concat (one after another) | interleave_under (in turn, until one runs out) |
    # interleave_over (until each was seen whole, restarting used-up ones) | interleave_once (each example once)
    mix_strategy: Literal["concat", "interleave_under", "interleave_over", "interleave_once"] = "concat"
    interleave_probs: str | None = None  # interleave_*: one weight per dataset (comma list) to draw by, not in turn
    overwrite_cache: bool = False  # tokenise again instead of reading the tokenised-data cache (data/cache.py)
    preprocessing_batch_size: int = 1000  # examples encoded at once (streaming: pt cuts, sft packs each such batch)
    preprocessing_num_workers: int | None = None  # pt / sft: processes that tokenise in parallel (None or 1: this one)
    max_samples: int | None = None  # at most this many examples of each dataset (its first ones)
    val_size: float = 0.0  # evaluation data held out of dataset: a fraction (< 1) or a count (streaming: a count)
    eval_on_each_dataset: bool = False  # pt / sft: each evaluation dataset evaluated alone (eval_<name>_loss, ...)
    # sft: several examples per row of up to cutoff_len tokens, none attending to another (data/collate.py); None:
    # the stage decides (pt always cuts its text into cutoff_len blocks, sft does not pack)
    packing: bool | None = None
    neat_packing: bool = False  # LLaMA-Factory's packing without cross-example attention: here the same as packing
    default_system: str | None = None  # the system prompt of conversations without one (training, chat, api, Modelfile)
    # templates with <think> blocks (qwen3, or a tokenizer chat_template that reads enable_thinking): false gives the
    # empty block in the prompt (not learned; generation starts after it), for answers without thinking
    enable_thinking: bool = True
    # templates that drop the <think> blocks of answers before the last user turn, as Qwen3's does (qwen3): keep
    # them, in training data and in chat history
    preserve_thinking: bool = False
    # how a named template writes tool definitions and calls (data/tools.py): LLaMA-Factory's ReAct-style default
    # (Action: / Action Input:), the model families' formats as LLaMA-Factory writes them, or plain json; unset:
    # the template's own. LLaMA-Factory's formats of vision templates (gemma4, qwen3_5) and seed_oss (its template
    # marks thinking with other tokens) are not built
    tool_format: Literal["default", "json", "qwen", "llama3", "glm4", "mistral", "ling", "glm4_moe", "lfm2", "minimax1",
                         "minimax2", "phi4_mini"] | None = None
    tokenized_path: str | None = None  # the tokenised data is saved to / loaded from <this>/tokenized.pkl
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
    stage: str = "sft"  # pt | sft | rm | dpo | kto | cls | ppo | grpo (the table in train/stages.py)
    finetuning_type: Literal["full", "freeze", "lora", "oft"] = "lora"  # what trains (models/adapters.py)
    plot_loss: bool = False  # after training, draw training_loss.png (and training_eval_loss.png) in output_dir
    compute_accuracy: bool = False  # pt / sft: evaluations also report token accuracy (eval_accuracy)
    # stop training after this many evaluations in a row without a better metric_for_best_model (evaluations, not
    # steps, despite LLaMA-Factory's name)
    early_stopping_steps: int | None = None
    disable_shuffling: bool = False  # training rows in data order, not reshuffled every epoch
    pure_bf16: bool = False  # load the model in bf16, not fp32 (full / freeze train bf16 weights; LoRA stays fp32)
    freeze_trainable_layers: int = 2  # freeze: train the last N layers (negative: the first -N); cls: the top N + head
    freeze_trainable_modules: str = "all"  # freeze: the modules in those layers that train (e.g. mlp,self_attn)
    freeze_extra_modules: str | None = None  # freeze: modules outside the layers that train too (e.g. embed_tokens)
    lora_rank: int = 8  # LoRA's rank r
    lora_alpha: int | None = None  # LoRA's alpha (updates scaled by alpha / r); None: 2 x lora_rank
    lora_dropout: float = 0.0  # dropout on the input of the LoRA branch
    lora_target: str = "all"  # module names (comma list, e.g. q_proj,v_proj) or all: every linear but the output head
    additional_target: str | None = None  # modules trained whole and saved with the adapter (PEFT's modules_to_save)
    loraplus_lr_ratio: float | None = None  # LoRA+: the B matrices learn at learning_rate x this
    # stage cls: what the head reads; auto = the sentence-transformers pooling config of the model when it has one
    # (mean for all-MiniLM-L6-v2), else cls for encoders and last for decoders (models/pooling.py)
    cls_pooling: Literal["auto", "cls", "mean", "last"] = "auto"
    layer_lr: str | None = None  # per-module learning rates: "classifier=5e-4,encoder=1e-5" (last match wins)
    layerwise_lr_decay: float | None = None  # each lower layer's rate x this factor (embeddings lowest)
    use_rslora: bool = False  # rank-stabilised LoRA: updates scaled by alpha / sqrt(r) instead of alpha / r
    use_dora: bool = False  # DoRA: each weight split into a magnitude vector and a direction that LoRA adapts
    pissa_init: bool = False  # LoRA starts from the principal singular vectors of each target (PEFT's PiSSA)
    pissa_iter: int = 16  # fast SVD iterations for pissa_init; -1: the exact SVD
    pissa_convert: bool = False  # save the trained PiSSA adapter as a plain LoRA adapter on the original base
    loraplus_lr_embedding: float = 1e-6  # LoRA+: the learning rate of LoRA embedding matrices
    # OFT (finetuning_type: oft): orthogonal fine-tuning through PEFT's OFTConfig; give oft_rank or oft_block_size
    oft_rank: int = 0  # orthogonal blocks per weight (PEFT's r); 0: oft_block_size decides
    oft_block_size: int = 32  # the size of each orthogonal block; 0: oft_rank decides
    oft_target: str = "all"  # like lora_target
    module_dropout: float = 0.0  # OFT's multiplicative dropout
    use_llama_pro: bool = False  # freeze: train the evenly spaced blocks that scripts/llama_pro.py-style expansion
    # added (every (layers / freeze_trainable_layers)-th block) instead of the last ones
    use_dft_loss: bool = False  # pt / sft: each target token's loss weighted by its own (detached) probability
    # HF's NEFTune: while training, uniform noise in [-a, a] added to the input embeddings, a = alpha /
    # sqrt(sequence length x hidden size) of the batch (models/neftune.py); None: off
    neftune_noise_alpha: float | None = None
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
    use_galore: bool = False  # GaLore's AdamW (finetuning_type full); with a bitsandbytes optim its 8-bit one (CUDA)
    galore_target: str = "all"
    galore_rank: int = 16
    galore_update_interval: int = 200  # steps between new projections (update_proj_gap)
    galore_scale: float = 2.0  # the projected-back update is multiplied by this
    galore_proj_type: Literal["std", "reverse_std", "right", "left", "full"] = "std"  # which side is projected
    galore_layerwise: bool = False  # step each weight inside backward as soon as its gradient is complete, and free it
    use_apollo: bool = False  # APOLLO's AdamW (finetuning_type full)
    apollo_target: str = "all"
    apollo_rank: int = 16
    apollo_update_interval: int = 200  # steps between new projections (update_proj_gap)
    apollo_scale: float = 32.0  # the update is multiplied by its square root
    apollo_proj: Literal["svd", "random"] = "random"  # the projection: random, or from the gradient's SVD
    apollo_proj_type: Literal["std", "right", "left"] = "std"  # which side is projected
    apollo_scale_type: Literal["channel", "tensor"] = "channel"  # one scaling factor per channel or per tensor
    apollo_layerwise: bool = False  # as galore_layerwise, for APOLLO
    apollo_scale_front: bool = False  # apply the scale before the norm-growth limiter rather than after it
    use_badam: bool = False  # BAdam (finetuning_type full): block coordinate descent, a part trained at a time
    badam_mode: Literal["layer", "ratio"] = "layer"  # layer: one layer block at a time; ratio: a share of each weight
    badam_start_block: int | None = None  # layer: the block to begin with; None: the first in badam_switch_mode's order
    badam_switch_mode: Literal["ascending", "descending", "random", "fixed"] | None = "ascending"  # layer: block order
    badam_switch_interval: int | None = 50  # layer: steps before the next block
    badam_update_ratio: float = 0.05  # ratio: the share of each weight's entries updated
    badam_mask_mode: Literal["adjacent", "scatter"] = "adjacent"  # ratio: those entries adjacent or scattered
    badam_verbose: int = 0  # BAdam's own printing (0: none)
    use_adam_mini: bool = False  # Adam-mini (finetuning_type full): one second-moment value per parameter block
    use_muon: bool = False  # Muon for the hidden 2-D weight matrices, AdamW for embeddings, output head, norms, biases
    # with adapter_name_or_path: merge all the adapters and train a new one (default: train the last one further)
    create_new_adapter: bool = False
    pref_beta: float = 0.1  # dpo / kto: beta, the scale of the rewards in the loss (orpo: its odds-ratio term's weight)
    pref_ftx: float = 0.0  # dpo: add pref_ftx x the chosen answer's per-token NLL (orpo's loss has that term already)
    pref_loss: str = "sigmoid"  # dpo: sigmoid (DPO) | hinge | ipo | orpo | simpo (train/dpo.py refuses others)
    dpo_label_smoothing: float = 0.0  # pref_loss sigmoid: the assumed share of mislabelled pairs (cDPO)
    simpo_gamma: float = 0.5  # pref_loss simpo: the target reward margin
    # dpo (LD-DPO): each answer's log-probability counts its first min(chosen, rejected) target tokens whole and the
    # rest of the longer answer times ld_alpha (0-1), so length alone moves the margin less; the reference's are whole
    ld_alpha: float | None = None
    # dpo (BCO term): each answer's implicit reward beta * (log pi - log pi_ref) classified against a running mean of
    # the rewards, chosen above and rejected below; the pair's loss is (loss + w * bco) / (1 + w)
    pref_bco_weight: float = 0.0
    kto_chosen_weight: float = 1.0  # kto: weight of the desirable answers' losses
    kto_rejected_weight: float = 1.0  # kto: weight of the undesirable answers' losses
    precompute_ref_log_probs: bool = False  # dpo: run the reference once over the data before training
    # the reference of dpo, kto, ppo, grpo and use_asft_loss, when it is another model; unset: the starting model
    # (with lora / oft the base with the adapter switched off, else a frozen copy)
    ref_model: str | None = None
    ref_model_adapters: str | None = None  # adapters loaded onto ref_model (a comma list, as adapter_name_or_path)
    # 4 or 8: ref_model is loaded quantised by bitsandbytes (unset: in full precision, even under QLoRA's
    # quantization_bit, as in LLaMA-Factory)
    ref_model_quantization_bit: int | None = None
    # ppo (LLaMA-Factory's keys): the reward model is a `stage: rm` output_dir (or, for api, a URL); see docs/rl.md
    reward_model: str | None = None
    reward_model_adapters: str | None = None  # full: the reward model's adapters (default: none, or reward_model)
    reward_model_type: Literal["lora", "full", "api"] = "lora"  # lora: the reward adapter on the policy's base
    # 4 or 8: a reward_model_type full model is loaded quantised by bitsandbytes (unset: in full precision)
    reward_model_quantization_bit: int | None = None
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
    output_dir: str | None = None  # train (required): where the model, checkpoints, logs and results go
    overwrite_output_dir: bool = False  # start over, not resume: only tuneforge's checkpoint-N folders are removed
    do_train: bool = False  # LLaMA-Factory's default: a config that trains says `do_train: true`
    # evaluate on the evaluation data (val_size / eval_dataset) after training, or without training (ppo and grpo
    # score their evaluation prompts before and after training)
    do_eval: bool = False
    do_predict: bool = False  # predict on the evaluation data: sft generated answers, rm scores, cls labels
    predict_with_generate: bool = False  # sft's do_predict needs it true: its predictions are generated text
    predict_metric: str | None = None  # sft do_predict: a user metric "path.py:function", called as
    # function(predictions, references) with two lists of strings; returns a number or a dict of name -> number
    per_device_train_batch_size: int = 8  # rows per micro-batch in each process
    per_device_eval_batch_size: int = 8  # rows per batch when evaluating, predicting and precomputing references
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    # HF's: when a step runs out of memory, run it again with its micro-batches halved (down to one row), and keep
    # them halved. Unlike HF, which halves the global batch and starts over, the step's rows stay the same: the same
    # updates, in the same number of steps (train/steps.py)
    auto_find_batch_size: bool = False
    learning_rate: float = 5e-5  # the peak rate, after warmup (layer_lr, layerwise_lr_decay, LoRA+ vary it)
    weight_decay: float = 0.0  # the optimizer's weight decay (decoupled in AdamW); biases and norm weights get none
    adam_beta1: float = 0.9  # AdamW's first-moment decay (also the AdamW-based optimizer extras')
    adam_beta2: float = 0.999  # AdamW's second-moment decay
    adam_epsilon: float = 1e-8  # AdamW's epsilon, added to the update's denominator
    max_grad_norm: float = 1.0  # clip each step's gradient norm to this; 0 or less: no clipping
    # HF's (stages pt, sft): each token's loss against (1 - e) x its label + e spread evenly over the vocabulary, in
    # training and evaluation losses, as transformers' LabelSmoother computes it
    label_smoothing_factor: float = 0.0
    # ours: a step whose loss or gradient norm is NaN/inf skips its update (counted, logged) instead of stopping
    skip_nonfinite_steps: bool = False
    num_train_epochs: float = 3.0  # passes over the training data (fractions too); max_steps > 0 overrides it
    max_steps: int = -1  # optimizer steps to train; -1: num_train_epochs decides
    # transformers' schedules by name (SCHEDULERS; train/schedules.py): linear, cosine, cosine_with_restarts,
    # polynomial, constant, constant_with_warmup, inverse_sqrt, cosine_with_min_lr, cosine_warmup_with_min_lr,
    # warmup_stable_decay. Not a Literal: training refuses HF's two measured schedules (reduce_lr_on_plateau,
    # greedy), but chat, export and eval must still load such a config
    lr_scheduler_type: str = "linear"
    # HF's: the schedule's own arguments, a mapping or a JSON object, e.g. {min_lr_rate: 0.1} for
    # cosine_with_min_lr, {num_cycles: 2} for cosine_with_restarts, {power: 2, lr_end: 1e-6} for polynomial,
    # {num_decay_steps: 100} for warmup_stable_decay (transformers' get_*_schedule functions' keyword arguments)
    lr_scheduler_kwargs: dict | str | None = None
    warmup_ratio: float = 0.0  # the share of all steps over which the rate rises from 0 (unless warmup_steps)
    # steps over which the rate rises from 0, or below 1 that share of all steps (transformers 5, which dropped
    # warmup_ratio); 0: warmup_ratio decides
    warmup_steps: float = 0
    # a log line (trainer_log.jsonl, report_to) every N steps; eval_steps' default. As for eval_steps and save_steps,
    # HF's rule: below 1, that share of the run's steps (0.1: every tenth of them), rounded up
    logging_steps: float = 10
    # HF's: steps (every logging_steps, and the last step), epoch (each epoch's last step, and training's), or no
    # training log lines at all (train_results.json still reports train_loss; evaluations are still logged)
    logging_strategy: Literal["steps", "epoch", "no"] = "steps"
    logging_first_step: bool = False  # HF's: a log line after the first step too
    save_steps: float = 500  # save_strategy steps: a checkpoint-N folder every N steps
    save_strategy: Literal["no", "steps", "epoch"] = "steps"  # when checkpoints are saved; the final model always is
    save_total_limit: int | None = None  # keep only the newest N checkpoints (None: all)
    save_only_model: bool = False  # checkpoints without optimizer, scheduler and RNG state: smaller, not resumable
    eval_strategy: Literal["no", "steps", "epoch"] = "no"  # evaluate during training every eval_steps or each epoch
    eval_steps: float | None = None  # eval_strategy steps: evaluate every N steps (None: every logging_steps)
    eval_delay: float = 0  # HF's: the first evaluation comes at this many steps (eval_strategy steps) or epochs (epoch)
    # HF's: evaluate once before the first step of the run (or of a resumed one), a check that evaluation works
    # before hours of training; logged at that step, not a candidate for the best model
    eval_on_start: bool = False
    load_best_model_at_end: bool = False  # keep the best evaluated weights (metric_for_best_model) and end with them
    # what decides the best model and early stopping: an evaluation metric, the eval_ prefix optional (None:
    # eval_loss); higher is better unless its name ends in loss or perplexity, or greater_is_better says otherwise
    metric_for_best_model: str | None = None
    greater_is_better: bool | None = None  # HF's: whether a higher metric_for_best_model is better (unset: as above)
    seed: int = 42  # for shuffling, the val_size split, resampling of datasets and initialisation (set_seed)
    # HF's: the seed of the training rows' order alone (each epoch's shuffle; a stream's shuffle buffer), so that
    # the order can stay while `seed` changes the initialisation and dropout, or the reverse; unset: seed
    data_seed: int | None = None
    bf16: bool = False  # autocast forward passes to bf16 (weights keep their dtype: fp32 unless pure_bf16)
    # 16-bit autocast with loss scaling: fp16 on a GPU or a CPU with fp16 units, elsewhere bf16 (a note says so)
    fp16: bool = False
    # what runs after training (do_eval's evaluation, do_predict) casts the whole model to bf16 / to fp16 (bf16 on a
    # CPU without fp16 units), as transformers does outside train(); evaluations during training keep its precision
    bf16_full_eval: bool = False
    fp16_full_eval: bool = False
    tf32: bool | None = None  # HF's: float32 matmuls in TF32 on NVIDIA GPUs (Ampere or newer); unset: torch's default
    gradient_checkpointing: bool = False  # recompute activations in backward instead of keeping them: less memory
    # ours: what gradient_checkpointing recomputes in backward. layers: whole decoder layers (LLaMA-Factory's; least
    # memory, 30-40% slower). selective: everything in a layer but its projections' outputs (norms, activations,
    # attention's core; no projection is run twice). attention: only eager attention's core (flash_attn: eager),
    # whose probabilities are the largest thing a short-sequence layer keeps. All give the same gradients; see
    # models/recompute.py, losses.head_chunk_size and docs/benchmarks.md (Memory; Compile and selective) for costs
    gradient_checkpointing_scope: Literal["layers", "selective", "attention"] = "layers"
    gradient_checkpointing_every: int = 1  # ours: with scope layers or selective, checkpoint every k-th layer (1: all)
    torch_compile: bool = False  # torch.compile each decoder layer (train/common.py compile_layers)
    # HF's: torch.compile's backend and mode for those layers; setting either turns torch_compile on, as in HF. A mode
    # other than default needs inductor; the CUDA graph modes (reduce-overhead, max-autotune) are refused on a GPU
    # (not built for layer-wise compile in training) and compile without CUDA graphs on a CPU, as inductor does there
    torch_compile_backend: Literal["inductor", "aot_eager", "eager"] | None = None
    torch_compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                                "max-autotune-no-cudagraphs"] | None = None
    # adamw_torch_fused (HF's default with torch >= 2.8, so LLaMA-Factory's too: one fused kernel per step, 7x faster
    # than adamw_torch's per-tensor loop on a CPU; the same update to rounding) | adamw_torch | adafactor | sgd |
    # adagrad | rmsprop | bitsandbytes' AdamW, Lion, AdEMAMix and RMSprop under transformers' names (adamw_8bit,
    # paged_adamw_32bit, lion_8bit, ademamix, rmsprop_bnb_8bit, ...; train/optimizers.py lists them all)
    optim: str = "adamw_torch_fused"
    # "key=value,key=value": arguments of sgd (momentum, dampening, nesterov), adagrad (lr_decay, eps), rmsprop and
    # rmsprop_bnb* (momentum, alpha, eps; rmsprop also centered) and ademamix* (beta1, beta2, beta3, alpha, eps,
    # t_alpha, t_beta3), as transformers reads them; the other optimizers take none
    optim_args: str | None = None
    # also send the logged scalars to: tensorboard (event files in <output_dir>/runs), wandb, mlflow; a comma list,
    # `all` (every one installed) or none; trainer_log.jsonl is always written. `run_name` names wandb/mlflow runs.
    report_to: str = "none"
    # a checkpoint-N folder to resume from; unset: the latest complete checkpoint in output_dir, unless
    # overwrite_output_dir
    resume_from_checkpoint: str | None = None
    # on resume, read the interrupted epoch's data again from its start instead of from where the checkpoint left
    # it (transformers': no batches skipped; a stream is not read up to its position). Training still ends at its
    # step count, so the data's tail in the last epoch goes unseen
    ignore_data_skip: bool = False
    # HF's: deterministic kernels for the run (torch.use_deterministic_algorithms, cuDNN's deterministic mode,
    # cuBLAS's fixed workspace), so a GPU run repeats bit for bit; an operation without one stops with torch's error
    full_determinism: bool = False
    # HF's: divide the loss by the target units (tokens; pairs or rows in the stages that count those) of all
    # processes (true), or each process by its own before DDP averages the gradients (false: a process with few
    # tokens weighs as much as one with many). The same in one process; the logged loss is over all units in both
    average_tokens_across_devices: bool = True
    ddp_timeout: int = 1800  # seconds a process waits for the others in a collective (torch.distributed's timeout)
    # HF's DistributedDataParallel settings (several processes without fsdp or deepspeed; unset: accelerate's
    # defaults). find_unused_parameters: search each step for trainable parameters the loss did not use (unset:
    # false, and DDP stops with an error naming them if there are any). static_graph: the same parameters take part
    # in every step, so DDP may skip its per-step checks. bucket_cap_mb: gradients per all-reduce (unset: 25).
    # broadcast_buffers: the main process's buffers sent to the others every forward (unset: true)
    ddp_find_unused_parameters: bool | None = None
    ddp_static_graph: bool | None = None
    ddp_bucket_cap_mb: int | None = None
    ddp_broadcast_buffers: bool | None = None
    # sharding across processes (docs/distributed.md). deepspeed: a ds_config.json path or a mapping (ZeRO under
    # torchrun, GPUs or CPUs: train/zero.py). fsdp: Hugging Face's words, "full_shard auto_wrap", "shard_grad_op",
    # "... offload"; fsdp_config: a JSON path or a mapping of HF's fsdp_config keys (fsdp_version,
    # transformer_layer_cls_to_wrap, reshard_after_forward, ...); fsdp_transformer_layer_cls_to_wrap: the older key
    # for the layer classes
    deepspeed: str | dict | None = None
    fsdp: str | None = None
    fsdp_config: str | dict | None = None
    fsdp_transformer_layer_cls_to_wrap: str | None = None
    dataloader_num_workers: int = 0  # processes that collate training batches (0: the training process)
    # HF's: leave out an epoch's last global batch when the rows left do not fill it (per_device_train_batch_size x
    # processes); unset, it is trained, smaller (one process) or topped up with the epoch's first rows (several)
    dataloader_drop_last: bool = False
    dataloader_pin_memory: bool = True  # HF's: page-locked batches, copied to the GPU asynchronously (a GPU only)
    dataloader_prefetch_factor: int | None = None  # HF's: batches each worker prepares ahead (unset: torch's 2)
    # HF's: how worker processes start (unset: the platform's default, fork on Linux); spawn and forkserver start
    # fresh interpreters, which is slower but safe where the training process holds threads
    dataloader_multiprocessing_context: Literal["fork", "spawn", "forkserver"] | None = None
    # HF's (transformers 5), the order of training rows. random: shuffled every epoch. sequential: in data order, as
    # LLaMA-Factory's disable_shuffling. group_by_length: micro-batches of rows of about the same length (shuffled,
    # then sorted by length within groups of up to 50 global batches; the group holding the longest row first):
    # less padding without packing, for stages that cannot pack; changes which rows share a micro-batch
    train_sampling_strategy: Literal["random", "sequential", "group_by_length"] = "random"
    group_by_length: bool = False  # transformers 4's spelling of train_sampling_strategy: group_by_length
    run_name: str | None = None  # the name of the wandb / mlflow run (report_to); no effect otherwise
    # train_results.json also reports effective_tokens_per_sec: this process's trained non-padding tokens (a pair's
    # both answers) / train_runtime, as LLaMA-Factory does per device
    include_effective_tokens_per_second: bool = False
    # HF's: trainer_log.jsonl records also carry total_tokens (the token ids every process has read since step 0:
    # all positions, or non_padding ones; true means all, as in HF) and throughput (this session's per second), as
    # LLaMA-Factory's log does; its web UI writes true into every config it saves
    include_num_input_tokens_seen: Literal["no", "all", "non_padding"] = "no"
    # torch.profiler over training steps (train/profiling.py): each cycle skips `wait` steps, warms up for `warmup`
    # and records `active`; `repeat` cycles (0: until training ends). Chrome / TensorBoard traces go to
    # <profiler_output_dir or output_dir/profiler>/rank_<process>/
    enable_torch_profiler: bool = False
    profiler_output_dir: str | None = None
    profiler_wait_steps: int = 1
    profiler_warmup_steps: int = 1
    profiler_active_steps: int = 1
    profiler_repeat: int = 1
    profiler_record_shapes: bool = True  # record the operators' input shapes
    profiler_profile_memory: bool = True  # record tensor memory allocations
    profiler_with_stack: bool = True  # record the source (Python) stack of each operator

    @property
    def length_grouped(self) -> bool:
        return self.group_by_length or self.train_sampling_strategy == "group_by_length"

    @property
    def length_grouping_key(self) -> str:
        """How the YAML asked for length grouping, for messages."""
        return "`group_by_length`" if self.group_by_length else "`train_sampling_strategy: group_by_length`"


@dataclass
class GenerateArgs:
    """Decoding. `tuneforge chat`, sft's do_predict and the ppo / grpo rollouts pass these to Hugging Face generate;
    `tuneforge api` decodes with them too (its requests' temperature, top_p and max_tokens override theirs), and
    refuses num_beams > 1 (its batches decode one token per request per step)."""

    do_sample: bool = True  # sample (temperature, top_p, top_k), not greedy or beam search; ppo and grpo need it
    temperature: float = 0.95  # with do_sample: the logits are divided by it (lower: surer choices)
    top_p: float = 0.7  # with do_sample: sample from the likeliest tokens that hold this share of probability
    top_k: int = 50  # with do_sample: sample from the k likeliest tokens only
    num_beams: int = 1  # beam search width (1: none); ppo and grpo need 1
    max_new_tokens: int = 1024  # new tokens per answer at most (grpo's rollouts: max_completion_length)
    repetition_penalty: float = 1.0  # above 1: tokens already in the text become less likely (1: off)
    length_penalty: float = 1.0  # beam search: beam scores are divided by length ** length_penalty
    eval_num_beams: int | None = None  # LLaMA-Factory's; accepted with a notice: see NO_EFFECT_YET
    skip_special_tokens: bool = True  # chat and sft do_predict: special tokens are dropped from decoded answers


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


# LLaMA-Factory's keys for what tuneforge does not have (lf_options.py)
LlamaFactoryOnlyArgs = dataclasses.make_dataclass(
    "LlamaFactoryOnlyArgs", [(key, kind, field(default=default)) for key, kind, default, _ in LLAMAFACTORY_ONLY])
# the Hugging Face training keys tuneforge has no option of its own for (hf_options.py)
HfOnlyArgs = dataclasses.make_dataclass(
    "HfOnlyArgs", [(key, kind, field(default=default)) for key, kind, default, _ in HF_REFUSED + HF_NO_EFFECT])


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    finetune: FinetuneArgs = field(default_factory=FinetuneArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    generate: GenerateArgs = field(default_factory=GenerateArgs)
    evaluation: EvalArgs = field(default_factory=EvalArgs)
    llamafactory_only: LlamaFactoryOnlyArgs = field(default_factory=LlamaFactoryOnlyArgs)
    hf_only: HfOnlyArgs = field(default_factory=HfOnlyArgs)
    source: str = "command line"  # the file the config came from, for error messages
    cli_keys: frozenset = frozenset()  # keys set on the command line (over the file's), for error messages
    notes: tuple = ()  # what loading decided beyond the keys (e.g. precision from accelerate launch), for notices()


GROUPS = {"model": ModelArgs, "data": DataArgs, "finetune": FinetuneArgs, "train": TrainArgs, "generate": GenerateArgs,
          "evaluation": EvalArgs, "llamafactory_only": LlamaFactoryOnlyArgs, "hf_only": HfOnlyArgs}
KEY_GROUP = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
# Keys accepted so LLaMA-Factory configs load, whose feature is not built yet: any non-default value is refused
# (never silently ignored). Each entry says what the user can do instead.
NOT_YET = {
    "export_quantization_bit": "GPTQ export is not built; for a quantised model use `export_gguf: q8_0` or "
                               "`export_gguf: q4_0` (llama.cpp / Ollama)",
    "use_fast_tokenizer": "tuneforge uses the fast (tokenizers) tokenizers only",
    **{key: why for key, _, _, why in LLAMAFACTORY_ONLY + HF_REFUSED},
}
# Keys LLaMA-Factory configs often set that have no effect in tuneforge yet: accepted with a printed notice, so
# those configs run and nothing is skipped silently.
NO_EFFECT_YET = {
    "eval_num_beams": GENERATION_KEYS_WIN,
    "upcast_lmhead_output": "the losses always take the output head's logits in fp32, which is what this makes "
                            "LLaMA-Factory do",
    "low_cpu_mem_usage": "transformers 5's from_pretrained drops it: weights always load without a random copy "
                         "first, which is what true asked for",
    "use_reentrant_gc": "gradient checkpointing here is always non-reentrant (the same gradients, and it works with "
                        "frozen embeddings)",
    **{key: why for key, _, _, why in HF_NO_EFFECT},
}
# Values other tools (TRL's trainers, axolotl's adapters) use for what a key here spells another way: their refusal
# says how to ask for it
SPELLED_OTHERWISE = {
    ("finetuning_type", "qlora"): "QLoRA is `finetuning_type: lora` with `quantization_bit: 4`",
    ("finetuning_type", "dora"): "DoRA is `finetuning_type: lora` with `use_dora: true`",
    ("finetuning_type", "pissa"): "PiSSA is `finetuning_type: lora` with `pissa_init: true`",
    **{("stage", loss): f"{name} is `stage: dpo` with `pref_loss: {loss}`"
       for loss, name in (("orpo", "ORPO"), ("simpo", "SimPO"), ("ipo", "IPO"), ("hinge", "the hinge loss"))},
}


def spelled_otherwise(key: str, value) -> str:
    """'; <how to ask for it>' where `value` of `key` is another tool's spelling of something tuneforge has."""
    hint = SPELLED_OTHERWISE.get((key, str(value).lower()))
    return f"; {hint}" if hint else ""
