"""`tuneforge data CONFIG`: check and preview a dataset without training.

Prints counts per dataset and split, token-length statistics (and writes a histogram PNG), how many records
cutoff_len truncates, and a few decoded examples with the trained tokens in [[double brackets]]. Data errors are
the same one-line errors `tuneforge train` gives.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from . import load_examples, load_splits
from .encode import IGNORE, encode_pretrain, encode_supervised
from .registry import DataError
from .templates import get_template

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


def preview(cfg, tokenizer, examples_to_show: int = 3, plot: str | None = "token_lengths.png") -> dict:
    d, stage = cfg.data, cfg.finetune.stage
    if stage not in ("pt", "sft"):
        raise DataError(f"`tuneforge data` previews stages pt and sft so far; stage {stage} data is checked when "
                        "`tuneforge train` starts")
    template = get_template(d.template, tokenizer, d.enable_thinking) if stage == "sft" else None
    report = {}
    for name in [n.strip() for n in (d.dataset or "").split(",") if n.strip()]:
        report[name] = len(load_examples(name, d, stage, cfg.train.seed))
    train, evaluation = load_splits(cfg)
    print("records per dataset: " + ", ".join(f"{k} {v}" for k, v in report.items()))
    print(f"split: {len(train)} train, {len(evaluation)} evaluation")
    if stage == "pt":
        blocks = encode_pretrain(train, tokenizer, d.cutoff_len)
        print(f"pre-training: {sum(len(b['input_ids']) for b in blocks)} tokens in {len(blocks)} blocks of up to "
              f"{d.cutoff_len}")
        return {"records": report, "blocks": len(blocks)}
    full, kept, truncated, dropped = [], [], 0, 0
    for example in train:
        whole = encode_supervised(example, tokenizer, template, NO_LIMIT, d.train_on_prompt, d.mask_history,
                                  d.default_system)
        row = encode_supervised(example, tokenizer, template, d.cutoff_len, d.train_on_prompt, d.mask_history,
                                d.default_system)
        if whole is not None:
            full.append(len(whole["input_ids"]))
            truncated += len(whole["input_ids"]) > d.cutoff_len
        if row is None:
            dropped += 1
        else:
            kept.append(row)
    print(f"token lengths before truncation: {_stats(full)}")
    print(f"cutoff_len {d.cutoff_len}: {truncated} of {len(train)} records truncated, {dropped} left with nothing "
          "to learn (dropped)")
    targets = [sum(label != IGNORE for label in r["labels"]) for r in kept]
    print(f"trained tokens per record: {_stats(targets)}")
    if plot and full:
        _histogram(full, d.cutoff_len, Path(plot))
        print(f"histogram: {plot}")
    for i, row in enumerate(kept[:examples_to_show]):
        print(f"\n--- example {i} ({train[i].where}); [[...]] is trained ---\n{show_trained(tokenizer, row)}")
    return {"records": report, "train": len(train), "eval": len(evaluation), "truncated": truncated,
            "dropped": dropped}


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

