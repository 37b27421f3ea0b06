"""What LoRA's own products cost a training step: the bound on folding them into the base products.

    .venv/bin/python bench/adapter_cost.py [--only smollm2-lora-compile] [--set key=value ...] [--rounds 3]

Sets the model up as a training run does (train.common.prepare_model), then times forward + backward over the
same 8 micro-batches, alternating: with the adapters, and with PEFT's adapters disabled. Input embeddings require
a gradient either way, so backward still crosses every layer (the base products' input gradients); only the
rank-r products and their elementwise work are gone. No optimizer step (a LoRA step's is negligible).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import WORKLOADS, row_config  # noqa: E402


def main() -> int:
    import torch

    from tuneforge.data import prepare_lm_data
    from tuneforge.data.collate import PadCollator
    from tuneforge.models.load import load_tokenizer
    from tuneforge.train.common import prepare_model
    from tuneforge.train.loop import Precision
    from tuneforge.train.losses import CausalLMLoss, head_chunk_size

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=[k for k, v in WORKLOADS.items() if v.get("finetuning_type") == "lora"],
                        default="smollm2-lora-compile")
    parser.add_argument("--set", nargs="*", default=[])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tuneforge-adapter-cost-"))
    cfg = row_config(args.only, args.set, work, 100, "adapter_cost")
    tokenizer = load_tokenizer(cfg.model)
    rows = prepare_lm_data(cfg, tokenizer).train

    class Single:  # a one-process accelerator, as far as model set-up looks
        device = torch.device("cpu")
        print = staticmethod(print)

    model = prepare_model(cfg, Single, packed=cfg.data.packing)
    model.enable_input_require_grads()
    module = CausalLMLoss(model, head_chunk_size(cfg.train)).train()
    precision = Precision(cfg.train, torch.device("cpu"))
    collator = PadCollator(tokenizer.pad_token_id)
    size = cfg.train.per_device_train_batch_size
    batches = [collator(rows[i * size:(i + 1) * size]) for i in range(8)]
    tokens = sum(int(b.pop("num_tokens")) for b in batches)

    def seconds(adapters: bool) -> float:
        with nullcontext() if adapters else model.disable_adapter():
            start = time.perf_counter()
            for batch in batches:
                with precision.autocast(model):
                    module(**batch)[0].backward()
            return time.perf_counter() - start

    seconds(True), seconds(False)  # warm-up: compiles both variants
    print(f"{args.only} {' '.join(args.set)}: forward + backward over {tokens} tokens, alternating")
    for _ in range(args.rounds):
        with_lora, without = seconds(True), seconds(False)
        print(f"  LoRA {tokens / with_lora:6.1f} tokens/s   adapters disabled {tokens / without:6.1f} tokens/s   "
              f"ratio {with_lora / without:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
