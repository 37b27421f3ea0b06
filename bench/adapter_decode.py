"""Decoding with a LoRA adapter attached (PEFT's layers) against folded into the base weights (what the engine of
chat, api, predict and eval loads since the fold was measured here).

    .venv/bin/python bench/adapter_decode.py [--model smollm2-135m-instruct] [--tokens 200] [--rounds 3]

Makes a rank-8 adapter on every linear layer with random B (so it changes the answers), then alternates, `--rounds`
times: greedy decoding of `--tokens` new tokens at batch 1 with the adapter attached, and with the engine's folded
model, in the engine's inference dtype. Prints one JSON line per round and the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> int:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from tuneforge.config import build_config
    from tuneforge.infer.engine import Engine
    from tuneforge.machine import cpu_description
    from tuneforge.models.load import inference_dtype, load_base_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="tuneforge-adapter-decode-")) / "adapter"
    cfg = build_config({"model_name_or_path": args.model, "template": "chatml"}, source="bench")
    dtype = inference_dtype(cfg.model)
    model = get_peft_model(load_base_model(cfg.model, dtype=dtype, compute_dtype=dtype),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.01)
    model.save_pretrained(folder)
    del model

    cfg = build_config({"model_name_or_path": args.model, "template": "chatml", "adapter_name_or_path": str(folder),
                        "max_new_tokens": args.tokens, "do_sample": False}, source="bench")
    folded = Engine(cfg)
    base = load_base_model(cfg.model, dtype=dtype, compute_dtype=dtype)
    attached = Engine(cfg, model=PeftModel.from_pretrained(base, folder), tokenizer=folded.tokenizer)
    prompt = [folded.prompt_ids([{"role": "user", "content": "Write a long story about a dragon."}])]
    speeds: dict[str, list[float]] = {"attached": [], "folded": []}
    for engine in (attached, folded):  # warm-up
        engine.generate(prompt, batch_size=1)
    for round_ in range(args.rounds):
        for name, engine in (("attached", attached), ("folded", folded)):
            started = time.perf_counter()
            answer = engine.generate(prompt, batch_size=1)[0]
            seconds = time.perf_counter() - started
            tokens = len(engine.tokenizer(answer, add_special_tokens=False)["input_ids"])
            speeds[name].append(tokens / seconds)
            print(json.dumps({"round": round_, "adapter": name, "tokens": tokens, "tokens_per_second":
                              round(tokens / seconds, 1)}), flush=True)
    print(json.dumps({"model": args.model, "dtype": str(dtype).removeprefix("torch."), "batch": 1,
                      "new_tokens": args.tokens, "threads": torch.get_num_threads(), "cpu": cpu_description(),
                      **{f"{name}_tokens_per_second": round(statistics.median(v), 1) for name, v in speeds.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
