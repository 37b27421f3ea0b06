"""`tuneforge data CONFIG`: check and preview a dataset without training.

Every stage's data: counts per dataset and split, token-length statistics (and a histogram PNG), how many
records cutoff_len truncates, and a few decoded examples with the trained tokens in [[double brackets]] (both
answers of a preference pair; the tag of a KTO example; the label of a classification example). Data errors are
the same one-line errors `tuneforge train` gives.
"""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path

from ..train.stages import data_kind
from . import load_examples, load_splits
from .encode import IGNORE, encode_kto, encode_pair, encode_pretrain, encode_supervised, render, tokenize_pieces
from .templates import data_template

NO_LIMIT = 10 ** 9


def _stats(lengths: list[int]) -> str:
    if not lengths:
        return "none"
    ordered = sorted(lengths)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return (f"min {ordered[0]}, mean {statistics.mean(ordered):.1f}, median {statistics.median(ordered):.0f}, "
            f"p95 {p95}, max {ordered[-1]}")


def show_trained(tokenizer, row: dict) -> str:
    """Decoded text with the tokens the model learns in [[...]]; everything else is read, not learned."""
    pieces, current, trained = [], [], None
    for token, label in zip(row["input_ids"], row["labels"]):
        learn = label != IGNORE
        if trained is not None and learn != trained:
            text = tokenizer.decode(current)
            pieces.append(f"[[{text}]]" if trained else text)
            current = []
        current.append(token)
        trained = learn
    if current:
        text = tokenizer.decode(current)
        pieces.append(f"[[{text}]]" if trained else text)
    return "".join(pieces)


def preview(cfg, examples_to_show: int = 3, plot: str | None = "token_lengths.png") -> dict:
    """Check and describe the data of the config's stage; returns the numbers it printed."""
    d, stage, kind = cfg.data, cfg.finetune.stage, data_kind(cfg.finetune.stage)
    if kind == "labelled":
        return _preview_labelled(cfg, examples_to_show)
    from ..models.load import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    template = data_template(d, tokenizer) if kind != "pt" else None
    if d.streaming:
        report, train, evaluation = _stream_sample(cfg)
    else:
        report = {}
        for name in [n.strip() for n in (d.dataset or "").split(",") if n.strip()]:
            report[name] = len(load_examples(name, d, stage, cfg.train.seed, warn=False))  # load_splits warns
        train, evaluation = load_splits(cfg)
    print("records per dataset: " + ", ".join(f"{k} {v}" for k, v in report.items()))
    print(f"split: {len(train)} train, {len(evaluation)} evaluation")
    summary = {"records": report, "train": len(train), "eval": len(evaluation)}
    if kind == "pt":
        blocks = encode_pretrain(train, tokenizer, d.cutoff_len)
        print(f"pre-training: {sum(len(b['input_ids']) for b in blocks)} tokens in {len(blocks)} blocks of up to "
              f"{d.cutoff_len}; every token is trained")
        for i, block in enumerate(blocks[:examples_to_show]):
            print(f"\n--- block {i}; [[...]] is trained ---\n{show_trained(tokenizer, block)}")
        return {**summary, "blocks": len(blocks)}

    def encode(example, cutoff):
        if kind == "preference":
            row = encode_pair(example, tokenizer, template, cutoff, d.default_system)
            return [{"input_ids": row[f"{side}_input_ids"], "labels": row[f"{side}_labels"]}
                    for side in ("chosen", "rejected")]
        if kind == "kto":
            return encode_kto([example], tokenizer, template, cutoff, d.default_system)[:1]
        if kind == "prompt":  # completions are generated in training: no token of the record is a target
            pieces = render(example, tokenizer, template, d.default_system)
            ids = [token for piece in tokenize_pieces(tokenizer, pieces) for token in piece][-cutoff:]
            return [{"input_ids": ids, "labels": [IGNORE] * len(ids)}]
        row = encode_supervised(example, tokenizer, template, cutoff, d.train_on_prompt, d.mask_history,
                                d.default_system)
        return [row] if row is not None else []

    full, kept, truncated, dropped = [], [], 0, 0
    for example in train:
        whole, rows = encode(example, NO_LIMIT), encode(example, d.cutoff_len)
        lengths = [len(r["input_ids"]) for r in whole]
        full += lengths
        truncated += any(n > d.cutoff_len for n in lengths)
        if rows:
            kept.append((example, rows))
        else:
            dropped += 1
    unit = "sequences (chosen and rejected)" if kind == "preference" else "records"
    print(f"token lengths before truncation, {unit}: {_stats(full)}")
    print(f"cutoff_len {d.cutoff_len}: {truncated} of {len(train)} records truncated, {dropped} left with nothing "
          "to learn (dropped)")
    targets = [sum(label != IGNORE for label in r["labels"]) for _, rows in kept for r in rows]
    print(f"trained tokens per sequence: {_stats(targets)}")
    if kind == "kto":
        desirable = sum(bool(e.kto_tag) for e in train)
        print(f"kto_tag: {desirable} desirable, {len(train) - desirable} undesirable")
    if plot and full:
        _histogram(full, d.cutoff_len, Path(plot))
        print(f"histogram: {plot}")
    for i, (example, rows) in enumerate(kept[:examples_to_show]):
        print(f"\n--- example {i} ({example.where}); [[...]] is trained ---")
        names = ["chosen", "rejected"] if kind == "preference" else [
            f"kto_tag {example.kto_tag}"] if kind == "kto" else [""]
        for name, row in zip(names, rows):
            print((f"[{name}] " if name else "") + show_trained(tokenizer, row))
    return {**summary, "truncated": truncated, "dropped": dropped}


def _stream_sample(cfg) -> tuple[dict, list, list]:
    """With streaming the data may not fit in memory: count each dataset's records in one pass, and describe the
    first `buffer_size` training examples of the stream (after the `val_size` held out)."""
    from .stream import RowStream

    d = cfg.data
    stream = RowStream(cfg, encode=None)
    report = {attr.name: sum(1 for _ in stream.read(attr)) for attr in stream.attrs}
    evaluation = load_examples(d.eval_dataset, d, cfg.finetune.stage, cfg.train.seed) if d.eval_dataset else []
    if d.val_size:
        evaluation += stream.hold_out(int(d.val_size))
    train = list(itertools.islice(stream.examples(0), d.buffer_size))
    print(f"streaming: the statistics below describe the first {len(train)} training examples of the stream "
          "(buffer_size)")
    return report, train, evaluation


def _preview_labelled(cfg, examples_to_show: int) -> dict:
    """Stage cls: counts per label and split, text lengths in tokens, a few examples with their labels."""
    from collections import Counter

    from .classify import load_labelled

    d = cfg.data
    train, evaluation = load_splits(cfg, lambda names: load_labelled(names, d, cfg.train.seed))
    counts = Counter(e.label for e in train)
    print(f"split: {len(train)} train, {len(evaluation)} evaluation")
    print("labels (train): " + ", ".join(f"{label} {n}" for label, n in sorted(counts.items())))
    missing = sorted({e.label for e in evaluation} - set(counts))
    if missing:
        print(f"warning: evaluation labels never seen in training: {', '.join(missing)}")
    summary = {"train": len(train), "eval": len(evaluation), "labels": dict(counts)}
    if train and train[0].image:
        for e in train[:examples_to_show]:
            print(f"{e.label}\t{e.text}")
        return summary
    from ..models.load import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    lengths = [len(tokenizer(e.text, e.text_pair)["input_ids"]) for e in train]
    truncated = sum(n > d.cutoff_len for n in lengths)
    print(f"token lengths before truncation: {_stats(lengths)}")
    print(f"cutoff_len {d.cutoff_len}: {truncated} of {len(train)} texts truncated")
    for e in train[:examples_to_show]:
        print(f"\n--- {e.where}: label [[{e.label}]] ---\n{e.text}" + (f"\n{e.text_pair}" if e.text_pair else ""))
    return {**summary, "truncated": truncated}


def _histogram(lengths: list[int], cutoff: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.figure(figsize=(6, 4))
    plt.hist(lengths, bins=40)
    plt.axvline(cutoff, color="red", linestyle="--", label=f"cutoff_len {cutoff}")
    plt.xlabel("tokens per record")
    plt.ylabel("records")
    plt.legend()
    plt.tight_layout()
    plt.savefig(path, dpi=100)
    plt.close()

