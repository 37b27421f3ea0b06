"""FastRMSNorm (models/rms_norm.py) gives transformers' llama RMSNorm's output and gradients bit for bit, in every
precision tuneforge trains in, and replaces only norms whose forward is llama's."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from tuneforge.models.rms_norm import FastRMSNorm, use_fast_rms_norms


def _run(norm, x, grad, autocast: bool):
    x = x.detach().clone().requires_grad_(True)
    norm.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = norm(x)
    out.backward(grad.to(out.dtype))
    return out, x.grad, norm.weight.grad


@pytest.mark.parametrize("x_dtype,weight_dtype,autocast", [
    (torch.bfloat16, torch.bfloat16, False),  # pure_bf16
    (torch.float32, torch.float32, True),  # bf16: true (autocast over fp32 weights and activations)
    (torch.float32, torch.float32, False),  # fp32
    (torch.bfloat16, torch.float32, False),  # upcast_layernorm under pure_bf16: an fp32 weight on bf16 activations
    (torch.float16, torch.float16, False),
])
@pytest.mark.parametrize("trainable", [False, True])  # LoRA freezes the norm; full fine-tuning trains it
def test_the_same_bits_as_transformers_norm(x_dtype, weight_dtype, autocast, trainable):
    torch.manual_seed(0)
    theirs = LlamaRMSNorm(96, eps=1e-5).to(weight_dtype)
    with torch.no_grad():
        theirs.weight.copy_(1 + 0.3 * torch.randn(96))
    theirs.weight.requires_grad_(trainable)
    ours = FastRMSNorm(theirs.weight, theirs.variance_epsilon)
    x = (torch.randn(3, 37, 96) * torch.logspace(-2, 2, 37)[:, None]).to(x_dtype)  # rows of very different scales
    grad = torch.randn(3, 37, 96)
    expected, got = _run(theirs, x, grad, autocast), _run(ours, x, grad, autocast)
    for name, a, b in zip(("output", "input gradient", "weight gradient"), expected, got):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), f"{name}: max difference {(a - b).abs().max()}"


@pytest.mark.parametrize("x_dtype,autocast", [(torch.bfloat16, False), (torch.float32, True),
                                              (torch.float32, False)])
def test_the_same_input_gradient_inside_a_residual_block(x_dtype, autocast):
    # as in a decoder layer the norm's input also goes round it: autograd adds the input's gradients in the order
    # they arrive, so the fp32 input (fp32 training; autocast's fp32 residual stream) must keep its graph
    torch.manual_seed(0)
    theirs = LlamaRMSNorm(96, eps=1e-5)
    with torch.no_grad():
        theirs.weight.copy_(1 + 0.3 * torch.randn(96))
    theirs = theirs.to(x_dtype).requires_grad_(False)
    ours = FastRMSNorm(theirs.weight, theirs.variance_epsilon)
    x = (torch.randn(3, 37, 96) * torch.logspace(-2, 2, 37)[:, None]).to(x_dtype)
    grads = []
    for norm in (theirs, ours):
        leaf = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = leaf + norm(leaf) * 3
        out.backward(torch.randn(3, 37, 96, generator=torch.Generator().manual_seed(1)).to(out.dtype))
        grads.append(leaf.grad)
    assert torch.equal(*grads), f"max difference {(grads[0] - grads[1]).abs().max()}"


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.llama, self.qwen = LlamaRMSNorm(8), Qwen2RMSNorm(8)  # Qwen2's forward is llama's, copied
        self.gemma = GemmaRMSNorm(8)  # 1 + weight: not llama's
        self.inner = nn.Sequential(LlamaRMSNorm(8), nn.Linear(8, 8))


def test_only_llamas_norms_are_replaced_and_keep_their_weights():
    block = _Block()
    weights = {name: param for name, param in block.named_parameters()}
    assert use_fast_rms_norms(block) == 3
    assert [type(m) for m in (block.llama, block.qwen, block.gemma, block.inner[0])] == \
        [FastRMSNorm, FastRMSNorm, GemmaRMSNorm, FastRMSNorm]
    assert {name: param for name, param in block.named_parameters()} == weights  # the same names, the same tensors
    assert use_fast_rms_norms(block) == 0
