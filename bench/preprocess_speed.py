"""Preprocessing benchmark: how fast 100k alpaca-style records become training rows.

    .venv/bin/python bench/preprocess_speed.py [--records 100000] [--workers N] [--streaming]

Writes a synthetic JSONL of alpaca records (instruction 8-60 words, input empty or 5-30 words, output 15-150
words; fixed seed), then times, with the bundled SmolLM2 tokenizer, the ChatML template and cutoff_len 1024:
reading + converting to canonical examples, and encoding (template, tokenisation, label masks, truncation).
With --streaming, times one epoch of `streaming: true` rows instead (read, shuffle buffer of 16384, encode a batch
at a time). Prints one JSON line, with the process's peak memory (RSS). The tokenised-data cache is bypassed
(overwrite_cache) so the work is really done.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the model learns from data and answers each question with care while the team measures speed memory "
         "and accuracy on every machine it can find including small laptops large servers and clusters").split()


def synthetic(path: Path, count: int) -> None:
    rng = random.Random(0)

    def text(low, high):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."

    with path.open("w", encoding="utf-8") as out:
        for _ in range(count):
            record = {"instruction": text(8, 60), "input": text(5, 30) if rng.random() < 0.4 else "",
                      "output": text(15, 150)}
            out.write(json.dumps(record) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=None, help="preprocessing_num_workers")
    parser.add_argument("--streaming", action="store_true", help="time streaming: true instead")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from tuneforge.config import build_config
    from tuneforge.data import _encode, load_splits
    from tuneforge.data.templates import get_template
    from tuneforge.machine import cpu_description
    from tuneforge.models.load import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "alpaca.jsonl"
        synthetic(data, args.records)
        cfg = build_config({"model_name_or_path": "smollm2-135m-instruct", "dataset": str(data), "template": "chatml",
                            "cutoff_len": 1024, "output_dir": str(Path(tmp) / "out"), "overwrite_cache": True,
                            "preprocessing_num_workers": args.workers})
        tokenizer = load_tokenizer(cfg.model)
        if args.streaming:
            result = stream_epoch(cfg, tokenizer)
        else:
            template = get_template("chatml", tokenizer)
            start = time.perf_counter()
            examples, _ = load_splits(cfg)
            read = time.perf_counter() - start
            start = time.perf_counter()
            rows, _ = _encode(examples, "sft", tokenizer, template, cfg.data)
            encode = time.perf_counter() - start
            tokens = sum(len(r["input_ids"]) for r in rows)
            result = {"records": len(examples), "workers": args.workers or 1, "read_s": round(read, 2),
                      "encode_s": round(encode, 2), "records_per_s": round(len(examples) / (read + encode)),
                      "encode_tokens_per_s": round(tokens / encode), "mean_tokens": round(tokens / len(rows), 1)}
    print(json.dumps({**result, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                      "cpu": cpu_description(), "cores": os.cpu_count()}))


def stream_epoch(cfg, tokenizer) -> dict:
    """One epoch of streamed rows, counted and dropped as a training loop would."""
    from tuneforge.data import prepare_lm_data

    cfg.data.streaming, cfg.train.max_steps = True, 1
    start = time.perf_counter()
    stream = prepare_lm_data(cfg, tokenizer).train
    examples, records, tokens = stream.examples(0), 0, 0
    while batch := list(itertools.islice(examples, cfg.data.preprocessing_batch_size)):
        records += len(batch)
        tokens += sum(len(row["input_ids"]) for row in stream.encode(batch))
    seconds = time.perf_counter() - start
    return {"streaming": True, "records": records, "seconds": round(seconds, 2),
            "records_per_s": round(records / seconds), "tokens_per_s": round(tokens / seconds)}


if __name__ == "__main__":
    main()
