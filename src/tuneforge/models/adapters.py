"""What trains: `full` (everything), `freeze` (chosen layers/modules), `lora` (PEFT adapters)."""

from __future__ import annotations

import re

import torch

from .load import ModelError


def _output_head_names(model) -> set[str]:
    head = model.get_output_embeddings()
    return {name for name, module in model.named_modules() if module is head and head is not None}


def all_linear_names(model) -> list[str]:
    """Leaf names of every nn.Linear except the output head: what `lora_target: all` means."""
    heads = _output_head_names(model)
    names = {name.split(".")[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and name not in heads}
    return sorted(names)


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def apply_freeze(model, args) -> None:
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if not n_layers:
        raise ModelError("finetuning_type freeze needs config.num_hidden_layers to find the layers")
    n = args.freeze_trainable_layers
    if n == 0 or abs(n) > n_layers:
        raise ModelError(f"freeze_trainable_layers must be between -{n_layers} and {n_layers} (not 0); got {n}")
    layer_ids = range(n_layers - n, n_layers) if n > 0 else range(-n)
    modules = _split(args.freeze_trainable_modules)
    extra = _split(args.freeze_extra_modules)
    layer_pattern = re.compile(r"\.(\d+)\.")
    matched_modules, matched_extra = set(), set()
    for name, param in model.named_parameters():
        found = layer_pattern.search(name)
        in_layer = found is not None and int(found.group(1)) in layer_ids
        module_ok = modules == ["all"] or any(f".{m}." in f".{name}" for m in modules)
        matched_modules.update(m for m in modules if in_layer and f".{m}." in f".{name}")
        extra_hit = [e for e in extra if f".{e}." in f".{name}"]
        matched_extra.update(extra_hit)
        param.requires_grad_(bool((in_layer and module_ok) or extra_hit))
    missing = [m for m in modules if m != "all" and m not in matched_modules] + \
              [e for e in extra if e not in matched_extra]
    if missing:
        raise ModelError(f"freeze: no parameters match {missing}; module names in this model include "
                         f"{sorted({n.split('.')[-2] for n, _ in model.named_parameters()})[:12]}")


def lora_config(model, args):
    from peft import LoraConfig, TaskType

    targets = all_linear_names(model) if args.lora_target.strip() == "all" else _split(args.lora_target)
    known = {name.split(".")[-1] for name, _ in model.named_modules()}
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise ModelError(f"lora_target {unknown} not found in the model; its linear layers are "
                         f"{', '.join(all_linear_names(model))} (or use `all`)")
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=args.lora_rank, lora_alpha=args.lora_alpha or 2 * args.lora_rank,
                      lora_dropout=args.lora_dropout, target_modules=targets,
                      modules_to_save=_split(args.additional_target) or None, use_rslora=args.use_rslora,
                      use_dora=args.use_dora)


def attach_adapters(model, model_args, finetune_args, is_trainable: bool):
    """Load `adapter_name_or_path` (all but the last merged in) and, when training LoRA, the adapter to train."""
    from peft import PeftModel, get_peft_model

    adapters = _split(model_args.adapter_name_or_path)
    if adapters:
        resume_last = is_trainable and not finetune_args.create_new_adapter
        to_merge = adapters[:-1] if (resume_last or not is_trainable) else adapters
        for path in to_merge:
            model = PeftModel.from_pretrained(model, path).merge_and_unload()
        if resume_last or not is_trainable:
            return PeftModel.from_pretrained(model, adapters[-1], is_trainable=is_trainable)
    if is_trainable and finetune_args.finetuning_type == "lora":
        model = get_peft_model(model, lora_config(model, finetune_args))
    return model


def setup_trainable(model, model_args, finetune_args):
    """Mark what trains for full / freeze / lora; returns the (possibly PEFT-wrapped) model."""
    kind = finetune_args.finetuning_type
    if kind == "full":
        model.requires_grad_(True)
        return model
    if kind == "freeze":
        apply_freeze(model, finetune_args)
        return model
    return attach_adapters(model, model_args, finetune_args, is_trainable=True)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def describe_trainable(model) -> str:
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
