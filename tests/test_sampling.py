"""Sampling with one random number per row: the distribution it draws from, alone and inside `generate`."""

import pytest
import torch
from transformers import (AutoModelForCausalLM, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)

from tuneforge.infer.sampling import Sample, candidates, draw

DRAWS = 200_000


def _within_five_sigma(counts: torch.Tensor, probs: torch.Tensor, n: int) -> bool:
    """Frequencies against probabilities, allowing five binomial standard deviations per token (plus one count):
    a seeded draw from the right distribution lands inside them; a draw off by a percent does not."""
    sigma = (n * probs * (1 - probs)).sqrt()
    return bool(((counts - n * probs).abs() <= 5 * sigma + 1).all())


def test_draw_follows_the_distribution_and_never_takes_an_impossible_token():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05, 0.0, 0.0])
    generator = torch.Generator().manual_seed(0)
    picks = draw(probs.expand(DRAWS, -1), generator)
    counts = torch.bincount(picks, minlength=len(probs)).double()
    assert counts[probs == 0].sum() == 0
    assert _within_five_sigma(counts, probs.double(), DRAWS)
    # unnormalised weights mean the same distribution; one row of a 1-D input gives one index
    assert torch.equal(draw(3 * probs.expand(DRAWS, -1), torch.Generator().manual_seed(0)), picks)
    assert draw(probs, generator).shape == ()


def test_draw_is_not_biased_by_its_place_in_the_distribution():
    """A check with power: shifting one percent of the mass from the first token to the last is seen."""
    probs = torch.full((4,), 0.25)
    shifted = torch.tensor([0.24, 0.25, 0.25, 0.26])
    counts = torch.bincount(draw(shifted.expand(DRAWS, -1), torch.Generator().manual_seed(1)), minlength=4)
    assert not _within_five_sigma(counts.double(), probs.double(), DRAWS)


def test_greedy_generate_with_sample_draws_from_the_warped_distribution(tiny_model):
    """The first token of many rows of one prompt, against softmax(logits / temperature) over the top_k tokens
    worked out from one forward pass."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompt = torch.tensor([[5, 9, 14, 3, 22]])
    # the tiny model's logits are nearly flat: a low temperature spreads them, so that ignoring it would show
    temperature, top_k, rows = 0.05, 6, 20_000
    with torch.no_grad():
        logits = model(prompt).logits[0, -1].double() / temperature
    top = logits.topk(top_k)
    probs = torch.zeros_like(logits).scatter(0, top.indices, torch.softmax(top.values, 0))
    torch.manual_seed(0)
    out = model.generate(prompt.expand(rows, -1), attention_mask=torch.ones(rows, 5, dtype=torch.long),
                         max_new_tokens=1, do_sample=False, temperature=None, top_p=None, top_k=None,
                         logits_processor=[Sample(temperature, top_k, 1.0)], pad_token_id=0)
    counts = torch.bincount(out[:, -1], minlength=len(probs)).double()
    assert counts[probs == 0].sum() == 0
    assert _within_five_sigma(counts, probs, rows)


@pytest.mark.parametrize("temperature,top_k,top_p,width", [
    (0.95, 50, 0.7, 50), (1.0, 50, 1.0, 50), (0.7, 3, 0.5, 3),  # top_k's tokens
    (0.5, 0, 0.9, 64), (1.0, 0, 0.7, 512), (2.0, 0, 0.95, 5000),  # top_p alone: each step of the search
    (1.0, 0, 1.0, None),  # the whole vocabulary, unsorted
])
def test_candidates_warp_as_transformers_warpers_do(temperature, top_k, top_p, width):
    """The distribution drawn from, against softmax of transformers' own warpers in their order. Without top_p the
    scores are rounded to bf16, as a bf16 model's logits are, which puts ties at the top_k boundary; with top_p they
    are not, because at a top_p cut inside a run of ties transformers keeps an arbitrary part of the run (the next
    test). A vocabulary of 5,000 and a spread of 3 make the nucleus of top_p 0.7-0.95 take each step of the search
    for it."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 5000, generator=generator) * 3
    if top_p == 1:
        scores = scores.bfloat16().float()
    ids = torch.zeros(4, 1, dtype=torch.long)
    theirs = LogitsProcessorList([TemperatureLogitsWarper(temperature)])  # as generate chains them
    theirs += [TopKLogitsWarper(top_k)] if top_k else []
    theirs += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    expected = torch.softmax(theirs(ids, scores.clone()), dim=-1)
    probs, tokens = candidates(scores.clone(), temperature, top_k, top_p)
    ours = probs if tokens is None else torch.zeros_like(expected).scatter(-1, tokens, probs)
    assert (None if tokens is None else tokens.shape[-1]) == width
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)  # softmax over fewer entries: rounding only


def test_candidates_keep_the_tokens_tied_at_the_top_p_cut():
    """Where the cut falls inside a run of equal scores, all of the run stays (transformers' unstable sort keeps
    an arbitrary part of it); below the run, nothing."""
    scores = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0, -1.0]])
    probs, tokens = candidates(scores, 1.0, 0, 0.5)  # token 0 holds 0.41 of the mass: one more is needed
    kept = set(tokens[probs > 0].tolist())
    assert kept == {0, 1, 2, 3}
    full = torch.softmax(scores[0, :4], 0)
    torch.testing.assert_close(probs[probs > 0], full.sort(descending=True).values)
