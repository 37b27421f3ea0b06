"""Rollouts for the RL stages: a prompt repeated across rows is run through the model once."""

from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneforge.data.collate import left_pad
from tuneforge.train.rollout import generate, shared_prompt_cache

# the prompt forward of a batch of 3 rows against one of 6: fp32 results may differ in reduction order only
TOLERANCE = 1e-5


def _prompts() -> list[list[int]]:
    a, b, c = [5, 9, 14, 3], [7, 7, 21, 4, 18, 30, 6], [11, 42]
    return [a, a, b, a, c, b]


def test_repeated_prompts_continue_from_one_shared_cache_as_from_their_own(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids, mask, _ = left_pad(_prompts(), 0)
    with torch.no_grad():
        cache = shared_prompt_cache(model, ids, mask)
        assert cache.get_seq_length() == ids.shape[1] - 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        continued = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=positions[:, -1:],
                          past_key_values=cache).logits[:, -1]
        whole = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    torch.testing.assert_close(continued, whole, atol=TOLERANCE, rtol=0)


def test_distinct_prompts_get_no_shared_cache(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids, mask, _ = left_pad(_prompts()[2:5], 0)
    assert shared_prompt_cache(model, ids, mask) is None


def test_greedy_rollouts_of_repeated_prompts_pick_the_likeliest_tokens(tiny_model):
    """End to end through `generate`: every completion token is the argmax of a plain forward pass over the rows
    as generated (no cache), up to the tolerance (a near-tie may go either way)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    gen = SimpleNamespace(max_new_tokens=6, num_beams=1, do_sample=False, repetition_penalty=1.0,
                          length_penalty=1.0)
    prompts = _prompts()
    out = generate(model, prompts, gen, 6, [tokenizer.eos_token_id], tokenizer, torch.autocast("cpu", enabled=False))
    width = out.input_ids.shape[1] - out.completion_mask.shape[1]
    positions = (out.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=out.input_ids, attention_mask=out.attention_mask, position_ids=positions).logits
    scores = logits[:, width - 1: -1]
    picked = scores.gather(-1, out.input_ids[:, width:, None])[..., 0]
    best = scores.max(-1).values
    kept = out.completion_mask.bool()
    assert kept.any(1).all()
    assert (best - picked)[kept].max() <= TOLERANCE
    # rows that repeat a prompt were decoded the same way
    assert torch.equal(out.input_ids[0], out.input_ids[1]) and torch.equal(out.input_ids[2], out.input_ids[5])
