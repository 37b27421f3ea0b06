"""LLaMA-Factory 0.9.5 keys for features tuneforge does not have (or that need hardware this machine lacks): each
is accepted at LLaMA-Factory's default so its configs load, and any other value is refused with the reason and what
to use instead. (key, type, LLaMA-Factory's default, reason)
"""

from __future__ import annotations

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
    ("ignore_pad_token_for_loss", "bool", True, "tuneforge never trains on padding; remove it"),
    ("download_mode", "str", "reuse_dataset_if_exists", "tuneforge eval reads local task folders; nothing is "
     "downloaded"),
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
    ("max_length", "int", 1024, "generation length is `max_new_tokens`; use it instead"),
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

# Megatron-Core's parallelism and fusion keys, which LLaMA-Factory's examples/megatron configs set and LLaMA-Factory
# reads only when launched with USE_MCA=1 (mcore_adapter): named together in one line, not as unknown keys
MEGATRON_KEYS = frozenset((
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
    "expert_model_parallel_size", "context_parallel_size", "sequence_parallel", "use_distributed_optimizer",
    "overlap_param_gather", "overlap_grad_reduce", "recompute_granularity", "recompute_method",
    "recompute_num_layers", "bias_activation_fusion", "apply_rope_fusion", "masked_softmax_fusion",
    "cross_entropy_loss_fusion", "moe_grouped_gemm", "moe_token_dispatcher_type", "calculate_per_token_loss",
    "account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split"))


def megatron_problem(where: str, keys: list[str]) -> str:
    return (f"{where}: {', '.join(f'`{k}`' for k in keys)} configure Megatron-Core (LLaMA-Factory reads them only "
            "with USE_MCA=1), whose training is not built: remove them and shard with fsdp or deepspeed "
            "(docs/distributed.md)")


# the keys only the experimental engine of LLaMA-Factory 0.9.5 reads (USE_V1=1; its examples/v1 configs)
V1_KEYS = frozenset((
    "model", "model_class", "init_config", "peft_config", "kernel_config", "quant_config", "train_dataset",
    "sample_backend", "micro_batch_size", "global_batch_size", "batching_strategy", "batching_workers",
    "enable_activation_checkpointing", "dist_config", "optim_config", "lr_scheduler_config", "save_epochs",
    "save_ckpt_as_hf"))


def v1_problem(where: str, keys: list[str]) -> str:
    return (f"{where}: {', '.join(f'`{k}`' for k in keys)} are keys of LLaMA-Factory's experimental v1 engine "
            "(USE_V1=1), which tuneforge does not read: write the config in LLaMA-Factory's main format "
            "(model -> model_name_or_path, train_dataset -> dataset, micro_batch_size -> "
            "per_device_train_batch_size, global_batch_size -> gradient_accumulation_steps x processes x that, "
            "peft_config -> finetuning_type and lora_*, dist_config -> fsdp or deepspeed, "
            "enable_activation_checkpointing -> gradient_checkpointing; docs/llamafactory.md)")


def other_engines(where: str, items: dict) -> tuple[list[str], set[str]]:
    """The keys of LLaMA-Factory's other engines in `items`, each engine's named together in one problem rather
    than as unknown keys: (problems, the keys they name)."""
    problems, named = [], set()
    for keys, problem in ((MEGATRON_KEYS, megatron_problem), (V1_KEYS, v1_problem)):
        if found := [key for key in items if key in keys]:
            problems.append(problem(where, found))
            named.update(found)
    return problems, named
