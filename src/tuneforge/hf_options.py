"""Hugging Face training keys that tuneforge does not read as options of its own. LLaMA-Factory passes every field
of transformers' Seq2SeqTrainingArguments through, so its configs may spell any of them out: each loads at
transformers' default. HF_REFUSED keys refuse any other value with the reason and what to use instead; HF_NO_EFFECT
keys take any value, with a printed notice, because they change nothing that is computed here.
(key, type, transformers 5's default, reason)
"""

from __future__ import annotations

_NOT_BUILT = "is not built yet; remove it"
_HUB = "pushing to the Hugging Face hub is not built; upload output_dir yourself (`hf upload`)"
_TRACKIO = "Trackio reporting is not built; report_to takes tensorboard, wandb or mlflow"
_LIGER = "Liger kernels need a CUDA GPU (Triton kernels), which this build does not target; remove it"
_GENERATE = "do_predict generates with the generation keys (max_new_tokens, num_beams, temperature, top_p, ...): " \
            "set those instead"
_METRICS = "each stage computes fixed metrics (docs/evaluation.md); custom compute_metrics inputs are not built"

HF_REFUSED = [
    ("optim_target_modules", "str | None", None, "GaLore and APOLLO take their modules from galore_target and "
     "apollo_target"),
    ("activation_checkpointing", "bool | None", None, "set gradient_checkpointing (or fsdp_config's "
     "activation_checkpointing) instead"),
    ("activation_checkpointing_kwargs", "dict | str | None", None, "gradient_checkpointing_scope chooses what is "
     "recomputed; these arguments are not built"),
    ("gradient_checkpointing_kwargs", "dict | str | None", None, "gradient checkpointing here is always "
     "non-reentrant (LLaMA-Factory's use_reentrant_gc sets use_reentrant; the same gradients) and "
     "gradient_checkpointing_scope chooses what is recomputed: remove it"),
    ("use_liger_kernel", "bool", False, _LIGER),
    ("liger_kernel_config", "dict | str | None", None, _LIGER),
    ("project", "str", "huggingface", _TRACKIO + " (wandb's project is the WANDB_PROJECT variable)"),
    ("trackio_space_id", "str | None", None, _TRACKIO),
    ("trackio_bucket_id", "str | None", None, _TRACKIO),
    ("trackio_static_space_id", "str | None", None, _TRACKIO),
    ("prediction_loss_only", "bool", False, "evaluation reports the stage's loss and metrics; prediction_loss_only "
     + _NOT_BUILT),
    ("include_for_metrics", "str", "", _METRICS),
    ("batch_eval_metrics", "bool", False, _METRICS),
    ("save_on_each_node", "bool", False, "the main process saves for every machine; saving on each machine's own "
     "disk is not built (use an output_dir on a shared file system)"),
    ("push_to_hub", "bool", False, _HUB),
    ("log_on_each_node", "bool", True, "the first process of each machine prints tuneforge's lines, so that every "
     "machine's output shows the run (the first process of all writes the logs); printing on the first machine only "
     + _NOT_BUILT),
    ("use_cpu", "bool", False, "to train on the CPU cores of a GPU machine, hide the GPUs: "
     "CUDA_VISIBLE_DEVICES= tuneforge train ..."),
    ("accelerator_config", "dict | str | None", None, "tuneforge configures accelerate itself (processes come from "
     "torchrun or accelerate launch); accelerator_config " + _NOT_BUILT),
    ("parallelism_config", "dict | str | None", None, "tensor, context and sequence parallelism are not built; "
     "shard with fsdp or deepspeed"),
    ("dataloader_in_order", "bool", True, "batches always arrive in the sampler's order, which resume relies on"),
    ("debug", "str", "", "transformers' debug modes are not built; a non-finite loss or gradient stops training and "
     "names the step"),
    ("generation_config", "str | None", None, _GENERATE),
]

# LLaMA-Factory sets these from cutoff_len and eval_num_beams, then passes its own generation keys to every
# evaluate/predict call, and transformers' Seq2SeqTrainer reads these only when those are missing
GENERATION_KEYS_WIN = ("generation reads max_new_tokens and num_beams, which LLaMA-Factory always passes and which "
                       "take precedence over it there too: set those")
_COLUMNS = "tuneforge's collators take the columns each stage needs"
_LOG = "tuneforge's own lines are printed, and transformers' logging levels are not read"
_ONLY_PUSH = "only push_to_hub reads it, which is not built"
_EVAL = "evaluation sums its metrics batch by batch and keeps no logits"

HF_NO_EFFECT = [
    ("use_cache", "bool", False, "the KV cache is off while training and on while generating"),
    ("torch_empty_cache_steps", "int | None", None, "emptying the CUDA cache changes memory use only; not built"),
    ("logging_nan_inf_filter", "bool", True, "a non-finite loss stops training (or, with skip_nonfinite_steps, is "
     "skipped and counted), so no logged loss averages one"),
    ("log_level", "str", "passive", _LOG),
    ("log_level_replica", "str", "warning", _LOG),
    ("disable_tqdm", "bool | None", None, "the progress bar goes to the main process's terminal (stderr)"),
    ("eval_do_concat_batches", "bool", True, _EVAL),
    ("eval_use_gather_object", "bool", False, _EVAL),
    ("eval_accumulation_steps", "int | None", None, _EVAL),
    ("skip_memory_metrics", "bool", True, "memory is not reported in the results; bench/ measures peak memory"),
    ("enable_jit_checkpoint", "bool", False, "tuneforge always saves a checkpoint when SIGTERM arrives "
     "(docs/reliability.md)"),
    ("restore_callback_states_from_checkpoint", "bool", False, "a resume always restores early stopping's count "
     "(trainer_state.json)"),
    ("hub_token", "str | None", None, _ONLY_PUSH),
    ("hub_private_repo", "bool | None", None, _ONLY_PUSH),
    ("hub_model_id", "str | None", None, _ONLY_PUSH),
    ("hub_strategy", "str", "every_save", _ONLY_PUSH),
    ("hub_always_push", "bool", False, _ONLY_PUSH),
    ("hub_revision", "str | None", None, _ONLY_PUSH),
    ("remove_unused_columns", "bool", True, _COLUMNS),
    ("label_names", "str | None", None, _COLUMNS),
    ("length_column_name", "str", "length", _COLUMNS),
    ("dataloader_persistent_workers", "bool", False, "a data loader is made for each epoch (a resume starts one "
     "mid-epoch), so its workers start once an epoch either way"),
    ("ddp_backend", "str | None", None, "the backend is nccl between GPUs and gloo between CPU processes"),
    ("local_rank", "int", -1, "each process reads its rank from torchrun's LOCAL_RANK variable"),
    ("generation_max_length", "int | None", None, GENERATION_KEYS_WIN),
    ("generation_num_beams", "int | None", None, GENERATION_KEYS_WIN),
    ("sortish_sampler", "bool", False, "transformers 5 declares it and reads it nowhere (its Seq2SeqTrainer no longer "
     "builds that sampler)"),
]
