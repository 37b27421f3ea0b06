"""Activation checkpointing (gradient_checkpointing_scope): whole decoder layers, every layer but its projections'
outputs, or only eager attention's core.

Eager attention keeps, per layer, the softmax probabilities twice for backward: in fp32 (softmax's output) and in
the model's dtype (the input of probabilities @ values). On SmolLM2-135M with 4 x 256-token rows that is 0.4 GB of
the 1.2 GB a micro-batch saves. Scope `attention` keeps only query, key and value and recomputes the rest in
backward: the same operations on the same inputs, so the gradients are the same, at the price of one more
query @ key product per layer. The model's own eager function runs (it may add soft-capping, sinks...); it is
reached through transformers' attention registry, which is how transformers lets a library add an attention kind.

Scope `selective` checkpoints whole layers through torch's selective activation checkpointing: the outputs of the
layer's large matrix products (its projections, the LoRA down-projections A) are kept, everything else is
recomputed in backward: norms and their fp32 upcasts, rotary embeddings, SiLU and the gating product, attention's
scores and probabilities, and the rank-r LoRA up-projections B (inner dimension r: cheaper to redo than to keep a
full-width output). It keeps about half of what a layer otherwise keeps and recomputes no projection.
"""

from __future__ import annotations

import hashlib
import inspect
from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .attention import GROUPED_EAGER, grouped_eager_attention, is_llamas_eager, model_eager_attention
from .load import ModelError

RECOMPUTED_EAGER = "tuneforge_recomputed_eager"
_MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
# a product whose output is this many times wider than its inner dimension is recomputed rather than kept: LoRA's B
# (rank r to the layer's width) costs 2*r FLOPs per output element, little against keeping a full-width output
_CHEAP_WIDENING = 8


def _keep_large_products(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in _MATMULS:
        inner, out = args[-1].shape  # mm(a, b) / addmm(bias, a, b): b is (inner, out)
        if inner * _CHEAP_WIDENING > out:
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    """The context_fn of selective checkpointing. Its `cache_hash` (torch's documented attribute, from the policy's
    own source) lets torch_compile reuse the compiled forward and backward graphs across processes: without it,
    AOTAutograd bypasses its cache and traces the joint graph again in every run."""
    context_fn = partial(create_selective_checkpoint_contexts, _keep_large_products)
    policy = inspect.getsource(_keep_large_products) + repr((_MATMULS, _CHEAP_WIDENING))
    context_fn.cache_hash = hashlib.sha256(policy.encode()).hexdigest()
    return context_fn


def recomputed_eager_attention(module, query, key, value, attention_mask, **kwargs):
    eager = grouped_eager_attention if is_llamas_eager(module) else model_eager_attention(module)
    if not (torch.is_grad_enabled() and module.training):
        return eager(module, query, key, value, attention_mask, **kwargs)
    return checkpoint(eager, module, query, key, value, attention_mask, use_reentrant=False, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(RECOMPUTED_EAGER, recomputed_eager_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(RECOMPUTED_EAGER, eager_mask)  # the same masks eager attention gets


def apply_gradient_checkpointing(model, t, model_args, requested: bool = False) -> str | None:
    """gradient_checkpointing (or `requested` otherwise, e.g. by fsdp_config): recompute activations in backward
    instead of keeping them, for whole decoder layers (every `gradient_checkpointing_every`-th one) or only for
    eager attention's core. Returns the scope applied, None when nothing is recomputed."""
    if not (t.gradient_checkpointing or requested) or model_args.disable_gradient_checkpointing:
        return None
    if t.gradient_checkpointing_scope == "attention":
        if model.config._attn_implementation not in ("eager", GROUPED_EAGER) or model_eager_attention(model) is None:
            raise ModelError("gradient_checkpointing_scope: attention recomputes eager attention; set "
                             f"`flash_attn: eager` (this model uses {model.config._attn_implementation}) or use "
                             "gradient_checkpointing_scope: layers")
        _register()
        model.set_attn_implementation(RECOMPUTED_EAGER)
        return t.gradient_checkpointing_scope
    if not model.supports_gradient_checkpointing:
        raise ModelError(f"{type(model).__name__} cannot recompute its activations (transformers has no gradient "
                         "checkpointing for it); remove gradient_checkpointing")
    kwargs = {"use_reentrant": False}
    if t.gradient_checkpointing_scope == "selective":
        kwargs["context_fn"] = _selective_context()
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.23's name
    if enable:
        enable(activation_checkpointing_kwargs=kwargs, every_n_layers=t.gradient_checkpointing_every)
    elif t.gradient_checkpointing_every != 1:
        raise ModelError("gradient_checkpointing_every needs transformers >= 5.23; remove it or upgrade transformers")
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
    return t.gradient_checkpointing_scope
