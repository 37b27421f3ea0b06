"""Rollouts for the RL stages: batched sampling from the policy being trained (adapter active, KV cache, left
padding, stop at the template's stop tokens), laid out as rows [left-padded prompt | completion]."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, replace

import torch

from ..data.collate import left_pad
from ..infer.engine import eager_decoding, generation_kwargs
from ..machine import release_free_memory


@dataclass
class Rollout:
    input_ids: torch.Tensor  # [rows, prompt width + completion width]; padding left of prompts, right of completions
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor  # [rows, completion width]: 1 up to and including the stop token
    truncated: torch.Tensor  # [rows] bool: no stop token within the length limit
    completions: list[str]  # decoded, without the stop token and special tokens
    seconds: float  # time spent generating

    @property
    def generated_tokens(self) -> int:
        return int(self.completion_mask.sum())


def completion_mask(completion: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of each row's tokens up to and including its first stop token, whether the row never stopped)."""
    is_stop = torch.isin(completion, torch.tensor(stop_ids, device=completion.device))
    stopped = is_stop.any(1)
    never = torch.full_like(stopped, completion.shape[1], dtype=torch.long)
    first = torch.where(stopped, is_stop.int().argmax(1), never)
    positions = torch.arange(completion.shape[1], device=completion.device)[None]
    return (positions <= first[:, None]).long(), ~stopped


def shared_prompt_cache(model, ids: torch.Tensor, mask: torch.Tensor):
    """The KV cache of all but the last token of left-padded prompts `ids`, computed once per distinct prompt and
    copied to the rows that repeat it (a GRPO group samples one prompt num_generations times), or None when no
    prompt repeats. `generate` continues from it with the full prompts, as from any cache it is given. The prompts'
    forward pass shrinks by the group size: most of a rollout's time with long prompts (bench/rollout_speed.py)."""
    rows = [tuple(row) for row in ids.tolist()]
    distinct = {row: i for i, row in enumerate(dict.fromkeys(rows))}
    if len(distinct) == len(rows) or ids.shape[1] < 2:
        return None
    owner = [distinct[row] for row in rows]
    keep = torch.tensor([owner.index(i) for i in range(len(distinct))], device=ids.device)
    part_ids, part_mask = ids[keep, :-1], mask[keep, :-1]
    positions = (part_mask.long().cumsum(-1) - 1).clamp(min=0)  # as generate numbers left-padded prompts
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
    cache = model(input_ids=part_ids, attention_mask=part_mask, position_ids=positions, use_cache=True,
                  **head).past_key_values
    if not hasattr(cache, "reorder_cache"):  # a model of its own (remote code) may keep its cache its own way
        return None
    cache.reorder_cache(torch.tensor(owner, device=ids.device))  # row i takes its prompt's cache
    return cache


@torch.no_grad()
def generate(model, prompts: list[list[int]], gen, max_new_tokens: int, stop_ids: list[int], tokenizer,
             autocast) -> Rollout:
    """Sample one completion per prompt (repeat a prompt to get several) in one batched call."""
    was_training = model.training
    model.eval()  # no dropout while sampling; the KV cache is used even when training checkpoints activations
    device = next(model.parameters()).device
    ids, mask, _ = left_pad(prompts, tokenizer.pad_token_id)
    kwargs = generation_kwargs(gen, stop_ids, tokenizer.pad_token_id)
    kwargs.update(max_new_tokens=max_new_tokens, use_cache=True)
    started = time.perf_counter()
    with autocast, eager_decoding():
        prompt_ids, prompt_mask = ids.to(device), mask.to(device)
        if gen.num_beams == 1:
            kwargs.update(past_key_values=shared_prompt_cache(model, prompt_ids, prompt_mask))
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs).cpu()
    seconds = time.perf_counter() - started
    model.train(was_training)
    release_free_memory()  # training's activations cannot reuse all of what the KV cache left free
    completion = out[:, ids.shape[1]:]
    if completion.shape[1] == 0:  # nothing generated: keep one padding column so shapes stay valid
        completion = torch.full((len(prompts), 1), tokenizer.pad_token_id, dtype=torch.long)
    keep, truncated = completion_mask(completion, stop_ids)
    completion = torch.where(keep.bool(), completion, tokenizer.pad_token_id)
    texts = [tokenizer.decode([t for t, k in zip(row.tolist(), kept.tolist()) if k and t not in stop_ids],
                              skip_special_tokens=True) for row, kept in zip(completion, keep)]
    return Rollout(input_ids=torch.cat([ids, completion], 1), attention_mask=torch.cat([mask, keep], 1),
                   completion_mask=keep, truncated=truncated, completions=texts, seconds=seconds)


def greedy_rollouts(model, prompts: list[dict], cfg, max_new_tokens: int, stop_ids: list[int], tokenizer, precision):
    """For evaluation: one greedy completion per prompt, in batches of per_device_eval_batch_size; yields each
    batch's prompts with its Rollout."""
    greedy, size = replace(cfg.generate, do_sample=False), cfg.train.per_device_eval_batch_size
    for first in range(0, len(prompts), size):
        chunk = prompts[first: first + size]
        yield chunk, generate(model, [p["ids"] for p in chunk], greedy, max_new_tokens, stop_ids, tokenizer,
                              precision.autocast(model))


def my_share(items: list, accelerator) -> list:
    """This process's part of `items` in a multi-process evaluation (every world-th one)."""
    return items[accelerator.process_index::accelerator.num_processes]


class RolloutStats:
    """Figures of the rollouts since the last log line, averaged, with generation speed and its share of the
    wall time: what an RL step source's `log_metrics` reports."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums, self.count, self.gen_seconds, self.gen_tokens = {}, 0, 0.0, 0
        self.since = time.perf_counter()

    def add(self, stats: dict[str, float], out: Rollout) -> None:
        for key, value in stats.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1
        self.gen_seconds += out.seconds
        self.gen_tokens += out.generated_tokens

    def flush(self) -> dict[str, float]:
        """The means since the last flush (empty when no rollout happened since)."""
        if not self.count:
            return {}
        wall = time.perf_counter() - self.since
        metrics = {k: v / self.count for k, v in self.sums.items()}
        metrics.update(generation_tokens_per_second=self.gen_tokens / max(self.gen_seconds, 1e-9),
                       generation_time_share=self.gen_seconds / max(wall, 1e-9))
        self.reset()
        return metrics
