"""ASFT (LLaMA-Factory's `use_asft_loss`, `asft_alpha`): DFT's probability-weighted token loss, anchored to the
starting model by a KL term, for stages pt and sft.

Per target token: p_y * CE + asft_alpha * KL(q || p), where p is the model's prediction, p_y its probability of the
target (detached, as DFT's weight), and q the reference's prediction: the LoRA base with its adapter switched off,
or a frozen copy of the starting model (full/freeze, and LoRA where the adapter off is not that model). Summed
over target tokens; the loop divides by their count, which for one micro-batch is LLaMA-Factory's mean of each
term.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.utils.checkpoint import checkpoint

from ..models.load import ModelError
from .losses import IGNORE, CausalLMLoss, decoder_and_head

# target rows per chunk: the policy's and the reference's fp32 logits and log-probabilities of a chunk exist
# together (256 rows x 49k vocabulary: about 0.2 GB), and are recomputed in backward rather than kept
CHUNK_ROWS = 256


class AnchoredLMLoss(torch.nn.Module):
    """The pt/sft loss module with ASFT's loss in training; in evaluation, CausalLMLoss's plain loss and metrics."""

    unit = "token"
    extra: dict = {}  # nothing trains besides the model (see steps.LossModule)

    def __init__(self, plain: CausalLMLoss, alpha: float, reference=None):
        super().__init__()
        self.plain, self.alpha = plain, alpha  # the model is registered once, as plain's
        self.reference = [reference] if reference is not None else []  # a list: not a submodule, never trained
        self.split = decoder_and_head(self.model)
        # (decoder, head) of the reference: the frozen copy's, or the policy's own, run with its adapter switched off
        self.reference_split = decoder_and_head(reference) if reference is not None else self.split
        if self.split is None or self.reference_split is None:
            raise ModelError(f"use_asft_loss needs a plain output head; {type(self.model).__name__}'s head changes "
                             "its logits (softcapping or scaling)")

    units = staticmethod(CausalLMLoss.units)

    @property
    def model(self) -> torch.nn.Module:
        return self.plain.model

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        if not self.training:
            return self.plain(input_ids, labels, attention_mask, position_ids)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        targets = labels[:, 1:] != IGNORE
        wanted = labels[:, 1:][targets]
        decoder, head = self.split
        hidden = decoder(**inputs).last_hidden_state[:, :-1][targets]
        reference_hidden = self._reference_hidden(inputs, targets)
        losses = [checkpoint(self._rows, hidden[start: start + CHUNK_ROWS], reference_hidden[start: start + CHUNK_ROWS],
                             wanted[start: start + CHUNK_ROWS], use_reentrant=False)
                  for start in range(0, hidden.shape[0], CHUNK_ROWS)]
        return (torch.cat(losses).sum() if losses else hidden.sum() * 0), {}

    def _as_reference(self):
        return nullcontext() if self.reference else self.model.disable_adapter()

    @torch.no_grad()
    def _reference_hidden(self, inputs: dict, targets: torch.Tensor) -> torch.Tensor:
        with self._as_reference():
            return self.reference_split[0](**inputs).last_hidden_state[:, :-1][targets]

    @torch.no_grad()
    def _reference_probs(self, reference_hidden: torch.Tensor) -> torch.Tensor:
        with self._as_reference():
            return self.reference_split[1](reference_hidden).float().softmax(-1)

    def _rows(self, hidden, reference_hidden, wanted):
        """Each target row's p_y * CE + alpha * KL(q || p); xlogy makes a token q gives no probability count 0."""
        log_p = self.split[1](hidden).float().log_softmax(-1)
        q = self._reference_probs(reference_hidden)
        ce = -log_p.gather(-1, wanted[:, None]).squeeze(-1)
        kl = (torch.xlogy(q, q) - q * log_p).sum(-1)
        return ce * torch.exp(-ce).detach() + self.alpha * kl
