"""Recipe for stage `kto`: desirable and undesirable answers, each judged against a reference point z0, the
batch's KL estimate from mismatched (prompt, other answer) pairs, as in the KTO paper. The reference model is the
LoRA base with its adapter switched off, a frozen copy of the starting model (full/freeze, and LoRA where the
adapter off is not that model: common.reference_model), or `ref_model`."""

from __future__ import annotations

import torch

from ..data import prepare_preference_data
from ..data.collate import KTOCollator
from .common import (dropout_off, guard_output_dir, on_device, prepare_model, reference_model, start,
                     train_and_evaluate)
from .losses import decoder_and_head, kto_loss, reference_log_probs, sequence_log_probs
from .stages import refuse_packing


class KTOLoss(torch.nn.Module):
    unit = "example"
    extra: dict = {}  # nothing trains besides the model (see steps.LossModule)

    def __init__(self, model, finetune_args, reference=None):
        super().__init__()
        self.model, self.args = model, finetune_args
        self.split = decoder_and_head(model)
        self.reference = [reference] if reference is not None else []  # a list: not a submodule, never trained

    @staticmethod
    def units(batch: dict) -> torch.Tensor:
        return torch.tensor(batch["kto_tag"].shape[0])

    def forward(self, input_ids, labels, attention_mask, kto_tag):
        a, n = self.args, kto_tag.shape[0]
        sums, _ = sequence_log_probs(self.model, self.split, input_ids, labels, attention_mask)
        reference = self.reference[0] if self.reference else None
        ref, _ = reference_log_probs(self.model, self.split, reference, input_ids, labels, attention_mask)
        own, mismatched, ref_own, ref_mismatched = sums[:n], sums[n:], ref[:n], ref[n:]
        losses, chosen_reward, rejected_reward = kto_loss(
            own[kto_tag], own[~kto_tag], ref_own[kto_tag], ref_own[~kto_tag], mismatched, ref_mismatched,
            a.pref_beta, a.kto_chosen_weight, a.kto_rejected_weight)
        # a desirable answer's reward should rise, an undesirable one's fall: each a mean over its own count
        # (steps.metric_means), as TRL and LLaMA-Factory log them
        kl = (mismatched - ref_mismatched).detach().mean().clamp(min=0)
        return losses.sum(), {
            "rewards/chosen": chosen_reward.sum(), "rewards/rejected": rejected_reward.sum(),
            "logps/chosen": own[kto_tag].detach().sum(), "logps/rejected": own[~kto_tag].detach().sum(),
            "count/chosen": kto_tag.sum(), "count/rejected": (~kto_tag).sum(), "kl": kl * n}


def check(cfg) -> list[str]:
    return refuse_packing(cfg)


def run(cfg) -> dict:
    f = cfg.finetune
    accelerator, tokenizer = start(cfg)
    train_rows, eval_rows, _ = prepare_preference_data(cfg, tokenizer)
    resume = guard_output_dir(cfg, accelerator)
    model = prepare_model(cfg, accelerator)
    dropout_off(model, accelerator)
    module = on_device(KTOLoss(model, f, reference_model(cfg, accelerator.device)), accelerator.device)
    collator = KTOCollator(tokenizer.pad_token_id)
    desirable = sum(r["kto_tag"] for r in train_rows)
    accelerator.print(f"[tuneforge] {len(train_rows)} training examples ({desirable} desirable), "
                      f"{len(eval_rows)} evaluation examples")
    return train_and_evaluate(cfg, module, tokenizer, train_rows, eval_rows, accelerator, resume, collator)
