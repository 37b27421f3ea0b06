"""llama's gated MLP with its SiLU and gating product as one autograd function: the same bits, less kept memory.

transformers' MLP (llama's, which most decoder models copy) computes down(silu(gate(x)) * up(x)). Autograd keeps
three full-width tensors of it for backward: SiLU's input, SiLU's output and the up projection's output. The SiLU
output is cheap to compute again from its input, so `_SwiGLU` keeps only the two projections' outputs and redoes
the SiLU in backward with the same kernel: backward then runs the same operations on the same values as autograd,
and both gradients are bit for bit autograd's (tests/test_swiglu.py, in every precision tuneforge trains in). On
SmolLM2-135M at the quickstart's settings that is 3 MB a layer for every 1,024 tokens (90 MB a micro-batch).
Each MLP whose forward is llama's, compared as syntax trees, with a SiLU activation, is replaced by `FastMLP`
holding the same projections under the same names, so PEFT's targets and saved weights do not change.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

from .attention import same_forward


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = grad * nn.functional.silu(gate)  # the SiLU output forward made, made again
        if ctx.needs_input_grad[0]:
            # autograd casts the product's gradient to the SiLU output's dtype, then applies silu's own backward
            grad_gate = torch.ops.aten.silu_backward((grad * up).to(gate.dtype), gate)
        return grad_gate, grad_up


class FastMLP(nn.Module):
    """A llama MLP, down(silu(gate(x)) * up(x)), with `_SwiGLU` between the projections (kept as they are)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))


@cache
def _is_llamas(kind: type) -> bool:
    from transformers.models.llama.modeling_llama import LlamaMLP

    return same_forward(kind, LlamaMLP)


def _is_silu(module) -> bool:
    from transformers.activations import SiLUActivation

    return type(module) in (nn.SiLU, SiLUActivation)


def use_fast_mlps(model: nn.Module) -> int:
    """Replace every MLP of `model` whose forward is llama's and whose activation is SiLU with FastMLP; how many
    were."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if not isinstance(child, FastMLP) and _is_llamas(type(child)) and _is_silu(getattr(child, "act_fn", None)):
                setattr(parent, name, FastMLP(child))
                replaced += 1
    return replaced
