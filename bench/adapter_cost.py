"""What LoRA's own products cost a training step, fused (tuneforge's layer) and as PEFT's own layer computes them.

    .venv/bin/python bench/adapter_cost.py [--only smollm2-lora-compile] [--set key=value ...] [--rounds 3]

Sets the model up as a training run does (train.common.prepare_model), then times forward + backward over the
same 8 micro-batches, alternating three variants: the adapters as `tuneforge train` runs them (models/lora_linear.py's
fused layer), the same layers running PEFT's own LoRA Linear forward (the class swapped back on the same weights),
and PEFT's adapters disabled (the bound: what the base products alone cost). Input embeddings require a gradient
throughout, so backward still crosses every layer (the base products' input gradients); only the rank-r products
and their elementwise work differ. No optimizer step (a LoRA step's is negligible).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import WORKLOADS, OneProcess, row_config  # noqa: E402


def main() -> int:
    import torch
    from peft.tuners.lora.layer import Linear

    from tuneforge.data import prepare_lm_data
    from tuneforge.data.collate import PadCollator
    from tuneforge.models.load import load_tokenizer
    from tuneforge.models.lora_linear import FusedLoraLinear
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

    model = prepare_model(cfg, OneProcess(torch.device("cpu")), packed=cfg.data.packing)
    model.enable_input_require_grads()
    module = CausalLMLoss(model, head_chunk_size(cfg.train)).train()
    precision = Precision(cfg.train, torch.device("cpu"))
    collator = PadCollator(tokenizer.pad_token_id)
    size = cfg.train.per_device_train_batch_size
    batches = [collator(rows[i * size:(i + 1) * size]) for i in range(8)]
    tokens = sum(int(b.pop("num_tokens")) for b in batches)
    fused = [m for m in model.modules() if isinstance(m, FusedLoraLinear)]
    assert fused, "the run's LoRA layers are not the fused ones (see models/adapters.py lora_config)"

    def seconds(variant: str) -> float:
        for layer in fused:
            layer.__class__ = Linear if variant == "peft" else FusedLoraLinear
        with model.disable_adapter() if variant == "disabled" else nullcontext():
            start = time.perf_counter()
            for batch in batches:
                with precision.autocast(model):
                    module(**batch)[0].backward()
            return time.perf_counter() - start

    variants = ("fused", "peft", "disabled")
    for variant in variants:  # warm-up: compiles each variant
        seconds(variant)
    print(f"{args.only} {' '.join(args.set)}: forward + backward over {tokens} tokens, alternating")
    for _ in range(args.rounds):
        rates = {variant: tokens / seconds(variant) for variant in variants}
        print("  " + "   ".join(f"{variant} {rate:6.1f} tokens/s" for variant, rate in rates.items()) +
              f"   fused / PEFT {rates['fused'] / rates['peft']:.2f}   disabled / fused "
              f"{rates['disabled'] / rates['fused']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
