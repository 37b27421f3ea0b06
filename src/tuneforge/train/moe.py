"""The router load-balancing loss of a mixture-of-experts model (LLaMA-Factory's `moe_aux_loss_coef`).

transformers' MoE causal LMs (Mixtral, Qwen2/3-MoE, OLMoE, PhiMoE, GraniteMoE, Jamba, JetMoE, DBRX, ERNIE-4.5-MoE)
each define Switch Transformer's balancing loss as `load_balancing_loss_func` in their modelling file, and add
`router_aux_loss_coef` x it to the mean token loss when given labels. tuneforge computes its own token loss from the
decoder's hidden states, so it asks the decoder for the router logits and calls that same function.
"""

from __future__ import annotations

import sys

import torch

from ..config import ConfigError


class RouterBalance:
    """coef x the balancing loss of one micro-batch, from its decoder's router logits."""

    def __init__(self, model, coef: float):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.loss_func = getattr(sys.modules[type(base).__module__], "load_balancing_loss_func", None)
        if self.loss_func is None or not hasattr(base, "num_experts_per_tok"):
            raise ConfigError(f"`moe_aux_loss_coef` balances the experts of a mixture-of-experts model; "
                              f"{type(base).__name__} has no router load-balancing loss: remove it")
        self.coef, self.experts, self.top_k = coef, base.num_experts, base.num_experts_per_tok

    def __call__(self, router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The balancing loss over the tokens `attention_mask` keeps: top_k when the routing is even, up to the
        number of experts as it favours the same few experts for every token."""
        return self.loss_func(router_logits, self.experts, self.top_k, attention_mask)
