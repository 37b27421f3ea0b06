"""`tuneforge expand`: LLaMA Pro's block expansion, what LLaMA-Factory's scripts/llama_pro.py does. The model's N
layers are split into `num_expand` groups; after each group's last layer goes a copy of it whose attention output
and MLP down projections are zero, so the new block adds nothing to the residual stream and the expanded model
computes exactly what the original did. Training with `use_llama_pro: true` and `freeze_trainable_layers:
num_expand` then trains only the copies (adapters.trainable_layer_ids picks every (N + num_expand) / num_expand-th
block), leaving the original layers as they were."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from .load import ModelError, resolve_model_path

ZEROED = ("o_proj", "down_proj")  # the projections that write a LLaMA-style block's output into the residual


def expand(model_name_or_path: str, out: str, num_expand: int) -> str:
    """Write the expanded model and its tokenizer to `out` (which must not hold anything yet); returns the keys to
    train it with."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(out)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} is not empty; give a new folder for the expanded model")
    path = resolve_model_path(model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelError(f"{model_name_or_path}: block expansion needs a decoder with a list of layers (LLaMA, "
                         f"Mistral, Qwen2/3, SmolLM); this is a {type(model).__name__}")
    n = len(layers)
    if num_expand <= 0 or n % num_expand:
        raise ModelError(f"--num_expand must divide the model's {n} layers (one new block after each of "
                         f"num_expand equal groups); got {num_expand}. Divisors of {n}: "
                         f"{', '.join(str(d) for d in range(1, n + 1) if n % d == 0)}")
    group = n // num_expand
    expanded, types = [], getattr(model.config, "layer_types", None)
    for index, layer in enumerate(layers):
        expanded.append(layer)
        if (index + 1) % group == 0:
            expanded.append(_silent_copy(layer, model_name_or_path))
    model.get_decoder().layers = torch.nn.ModuleList(expanded)
    model.config.num_hidden_layers = n + num_expand
    if isinstance(types, list) and len(types) == n:  # per-layer attention kinds (sliding or full): the copy's own
        model.config.layer_types = [kind for i, kind in enumerate(types)
                                    for _ in range(2 if (i + 1) % group == 0 else 1)]
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(path).save_pretrained(target)
    return (f"model_name_or_path: {target}\nfinetuning_type: freeze\nuse_llama_pro: true\n"
            f"freeze_trainable_layers: {num_expand}")


def _silent_copy(layer: torch.nn.Module, name: str) -> torch.nn.Module:
    """A copy of `layer` whose output projections are zero: the block passes its input through unchanged."""
    block = copy.deepcopy(layer)
    zeroed = [module for module_name, module in block.named_modules() if module_name.split(".")[-1] in ZEROED]
    if len(zeroed) != len(ZEROED):
        raise ModelError(f"{name}: block expansion knows LLaMA-style layers (self_attn.o_proj and mlp.down_proj, as "
                         f"LLaMA, Mistral, Qwen2/3 and SmolLM have); this model's layers are "
                         f"{type(layer).__name__} without them")
    with torch.no_grad():
        for module in zeroed:
            for tensor in module.parameters():
                tensor.zero_()
    return block
