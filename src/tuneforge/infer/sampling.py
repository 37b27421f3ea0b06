"""Sampling a token with one random number per row.

torch.multinomial draws one exponential per vocabulary entry, and on a CPU it draws them one after another: 11 ms
per step for 16 rows of SmolLM2's 49,152 tokens, a fifth of a GRPO rollout's time. Inverse-CDF sampling draws the
same distribution from one uniform per row in under 1 ms (bench/rollout_speed.py)."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper


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


class Sample(LogitsProcessor):
    """Sampling as the last logits processor of a greedy `generate`: the scores warped as transformers' sampling
    warps them (temperature, then top_k, then top_p), one token drawn per row, and only that token left finite for
    greedy's argmax to take. Repetition penalty and the other processors run before it, as they run before
    transformers' sampling."""

    def __init__(self, temperature: float, top_k: int, top_p: float):
        self.top_k = top_k
        self.warpers = LogitsProcessorList()
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def distribution(self, input_ids: torch.LongTensor, scores: torch.FloatTensor):
        """(probabilities [rows, n], their token ids [rows, n], or None when n is the whole vocabulary). With top_k,
        only the top_k tokens are warped: transformers' top_p sorts the whole vocabulary every step (54 ms for 16
        rows of 49,152 on one thread), and its top_k leaves nothing else to sort."""
        tokens = None
        if 0 < self.top_k < scores.shape[-1]:
            top = scores.topk(self.top_k)
            kth = top.values[:, -1:]
            width = int((scores >= kth).sum(-1).max())  # tokens tied with the k-th stay, as transformers keeps them
            scores, tokens = top if width == self.top_k else scores.topk(width)
            scores = scores.masked_fill(scores < kth, float("-inf"))  # rows with fewer ties than the widest
        return torch.softmax(self.warpers(input_ids, scores).float(), dim=-1), tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs, tokens = self.distribution(input_ids, scores)
        token = draw(probs)
        if tokens is not None:
            token = tokens.gather(-1, token[:, None])[:, 0]
        return torch.full_like(scores, float("-inf")).scatter_(-1, token[:, None], 0.0)
