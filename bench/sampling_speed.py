"""Drawing one token per row: transformers' warpers against tuneforge's `candidates`, side by side on the same
logits.

    .venv/bin/python bench/sampling_speed.py [--rows 8] [--steps 96]

The logits are recorded from SmolLM2-135M-Instruct (the bundled alias, bf16) sampling answers to `--rows` chat
prompts at temperature 0.95 with top_p 0.95 and no top_k, so they are what a sampler meets in use, peaked and flat
steps alike. Each setting then warps and draws every recorded step both ways (transformers: its Temperature, TopK and
TopP warpers, softmax, torch.multinomial; tuneforge: `Sample`), alternating rounds, and prints ms per step of all
rows, median of 3 rounds. The first line gives the share of steps whose top_p nucleus fits in 64 and in 512 tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from tuneforge.infer.sampling import Sample
from tuneforge.machine import cpu_description
from tuneforge.models.load import resolve_model_path

QUESTIONS = ["Write a short poem about the sea.", "What is the capital of France?", "Explain photosynthesis simply.",
             "Give me three ideas for a birthday party.", "How do I sort a list in Python?",
             "Tell me a joke about cats.", "What is 17 times 23?", "Describe your favourite book."]
SETTINGS = [(0.95, 50, 0.7), (0.95, 0, 0.7), (0.95, 0, 0.95)]  # LLaMA-Factory's defaults, then top_p alone


class Record(LogitsProcessor):
    def __init__(self):
        self.steps = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores.clone())
        return scores


def record_logits(rows: int, steps: int) -> list[torch.Tensor]:
    path = resolve_model_path("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                           tokenize=False, add_generation_prompt=True) for i in range(rows)]
    record = Record()
    torch.manual_seed(0)
    with torch.no_grad():
        model.generate(**tokenizer(texts, return_tensors="pt", padding=True), max_new_tokens=steps,
                       min_new_tokens=steps, do_sample=True, temperature=0.95, top_k=0, top_p=0.95,
                       logits_processor=[record])
    return record.steps


def nucleus_sizes(steps: list[torch.Tensor], top_p: float) -> torch.Tensor:
    sizes = []
    for scores in steps:
        probs = (scores.float() / 0.95).softmax(-1).sort(descending=True).values
        sizes.append(((probs.cumsum(-1) - probs) < top_p).sum(-1))
    return torch.cat(sizes).float()


def transformers_draw(temperature: float, top_k: int, top_p: float):
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    return lambda ids, scores: torch.multinomial(torch.softmax(warpers(ids, scores), dim=-1), 1)


def ms_per_step(draw, steps: list[torch.Tensor]) -> float:
    ids = torch.zeros(len(steps[0]), 1, dtype=torch.long)
    start = time.perf_counter()
    for scores in steps:
        draw(ids, scores.clone())
    return (time.perf_counter() - start) / len(steps) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=96)
    args = parser.parse_args()
    steps = record_logits(args.rows, args.steps)
    common = {"cpu": cpu_description(), "threads": torch.get_num_threads(), "rows": args.rows, "steps": len(steps)}
    shares = {}
    for top_p in (0.7, 0.95):
        sizes = nucleus_sizes(steps, top_p)
        shares[f"top_p {top_p}"] = {"<=64": round(float((sizes <= 64).float().mean()), 3),
                                    "<=512": round(float((sizes <= 512).float().mean()), 3),
                                    "median": float(sizes.median())}
    print(json.dumps({**common, "nucleus_sizes": shares}))
    for temperature, top_k, top_p in SETTINGS:
        ours, theirs = Sample(temperature, top_k, top_p), transformers_draw(temperature, top_k, top_p)
        ms_per_step(ours, steps[:8]), ms_per_step(theirs, steps[:8])  # warm-up
        rounds = [(ms_per_step(theirs, steps), ms_per_step(ours, steps)) for _ in range(3)]
        print(json.dumps({**common, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                          "transformers_ms": round(statistics.median(r[0] for r in rounds), 2),
                          "tuneforge_ms": round(statistics.median(r[1] for r in rounds), 2)}))


if __name__ == "__main__":
    main()
