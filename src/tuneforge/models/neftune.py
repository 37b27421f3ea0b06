"""NEFTune (Jain et al., 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"), as transformers'
Trainer applies it for `neftune_noise_alpha`: while the model trains, the input embeddings get uniform noise in
[-a, a], a = alpha / sqrt(sequence length x hidden size) of the batch; evaluation and generation see none, nor do
the passes of training that compute no gradient: a LoRA reference (the policy with its adapter off) is as clean
as a frozen copy, and precomputed reference log-probabilities equal those computed at each step."""

from __future__ import annotations

import math

import torch


def add_noise_to_embeddings(model, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """Hook the noise onto `model`'s input embeddings (a PEFT model's base embeddings); returns the hook's handle."""
    def noisy(module, args, output):
        if not module.training or not torch.is_grad_enabled():
            return output
        bound = alpha / math.sqrt(output.size(1) * output.size(2))
        return output + torch.empty_like(output).uniform_(-bound, bound)

    return model.get_input_embeddings().register_forward_hook(noisy)
