"""Sampling a token with one random number per row.

torch.multinomial draws one exponential per vocabulary entry, and on a CPU it draws them one after another: 11 ms
per step for 16 rows of SmolLM2's 49,152 tokens, a fifth of a GRPO rollout's time. Inverse-CDF sampling draws the
same distribution from one uniform per row in under 1 ms (bench/rollout_speed.py)."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of `probs` [..., vocab] (non-negative, not necessarily normalised), index i with
    probability probs[i] / sum: the first index whose running sum exceeds a uniform share of the total. The sum runs
    in float64 so that rounding over a large vocabulary cannot move probability between tokens."""
    cdf = probs.double().cumsum(-1)
    uniform = torch.rand(cdf.shape[:-1] + (1,), dtype=torch.float64, device=probs.device, generator=generator)
    index = torch.searchsorted(cdf, uniform * cdf[..., -1:], right=True)[..., 0]
    # uniform * total may round up to the total itself: the last token with any probability then takes it
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
    return torch.minimum(index, last)


CANDIDATES = 64  # the first guess at how many tokens hold top_p: 0.3 ms for 16 rows, a sort of 49,152 takes 23


def candidates(scores: torch.Tensor, temperature: float, top_k: int, top_p: float):
    """The distribution a token is drawn from, as transformers' warpers make it (temperature, then top_k, then
    top_p): probabilities [rows, n] over the likeliest tokens in descending order and their token ids [rows, n]
    (None when neither top_k nor top_p narrows it). transformers' top_p sorts the whole vocabulary every step (1.4 ms
    per row of SmolLM2's 49,152 tokens); here it cuts the top_k tokens, or without top_k the likeliest few
    (_top_p_alone). At a cut between tokens of equal score, all those tied with the last kept token stay:
    transformers' unstable sort keeps an arbitrary part of them."""
    scores = scores.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        values, tokens = _top_k(scores, top_k)
        probs = torch.softmax(values, dim=-1)
        return (probs if top_p == 1 else _nucleus(values, probs, top_p)[0]), tokens
    if top_p < 1:
        return _top_p_alone(scores, top_p)
    return torch.softmax(scores, dim=-1), None


def _top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k highest scores per row in descending order with their token ids, and every token tied with a row's
    k-th as well (as transformers' top_k keeps them). Rows with fewer ties than the widest get -inf beyond theirs."""
    top = scores.topk(k)
    kth = top.values[:, -1:]
    width = int((scores >= kth).sum(-1).max())
    values, tokens = top if width == k else scores.topk(width)
    return values.masked_fill(values < kth, float("-inf")), tokens


def _nucleus(values: torch.Tensor, probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`probs` of scores `values` [rows, n] in descending order, normalised, with zeros after the tokens that hold
    top_p of the mass except those tied with the last of them; and each row's last kept score [rows, 1]."""
    before = torch.cat([torch.zeros_like(probs[:, :1]), probs.cumsum(-1)[:, :-1]], dim=-1)
    last = values.gather(-1, (before < top_p).sum(-1, keepdim=True) - 1)
    probs = probs.masked_fill(values < last, 0.0)
    return probs / probs.sum(-1, keepdim=True), last


def _top_p_alone(scores: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """top_p over the whole vocabulary without sorting it where the likeliest CANDIDATES tokens hold the nucleus,
    or else eight times as many: each row takes the first of those lists that holds top_p of the mass and every
    token tied with its last kept one, the whole vocabulary when neither does. Rows shorter than the widest are
    padded with probability 0. Sampling from SmolLM2-135M-Instruct at temperature 0.95 and top_p 0.95, 70-80% of the
    steps needed at most 64 tokens and 91-95% at most 512 (docs/benchmarks.md)."""
    log_total, vocab = scores.logsumexp(-1, keepdim=True), scores.shape[-1]
    pending, parts = torch.arange(len(scores), device=scores.device), []
    for n in (CANDIDATES, 8 * CANDIDATES, vocab):
        values, tokens = scores[pending].topk(min(n, vocab))
        shares = (values - log_total[pending]).exp()  # of the whole vocabulary's mass
        probs, last = _nucleus(values, shares, top_p)
        done = (shares.sum(-1) >= top_p) & (last[:, 0] > values[:, -1])
        if n >= vocab:
            done[:] = True
        parts.append((pending[done], probs[done], tokens[done]))
        pending = pending[~done]
        if not len(pending):
            break
    width = max(part[1].shape[-1] for part in parts)
    probs, tokens = scores.new_zeros(len(scores), width), scores.new_zeros(len(scores), width, dtype=torch.long)
    for rows, row_probs, row_tokens in parts:
        probs[rows, :row_probs.shape[-1]], tokens[rows, :row_tokens.shape[-1]] = row_probs, row_tokens
    return probs, tokens


class Sample(LogitsProcessor):
    """Sampling as the last logits processor of a greedy `generate`: one token drawn per row from `candidates`, and
    only that token left finite for greedy's argmax to take. Repetition penalty and the other processors run before
    it, as they run before transformers' sampling."""

    def __init__(self, temperature: float, top_k: int, top_p: float):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs, tokens = candidates(scores, self.temperature, self.top_k, self.top_p)
        token = draw(probs)
        if tokens is not None:
            token = tokens.gather(-1, token[:, None])[:, 0]
        return torch.full_like(scores, float("-inf")).scatter_(-1, token[:, None], 0.0)
