"""Recipe for stage `dpo`: pref_loss sigmoid (DPO), hinge, ipo, orpo or simpo on chosen/rejected pairs, optionally
mixed with BCO (pref_bco_weight).

Both answers of a pair go through the policy in one concatenated forward. The reference is the LoRA base with
its adapter switched off (no second copy in memory), a frozen copy of the starting model (full/freeze, and LoRA
where the adapter off is not that model: common.reference_model), or `ref_model`; orpo and simpo use none. With
`precompute_ref_log_probs` the reference runs once over the data before training.
"""

from __future__ import annotations

import torch

from ..data import prepare_preference_data
from ..data.collate import PairCollator
from .common import (dropout_off, guard_output_dir, on_device, prepare_model, reference_model, start,
                     train_and_evaluate)
from .losses import bco_loss, decoder_and_head, dpo_family_loss, reference_log_probs, sequence_log_probs, uses_average
from .stages import refuse_packing, unused_reference

PREF_LOSSES = ("sigmoid", "hinge", "ipo", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")  # losses that compare the policy's own answers, with no reference model


BCO_BASELINE = "bco_baseline.safetensors"


class RewardBaseline(torch.nn.Module):
    """BCO's delta: the running mean of the training micro-batches' mean implicit reward, each process's micro-batch
    counted once (as TRL's RunningMoments, which LLaMA-Factory uses, counts them). Buffers, so that checkpoints
    keep it and a resumed run goes on from the same baseline."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, batch_mean: torch.Tensor) -> torch.Tensor:
        value, n = batch_mean.detach().double(), 1
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            n = torch.distributed.get_world_size()
            torch.distributed.all_reduce(value)  # every process keeps the same baseline
            value = value / n
        self.count += n
        self.mean += (value - self.mean) * n / self.count
        return self.mean


class PreferenceLoss(torch.nn.Module):
    unit = "pair"

    def __init__(self, model, finetune_args, reference=None):
        super().__init__()
        self.model, self.args = model, finetune_args
        self.split = decoder_and_head(model)
        self.reference = [reference] if reference is not None else []  # a list: not a submodule, never trained
        self.needs_reference = finetune_args.pref_loss not in REFERENCE_FREE
        self.baseline = RewardBaseline() if finetune_args.pref_bco_weight else None
        # nothing trains besides the model (see steps.LossModule); the BCO baseline is saved beside it
        self.extra = {BCO_BASELINE: self.baseline} if self.baseline is not None else {}

    @staticmethod
    def units(batch: dict) -> torch.Tensor:
        return torch.tensor(batch["input_ids"].shape[0] // 2)

    def _select(self, sums, counts) -> tuple[torch.Tensor, torch.Tensor]:
        """(the log-probabilities the loss uses: sums or per-token averages, the per-token averages)."""
        average = sums / counts.clamp(min=1)
        return (average if uses_average(self.args.pref_loss) else sums), average

    def reference_log_probs(self, input_ids, labels, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        reference = self.reference[0] if self.reference else None
        sums, counts = reference_log_probs(self.model, self.split, reference, input_ids, labels, attention_mask)
        return self._select(sums, counts)[0].chunk(2)

    def forward(self, input_ids, labels, attention_mask=None, ref_chosen_logps=None, ref_rejected_logps=None):
        a = self.args
        logps, average = self._select(*sequence_log_probs(self.model, self.split, input_ids, labels, attention_mask,
                                                          ld_alpha=a.ld_alpha))
        chosen, rejected = logps.chunk(2)
        ref_chosen = ref_rejected = None
        if self.needs_reference:
            if ref_chosen_logps is None:
                ref_chosen, ref_rejected = self.reference_log_probs(input_ids, labels, attention_mask)
            else:
                ref_chosen, ref_rejected = ref_chosen_logps, ref_rejected_logps
        losses, chosen_reward, rejected_reward = dpo_family_loss(
            a.pref_loss, chosen, rejected, ref_chosen, ref_rejected, a.pref_beta, a.dpo_label_smoothing,
            a.simpo_gamma)
        if self.baseline is not None:
            losses = self._with_bco(losses, chosen - ref_chosen, rejected - ref_rejected, chosen_reward,
                                    rejected_reward)
        if a.pref_ftx and a.pref_loss != "orpo":  # orpo's loss already holds the SFT term
            losses = losses - a.pref_ftx * average.chunk(2)[0]
        metrics = {"rewards/chosen": chosen_reward.sum(), "rewards/rejected": rejected_reward.sum(),
                   "rewards/accuracies": (chosen_reward > rejected_reward).float().sum(),
                   "rewards/margins": (chosen_reward - rejected_reward).sum(),
                   "logps/chosen": chosen.detach().sum(), "logps/rejected": rejected.detach().sum()}
        return losses.sum(), metrics


    def _with_bco(self, losses, chosen_ratio, rejected_ratio, chosen_reward, rejected_reward) -> torch.Tensor:
        """The pair losses mixed with BCO's as LLaMA-Factory mixes them: (loss + w * bco) / (1 + w). Training moves
        the baseline with this micro-batch's rewards first; evaluation reads it as it is."""
        w, beta = self.args.pref_bco_weight, self.args.pref_beta
        rewards = torch.cat([chosen_reward, rejected_reward]).mean()
        baseline = self.baseline.update(rewards) if self.training else self.baseline.mean
        bco = bco_loss(beta * chosen_ratio, beta * rejected_ratio, baseline.to(losses.dtype))
        return (losses + w * bco) / (1 + w)


@torch.no_grad()
def precompute_reference(module: PreferenceLoss, rows: list[dict], collator, batch_size: int, device) -> None:
    """Store the reference log-probabilities in the rows, so training runs the policy only."""
    for first in range(0, len(rows), batch_size):
        chunk = rows[first: first + batch_size]
        batch = collator(chunk)
        ref_chosen, ref_rejected = module.reference_log_probs(
            batch["input_ids"].to(device), batch["labels"].to(device), batch["attention_mask"].to(device))
        for row, c, r in zip(chunk, ref_chosen.tolist(), ref_rejected.tolist()):
            row["ref_chosen_logps"], row["ref_rejected_logps"] = c, r
    module.reference.clear()  # a frozen copy is no longer needed


def check(cfg) -> list[str]:
    f, out = cfg.finetune, refuse_packing(cfg)
    if f.pref_loss not in PREF_LOSSES:
        out.append(f"`pref_loss: {f.pref_loss}` is not supported; choose one of {', '.join(PREF_LOSSES)}")
    if f.pref_loss == "ipo" and f.pref_beta <= 0:
        out.append("`pref_loss: ipo` needs `pref_beta` > 0")
    if f.ld_alpha is not None and not 0 <= f.ld_alpha <= 1:
        out.append(f"`ld_alpha` weighs the longer answer's extra tokens: it must be in [0, 1]; got {f.ld_alpha}")
    if f.pref_bco_weight < 0:
        out.append(f"`pref_bco_weight` is the BCO term's share of the loss: it must be >= 0; got {f.pref_bco_weight}")
    if f.pref_bco_weight and f.pref_loss in REFERENCE_FREE:
        out.append(f"`pref_bco_weight` classifies rewards measured against the reference model, and `pref_loss: "
                   f"{f.pref_loss}` uses none: use sigmoid, hinge or ipo, or remove pref_bco_weight")
    defaults = type(f)()
    for key, loss in (("simpo_gamma", "simpo"), ("dpo_label_smoothing", "sigmoid")):
        if getattr(f, key) != getattr(defaults, key) and f.pref_loss != loss:
            out.append(f"`{key}` applies to `pref_loss: {loss}` only, and this run's is {f.pref_loss}; remove it")
    if f.pref_loss in REFERENCE_FREE:
        out += unused_reference(cfg, f"`pref_loss: {f.pref_loss}` uses no reference model")
        if f.precompute_ref_log_probs:
            out.append(f"`precompute_ref_log_probs`: `pref_loss: {f.pref_loss}` uses no reference model; remove it")
    if f.pref_bco_weight and cfg.train.fsdp:
        out.append("`pref_bco_weight` with `fsdp` is not built (the baseline is not sharded state); train with DDP "
                   "(torchrun without fsdp) or in one process")
    return out


def run(cfg) -> dict:
    t, f = cfg.train, cfg.finetune
    accelerator, tokenizer = start(cfg)
    train_rows, eval_rows, _ = prepare_preference_data(cfg, tokenizer)
    resume = guard_output_dir(cfg, accelerator)
    model = prepare_model(cfg, accelerator)
    dropout_off(model, accelerator)
    reference = reference_model(cfg, accelerator.device, needed=f.pref_loss not in REFERENCE_FREE)
    module = on_device(PreferenceLoss(model, f, reference), accelerator.device)
    collator = PairCollator(tokenizer.pad_token_id)
    accelerator.print(f"[tuneforge] {len(train_rows)} training and {len(eval_rows)} evaluation pairs; "
                      f"pref_loss {f.pref_loss}, reference: {_describe_reference(module, f)}")
    if f.precompute_ref_log_probs and module.needs_reference:
        precompute_reference(module, train_rows + eval_rows, collator, t.per_device_eval_batch_size,
                             accelerator.device)
    return train_and_evaluate(cfg, module, tokenizer, train_rows, eval_rows, accelerator, resume, collator)


def _describe_reference(module: PreferenceLoss, f) -> str:
    if not module.needs_reference:
        return "none"
    if module.reference:
        return f.ref_model or "a frozen copy of the starting model"
    return "the base model with the LoRA adapter disabled"
