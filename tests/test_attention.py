"""Grouped eager attention: llama's eager attention without copying keys and values per query head."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import eager_attention_forward

from tuneforge.config import ModelArgs
from tuneforge.models.attention import GROUPED_EAGER, grouped_eager_attention
from tuneforge.models.load import load_base_model

# fp32 products of different shapes (a group's query heads stacked into one product) may sum in another order
TOLERANCE = 1e-6


class _Layer(torch.nn.Module):
    num_key_value_groups = 3


def _inputs(length: int, keys: int, mask: str, value_dim: int = 8):
    torch.manual_seed(0)
    batch, heads, groups, dim = 2, 6, 2, 8
    query = torch.randn(batch, length, heads, dim).transpose(1, 2)  # strided, as a projection's view makes it
    key, value = torch.randn(batch, groups, keys, dim), torch.randn(batch, groups, keys, value_dim)
    allowed = torch.ones(batch, 1, length, keys, dtype=torch.bool).tril(keys - length)
    allowed[0, :, :, :2] = False  # the first row is left-padded by two
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    masks = {"none": None, "shared": additive, "per head": additive.expand(batch, heads, length, keys).clone()}
    return query, key, value, masks[mask]


@pytest.mark.parametrize("length,keys,value_dim", [(7, 7, 8), (1, 9, 8), (7, 7, 5)],
                         ids=["prompt", "decoding step", "values narrower than keys"])
@pytest.mark.parametrize("mask", ["none", "shared", "per head"])
def test_grouped_eager_attention_computes_llamas_eager_attention(length, keys, value_dim, mask):
    layer = _Layer().eval()
    query, key, value, attention_mask = _inputs(length, keys, mask, value_dim)
    ours = grouped_eager_attention(layer, query, key, value, attention_mask, scaling=0.35)
    theirs = eager_attention_forward(layer, query, key, value, attention_mask, scaling=0.35)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=TOLERANCE, rtol=0)


def test_attention_dropout_falls_on_the_same_elements():
    layer = _Layer().train()
    query, key, value, attention_mask = _inputs(5, 5, "shared")
    torch.manual_seed(3)
    ours = grouped_eager_attention(layer, query, key, value, attention_mask, scaling=0.35, dropout=0.5)[1]
    torch.manual_seed(3)
    theirs = eager_attention_forward(layer, query, key, value, attention_mask, scaling=0.35, dropout=0.5)[1]
    torch.testing.assert_close(ours, theirs, atol=TOLERANCE, rtol=0)


def test_a_model_loaded_on_eager_attention_gets_grouped_attention_with_eagers_results(tiny_model, tmp_path):
    model = load_base_model(ModelArgs(model_name_or_path=tiny_model, flash_attn="eager"))
    assert model.config._attn_implementation == GROUPED_EAGER  # the tiny llama has 4 query heads on 2 kv heads
    ids = torch.randint(3, 300, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0

    def logits_and_gradients(attention: str):
        model.set_attn_implementation(attention)
        model.zero_grad()
        logits = model(ids, attention_mask=mask).logits
        logits.float().pow(2).mean().backward()
        return [logits.detach()] + [p.grad.clone() for p in model.parameters()]

    ours, theirs = logits_and_gradients(GROUPED_EAGER), logits_and_gradients("eager")
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=TOLERANCE, rtol=1e-5)
    model.set_attn_implementation(GROUPED_EAGER)
    model.save_pretrained(tmp_path)  # what tuneforge saves loads in plain transformers
    assert GROUPED_EAGER not in (tmp_path / "config.json").read_text()
    AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_model_with_an_eager_attention_of_its_own_keeps_it(tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path)  # soft-capped scores: not llama's eager attention
    model = load_base_model(ModelArgs(model_name_or_path=str(tmp_path), flash_attn="eager"))
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_power_of_two_scales_the_queries_with_the_same_bits(monkeypatch, dtype):
    """head_dim 64's scaling (1/8) multiplies the queries instead of the scores: outputs and all three gradients
    bit for bit those of scaling the scores."""
    from tuneforge.models import attention

    query, key, value, mask = _inputs(6, 24, "shared")  # more keys than the head's 8 dimensions
    grad = torch.randn(2, 6, 6, 8)

    def run():
        inputs = [t.detach().to(dtype).requires_grad_(True) for t in (query, key, value)]
        output, weights = grouped_eager_attention(_Layer().eval(), *inputs, mask.to(dtype), scaling=0.125)
        output.backward(grad.to(dtype))
        return [output, weights] + [t.grad for t in inputs]

    assert attention.scales_exactly(0.125) and not attention.scales_exactly(128 ** -0.5)
    folded = run()
    monkeypatch.setattr(attention, "scales_exactly", lambda scaling: False)
    for a, b in zip(folded, run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,value_dtype,mask_dtype,autocast", [
    (torch.float32, torch.float32, torch.float32, False), (torch.bfloat16, torch.bfloat16, torch.bfloat16, False),
    (torch.bfloat16, torch.bfloat16, torch.float32, False),
    # bf16 autocast over an fp32 model: rotary makes queries and keys fp32, values come from a bf16 product
    (torch.float32, torch.bfloat16, torch.float32, True),
], ids=["fp32", "bf16", "bf16 scores, fp32 mask", "autocast"])
@pytest.mark.parametrize("read_weights", [False, True])  # a caller that differentiates the returned probabilities
def test_probabilities_kept_once_with_autograds_bits(monkeypatch, dtype, value_dtype, mask_dtype, autocast,
                                                     read_weights):
    """Training keeps the fp32 probabilities only and casts them again in backward: outputs and all gradients bit
    for bit those of autograd through the same operations, which keeps the cast copy as well."""
    from tuneforge.models import attention

    query, key, value, mask = _inputs(6, 24, "shared")
    grad, grad_weights = torch.randn(2, 6, 6, 8), torch.randn(2, 6, 6, 24)

    def run():
        inputs = [t.detach().to(d).requires_grad_(True) for t, d in zip((query, key, value),
                                                                      (dtype, dtype, value_dtype))]
        kept = set()

        def pack(tensor):
            if tensor.shape[-1] == 24 and tensor.numel() == grad_weights.numel():  # a copy of the probabilities
                kept.add(tensor.untyped_storage().data_ptr())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            output, weights = grouped_eager_attention(_Layer().train(), *inputs, mask.to(mask_dtype), scaling=0.35)
        loss = (output * grad.to(output.dtype)).sum()
        if read_weights:
            loss = loss + (weights * grad_weights.to(weights.dtype)).sum()
        loss.backward()
        return [output, weights] + [t.grad for t in inputs], len(kept)

    def plain(scores, values, dtype):  # autograd through the operations of llama's eager attention
        probabilities = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        return torch.bmm(probabilities.view(values.shape[0], -1, values.shape[1]), values), probabilities

    ours, kept = run()
    monkeypatch.setattr(attention._ProbabilitiesTimesValues, "apply", plain)
    theirs, kept_by_autograd = run()
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and torch.equal(a, b), f"max difference {(a - b).abs().max()}"
    assert kept == 1 and kept_by_autograd == (1 if (dtype, autocast) == (torch.float32, False) else 2)
