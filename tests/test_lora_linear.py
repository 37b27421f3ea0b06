"""The fused LoRA linear (models/lora_linear.py) computes what PEFT's LoRA Linear computes, forward and backward,
in every precision tuneforge trains in; it is what `lora_config` builds unless something rules it out, and
anything beyond plain LoRA runs PEFT's own forward."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tuneforge.models.adapters import lora_config
from tuneforge.models.lora_linear import FusedLoraLinear, fuse_lora_products
from tuneforge.options import FinetuneArgs


class _Proj(torch.nn.Module):
    def __init__(self, dtype: torch.dtype, bias: bool):
        super().__init__()
        self.proj = torch.nn.Linear(48, 40, bias=bias, dtype=dtype).requires_grad_(False)

    def forward(self, x):
        return self.proj(x)


def _pair(base_dtype=torch.float32, bias=True, **options):
    """PEFT's layer and the fused one on the same weights, B non-zero as after a first step."""
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], **options)
    plain = get_peft_model(_Proj(base_dtype, bias), config)
    with torch.no_grad():
        plain.base_model.model.proj.lora_B["default"].weight.normal_(std=0.1)
    fused_config = copy.deepcopy(config)
    fuse_lora_products(fused_config)
    fused = get_peft_model(_Proj(base_dtype, bias), fused_config)
    fused.load_state_dict(plain.state_dict())
    assert type(fused.base_model.model.proj) is FusedLoraLinear
    return plain, fused


def _run(model, x, grad, autocast: torch.dtype | None):
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = model(x)
    out.backward(grad.to(out.dtype))
    lora = model.base_model.model.proj
    return [out, x.grad, lora.lora_A["default"].weight.grad, lora.lora_B["default"].weight.grad]


@pytest.mark.parametrize("base_dtype,x_dtype,autocast,tolerance", [
    # fp32 throughout: the same products summed in another order (fp32's 24 bits: 1e-5 of the largest value)
    (torch.float32, torch.float32, None, 1e-5),
    # bf16 autocast over an fp32 base (bf16: true) and a bf16 one (pure_bf16): the fused sum rounds to bf16 once
    # where PEFT's rounds twice, so the output and the input's gradient may differ by two roundings (2^-7 each) of
    # the largest value: 1.6e-2 (measured up to 0.7%; the adapters' gradients came out equal)
    (torch.float32, torch.float32, torch.bfloat16, 1.6e-2),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16, 1.6e-2),
    (torch.bfloat16, torch.float32, torch.bfloat16, 1.6e-2),
])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_matches_peft_forward_and_backward(base_dtype, x_dtype, autocast, tolerance, bias):
    plain, fused = _pair(base_dtype, bias)
    x = torch.randn(2, 6, 48, dtype=x_dtype)
    grad = torch.randn(2, 6, 40)
    for theirs, ours in zip(_run(plain, x, grad, autocast), _run(fused, x, grad, autocast), strict=True):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        assert (ours.float() - theirs.float()).abs().max() <= tolerance * theirs.float().abs().max()


def test_rslora_scaling_is_the_one_peft_uses():
    plain, fused = _pair(use_rslora=True)
    x, grad = torch.randn(3, 48), torch.randn(3, 40)
    for theirs, ours in zip(_run(plain, x, grad, None), _run(fused, x, grad, None), strict=True):
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()  # fp32 reordering, as above


def test_anything_beyond_plain_lora_runs_peft_forward(monkeypatch):
    """Each case is one the fused function does not compute; a call into it would fail the test."""
    def refuse(*args):
        raise AssertionError("the fused function ran")

    monkeypatch.setattr("tuneforge.models.lora_linear._LoraProduct.apply", refuse)
    x = torch.randn(3, 48)
    plain, fused = _pair(lora_dropout=0.1)
    fused.eval()  # dropout is skipped in eval, but the layer still holds a dropout module: PEFT's path
    plain.eval()
    assert torch.equal(fused(x), plain(x))
    plain, fused = _pair(use_dora=True)
    assert torch.equal(fused(x), plain(x))
    plain, fused = _pair()
    with fused.disable_adapter(), plain.disable_adapter():
        assert torch.equal(fused(x), plain(x))
    fused.base_model.model.proj.merge()
    plain.base_model.model.proj.merge()
    assert torch.equal(fused(x), plain(x))
    plain, fused = _pair(base_dtype=torch.bfloat16)  # no autocast, adapters in fp32, base in bf16: PEFT's casts
    assert torch.equal(fused(x.bfloat16()), plain(x.bfloat16()))


def _args():
    return FinetuneArgs(lora_rank=4, lora_target="all")


def test_lora_config_fuses_plain_linear_models_only(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert lora_config(model, _args(), fuse=True)._custom_modules == {torch.nn.Linear: FusedLoraLinear}
    assert lora_config(model, _args(), fuse=False)._custom_modules is None
    assert "_custom_modules" not in lora_config(model, _args(), fuse=True).to_dict()  # not in adapter_config.json

    class Quantised(torch.nn.Linear):  # as bitsandbytes' Linear4bit: PEFT has its own class for it
        pass

    model.model.layers[0].mlp.down_proj.__class__ = Quantised
    assert lora_config(model, _args(), fuse=True)._custom_modules is None


def test_training_on_cpu_builds_fused_layers(tiny_model, alpaca_file, tmp_path):
    from conftest import train_config

    from tuneforge.config import build_config, validate
    from tuneforge.train.common import prepare_model

    cfg = build_config(train_config(tiny_model, alpaca_file, tmp_path / "out"), source="test")
    validate(cfg, "train")
    on_cpu = SimpleNamespace(device=torch.device("cpu"), print=print)
    layers = [m for m in prepare_model(cfg, on_cpu).modules() if hasattr(m, "lora_A")]
    assert layers and all(type(m) is FusedLoraLinear for m in layers)
    on_gpu = SimpleNamespace(device=torch.device("meta"), print=print)  # any device but the CPU: PEFT's layers
    assert not any(isinstance(m, FusedLoraLinear) for m in prepare_model(cfg, on_gpu).modules())
    # selective checkpointing keeps the products the function adds to in place: PEFT's layers (test_memory.py)
    cfg.train.gradient_checkpointing, cfg.train.gradient_checkpointing_scope = True, "selective"
    assert not any(isinstance(m, FusedLoraLinear) for m in prepare_model(cfg, on_cpu).modules())
