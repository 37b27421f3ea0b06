"""FastMLP (models/swiglu.py) gives transformers' llama MLP's output and gradients bit for bit, in every precision
tuneforge trains in, keeps one full-width tensor less for backward, and replaces only llama's MLPs with SiLU."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import GemmaConfig, LlamaConfig
from transformers.models.gemma.modeling_gemma import GemmaMLP
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from tuneforge.models.swiglu import FastMLP, use_fast_mlps

SIZES = {"hidden_size": 48, "intermediate_size": 128, "num_attention_heads": 4}
CONFIG = LlamaConfig(**SIZES, hidden_act="silu")


def _run(mlp, x, grad, autocast: bool):
    x = x.detach().clone().requires_grad_(True)
    mlp.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = mlp(x)
    out.backward(grad.to(out.dtype))
    grads = [p.grad for p in mlp.parameters() if p.requires_grad]
    return [out, x.grad, *grads]


@pytest.mark.parametrize("dtype,autocast", [
    (torch.bfloat16, False),  # pure_bf16
    (torch.float32, True),  # bf16: true (autocast over fp32 weights)
    (torch.float32, False),
    (torch.float16, False),
])
@pytest.mark.parametrize("lora", [False, True])  # frozen projections with adapters, or full fine-tuning
def test_the_same_bits_as_transformers_mlp(dtype, autocast, lora):
    torch.manual_seed(0)
    theirs = nn.Sequential(LlamaMLP(CONFIG)).to(dtype)  # (use_fast_mlps replaces children)
    if lora:
        theirs = get_peft_model(theirs, LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"]))
        for name, param in theirs.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero, which would hide a wrong gradient for A
                nn.init.normal_(param)
    ours = copy.deepcopy(theirs)
    assert use_fast_mlps(ours) == 1
    x = torch.randn(3, 17, 48).to(dtype) * 3  # wide enough to reach SiLU's curved part on both sides
    grad = torch.randn(3, 17, 48)
    expected, got = _run(theirs, x, grad, autocast), _run(ours, x, grad, autocast)
    assert len(expected) == len(got) == (2 + (6 if lora else 3))
    for index, (a, b) in enumerate(zip(expected, got)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"tensor {index}: max difference {(a - b).abs().max()}"


def test_keeps_the_gate_and_up_outputs_only():
    """Autograd keeps SiLU's input and output and the up projection's output; FastMLP keeps two of the three."""
    def saved_full_width(mlp):
        weights, kept = {p.untyped_storage().data_ptr() for p in mlp.parameters()}, []

        def pack(tensor):
            storage = tensor.untyped_storage().data_ptr()
            if tensor.shape[-1] == CONFIG.intermediate_size and storage not in weights:
                kept.append(storage)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mlp(torch.randn(2, 5, 48, requires_grad=True))
        return len(set(kept))

    theirs = LlamaMLP(CONFIG).requires_grad_(False)
    ours = FastMLP(copy.deepcopy(theirs))
    # (the frozen down projection keeps no input: that would be for its weight's gradient)
    assert saved_full_width(theirs) == 3  # gate's output (SiLU's input), SiLU's output, up's output
    assert saved_full_width(ours) == 2


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.llama, self.qwen = LlamaMLP(CONFIG), Qwen2MLP(CONFIG)  # Qwen2's forward is llama's, copied
        self.gelu = LlamaMLP(LlamaConfig(**SIZES, hidden_act="gelu"))
        self.gemma = GemmaMLP(GemmaConfig(**SIZES))  # llama's forward, GELU
        self.inner = nn.Sequential(LlamaMLP(CONFIG))


def test_only_llamas_silu_mlps_are_replaced_and_keep_their_weights():
    block = _Block()
    weights = {name: param for name, param in block.named_parameters()}
    assert use_fast_mlps(block) == 3
    assert [type(m) for m in (block.llama, block.qwen, block.gelu, block.gemma, block.inner[0])] == \
        [FastMLP, FastMLP, LlamaMLP, GemmaMLP, FastMLP]
    assert {name: param for name, param in block.named_parameters()} == weights  # the same names, the same tensors
    assert use_fast_mlps(block) == 0
