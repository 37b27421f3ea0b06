"""RL rollouts: transformers' sampling, as TRL's GRPO trainer calls it without vLLM, against tuneforge's.

    .venv/bin/python bench/rollout_speed.py [--only example|long] [--rounds 3]

The policy is set up as `tuneforge train examples/grpo.yaml` sets it up (SmolLM2-135M-Instruct, LoRA r16 on all
linear layers, pure bf16, eager attention). A rollout samples `group` completions of each of 4 prompts of
data/arithmetic_prompts.json in one batched `generate`, at the example's temperature 0.5. Every completion is
exactly `tokens` long (min_new_tokens = max_new_tokens), so that every row does the same work whatever it samples.

Rows, each in its own process (peak RSS is the process's; on a GPU, its peak CUDA memory is added):
- transformers: `generate(do_sample=True, ...)` on transformers' eager attention: keys and values copied for every
  query head (repeat_kv), every row's prompt through the model, tokens drawn by torch.multinomial;
- + grouped eager attention: no copies (models/attention.py);
- + shared prompt cache: each distinct prompt through the model once (train/rollout.py shared_prompt_cache);
- + one-uniform sampling: tokens drawn by infer/sampling.py's Sample;
- tuneforge: all three, as `tuneforge train` loads the model and train/rollout.py's generate calls generate.

Workloads: `example` is examples/grpo.yaml's rollout (prompts of about 32 tokens, 4 x 4 rows, 16 tokens); `long`
has prompts of about 470 tokens (the instruction repeated 20 times), 4 x 8 rows, 64 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = {"example": dict(repeat=1, group=4, tokens=16), "long": dict(repeat=20, group=8, tokens=64)}
# (grouped eager attention, shared prompt cache, one-uniform sampling)
ROWS = {"transformers": (False, False, False), "+ grouped eager attention": (True, False, False),
        "+ shared prompt cache": (False, True, False), "+ one-uniform sampling": (False, False, True),
        "tuneforge": (True, True, True)}


def measure(workload: str, row: str, rounds: int) -> dict:
    import torch
    from accelerate import Accelerator

    from tuneforge.config import load_config
    from tuneforge.data.collate import left_pad
    from tuneforge.data.encode import encode_prompt
    from tuneforge.data.templates import data_template, stop_token_ids
    from tuneforge.infer.engine import generation_kwargs
    from tuneforge.models.load import load_tokenizer
    from tuneforge.train.common import prepare_model
    from tuneforge.train.loop import Precision
    from tuneforge.train.rollout import shared_prompt_cache

    work, (grouped, shared, ours) = WORKLOADS[workload], ROWS[row]
    cfg = load_config(str(ROOT / "examples/grpo.yaml"), [f"output_dir={tempfile.mkdtemp()}",
                                                           f"dataset_dir={ROOT / 'data'}"])
    accelerator = Accelerator()  # a GPU where there is one
    model = prepare_model(cfg, accelerator).to(accelerator.device).eval()
    if not grouped:
        model.set_attn_implementation("eager")
    tokenizer = load_tokenizer(cfg.model)
    template = data_template(cfg.data, tokenizer)
    records = json.loads((ROOT / "data/arithmetic_prompts.json").read_text())[:4]
    prompts = [encode_prompt([{"role": "user", "content": " ".join([r["instruction"]] * work["repeat"])}],
                             tokenizer, template, None) for r in records for _ in range(work["group"])]
    ids, mask, _ = left_pad(prompts, tokenizer.pad_token_id)
    ids, mask = ids.to(accelerator.device), mask.to(accelerator.device)
    kwargs = generation_kwargs(cfg.generate, stop_token_ids(template, tokenizer), tokenizer.pad_token_id)
    if not ours:  # transformers' own sampling
        kwargs.update(do_sample=True, temperature=cfg.generate.temperature, top_p=cfg.generate.top_p,
                      top_k=cfg.generate.top_k, logits_processor=None)
    kwargs.update(max_new_tokens=work["tokens"], min_new_tokens=work["tokens"], use_cache=True)
    autocast = Precision(cfg.train, accelerator.device).autocast(model)

    def rollout() -> float:
        start = time.perf_counter()
        with torch.no_grad(), autocast:
            cache = shared_prompt_cache(model, ids, mask) if shared else None
            out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **kwargs)
        assert out.shape[1] == ids.shape[1] + work["tokens"]
        return time.perf_counter() - start

    rollout()  # warm-up
    seconds = statistics.median(rollout() for _ in range(rounds))
    generated = len(prompts) * work["tokens"]
    return dict(workload=workload, row=row, rows=len(prompts), prompt_width=ids.shape[1], tokens=work["tokens"],
                seconds=round(seconds, 3), tokens_per_s=round(generated / seconds, 1),
                peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                peak_cuda_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one row in this process
    args = parser.parse_args()
    if args.row:
        print(json.dumps(measure(args.only, args.row, args.rounds)))
        return 0
    from tuneforge.machine import cpu_description, training_allocator

    environment = training_allocator(os.environ) or dict(os.environ)  # tcmalloc, as `tuneforge train` runs
    print(f"CPU: {cpu_description()}; median of {args.rounds} rollouts after one warm-up")
    print("| workload | row | rows x prompt width | tokens | seconds | generated tokens/s | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for workload in [args.only] if args.only else list(WORKLOADS):
        for row in ROWS:
            done = subprocess.run([sys.executable, __file__, "--only", workload, "--row", row, "--rounds",
                                   str(args.rounds)], env=environment, capture_output=True, text=True, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            cuda = f" ({r['device']}: {r['peak_cuda_gb']} GB)" if r["peak_cuda_gb"] is not None else ""
            print(f"| {workload} | {row} | {r['rows']} x {r['prompt_width']} | {r['tokens']} | {r['seconds']} | "
                  f"{r['tokens_per_s']} | {r['peak_rss_gb']} GB{cuda} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
