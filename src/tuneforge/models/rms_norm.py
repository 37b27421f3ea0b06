"""llama's RMSNorm as one autograd function: the same values forward, a shorter backward, the same bits.

transformers' RMSNorm (llama's, which most decoder models copy) is seven operations; autograd keeps the input's
fp32 copy and takes each operation apart in backward. Written as one function, backward reads the saved 16-bit
input and the per-row scale and computes what autograd would (the same formulas, in the same order, with the same
casts), so the outputs and both gradients are bit for bit those of transformers' module (tests/test_rms_norm.py
compares them in every precision tuneforge trains in). An fp32 input has no upcast copy to spare and runs
transformers' own operations, which inside a model is what keeps its gradient the same bits. Each norm whose
forward is llama's, compared as syntax trees, is replaced by `FastRMSNorm` holding the same weight; any other
(gemma's 1 + weight, norms with an offset or a cast of their own) keeps its module. At the quickstart's settings
on SmolLM2-135M (61 norms per micro-batch) that is 70 MB less memory and 1% more speed on an AMX Xeon
(docs/benchmarks.md).
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

from .attention import same_forward


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        h = x.to(torch.float32)
        scale = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, scale)
        # (h * scale).to(x.dtype) without the fp32 product: computed in fp32, rounded once as it is written
        normed = torch.mul(h, scale, out=torch.empty_like(x))
        return weight * normed

    @staticmethod
    def backward(ctx, grad):
        x, weight, scale = ctx.saved_tensors
        h = x.to(torch.float32)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            normed = torch.mul(h, scale, out=torch.empty_like(x))
            grad_weight = (grad * normed).sum_to_size(weight.shape).to(weight.dtype)
        # autograd casts each gradient to its input's dtype: the normalised value was in x's dtype
        grad_normed = (grad * weight).to(x.dtype).to(torch.float32)
        grad_scale = (grad_normed * h).sum(-1, keepdim=True)
        grad_mean = (-0.5 * grad_scale) * scale.pow(3)  # rsqrt's derivative as autograd writes it
        # mean's derivative (/ n) then pow's (2 * h): scaling by 2 first is exact, and spares a full-size product
        grad_h = grad_normed * scale + (grad_mean / h.shape[-1] * 2) * h
        return grad_h.to(x.dtype), grad_weight, None


class FastRMSNorm(nn.Module):
    """A llama RMSNorm (weight * normalised x, in fp32 then x's dtype) computed by `_RMSNorm`."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight, self.variance_epsilon = weight, eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype == torch.float32:
            # transformers' operations: there is no upcast copy to spare, and autograd, given them, adds the input's
            # two gradients from the norm to the residual's in its own order, where `_RMSNorm` adds them first
            variance = hidden_states.pow(2).mean(-1, keepdim=True)
            return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))
        return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


@cache
def _is_llamas(kind: type) -> bool:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return same_forward(kind, LlamaRMSNorm)


def use_fast_rms_norms(model: nn.Module) -> int:
    """Replace every norm of `model` whose forward is llama's RMSNorm with FastRMSNorm; how many were."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if not isinstance(child, FastRMSNorm) and isinstance(getattr(child, "weight", None), nn.Parameter) \
                    and isinstance(getattr(child, "variance_epsilon", None), float) and _is_llamas(type(child)):
                setattr(parent, name, FastRMSNorm(child.weight, child.variance_epsilon))
                replaced += 1
    return replaced
