"""Data: find datasets, read files, convert to canonical examples, encode, split train/validation."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..train.stages import data_kind
from . import cache
from .collate import pack_rows
from .encode import chunk_documents, encode_kto, encode_pair, encode_supervised_batch, tokenize_documents
from .formats import Example, to_examples
from .placeholders import filled
from .registry import DataError, read_records, resolve, sampled
from .templates import data_template

__all__ = ["DataError", "Example", "LMData", "load_examples", "prepare_lm_data"]


def load_examples(names: str, data_args, stage: str, seed: int, warn: bool = True,
                  rng: np.random.RandomState | None = None) -> list[Example]:
    """The canonical examples of a comma list of datasets, mixed by `mix_strategy`, placeholders filled (and
    those left warned about, unless not `warn`); `num_samples` drawn from `rng` (default: a new one from `seed`)."""
    parts, rng = [], rng or np.random.RandomState(seed)
    for attr in resolve(names, data_args.dataset_dir):
        skip = data_args.skip_bad_records
        part = list(filled(to_examples(attr, read_records(attr, skip), stage, skip), data_args.fill_placeholders,
                           warn))
        if attr.num_samples:
            part = sampled(part, attr.num_samples, rng)
        if data_args.max_samples:
            part = part[: data_args.max_samples]
        parts.append(part)
    return mix(parts, data_args.mix_strategy, data_args.interleave_probs, seed)


def mix(parts: list[list], strategy: str, probs: str | None, seed: int) -> list:
    return list(mix_streams([lambda part=part: iter(part) for part in parts], strategy, probs, seed))


_END = object()  # what a used-up dataset's stream gives next


def mix_streams(sources: list[Callable[[], Iterator]], strategy: str, probs: str | None, seed: int) -> Iterator:
    """Mix datasets, each given as a function that opens it, as datasets' interleave_datasets does (LLaMA-Factory's
    mixing), example for example. concat: one after another. interleave_under: take from the datasets in turn, whole
    rounds until one runs out (each gives as many examples), or at random by `interleave_probs` until one has run out;
    interleave_over: likewise until every one has been seen whole, opening used-up ones again (oversampling);
    interleave_once: until every one runs out, each example used once."""
    if strategy == "concat" or len(sources) == 1:
        for source in sources:
            yield from source()
        return
    if probs:
        yield from _drawn(sources, strategy, [float(p) for p in probs.split(",")], seed)
        return
    turn = 0
    streams, ahead = _opened(sources)
    whole = [False] * len(sources)
    while True:
        live = [i for i in range(len(sources)) if strategy != "interleave_once" or ahead[i] is not _END]
        if not live:
            return
        i, turn = live[turn % len(live)], turn + 1
        if ahead[i] is _END:  # interleave_over starts a used-up dataset again
            streams[i] = sources[i]()
            ahead[i] = next(streams[i])
        yield ahead[i]
        ahead[i] = next(streams[i], _END)
        whole[i] = whole[i] or ahead[i] is _END
        if turn % len(live) == 0 and (all(whole) if strategy == "interleave_over" else
                                      strategy == "interleave_under" and any(whole)):
            return  # taken in turn, datasets stops only at a round's end


def _opened(sources: list[Callable[[], Iterator]]) -> tuple[list[Iterator], list]:
    """Each dataset opened, with its first example ahead; one that has none could never be taken from."""
    streams = [source() for source in sources]
    ahead = [next(stream, _END) for stream in streams]
    empty = [str(i + 1) for i, first in enumerate(ahead) if first is _END]
    if empty:
        raise DataError(f"dataset number {', '.join(empty)} of the {len(sources)} to interleave has no examples left "
                        "(were all its records skipped as bad?): fix its records or leave it out")
    return streams, ahead


def _drawn(sources: list[Callable[[], Iterator]], strategy: str, weights: list[float], seed: int) -> Iterator:
    """interleave_probs: each example from a dataset drawn at random, the draws datasets makes (numpy's default_rng
    with the seed, 1,000 at a time), so the same seed mixes the same examples. A zero-weight dataset is never drawn,
    nor waited for."""
    rng = np.random.default_rng(seed)
    p = np.asarray(weights) / sum(weights)
    streams, ahead = _opened(sources)
    needed = [i for i, weight in enumerate(weights) if weight > 0]
    whole = [False] * len(sources)
    while True:
        for i in rng.choice(len(sources), size=1000, p=p).tolist():
            if ahead[i] is _END:
                if strategy == "interleave_once":
                    continue  # a used-up dataset's draws are skipped
                streams[i] = sources[i]()  # interleave_over starts a used-up dataset again
                ahead[i] = next(streams[i])
            yield ahead[i]
            ahead[i] = next(streams[i], _END)
            whole[i] = whole[i] or ahead[i] is _END
            if whole[i] and strategy == "interleave_under" or all(whole[j] for j in needed):
                return


@dataclass
class LMData:
    train: list[dict]  # encoded rows (packed rows when packing), or a RowStream with `streaming`
    eval: list[dict]
    eval_examples: list[Example]  # the canonical records behind `eval`, for generation-based prediction
    template: object
    num_train_examples: int = 0  # before packing

    @property
    def packed(self) -> bool:
        first = self.train.first if hasattr(self.train, "first") else (self.train[0] if self.train else {})
        return "position_ids" in (first or {})


def _encode(examples, stage, tokenizer, template, d) -> tuple[list[dict], list[Example]]:
    """Encode in batches of preprocessing_batch_size, in preprocessing_num_workers processes when asked."""
    size = d.preprocessing_batch_size
    batches = [examples[start: start + size] for start in range(0, len(examples), size)]
    job = (stage, tokenizer, template, d.cutoff_len, d.train_on_prompt, d.mask_history, d.default_system)
    workers = min(d.preprocessing_num_workers or 1, len(batches))
    if workers > 1:  # forked workers inherit the tokenizer; each encodes whole batches
        import multiprocessing

        global _JOB
        _JOB = job
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            encoded = pool.map(_encode_batch, batches)
    else:
        encoded = [_encode_batch(batch, job) for batch in batches]
    if data_kind(stage) == "pt":
        return chunk_documents([ids for batch in encoded for ids in batch], d.cutoff_len), []
    rows, kept = [], []
    for batch, batch_rows in zip(batches, encoded):
        for example, row in zip(batch, batch_rows):
            if row is not None:
                rows.append(row)
                kept.append(example)
    return rows, kept


_JOB = None  # (stage, tokenizer, template, options) for forked preprocessing workers


def _encode_batch(batch: list[Example], job: tuple | None = None) -> list:
    stage, tokenizer, template, *options = job or _JOB
    if data_kind(stage) == "pt":
        return tokenize_documents(batch, tokenizer)
    return encode_supervised_batch(batch, tokenizer, template, *options)


def load_splits(cfg, load=None) -> tuple[list, list]:
    """(training examples, evaluation examples): `eval_dataset` plus a `val_size` share held out of `dataset`.

    `load(names)` reads a comma list of datasets; by default as canonical Examples for the config's stage."""
    d, stage, seed = cfg.data, cfg.finetune.stage, cfg.train.seed
    rng = np.random.RandomState(seed)  # training then evaluation datasets draw from it, as in LLaMA-Factory
    load = load or (lambda names: load_examples(names, d, stage, seed, rng=rng))
    train_examples = load(d.dataset) if d.dataset else []
    eval_examples = load(d.eval_dataset) if d.eval_dataset else []
    if d.val_size and train_examples:
        # held out as datasets' train_test_split (LLaMA-Factory's split) holds them out with the same seed: the
        # first of a permutation, a fraction rounded up; the rest train in the permutation's order
        order = np.random.default_rng(seed).permutation(len(train_examples)).tolist()
        count = int(d.val_size) if d.val_size >= 1 else math.ceil(d.val_size * len(order))
        if count >= len(order):
            raise DataError(f"val_size {d.val_size} leaves no training examples out of {len(order)}; lower it")
        eval_examples += [train_examples[i] for i in order[:count]]
        train_examples = [train_examples[i] for i in order[count:]]
    return train_examples, eval_examples


def prepare_preference_data(cfg, tokenizer) -> tuple[list[dict], list[dict], list[Example]]:
    """(train rows, eval rows, eval examples) for rm / dpo (pairs) and kto (examples with mismatched answers),
    cached like prepare_lm_data."""
    template = data_template(cfg.data, tokenizer)
    return cache.cached(cfg, tokenizer, template, lambda: _encode_preferences(cfg, tokenizer, template))


def _encode_preferences(cfg, tokenizer, template) -> tuple[list[dict], list[dict], list[Example]]:
    d = cfg.data
    train_examples, eval_examples = load_splits(cfg)
    if data_kind(cfg.finetune.stage) == "kto":
        def encode(examples):
            return encode_kto(examples, tokenizer, template, d.cutoff_len, d.default_system) if examples else []
    else:
        def encode(examples):
            return [encode_pair(e, tokenizer, template, d.cutoff_len, d.default_system) for e in examples]
    train = encode(train_examples)
    if cfg.train.do_train and not train:
        raise DataError(f"dataset `{d.dataset}` gave no training examples")
    return train, encode(eval_examples), eval_examples


def prepare_lm_data(cfg, tokenizer, need_train: bool = True) -> LMData:
    """Everything the pt/sft recipes need from the data, validated before anything is written to output_dir.

    Tokenised data is cached (see cache.py): an unchanged dataset is not tokenised again.
    """
    d, stage = cfg.data, cfg.finetune.stage
    template = data_template(d, tokenizer) if data_kind(stage) != "pt" else None
    if d.streaming:
        return _stream(cfg, tokenizer, template, need_train)
    data = cache.cached(cfg, tokenizer, template, lambda: _tokenise(cfg, tokenizer, template, need_train))
    data.template = template  # templates are rebuilt, not cached
    return data


def _metric_name(dataset: str) -> str:
    """A dataset name (or file path) as a metric-name part: eval_<this>_loss."""
    return re.sub(r"\W+", "_", Path(dataset).stem if "/" in dataset or "." in dataset else dataset).strip("_")


def _tokenise(cfg, tokenizer, template, need_train: bool) -> LMData:
    d, stage = cfg.data, cfg.finetune.stage
    train_examples, eval_examples = load_splits(cfg)
    train, _ = _encode(train_examples, stage, tokenizer, template, d)
    evaluation, kept_eval = _encode(eval_examples, stage, tokenizer, template, d)
    if need_train and not train:
        raise DataError(f"dataset `{d.dataset}`: no example has a response token left after truncation to "
                        f"cutoff_len={d.cutoff_len}; raise cutoff_len or check the data")
    num_train_examples = len(train)
    if data_kind(stage) == "lm" and (d.packing or d.neat_packing):
        train = pack_rows(train, d.cutoff_len)
    evaluation = _evaluation_sets(evaluation, eval_examples, stage, tokenizer, template, d)
    return LMData(train=train, eval=evaluation, eval_examples=kept_eval, template=None,
                  num_train_examples=num_train_examples)


def _evaluation_sets(evaluation, eval_examples, stage, tokenizer, template, d):
    """The encoded evaluation rows, or with eval_on_each_dataset one set per dataset (eval_<name>_loss, ...)."""
    if eval_examples and not evaluation:
        raise DataError(f"no evaluation example has a response token left after truncation to "
                        f"cutoff_len={d.cutoff_len}; raise cutoff_len or check the evaluation data")
    if not d.eval_on_each_dataset:
        return evaluation
    names = dict.fromkeys(e.dataset for e in eval_examples)
    return {_metric_name(name): _encode([e for e in eval_examples if e.dataset == name], stage, tokenizer, template,
                                        d)[0] for name in names}


def _stream(cfg, tokenizer, template, need_train: bool) -> LMData:
    """Training rows streamed from the files (see stream.py); evaluation data in memory: `eval_dataset` plus
    `val_size` examples held out of the stream. Not cached: the stream is encoded as training reads it."""
    from .stream import RowStream

    d, stage = cfg.data, cfg.finetune.stage

    def encode(examples: list[Example]) -> list[dict]:
        rows = _encode(examples, stage, tokenizer, template, d)[0]
        return pack_rows(rows, d.cutoff_len) if data_kind(stage) == "lm" and (d.packing or d.neat_packing) else rows

    stream = RowStream(cfg, encode)
    eval_examples = load_examples(d.eval_dataset, d, stage, cfg.train.seed) if d.eval_dataset else []
    if d.val_size:
        eval_examples += stream.hold_out(int(d.val_size))
    evaluation, kept_eval = _encode(eval_examples, stage, tokenizer, template, d)
    evaluation = _evaluation_sets(evaluation, eval_examples, stage, tokenizer, template, d)
    if need_train:  # the first batch is read and encoded now, so its data errors come before output_dir is touched
        stream.first = next(stream.rows())[0]
    return LMData(train=stream, eval=evaluation, eval_examples=kept_eval, template=template)
