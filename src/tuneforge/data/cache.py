"""A cache of tokenised data, keyed by a fingerprint of everything that decides the result: the data files'
bytes, the registry entry, the tokenizer, the template and the encoding options. A second run with the same key
skips tokenisation; `overwrite_cache` redoes it; `tokenized_path` names an explicit place to save or load."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .registry import resolve

# bump when what encoding gives changes (3: records are checked for parts a template drops; 4: empty tool lists,
# KTO's mismatched pairs, val_size's split, interleaving and num_samples as LLaMA-Factory does them)
VERSION = 4


def fingerprint(cfg, tokenizer, template) -> str:
    d = cfg.data
    digest = hashlib.sha256()

    def add(value) -> None:
        digest.update(json.dumps(value, sort_keys=True, default=str).encode())

    add([VERSION, cfg.finetune.stage, cfg.train.seed, d.dataset, d.eval_dataset, d.cutoff_len, d.train_on_prompt,
         d.mask_history, d.default_system, d.max_samples, d.val_size, d.packing, d.neat_packing, d.mix_strategy,
         d.interleave_probs, d.eval_on_each_dataset, d.enable_thinking, d.skip_bad_records, d.fill_placeholders])
    for names in (d.dataset, d.eval_dataset):
        for attr in resolve(names, d.dataset_dir) if names else []:
            add([attr.name, attr.formatting, attr.ranking, attr.columns, attr.tags, attr.num_samples, attr.hub,
                 attr.subset, attr.split, list(map(str, attr.files))])
            for file in attr.files:
                digest.update(file.read_bytes())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    add(backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()))
    add([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, getattr(tokenizer, "chat_template", None),
         getattr(tokenizer, "split_special_tokens", False)])
    add(repr(template))
    return digest.hexdigest()[:20]


def cached(cfg, tokenizer, template, build):
    """The tokenised data for these settings: from the cache when present (and not overwrite_cache), else
    `build()`, saved for the next run. Of several processes, one builds and the others wait for its cache."""
    key = fingerprint(cfg, tokenizer, template)
    path = cache_file(cfg, key)
    with _one_process_first(cfg.data.data_shared_file_system) as first:
        value = None if cfg.data.overwrite_cache and first else load(path, key)
        if value is not None:
            print(f"[tuneforge] tokenised data loaded from the cache ({path})")
            return value
        if not first:
            print(f"[tuneforge] the first process's tokenised data is not in {path} here (is the cache folder "
                  "shared, as data_shared_file_system says?); tokenising in this process too")
        value = build()
        save(path, key, value)
        return value


@contextmanager
def _one_process_first(shared: bool) -> Iterator[bool]:
    """Whether this process goes first: alone, or the first of all processes (shared) or of this machine; the
    others wait at a barrier until it is done (each process reaches the barrier once, before or after)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield True
        return
    first = dist.get_rank() == 0 if shared else int(os.environ.get("LOCAL_RANK", "0")) == 0
    if not first:
        dist.barrier()
    try:
        yield first
    finally:
        if first:
            dist.barrier()


def cache_file(cfg, key: str) -> Path:
    if cfg.data.tokenized_path:
        return Path(cfg.data.tokenized_path) / "tokenized.pkl"
    from ..models.load import cache_root

    return cache_root() / "data" / f"{key}.pkl"


def load(path: Path, key: str):
    """The cached value, or None when there is none or it belongs to other data or settings."""
    if not path.is_file():
        return None
    with path.open("rb") as handle:
        saved = pickle.load(handle)
    return saved["value"] if saved.get("key") == key else None


def save(path: Path, key: str, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # several processes (torchrun ranks, on one machine or on machines sharing the folder) may write at once
    staging = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    with staging.open("wb") as handle:
        pickle.dump({"key": key, "value": value}, handle, protocol=pickle.HIGHEST_PROTOCOL)
    staging.replace(path)
