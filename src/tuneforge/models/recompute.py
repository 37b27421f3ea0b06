"""Activation checkpointing, whole decoder layers or only eager attention's core (gradient_checkpointing_scope).

Eager attention keeps, per layer, the softmax probabilities twice for backward: in fp32 (softmax's output) and in
the model's dtype (the input of probabilities @ values). On SmolLM2-135M with 4 x 256-token rows that is 0.4 GB of
the 1.2 GB a micro-batch saves. Scope `attention` keeps only query, key and value and recomputes the rest in
backward: the same operations on the same inputs, so the gradients are the same, at the price of one more
query @ key product per layer. The model's own eager function runs (it may add soft-capping, sinks...); it is
reached through transformers' attention registry, which is how transformers lets a library add an attention kind.
"""

from __future__ import annotations

import sys

import torch
from torch.utils.checkpoint import checkpoint

from .load import ModelError

RECOMPUTED_EAGER = "tuneforge_recomputed_eager"


def _model_eager_attention(module):
    """The eager attention function of the modeling file `module` (the model or one of its layers) comes from."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)


def recomputed_eager_attention(module, query, key, value, attention_mask, **kwargs):
    eager = _model_eager_attention(module)
    if not (torch.is_grad_enabled() and module.training):
        return eager(module, query, key, value, attention_mask, **kwargs)
    return checkpoint(eager, module, query, key, value, attention_mask, use_reentrant=False, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(RECOMPUTED_EAGER, recomputed_eager_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(RECOMPUTED_EAGER, eager_mask)  # the same masks eager attention gets


def apply_gradient_checkpointing(model, t, model_args, requested: bool = False) -> None:
    """gradient_checkpointing (or `requested` otherwise, e.g. by fsdp_config): recompute activations in backward
    instead of keeping them, for whole decoder layers (every `gradient_checkpointing_every`-th one) or only for
    eager attention's core."""
    if not (t.gradient_checkpointing or requested) or model_args.disable_gradient_checkpointing:
        return
    if t.gradient_checkpointing_scope == "attention":
        if model.config._attn_implementation != "eager" or _model_eager_attention(model) is None:
            raise ModelError("gradient_checkpointing_scope: attention recomputes eager attention; set "
                             f"`flash_attn: eager` (this model uses {model.config._attn_implementation}) or use "
                             "gradient_checkpointing_scope: layers")
        _register()
        model.set_attn_implementation(RECOMPUTED_EAGER)
        return
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.23's name
    if enable:
        enable(activation_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=t.gradient_checkpointing_every)
    elif t.gradient_checkpointing_every != 1:
        raise ModelError("gradient_checkpointing_every needs transformers >= 5.23; remove it or upgrade transformers")
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
