"""Loss functions. They return sums, never means: the caller divides by the target-token count of the whole
(accumulated, multi-process) batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over positions whose label is not -100, and their count."""
    shift_logits = logits[:, :-1].reshape(-1, logits.size(-1))
    shift_labels = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(shift_logits.float(), shift_labels, ignore_index=IGNORE, reduction="sum")
    return loss, (shift_labels != IGNORE).sum()


def causal_lm_loss(model, batch: dict, with_accuracy: bool = False):
    """(loss sum, target count, correct-prediction count) for one batch of a causal LM."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss, count = token_cross_entropy(logits, batch["labels"])
    correct = torch.zeros((), device=loss.device)
    if with_accuracy:
        labels = batch["labels"][:, 1:]
        predicted = logits[:, :-1].argmax(-1)
        correct = ((predicted == labels) & (labels != IGNORE)).sum()
    return loss, count, correct
