"""Recipe for stage `grpo`: group-relative policy optimisation (DeepSeekMath's GRPO, with TRL's key names).

Every optimizer step: take the next prompts, sample `num_generations` completions of each with the policy being
trained, score them with the reward functions, and give each completion its reward minus its group's mean as the
advantage of all its tokens; then one clipped policy-gradient step on those completions (plus `beta` x the
per-token KL to the reference: the LoRA base with its adapter off, or a frozen copy). The rollouts are the loop's
source of steps (RolloutSteps), so logging, checkpoints and exact resume are the loop's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import order_seed, shuffles_rows
from ..data import DataError, load_splits
from ..data.encode import render, tokenize_pieces
from ..data.templates import data_template, stop_token_ids
from . import rewards as reward_functions
from .faults import rows_signature
from .common import guard_output_dir, prepare_model, reference_model, start, train_and_evaluate
from .loop import Precision
from .losses import (clipped_policy_loss, completion_log_probs, decoder_and_head, group_advantages, kl_to_reference,
                     loss_units, token_weights)
from .rollout import RolloutStats, generate, greedy_rollouts, my_share
from .stages import rollout_problems, unused_reference
from .steps import batches_per_epoch, epoch_batches


def check(cfg) -> list[str]:
    f, t, g = cfg.finetune, cfg.train, cfg.generate
    out = reward_functions.check(f) + rollout_problems(cfg)
    per_process = t.per_device_train_batch_size * t.gradient_accumulation_steps
    if f.num_generations < 2:
        out.append(f"`num_generations` must be at least 2 (a group needs others to compare with); got "
                   f"{f.num_generations}")
    elif per_process % f.num_generations:
        out.append(f"per_device_train_batch_size x gradient_accumulation_steps ({per_process}) must be a multiple of "
                   f"num_generations ({f.num_generations}): each step holds whole groups of completions")
    if g.max_new_tokens != type(g)().max_new_tokens:
        out.append("stage grpo generates up to `max_completion_length` tokens; remove `max_new_tokens`")
    if f.beta < 0:
        out.append(f"`beta` must be at least 0 (0: no KL term and no reference); got {f.beta}")
    if f.beta == 0:
        out += unused_reference(cfg, "`beta: 0` turns off the KL penalty, the reference model's only use")
    if f.epsilon != type(f)().epsilon or f.epsilon_high is not None:
        # the clip would bind only with several optimisation passes per rollout (TRL's num_iterations > 1)
        out.append("`epsilon` / `epsilon_high` would have no effect: grpo optimises once per rollout (as TRL's "
                   "default num_iterations: 1), where the probability ratio is always 1; remove them")
    if f.max_completion_length < 1:
        out.append(f"`max_completion_length` must be at least 1; got {f.max_completion_length}")
    return out


class GRPOLoss(torch.nn.Module):
    extra: dict = {}  # nothing trains besides the model (see steps.LossModule)

    def __init__(self, model, finetune_args):
        super().__init__()
        self.model, self.args = model, finetune_args
        self.split = decoder_and_head(model)
        self.unit = {"dapo": "completion_token", "bnpo": "micro_batch"}.get(finetune_args.loss_type, "completion")

    def units(self, batch: dict) -> torch.Tensor:
        return loss_units(self.args.loss_type, batch["completion_mask"])

    def forward(self, input_ids, attention_mask, completion_mask, advantages, ref_logps=None):
        a = self.args
        logps, entropy = completion_log_probs(self.model, self.split, input_ids, attention_mask,
                                              completion_mask.shape[1], with_entropy=True)
        # one optimisation pass per rollout (TRL's num_iterations=1): the rollout policy is the current one, so
        # the ratio is 1 in value and carries the policy gradient
        losses, _ = clipped_policy_loss(logps, logps.detach(), advantages[:, None], a.epsilon, a.epsilon_high)
        per_token = {"entropy": entropy.detach()}
        if ref_logps is not None:
            kl = kl_to_reference(logps, ref_logps)
            losses = losses + a.beta * kl
            per_token["kl"] = kl.detach()
        weights = token_weights(a.loss_type, completion_mask, a.max_completion_length)
        # metrics are averaged like the loss, except that dr_grpo's constant divisor would shrink them: per completion
        shown = token_weights("grpo", completion_mask, 1) if a.loss_type == "dr_grpo" else weights
        return (losses * weights).sum(), {k: (v * shown).sum() for k, v in per_token.items()}


class RolloutSteps:
    """The loop's source of steps for grpo: every step, `per_step` prompts per process (shuffled per epoch with the
    seed, as in-memory rows are), `num_generations` completions each, with rewards and advantages."""

    resumes_every = 1  # each step has its own rollout

    def __init__(self, cfg, module: GRPOLoss, tokenizer, prompts: list[dict], rewards, reference, accelerator):
        t, f = cfg.train, cfg.finetune
        self.cfg, self.module, self.tokenizer, self.prompts, self.rewards = cfg, module, tokenizer, prompts, rewards
        self.reference, self.device = reference, accelerator.device
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps // f.num_generations
        self.steps_per_epoch = batches_per_epoch(len(prompts), self.per_step * self.world, t.dataloader_drop_last)
        self.num_examples, self.signature, self.step_rows = len(prompts), rows_signature(prompts), []
        self.template = data_template(cfg.data, tokenizer)
        self.stop_ids = stop_token_ids(self.template, tokenizer)
        self.precision = Precision(t, accelerator.device)
        self.stats = RolloutStats()

    def steps(self, state):
        t = self.cfg.train
        while True:
            batches = epoch_batches(len(self.prompts), self.per_step, order_seed(t), state.epoch,
                                    shuffles_rows(self.cfg), self.rank, self.world, drop_last=t.dataloader_drop_last)
            for indices in batches[state.step_in_epoch:]:
                self.step_rows = [indices]  # the step's prompts (their completions fill its micro-batches)
                yield self.rollout([self.prompts[i] for i in indices])

    @torch.no_grad()
    def rollout(self, prompts: list[dict]) -> list[dict]:
        """One step's micro-batches: generated, scored, with advantages (and reference log-probs when beta > 0)."""
        f, size = self.cfg.finetune, self.cfg.train.per_device_train_batch_size
        group = f.num_generations
        model = self.module.model
        rows = [p for p in prompts for _ in range(group)]  # a group's completions are consecutive rows
        out = generate(model, [p["ids"] for p in rows], self.cfg.generate, f.max_completion_length, self.stop_ids,
                       self.tokenizer, self.precision.autocast(model))
        scores, means = reward_functions.score(self.rewards, [p["text"] for p in rows], out.completions,
                                               [p["extra"] for p in rows])
        advantages = group_advantages(scores, group, f.scale_rewards)
        mask = out.completion_mask
        if f.mask_truncated_completions:
            mask = mask * (~out.truncated)[:, None]
        self._record(scores, group, out, means)
        micro = []
        for first in range(0, len(rows), size):
            part = slice(first, first + size)
            batch = {"input_ids": out.input_ids[part], "attention_mask": out.attention_mask[part],
                     "completion_mask": mask[part], "advantages": advantages[part]}
            if f.beta > 0:
                batch["ref_logps"] = self.reference_log_probs(batch).cpu()
            batch["num_tokens"] = int(batch["attention_mask"].sum())
            micro.append(batch)
        return micro

    def reference_log_probs(self, batch: dict) -> torch.Tensor:
        model, width = self.module.model, batch["completion_mask"].shape[1]
        inputs = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        with self.precision.autocast(model):
            if self.reference is not None:
                return completion_log_probs(self.reference, decoder_and_head(self.reference), *inputs, width)[0]
            with model.disable_adapter():
                return completion_log_probs(model, self.module.split, *inputs, width)[0]

    def _record(self, scores, group: int, out, means: dict) -> None:
        stats = {"reward": scores.mean().item(), "reward_std": scores.view(-1, group).std(1).mean().item(),
                 "completion_length": out.completion_mask.sum(1).float().mean().item(),
                 "truncated_ratio": out.truncated.float().mean().item(), **means}
        self.stats.add(stats, out)

    def log_metrics(self) -> dict[str, float]:
        """Means over the rollouts since the last call, with generation speed and its share of the time."""
        return self.stats.flush()


def encode_prompts(cfg, tokenizer) -> tuple[list[dict], list[dict]]:
    """(training prompts, evaluation prompts), each with its token ids (conversation + assistant header, keeping
    the last cutoff_len tokens), the text of its last user turn (what reward functions get as the prompt) and its
    extra columns."""
    d = cfg.data
    template = data_template(d, tokenizer)

    def encode(e) -> dict:
        pieces = tokenize_pieces(tokenizer, render(e, tokenizer, template, d.default_system))
        ids = [token for piece in pieces for token in piece]
        return {"ids": ids[-d.cutoff_len:], "text": e.messages[-1]["content"], "extra": e.extra}
    train, evaluation = load_splits(cfg)
    return [encode(e) for e in train], [encode(e) for e in evaluation]


@dataclass
class RewardEvaluation:
    """The mean reward (and each reward function's) of one greedy completion per evaluation prompt (an
    evaluation.Evaluation): each process completes its share of the prompts, the main process scores them all
    (reward functions run once per completion), and every process gets the metrics."""
    cfg: object
    prompts: list[dict]
    rewards: list
    source: RolloutSteps
    accelerator: object
    metric: str = "eval_reward"

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        s, accelerator = self.source, self.accelerator
        mine = my_share(list(range(len(self.prompts))), accelerator)
        completions = [text for _, out in greedy_rollouts(
            s.module.model, [self.prompts[i] for i in mine], self.cfg, self.cfg.finetune.max_completion_length,
            s.stop_ids, s.tokenizer, s.precision) for text in out.completions]
        done = sorted(zip(mine, completions))
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            done = sorted(gather_object(done))
        metrics = [None]
        if accelerator.is_main_process:
            total, means = reward_functions.score(self.rewards, [p["text"] for p in self.prompts],
                                                  [text for _, text in done], [p["extra"] for p in self.prompts])
            metrics = [{"eval_reward": total.mean().item(), **{f"eval_{k}": v for k, v in means.items()}}]
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(metrics)
        return metrics[0]


def run(cfg) -> dict:
    f, t = cfg.finetune, cfg.train
    accelerator, tokenizer = start(cfg)
    prompts, eval_prompts = encode_prompts(cfg, tokenizer)
    if t.do_train and not prompts:
        raise DataError(f"dataset `{cfg.data.dataset}` gave no prompts")
    rewards = reward_functions.load_rewards(cfg, tokenizer)
    resume = guard_output_dir(cfg, accelerator)
    model = prepare_model(cfg, accelerator)
    module = GRPOLoss(model, f).to(accelerator.device)
    reference = reference_model(cfg, accelerator.device, needed=f.beta > 0)
    source = RolloutSteps(cfg, module, tokenizer, prompts, rewards, reference, accelerator)
    accelerator.print(f"[tuneforge] {len(prompts)} prompts, {source.per_step} per step x {f.num_generations} "
                      f"completions; rewards: {', '.join(f'{r.name} x {r.weight:g}' for r in rewards)}; loss_type "
                      f"{f.loss_type}, beta {f.beta:g}")
    evaluation = RewardEvaluation(cfg, eval_prompts, rewards, source, accelerator) if eval_prompts else None
    before = evaluation() if t.do_eval and t.do_train and evaluation else None
    return train_and_evaluate(cfg, module, tokenizer, source, [], accelerator, resume, collator=None,
                              evaluation=evaluation, before=before)
