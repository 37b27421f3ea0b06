"""Eager attention without copying keys and values for grouped-query attention.

transformers' eager attention (llama's `eager_attention_forward`, which 154 modeling files of transformers 5.23
share verbatim) first repeats each key and value head for every query head of its group (`repeat_kv`): a copy of
the whole KV cache per layer and step when generating. For SmolLM2 (9 query heads on 3 key/value heads) with 32
rows of a 533-token context that copy makes a layer's attention 3.3 ms instead of 0.36 ms, a third of a long
rollout's time.

Grouped eager attention computes the same products without the copy: the query heads of a group are stacked along
the query axis, so one product per key/value head serves them all. Every score and output is the same dot product,
and the dropout mask falls on the same elements in the same order. Where the scaling is a power of two (head_dim
64) the queries are scaled rather than the scores: a quarter of the elements at 256 keys, and the same bits. It is
used only where a model's eager attention and `repeat_kv` are llama's, compared as syntax trees; any other model
keeps its own (gemma2's soft-capping, gpt-oss's sinks...). It registers through transformers' attention registry,
as models/recompute.py does. Training on a CPU, it keeps the softmax probabilities for backward once, in fp32,
instead of twice (`_ProbabilitiesTimesValues`): the same bits, 135 MB less a micro-batch on SmolLM2.
"""

from __future__ import annotations

import ast
import inspect
import math
import sys
import textwrap
from functools import cache

import torch
from torch import nn

GROUPED_EAGER = "tuneforge_grouped_eager"


def grouped_eager_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0,
                            **kwargs):
    """llama's eager attention with the query heads of each key/value head stacked: query [batch, heads, q, dim],
    key and value [batch, kv heads, keys, dim]; returns ([batch, q, heads, dim], weights [batch, heads, q, keys])."""
    batch, heads, length, dim = query.shape
    groups = key.shape[1]
    stacked = query.reshape(batch, groups, heads // groups * length, dim)
    if key.shape[2] > dim and scales_exactly(scaling):  # the query is the smaller tensor, forward and backward
        weights = torch.matmul(stacked * scaling, key.transpose(2, 3))
    else:
        weights = torch.matmul(stacked, key.transpose(2, 3)) * scaling
    weights = weights.view(batch, groups, -1, length, key.shape[2])
    if attention_mask is not None:
        per_head = attention_mask.shape[1] != 1
        weights = weights + (attention_mask.reshape(weights.shape) if per_head else attention_mask[:, :, None])
    if (torch.is_grad_enabled() and weights.device.type == "cpu" and not (dropout and module.training)
            and not torch.compiler.is_compiling()):  # (measured on CPUs; inductor decides what it keeps itself)
        # the values as matmul would hand them to bmm (they may be narrower than the keys)
        values = value.reshape(batch * groups, *value.shape[2:])
        output, weights = _ProbabilitiesTimesValues.apply(weights, values, query.dtype)
    else:
        weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
        weights = nn.functional.dropout(weights, p=dropout, training=module.training)
        output = torch.matmul(weights.view(batch, groups, -1, key.shape[2]), value)
    output = output.view(batch, heads, length, value.shape[-1]).transpose(1, 2).contiguous()
    return output, weights.view(batch, heads, length, -1)


class _ProbabilitiesTimesValues(torch.autograd.Function):
    """softmax(scores) in fp32, cast to `dtype`, times the values, as llama's eager attention computes them; keeps
    the fp32 probabilities only. Autograd would keep the cast copy too, for the product's backward (135 MB a
    micro-batch on SmolLM2 at the quickstart's settings): backward makes it again from the fp32 ones, the same bits,
    then runs autograd's own formulas (bmm's, the casts', softmax's) on the same values. Under autocast the product
    takes autocast's casts, made here as autocast would make them."""

    @staticmethod
    def forward(ctx, scores, values, dtype):
        ctx.set_materialize_grads(False)  # the probabilities are returned for callers that read them; rarely used
        fp32 = nn.functional.softmax(scores, dim=-1, dtype=torch.float32)
        probabilities = fp32.to(dtype)
        device = scores.device.type
        ctx.product_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else dtype
        ctx.save_for_backward(fp32, values)
        ctx.dtype, ctx.scores_dtype = dtype, scores.dtype
        with torch.autocast(device, enabled=False):
            output = torch.bmm(*_ProbabilitiesTimesValues._operands(ctx, probabilities, values))
        return output, probabilities

    @staticmethod
    def _operands(ctx, probabilities, values):
        rows = probabilities.to(ctx.product_dtype).view(values.shape[0], -1, values.shape[1])
        return rows, values.to(ctx.product_dtype)

    @staticmethod
    def backward(ctx, grad_output, grad_probabilities):
        fp32, values = ctx.saved_tensors
        probabilities, values = _ProbabilitiesTimesValues._operands(ctx, fp32.to(ctx.dtype), values)
        grad_scores = grad_values = None
        if grad_output is not None and ctx.needs_input_grad[1]:
            grad_values = probabilities.transpose(1, 2).bmm(grad_output)
        if ctx.needs_input_grad[0]:
            grad = None
            if grad_output is not None:
                grad = grad_output.bmm(values.transpose(1, 2)).view(fp32.shape).to(ctx.dtype)
            if grad_probabilities is not None:
                grad = grad_probabilities if grad is None else grad + grad_probabilities
            if grad is not None:
                grad_scores = torch._softmax_backward_data(grad.to(torch.float32), fp32, -1, torch.float32)
                grad_scores = grad_scores.to(ctx.scores_dtype)
        return grad_scores, grad_values, None


def scales_exactly(scaling: float) -> bool:
    """Whether `scaling` is a power of two: multiplying by it moves only the exponent, so a product of scaled
    queries is bit for bit the scaled product (outside the subnormal range, 1e-38), forward and backward. So is
    head_dim ** -0.5 for head_dim 16, 64 or 256 (SmolLM2, Qwen2.5 up to 3B, Llama 3.2)."""
    return scaling > 0 and math.frexp(scaling)[0] == 0.5


@cache
def _llama_syntax(name: str) -> str:
    from transformers.models.llama import modeling_llama

    return _syntax(getattr(modeling_llama, name))


def _syntax(function) -> str:
    return ast.dump(ast.parse(textwrap.dedent(inspect.getsource(function))).body[0])  # dedented: methods too


def same_forward(kind: type, reference: type) -> bool:
    """Whether module class `kind` computes `reference`'s forward: the same function, or one of the same syntax."""
    try:
        return kind.forward is reference.forward or _syntax(kind.forward) == _syntax(reference.forward)
    except (OSError, TypeError, SyntaxError):  # no source to read
        return False


def model_eager_attention(module):
    """The eager attention function of the modeling file `module` (the model or one of its layers) comes from."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)


def is_llamas_eager(module) -> bool:
    """Whether the eager attention of the modeling file `module` (a model or one of its layers) comes from is
    llama's, repeat_kv included: then grouped_eager_attention computes exactly what it computes."""
    return _is_llamas(type(module).__module__)


@cache
def _is_llamas(module_name: str) -> bool:
    source = sys.modules[module_name]
    try:
        return all(_syntax(getattr(source, name)) == _llama_syntax(name)
                   for name in ("eager_attention_forward", "repeat_kv"))
    except (AttributeError, OSError, TypeError):  # no such function, or no source to read
        return False


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(GROUPED_EAGER, grouped_eager_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_EAGER, eager_mask)  # the same masks eager attention gets


def group_eager_attention(model) -> None:
    """Switch a model on eager attention to grouped eager attention where that computes the same. Not for models
    of several parts (a vision tower beside the language model): the switch would reach parts of another kind."""
    if model.config._attn_implementation != "eager" or model.config.sub_configs or not is_llamas_eager(model):
        return
    config = model.config.get_text_config()
    if getattr(config, "num_key_value_heads", None) in (None, config.num_attention_heads):  # nothing to repeat
        return
    _register()
    model.set_attn_implementation(GROUPED_EAGER)
