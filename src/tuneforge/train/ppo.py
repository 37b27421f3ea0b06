"""Recipe for stage `ppo`: PPO against a reward model, with LLaMA-Factory's keys and TRL's PPOTrainer formulas.

Every rollout: take `ppo_buffer_size` x (batch size x accumulation) prompts, sample one completion each with the
policy being trained, score prompt + completion with the reward model, and give every completion token the reward
-kl_coef x (logp - ref_logp), plus the score at its last token. GAE turns those rewards and the policy's value head
into advantages and returns. Then `ppo_epochs` passes over the buffer, one optimizer step per (batch size x
accumulation) completions: clipped policy loss + VF_COEF x clipped value loss. After each rollout the adaptive KL
controller moves kl_coef towards `ppo_target`. The rollouts are the loop's source of steps (PPOSteps), so logging,
checkpoints and exact resume are the loop's own; one loop step is one optimizer update.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import ConfigError, order_seed, shuffles_rows
from ..data import DataError
from ..data.templates import data_template, stop_token_ids
from ..models.adapters import pissa_init_of
from ..models.load import ModelError
from .common import dropout_off, guard_output_dir, prepare_model, reference_model, start, train_and_evaluate
from .grpo import encode_prompts
from .loop import Precision
from .losses import (adaptive_kl_coef, clipped_policy_loss, clipped_value_loss, completion_log_probs,
                     completion_outputs, decoder_and_head, generalised_advantages, kl_penalised_rewards, masked_whiten)
from .rm import VALUE_HEAD, ValueHead, load_reward_model
from .rollout import RolloutStats, generate, greedy_rollouts, my_share
from .stages import rollout_problems
from .steps import epoch_batches

# TRL PPOConfig defaults, which LLaMA-Factory's PPO keeps (it exposes none of them as keys)
GAMMA, LAM = 1.0, 0.95  # GAE discount and lambda
INIT_KL_COEF, KL_HORIZON = 0.2, 10000  # the adaptive KL controller's start and horizon
CLIP_RANGE, VALUE_CLIP_RANGE, VF_COEF = 0.2, 0.2, 0.1
# the policy's value head; not value_head.safetensors, which marks a reward model (rm output, export)
POLICY_VALUE_HEAD = "ppo_value_head.safetensors"
REWARD_ADAPTER = "reward"  # reward_model_type lora: the reward adapter's name beside the policy's `default`
API_TIMEOUT_S = 120


def check(cfg) -> list[str]:
    f, t = cfg.finetune, cfg.train
    out = rollout_problems(cfg) + _reward_model_problems(f)
    updates = f.ppo_epochs * f.ppo_buffer_size
    if f.ppo_epochs < 1 or f.ppo_buffer_size < 1:
        out.append(f"`ppo_epochs` and `ppo_buffer_size` must be at least 1; got {f.ppo_epochs} and "
                   f"{f.ppo_buffer_size}")
    elif t.save_strategy == "steps" and (t.save_steps < 1 or t.save_steps % updates):
        out.append(f"`save_steps` ({t.save_steps:g}) must be a multiple of ppo_epochs x ppo_buffer_size ({updates}), "
                   "not a share of the run's steps: a checkpoint is taken between rollouts, so that resume continues "
                   "exactly")
    if f.ppo_target <= 0:
        out.append(f"`ppo_target` (the KL the adaptive controller aims at) must be above 0; got {f.ppo_target}")
    if not t.do_train:
        out.append("stage ppo only trains: set `do_train: true` (do_eval scores held-out prompts before and after)")
    return out


def _reward_model_problems(f) -> list[str]:
    kind, path = f.reward_model_type, f.reward_model
    if not path:
        return ["stage ppo needs `reward_model`: the output_dir of a `stage: rm` run (or, with reward_model_type: "
                "api, the URL of a scoring server)"]
    out = [] if kind == "full" or not f.reward_model_quantization_bit else [
        "`reward_model_quantization_bit` quantises a reward_model_type full model; " +
        ("the lora reward adapter sits on the policy's own base, quantised by quantization_bit" if kind == "lora" else
         "an api reward model is a server, not a model loaded here") + ": remove it"]
    if kind == "api":
        ok = path.startswith(("http://", "https://"))
        return out + ([] if ok else [f"reward_model_type api needs `reward_model` to be an http(s) URL; got {path!r}"])
    if kind == "lora":
        if f.finetuning_type != "lora":
            out.append("reward_model_type lora puts the reward adapter on the policy's own base, which needs "
                       f"finetuning_type lora; you set {f.finetuning_type}: use reward_model_type full")
        if f.reward_model_adapters:
            out.append("`reward_model_adapters` is for reward_model_type full; with lora, `reward_model` is the "
                       "reward adapter itself")
        if f.pissa_init or pissa_init_of(path):
            changed = "pissa_init turns it into PiSSA's residual" if f.pissa_init else \
                f"{path} is a PiSSA adapter, whose loading subtracts its start from that base"
            out.append(f"reward_model_type lora puts the reward adapter on the policy's own base, and {changed}: use "
                       "reward_model_type full")
        if not (Path(path) / "adapter_config.json").is_file():
            out.append(f"reward_model {path} is not a LoRA adapter (no adapter_config.json): point it at the "
                       "output_dir of a LoRA `stage: rm` run, or use reward_model_type full")
    head_folder = (f.reward_model_adapters or "").split(",")[-1].strip() or path
    if not (Path(head_folder) / VALUE_HEAD).is_file():
        out.append(f"{head_folder} has no {VALUE_HEAD}: the reward model must be the output_dir of a `stage: rm` run")
    return out


# ---- the policy with its value head ----

def policy_forward(model, split, value_head, input_ids, attention_mask, width: int, with_entropy: bool = False):
    """(log-probability of each of the last `width` tokens, their entropies or None, the value of the state before
    each of them), for rows laid out as [left-padded prompt | completion]."""
    logps, entropy, hidden = completion_outputs(model, split, input_ids, attention_mask, width, with_entropy)
    return logps, entropy, value_head(hidden.to(value_head.weight.dtype)).squeeze(-1).float()


class PPOLoss(torch.nn.Module):
    unit = "completion_token"  # losses are token means over the optimizer step's completion tokens

    def __init__(self, model):
        super().__init__()
        self.model, self.split = model, decoder_and_head(model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.value_head = ValueHead(base.config.hidden_size)
        self.extra = {POLICY_VALUE_HEAD: self.value_head}

    @staticmethod
    def units(batch: dict) -> torch.Tensor:
        return batch["completion_mask"].sum()

    def forward(self, input_ids, attention_mask, completion_mask, old_logps, old_values, advantages, returns):
        logps, entropy, values = policy_forward(self.model, self.split, self.value_head, input_ids, attention_mask,
                                                completion_mask.shape[1], with_entropy=True)
        mask = completion_mask.float()
        policy, clipped = clipped_policy_loss(logps, old_logps, advantages, CLIP_RANGE)
        value, value_clipped = clipped_value_loss(values, old_values, returns, VALUE_CLIP_RANGE)
        metrics = {"policy_loss": policy.detach(), "value_loss": value.detach(), "clip_fraction": clipped.float(),
                   "value_clip_fraction": value_clipped.float(), "entropy": entropy.detach(),
                   "approx_kl": 0.5 * (logps.detach() - old_logps) ** 2}
        return ((policy + VF_COEF * value) * mask).sum(), {k: (v * mask).sum() for k, v in metrics.items()}


# ---- the reward model: each kind is a callable (input_ids, attention_mask, prompts, completions) -> scores ----

@torch.no_grad()
def last_token_scores(decoder, head, input_ids, attention_mask) -> torch.Tensor:
    """The value head at each row's last non-padding token (rows: left-padded prompt | right-padded completion)."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state
    last = (attention_mask * torch.arange(attention_mask.shape[1], device=attention_mask.device)).argmax(1)
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return head(picked.to(head.weight.dtype)).squeeze(-1).float()


class AdapterReward:
    """reward_model_type lora: the reward adapter, loaded onto the policy's own base as a second adapter, is switched
    on just for scoring; no second model."""

    def __init__(self, policy, folder: str, device):
        from safetensors.torch import load_file

        policy.load_adapter(folder, adapter_name=REWARD_ADAPTER, is_trainable=False)
        self.policy, self.decoder = policy, policy.get_base_model().get_decoder()
        self.head = ValueHead(policy.get_base_model().config.hidden_size).requires_grad_(False)
        self.head.load_state_dict(load_file(Path(folder) / VALUE_HEAD))
        self.head.to(device)

    def __call__(self, input_ids, attention_mask, prompts, completions) -> torch.Tensor:
        trained = self.policy.active_adapter
        self.policy.set_adapter(REWARD_ADAPTER, inference_mode=True)
        try:
            return last_token_scores(self.decoder, self.head, input_ids, attention_mask)
        finally:  # the trained adapter is active (and trainable) again
            self.policy.set_adapter(trained)


class ModelReward:
    """reward_model_type full: a separate reward model (full, or its own base + the reward adapter)."""

    def __init__(self, cfg, accelerator):
        f = cfg.finetune
        m = replace(cfg.model, quantization_bit=f.reward_model_quantization_bit)
        if f.reward_model_adapters:
            model_args = replace(m, model_name_or_path=f.reward_model, adapter_name_or_path=f.reward_model_adapters)
        elif (Path(f.reward_model) / "adapter_config.json").is_file():  # a LoRA rm output: on the policy's base
            model_args = replace(m, adapter_name_or_path=f.reward_model)
        else:
            model_args = replace(m, model_name_or_path=f.reward_model, adapter_name_or_path=None)
        rm_cfg = replace(cfg, model=model_args, train=replace(cfg.train, do_train=False))
        self.module = load_reward_model(rm_cfg, accelerator).requires_grad_(False).to(accelerator.device)

    def __call__(self, input_ids, attention_mask, prompts, completions) -> torch.Tensor:
        return last_token_scores(self.module.decoder[0], self.module.value_head, input_ids, attention_mask)


class ApiReward:
    """reward_model_type api: POST {"model", "messages": [prompt + completion texts], "prompts", "completions"} as
    JSON to the `reward_model` URL; the reply is {"scores": [one number per text]} (LLaMA-Factory's contract,
    with our two extra fields)."""

    def __init__(self, url: str, tokenizer):
        self.url, self.tokenizer = url, tokenizer

    def __call__(self, input_ids, attention_mask, prompts, completions) -> torch.Tensor:
        texts = [self.tokenizer.decode([t for t, keep in zip(row.tolist(), mask.tolist()) if keep])
                 for row, mask in zip(input_ids, attention_mask)]
        body = json.dumps({"model": "tuneforge", "messages": texts, "prompts": prompts,
                           "completions": completions}).encode()
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=API_TIMEOUT_S) as reply:
                scores = json.loads(reply.read())["scores"]
        except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as err:
            raise ModelError(f"reward_model {self.url}: no scores ({err}); the server must answer the POST with JSON "
                             "{\"scores\": [one number per text]}") from None
        if not isinstance(scores, list) or len(scores) != len(texts):
            raise ModelError(f"reward_model {self.url}: sent {len(texts)} texts, got back "
                             f"{len(scores) if isinstance(scores, list) else type(scores).__name__} scores")
        return torch.tensor([float(s) for s in scores], device=input_ids.device)


def load_reward(cfg, policy, tokenizer, accelerator):
    kind = cfg.finetune.reward_model_type
    if kind == "api":
        return ApiReward(cfg.finetune.reward_model, tokenizer)
    if kind == "lora":
        return AdapterReward(policy, cfg.finetune.reward_model, accelerator.device)
    return ModelReward(cfg, accelerator)


# ---- rollouts: the loop's source of steps ----

class PPOSteps:
    """Every rollout: generate and score a buffer of completions, then hand out ppo_epochs x ppo_buffer_size
    optimizer steps over it (reshuffled every pass). Incomplete last buffers of an epoch are dropped, as TRL's
    PPO dataloader does. The KL coefficient and the score statistics live in the loop's state (checkpointed)."""

    signature = None

    def __init__(self, cfg, module: PPOLoss, reference, reward, tokenizer, prompts: list[dict], accelerator):
        t, f = cfg.train, cfg.finetune
        self.cfg, self.module, self.reference, self.reward, self.tokenizer = cfg, module, reference, reward, tokenizer
        self.prompts, self.device, self.accelerator = prompts, accelerator.device, accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps
        self.per_rollout = self.per_step * f.ppo_buffer_size
        self.updates = self.resumes_every = f.ppo_epochs * f.ppo_buffer_size  # optimizer steps per rollout
        self.rollouts_per_epoch = len(prompts) // (self.per_rollout * self.world)
        self.steps_per_epoch, self.num_examples = self.rollouts_per_epoch * self.updates, len(prompts)
        template = data_template(cfg.data, tokenizer)
        self.stop_ids = stop_token_ids(template, tokenizer)
        self.precision = Precision(t, accelerator.device)
        self.kl_coef, self.moments = INIT_KL_COEF, [0.0, 1.0, 1e-24]  # score mean, variance, count (TRL's start)
        self.stats, self.last = RolloutStats(), {}

    def steps(self, state):
        if state.step_in_epoch % self.updates:
            raise ConfigError(f"the checkpoint at step {state.global_step} was taken inside a rollout buffer; resume "
                              f"from one whose step is a multiple of {self.updates} (ppo_epochs x ppo_buffer_size)")
        self.kl_coef = state.extra.get("kl_coef", self.kl_coef)
        self.moments = state.extra.get("score_moments", self.moments)
        t, size = self.cfg.train, self.cfg.train.per_device_train_batch_size
        while True:
            batches = epoch_batches(len(self.prompts), self.per_rollout, order_seed(t), state.epoch,
                                    shuffles_rows(self.cfg), self.rank, self.world)
            for indices in batches[: self.rollouts_per_epoch][state.step_in_epoch // self.updates:]:
                buffer = self.rollout([self.prompts[i] for i in indices])
                state.extra.update(kl_coef=self.kl_coef, score_moments=self.moments)  # saved with the checkpoint
                for _ in range(self.cfg.finetune.ppo_epochs):
                    order = torch.randperm(self.per_rollout)
                    for first in range(0, self.per_rollout, self.per_step):
                        rows = order[first: first + self.per_step]
                        yield [_micro_batch(buffer, rows[i: i + size]) for i in range(0, len(rows), size)]

    @torch.no_grad()
    def rollout(self, prompts: list[dict]) -> dict:
        """The buffer: completions with old log-probs, values, rewards, advantages and returns, on the CPU."""
        model, f, size = self.module.model, self.cfg.finetune, self.cfg.train.per_device_train_batch_size
        out = generate(model, [p["ids"] for p in prompts], self.cfg.generate, self.cfg.generate.max_new_tokens,
                       self.stop_ids, self.tokenizer, self.precision.autocast(model))
        width, parts = out.completion_mask.shape[1], []
        was_training = self.module.training
        self.module.eval()  # no dropout in the old log-probs and values the losses compare with
        for first in range(0, len(prompts), size):
            rows = slice(first, first + size)
            ids, mask = out.input_ids[rows].to(self.device), out.attention_mask[rows].to(self.device)
            with self.precision.autocast(model):  # a context is entered once: a new one each time
                logps, _, values = policy_forward(model, self.module.split, self.module.value_head, ids, mask, width)
                ref_logps = self.reference_log_probs(ids, mask, width)
                scores = self.reward(ids, mask, [p["text"] for p in prompts[rows]], out.completions[rows])
            parts.append([x.float().cpu() for x in (logps, values, ref_logps, scores)])
        self.module.train(was_training)
        logps, values, ref_logps, scores = (torch.cat(x) for x in zip(*parts))
        mask = out.completion_mask.float()
        raw_scores = scores
        if f.ppo_score_norm:  # the running statistics take every process's scores, as TRL's do
            scores = self._normalise(scores, self._gather(scores))
        rewards, kl = kl_penalised_rewards(scores, logps, ref_logps, mask, self.kl_coef)
        if f.ppo_whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = generalised_advantages(rewards, values, mask, GAMMA, LAM)
        advantages = masked_whiten(advantages, mask)
        mean_kl = self._gather(kl.sum(1)).mean().item()  # one KL coefficient for every process
        self.stats.add({"reward": raw_scores.mean().item(), "kl": mean_kl, "kl_coef": self.kl_coef,
                        "response_length": mask.sum(1).mean().item()}, out)
        # TRL updates the controller after the epochs over this rollout; it is used for the next rollout's rewards
        self.kl_coef = adaptive_kl_coef(self.kl_coef, mean_kl, f.ppo_target, self.per_rollout * self.world,
                                        KL_HORIZON)
        return {"input_ids": out.input_ids, "attention_mask": out.attention_mask,
                "completion_mask": out.completion_mask,
                "old_logps": logps, "old_values": values, "advantages": advantages, "returns": returns}

    def reference_log_probs(self, ids, mask, width: int) -> torch.Tensor:
        if self.reference is not None:
            return completion_log_probs(self.reference, decoder_and_head(self.reference), ids, mask, width)[0]
        with self.module.model.disable_adapter():
            return completion_log_probs(self.module.model, self.module.split, ids, mask, width)[0]

    def _gather(self, values: torch.Tensor) -> torch.Tensor:
        """`values` of every process, concatenated (each process's are the same shape)."""
        return self.accelerator.gather(values.to(self.device)).cpu() if self.world > 1 else values

    def _normalise(self, scores: torch.Tensor, all_scores: torch.Tensor) -> torch.Tensor:
        """ppo_score_norm: (score - running mean) / running std over every process's scores so far, TRL's
        use_score_scaling + use_score_norm."""
        mean, variance, count = self.moments
        batch_var, batch_mean = torch.var_mean(all_scores, unbiased=False)
        n, delta = all_scores.numel(), batch_mean.item() - mean
        total = count + n
        variance = (variance * count + delta ** 2 * count * n / total + batch_var.item() * n) / total
        mean += delta * n / total
        self.moments = [mean, variance, total]
        std = math.sqrt(variance * total / (total - 1)) if total > 1 else 1.0
        return (scores - mean) / (std + torch.finfo(scores.dtype).eps)

    def log_metrics(self) -> dict[str, float]:
        """Means over the rollouts since the last call (the last one's when it is still being trained on), with
        generation speed and its share of the wall time."""
        self.last = self.stats.flush() or self.last
        return self.last


def _micro_batch(buffer: dict, rows: torch.Tensor) -> dict:
    batch = {key: value[rows] for key, value in buffer.items()}
    batch["num_tokens"] = int(batch["attention_mask"].sum())
    return batch


# ---- evaluation and the recipe ----

@dataclass
class RewardModelEvaluation:
    """The mean reward score of one greedy completion per evaluation prompt (an evaluation.Evaluation): each
    process completes and scores its share of the prompts; the sums are added up across processes."""
    cfg: object
    prompts: list[dict]
    source: PPOSteps
    accelerator: object
    metric: str = "eval_reward"

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        s, model = self.source, self.source.module.model
        was_training = s.module.training
        s.module.eval()
        mine = my_share(self.prompts, self.accelerator)
        total = torch.tensor([0.0, len(mine)], device=s.device)  # score sum, prompts
        for chunk, out in greedy_rollouts(model, mine, self.cfg, self.cfg.generate.max_new_tokens, s.stop_ids,
                                          s.tokenizer, s.precision):
            with s.precision.autocast(model):
                scores = s.reward(out.input_ids.to(s.device), out.attention_mask.to(s.device),
                                  [p["text"] for p in chunk], out.completions)
            total[0] += scores.sum().float().to(s.device)
        s.module.train(was_training)
        total = self.accelerator.reduce(total, "sum") if self.accelerator.num_processes > 1 else total
        return {"eval_reward": (total[0] / total[1].clamp(min=1)).item()}


def setup(cfg, accelerator, tokenizer) -> tuple[PPOLoss, torch.nn.Module | None, object]:
    """(the policy with its value head, the reference or None (LoRA: the adapter switched off), the reward)."""
    model = prepare_model(cfg, accelerator)
    dropout_off(model, accelerator)
    module = PPOLoss(model).to(accelerator.device)
    reference = reference_model(cfg, accelerator.device)
    return module, reference, load_reward(cfg, module.model, tokenizer, accelerator)


def run(cfg) -> dict:
    f, t = cfg.finetune, cfg.train
    accelerator, tokenizer = start(cfg)
    prompts, eval_prompts = encode_prompts(cfg, tokenizer)
    per_rollout = t.per_device_train_batch_size * t.gradient_accumulation_steps * f.ppo_buffer_size
    if len(prompts) < per_rollout * accelerator.num_processes:
        raise DataError(f"dataset `{cfg.data.dataset}` gave {len(prompts)} prompts; one rollout needs "
                        f"{per_rollout * accelerator.num_processes} (batch size x accumulation x ppo_buffer_size x "
                        "processes)")
    resume = guard_output_dir(cfg, accelerator)
    module, reference, reward = setup(cfg, accelerator, tokenizer)
    source = PPOSteps(cfg, module, reference, reward, tokenizer, prompts, accelerator)
    accelerator.print(f"[tuneforge] {len(prompts)} prompts; each rollout samples {source.per_rollout} completions "
                      f"and gives {source.updates} optimizer steps (ppo_epochs {f.ppo_epochs} x ppo_buffer_size "
                      f"{f.ppo_buffer_size}); reward model: {f.reward_model} ({f.reward_model_type})")
    evaluation = RewardModelEvaluation(cfg, eval_prompts, source, accelerator) if eval_prompts else None
    before = evaluation() if t.do_eval and t.do_train and evaluation else None
    return train_and_evaluate(cfg, module, tokenizer, source, [], accelerator, resume, collator=None,
                              evaluation=evaluation, before=before)
