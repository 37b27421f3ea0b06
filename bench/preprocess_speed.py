"""Preprocessing benchmark: how fast 100k alpaca-style records become training rows.

    .venv/bin/python bench/preprocess_speed.py [--records 100000] [--workers N]

Writes a synthetic JSONL of alpaca records (instruction 8-60 words, input empty or 5-30 words, output 15-150
words; fixed seed), then times, with the bundled SmolLM2 tokenizer, the ChatML template and cutoff_len 1024:
reading + converting to canonical examples, and encoding (template, tokenisation, label masks, truncation).
Prints one JSON line. The tokenised-data cache is bypassed (overwrite_cache) so the work is really done.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
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
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from tuneforge.config import build_config
    from tuneforge.data import _encode, load_splits
    from tuneforge.data.templates import get_template
    from tuneforge.models.load import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "alpaca.jsonl"
        synthetic(data, args.records)
        cfg = build_config({"model_name_or_path": "smollm2-135m-instruct", "dataset": str(data), "template": "chatml",
                            "cutoff_len": 1024, "output_dir": str(Path(tmp) / "out"), "overwrite_cache": True,
                            "preprocessing_num_workers": args.workers})
        tokenizer = load_tokenizer(cfg.model)
        template = get_template("chatml", tokenizer)
        start = time.perf_counter()
        examples, _ = load_splits(cfg)
        read = time.perf_counter() - start
        start = time.perf_counter()
        rows, _ = _encode(examples, "sft", tokenizer, template, cfg.data)
        encode = time.perf_counter() - start
    tokens = sum(len(r["input_ids"]) for r in rows)
    print(json.dumps({
        "records": len(examples), "workers": args.workers or 1, "read_s": round(read, 2),
        "encode_s": round(encode, 2), "records_per_s": round(len(examples) / (read + encode)),
        "encode_tokens_per_s": round(tokens / encode), "mean_tokens": round(tokens / len(rows), 1),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}))


if __name__ == "__main__":
    main()
