"""`streaming: true`: training rows made as training reads them, for datasets too big for memory.

The files are read record by record, mixed, shuffled through a buffer of `buffer_size` examples (seeded anew each
epoch), encoded `preprocessing_batch_size` examples at a time (pt: concatenated and cut into blocks per batch; sft
with packing: packed per batch) and handed out row by row. Memory holds the buffer and one batch, never the
dataset. Each pass over the data is an epoch; `max_steps` ends training.

A position (epoch, batch, row) says where the stream stands. Checkpoints store it; a resumed run reads the files
again up to it without tokenising and goes on with exactly the rows the uninterrupted run would have seen.
`val_size` (a count) takes the first examples of epoch 0's order as the evaluation set; they are left out of
training in every epoch.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from typing import Iterator

from ..config import order_seed, shuffles_rows
from . import mix_streams
from .formats import Example, iter_examples
from .placeholders import filled
from .registry import DataError, iter_records, resolve


def check_options(cfg, stage) -> list[str]:
    """Problems with `streaming: true` and the options it cannot honour (config.validate asks)."""
    from ..train.stages import names

    d, t, out = cfg.data, cfg.train, []
    if not stage.language_modelling:
        out.append(f"`streaming` is built for stages {names(lambda s: s.language_modelling)}; stage {stage.name} "
                   "reads its data into memory (set streaming: false)")
    if t.max_steps <= 0:
        out.append("`streaming: true` reads the data as training goes, so its length is unknown: set `max_steps`")
    if d.val_size and d.val_size != int(d.val_size):
        out.append(f"with streaming, `val_size` is a count of examples (e.g. 500), not a fraction; got {d.val_size}")
    if d.tokenized_path:
        out.append("`tokenized_path` saves tokenised data, which streaming never holds whole; remove it or set "
                   "streaming: false")
    for key in ("eval_strategy", "save_strategy"):
        if getattr(t, key) == "epoch":
            out.append(f"`{key}: epoch` needs epochs of known length; with streaming use `{key}: steps`")
    if d.buffer_size < 1:
        out.append(f"`buffer_size` must be at least 1 (1 keeps the file order); got {d.buffer_size}")
    return out


def shuffled(items, size: int, seed: int) -> Iterator:
    """Buffer shuffle, as `datasets` does for iterable datasets: each item out is a random pick among the next
    `size` items in."""
    rng, buffer = random.Random(seed), []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


class RowStream:
    """The endless, deterministic sequence of training rows of a config's `dataset`, epoch after epoch."""

    def __init__(self, cfg, encode):
        """`encode(examples)` turns one batch of examples into training rows."""
        self.cfg, self.encode = cfg, encode
        d = cfg.data
        self.attrs = resolve(d.dataset, d.dataset_dir)
        for attr in self.attrs:
            if attr.num_samples:
                raise DataError(f"dataset `{attr.name}` sets num_samples, which resamples a dataset held in memory; "
                                "remove it or set streaming: false")
        self.held_out: set[tuple[str, str]] = set()
        self.first: dict | None = None  # the first training row, once read

    def examples(self, epoch: int) -> Iterator[Example]:
        """The training examples of one epoch, in its order."""
        d, seed = self.cfg.data, self.cfg.train.seed
        sources = [lambda attr=attr: self.read(attr) for attr in self.attrs]
        stream = (e for e in mix_streams(sources, d.mix_strategy, d.interleave_probs, seed)
                  if (e.dataset, e.where) not in self.held_out)
        if not shuffles_rows(self.cfg):
            return stream
        return shuffled(stream, d.buffer_size, order_seed(self.cfg.train) + epoch)

    def read(self, attr) -> Iterator[Example]:
        """One dataset's examples, in file order."""
        d = self.cfg.data
        skip = d.skip_bad_records
        examples = filled(iter_examples(attr, iter_records(attr, skip, streaming=True), self.cfg.finetune.stage, skip),
                          d.fill_placeholders)
        return itertools.islice(examples, d.max_samples) if d.max_samples else examples

    def hold_out(self, count: int) -> list[Example]:
        """Take the first `count` examples of epoch 0's order out of training, as the evaluation set."""
        held = list(itertools.islice(self.examples(0), count + 1))
        if len(held) <= count:
            raise DataError(f"val_size {count} takes every one of the {len(held)} examples of `{self.cfg.data.dataset}`"
                            "; lower it")
        held = held[:count]
        self.held_out = {(e.dataset, e.where) for e in held}
        return held

    def rows(self, position=(0, 0, 0)) -> Iterator[tuple[dict, list[int]]]:
        """(row, position after it) from `position` on. Batches before the position are read, not encoded."""
        epoch, start_batch, start_row = position
        size = self.cfg.data.preprocessing_batch_size
        while True:
            whole_pass, made = (start_batch, start_row) == (0, 0), False
            examples = self.examples(epoch)
            for batch in itertools.count():
                chunk = list(itertools.islice(examples, size))
                if not chunk:
                    break
                if batch < start_batch:
                    continue
                rows = self.encode(chunk)
                for index in range(start_row, len(rows)):
                    made = True
                    yield rows[index], [epoch, batch, index + 1]
                start_row = 0
            if whole_pass and not made:
                d = self.cfg.data
                raise DataError(f"dataset `{d.dataset}`: a whole pass gave no training row; check that examples keep a "
                                f"response token after truncation to cutoff_len={d.cutoff_len}")
            epoch, start_batch = epoch + 1, 0

    def signature(self) -> str:
        """Names and sizes of the files (a cheap check that a resumed run streams the same data)."""
        files = [f"{attr.name}:{attr.hub or ''}:" + ",".join(f"{f}={f.stat().st_size}" for f in attr.files)
                 for attr in self.attrs]
        return hashlib.sha256("|".join(files).encode()).hexdigest()[:16]
