"""Check every GGUF file in an export folder against the merged model beside it, with transformers' GGUF loader:

    .venv/bin/python bench/gguf_check.py EXPORT_DIR [EXPORT_DIR ...]

For a fixed set of chat prompts: top-1 agreement of next-token predictions over every prompt position, the largest
logit difference relative to the largest logit, and whether the greedy answer (32 tokens) is the same. One JSON line
per file.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

PROMPTS = ["Who are you?", "What is the capital of France?", "Write a haiku about the sea.",
           "Explain what a GPU is in one sentence.", "List three fruits.", "What is 12 times 7?",
           "Translate 'good morning' into Spanish.", "Give me a tip for learning to code."]


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for folder in map(Path, sys.argv[1:]):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                 return_tensors="pt")["input_ids"] for p in PROMPTS]
        with torch.no_grad():
            reference = [merged(ids).logits[0] for ids in prompts]
            greedy = [merged.generate(ids, max_new_tokens=32, do_sample=False)[0] for ids in prompts]
        for file in sorted(folder.glob("*.gguf")):
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file.name, dtype=torch.float32).eval()
            load_s = time.perf_counter() - start
            with torch.no_grad():
                got = [model(ids).logits[0] for ids in prompts]
                same = sum(torch.equal(model.generate(ids, max_new_tokens=32, do_sample=False)[0], g)
                           for ids, g in zip(prompts, greedy))
            top1 = torch.cat([(r.argmax(-1) == g.argmax(-1)).float() for r, g in zip(reference, got)])
            scale = max(r.abs().max().item() for r in reference)
            print(json.dumps({"file": file.name, "MiB": round(file.stat().st_size / 2**20, 1),
                              "top1_agreement": round(top1.mean().item(), 4), "positions": len(top1),
                              "max_logit_diff_rel": round(max((r - g).abs().max().item() for r, g in
                                                              zip(reference, got)) / scale, 4),
                              "same_greedy_answers": f"{same}/{len(prompts)}", "load_s": round(load_s, 1)}),
                  flush=True)


if __name__ == "__main__":
    main()
