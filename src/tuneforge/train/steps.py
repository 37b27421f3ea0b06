"""The two contracts of the training loop, written down: what a loss module is, and where steps come from.

A loss module (LossModule) holds the trainable model and turns one collated micro-batch into a loss sum and
metric sums. A step source (StepSource) hands out, for every optimizer step, that step's micro-batches: fixed
epochs over in-memory rows (RowSteps), rows read as training goes (StreamSteps), or rollouts an RL recipe
generates with the policy being trained.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import torch
from torch.utils.data import DataLoader

from ..config import ConfigError, order_seed
from .faults import rows_signature
from .stages import STAGES


class LossModule(Protocol):
    unit: str  # what `units` counts: "token", "pair", "example", "completion token"
    model: torch.nn.Module  # the trainable model (PEFT-wrapped for LoRA); saved as the adapter or full model
    # modules trained besides `model`, saved beside it under these file names (a reward model's value head);
    # empty for most stages
    extra: dict[str, torch.nn.Module]

    def units(self, batch: dict) -> torch.Tensor:
        """How many normalisation units the micro-batch holds (counted on the CPU: no device sync)."""

    def __call__(self, **batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss summed over the batch's units, metric sums); the loop divides both by the step's units, except
        a metric `<what>/<part>` (or `<part>`) that comes with a `count/<part>` sum: that count divides it
        (metric_means)."""


def metric_means(sums: dict[str, float], units: float) -> dict[str, float]:
    """Metric sums over a step, log interval or evaluation as the means the log reports. KTO's desirable and
    undesirable answers are each a share of the batch, so their rewards are summed with a count of their own
    (`count/chosen`): divided by it, and left out where that count is 0; the counts themselves are not reported.
    compute_accuracy's per-example accuracy is divided by its examples (`count/accuracy`) likewise. With both KTO
    rewards, `rewards/margins` is the chosen mean less the rejected mean, as TRL and LLaMA-Factory log it."""
    counts = {key.removeprefix("count/"): value for key, value in sums.items() if key.startswith("count/")}
    means = {}
    for key, value in sums.items():
        part = key.rsplit("/", 1)[-1]
        if key.startswith("count/") or counts.get(part, 1) == 0:
            continue
        means[key] = value / (counts[part] if part in counts else units)
    if "chosen" in counts and "rewards/chosen" in means and "rewards/rejected" in means:
        means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
    return means


def unwrapped(module) -> LossModule:
    """The loss module inside a DDP wrapper (or the module itself)."""
    return getattr(module, "module", module)


class StepSource(Protocol):
    steps_per_epoch: int  # optimizer steps in one pass over the data; 0 when unknown (a stream)
    num_examples: int  # checked on resume: a checkpoint continues only on the same data (0: not counted)
    signature: str | None  # likewise: a hash of the rows, or of the streamed files' names and sizes
    # a checkpoint resumes only where the epoch's step count is a multiple of this (a ppo rollout's updates): a stop
    # signal trains on to such a step before it saves; 1 for the other sources
    resumes_every: int
    # for each micro-batch of the step last handed out, where its examples are in the data (row indices, stream
    # positions), so that an error can name them
    step_rows: list[list]

    def steps(self, state) -> Iterator[list[dict]]:
        """Each optimizer step's collated micro-batches (each with `num_tokens`), from the position `state` holds
        on. The loop moves `state.epoch` / `step_in_epoch` at the end of a known-length epoch; a source of unknown
        length moves them itself."""

    def log_metrics(self) -> dict[str, float]:
        """What the source itself measured since the last call (rollouts: rewards, lengths, generation speed),
        for the log line; empty for data read from files."""


class SplittableSteps(StepSource, Protocol):
    """A source of rows of data (not rollouts), whose micro-batches auto_find_batch_size can make smaller."""

    def smaller(self) -> list[dict] | None:
        """Halve the micro-batches from the step last handed out on: that step's rows again, in micro-batches of
        half as many rows (`step_rows` follows); None when they hold one row each already."""


class RowSteps:
    """Epochs over encoded rows in memory: the same shuffled micro-batches on every run, so resume is exact."""

    resumes_every = 1

    def __init__(self, rows: list[dict], t, collator, shuffle: bool, rank: int = 0, world: int = 1):
        import math

        self.rows, self.t, self.collator, self.shuffle, self.rank, self.world = rows, t, collator, shuffle, rank, world
        micro = batches_per_epoch(len(rows), t.per_device_train_batch_size * world, t.dataloader_drop_last)
        self.steps_per_epoch = math.ceil(micro / t.gradient_accumulation_steps)
        self.num_examples, self.signature, self.step_rows = len(rows), rows_signature(rows), []
        self.size = t.per_device_train_batch_size  # rows per micro-batch at most (auto_find_batch_size lowers it)
        self.lengths = [row_length(row) for row in rows] if t.length_grouped else None
        if self.lengths is not None and not any(self.lengths):
            raise ConfigError(f"{t.length_grouping_key} groups rows by their number of tokens, and these rows hold "
                              "no tokens (images): remove it")

    def log_metrics(self) -> dict[str, float]:
        return {}

    def steps(self, state) -> Iterator[list[dict]]:
        t = self.t
        while True:
            batches = epoch_batches(len(self.rows), t.per_device_train_batch_size, order_seed(t), state.epoch,
                                    self.shuffle, self.rank, self.world, self.lengths, t.dataloader_drop_last)
            groups = [_even(batches[i: i + t.gradient_accumulation_steps])
                      for i in range(0, len(batches), t.gradient_accumulation_steps)]
            first = state.step_in_epoch
            while first < len(groups):  # once, unless auto_find_batch_size makes the micro-batches smaller
                size = self.size
                flat = [piece for group in groups[first:] for piece in _pieces(group, size)]
                # a private generator: creating an iterator must not draw from the global RNG that dropout uses,
                # or a resumed run would see different random numbers than an uninterrupted one
                loader = iter(DataLoader(self.rows, batch_sampler=flat, collate_fn=self.collator,
                                         generator=torch.Generator(), **loader_options(t)))
                for group in groups[first:]:
                    self.step_rows = _pieces(group, size)
                    yield [next(loader) for _ in self.step_rows]
                    first += 1
                    if self.size != size:
                        break

    def smaller(self) -> list[dict] | None:
        if max(map(len, self.step_rows)) == 1:
            return None
        self.size = -(-max(map(len, self.step_rows)) // 2)
        self.step_rows = _pieces(self.step_rows, self.size)
        return [self.collator([self.rows[i] for i in piece]) for piece in self.step_rows]


def loader_options(t) -> dict:
    """HF's dataloader_* keys as torch's DataLoader takes them; as in HF's Trainer, the workers' options only
    with workers, and pinned memory only where there is a GPU to copy to (config.notices says when they do
    nothing)."""
    out = {"num_workers": t.dataloader_num_workers,
           "pin_memory": t.dataloader_pin_memory and torch.cuda.is_available()}
    if t.dataloader_num_workers:
        out.update(prefetch_factor=t.dataloader_prefetch_factor,
                   multiprocessing_context=t.dataloader_multiprocessing_context)
    return out


def loader_notices(cfg) -> list[str]:
    t, out = cfg.train, []
    workers = (("dataloader_prefetch_factor", t.dataloader_prefetch_factor is not None),
               ("dataloader_multiprocessing_context", t.dataloader_multiprocessing_context is not None))
    if cfg.data.streaming:
        out += [f"note: `{key}` has no effect with streaming: streamed rows are collated in the training process"
                for key, on in (("dataloader_num_workers", t.dataloader_num_workers > 0), *workers) if on]
        if t.dataloader_drop_last:
            out.append("note: `dataloader_drop_last` has no effect with streaming: batches run on from one pass over "
                       "the data into the next, so none is left incomplete")
    elif not t.dataloader_num_workers:
        out += [f"note: `{key}` has no effect without workers (dataloader_num_workers: 0)" for key, on in workers if on]
    return out


def auto_batch_problems(cfg) -> list[str]:
    """The rules of auto_find_batch_size (the loop refuses it with several processes, which it sees first)."""
    f, out = cfg.finetune, []
    if not cfg.train.auto_find_batch_size:
        return out
    if f.stage in STAGES and STAGES[f.stage].data == "prompt":
        out.append(f"`auto_find_batch_size` makes micro-batches of rows of data smaller; stage {f.stage} trains on "
                   "completions it generates: lower per_device_train_batch_size instead")
    if f.galore_layerwise or f.apollo_layerwise:
        out.append("`auto_find_batch_size` runs a step that ran out of memory again, and galore_layerwise / "
                   "apollo_layerwise update weights inside backward, before the step is complete: set one")
    return out


def _even(group: list[list[int]]) -> list[list[int]]:
    """A step's rows spread evenly over its micro-batches. Only an epoch's last step changes: [4, 1] becomes [2, 3].
    Its gradient is the same (the loss is normalised over the whole step), and a compiled model is not compiled
    again for a micro-batch of one row (torch specialises size 1: 20 s more on SmolLM2-135M's last step)."""
    rows = [index for batch in group for index in batch]
    return [rows[j * len(rows) // len(group): (j + 1) * len(rows) // len(group)] for j in range(len(group))]


def _pieces(micro: list[list], size: int) -> list[list]:
    """Each micro-batch cut into as few evenly sized pieces of at most `size` rows as it takes."""
    out = []
    for rows in micro:
        n = -(-len(rows) // size)
        out += [rows[j * len(rows) // n: (j + 1) * len(rows) // n] for j in range(n)]
    return out


def batches_per_epoch(n: int, span: int, drop_last: bool) -> int:
    """How many global batches of `span` rows an epoch of `n` rows has (see epoch_batches)."""
    if drop_last and n < span:
        raise ConfigError(f"dataloader_drop_last: the {n} training rows do not fill one batch of {span} "
                          "(per_device_train_batch_size x processes), so every epoch would be empty: lower the "
                          "batch size or remove dataloader_drop_last")
    return n // span if drop_last else -(-n // span)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool, rank: int = 0,
                  world: int = 1, lengths: list[int] | None = None, drop_last: bool = False) -> list[list[int]]:
    """This process's micro-batches (lists of example indices) for one epoch; the same on every run. With
    `lengths` (group_by_length), rows of about the same length share micro-batches; with `drop_last`, the last
    global batch is left out when incomplete."""
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    else:
        order = list(range(n))
    span = batch_size * world
    if lengths is not None:
        order = _grouped_by_length(order, lengths, span)
    if drop_last:
        order = order[: n - n % span]
    elif world > 1 and n % span:  # every process needs the same number of non-empty micro-batches
        order += order[: span - n % span]
    return [order[start + rank * batch_size: start + (rank + 1) * batch_size] for start in range(0, len(order), span)]


def row_length(row: dict) -> int:
    """The width a row pads a micro-batch to: its longest token list (a pair's longer sequence)."""
    return max((len(value) for value in row.values() if isinstance(value, list)), default=0)


def _grouped_by_length(order: list[int], lengths: list[int], span: int) -> list[int]:
    """`order` cut into groups of up to 50 global batches (fewer for small data, so that at least four groups are
    left: Hugging Face's LengthGroupedSampler's rule), each sorted longest first; the group holding the longest row
    goes first, so a run that does not fit in memory stops at its first step."""
    size = span * max(1, min(len(order) // (span * 4), 50))
    groups = [sorted(order[i: i + size], key=lengths.__getitem__, reverse=True) for i in range(0, len(order), size)]
    groups.insert(0, groups.pop(max(range(len(groups)), key=lambda g: lengths[groups[g][0]])))
    return [index for group in groups for index in group]


class StreamSteps:
    """Rows of a RowStream (streaming: true), read until max_steps. Every process reads the same rows and keeps
    its own share; the state's stream position moves with every step handed out, so resume is exact."""

    steps_per_epoch, num_examples, resumes_every = 0, 0, 1

    def __init__(self, stream, t, collator, rank: int = 0, world: int = 1):
        self.stream, self.t, self.collator, self.rank, self.world = stream, t, collator, rank, world
        self.signature, self.step_rows = stream.signature(), []
        self.size = t.per_device_train_batch_size  # rows per micro-batch at most (auto_find_batch_size lowers it)
        self.step = []  # the rows of the step last handed out, by micro-batch

    def log_metrics(self) -> dict[str, float]:
        return {}

    def steps(self, state) -> Iterator[list[dict]]:
        rows = self.stream.rows(state.stream_position or (0, 0, 0))
        size, rank = self.t.per_device_train_batch_size, self.rank
        while True:
            step = []
            for _ in range(self.t.gradient_accumulation_steps):
                taken = [next(rows) for _ in range(size * self.world)]
                step.append(taken[rank * size: (rank + 1) * size])
            state.stream_position = taken[-1][1]
            if state.stream_position[0] != state.epoch:  # a new pass over the data began
                state.epoch, state.step_in_epoch = state.stream_position[0], 0
            yield self._collated(_pieces(step, self.size))

    def _collated(self, step: list[list]) -> list[dict]:
        """The step's micro-batches collated; its rows and their positions kept for smaller() and for errors."""
        self.step = step
        self.step_rows = [[list(position) for _, position in piece] for piece in step]
        return [self.collator([row for row, _ in piece]) for piece in step]

    def smaller(self) -> list[dict] | None:
        if max(map(len, self.step)) == 1:
            return None
        self.size = -(-max(map(len, self.step)) // 2)
        return self._collated(_pieces(self.step, self.size))


def rows_source(data, t, collator, shuffle: bool, accelerator) -> StepSource:
    """The step source of a recipe's training data: rows in memory, a RowStream, or a source already."""
    from ..data.stream import RowStream

    rank, world = accelerator.process_index, accelerator.num_processes
    if isinstance(data, list):
        return RowSteps(data, t, collator, shuffle, rank, world)
    if isinstance(data, RowStream):
        return StreamSteps(data, t, collator, rank, world)
    return data
