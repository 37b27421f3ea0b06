"""Length-grouped batches for a stage that cannot pack: DPO with random against grouped micro-batches.

    .venv/bin/python bench/grouped_dpo.py [--pairs 96] [--repeats 2]

Pairs are made from bench/data/alpaca_bench.json (record i's answer chosen, record i+7's rejected), so their lengths
vary as real instruction data does. SmolLM2-135M-Instruct, LoRA r8 on all linear layers, chatml, cutoff 256, batch
4 x accumulation 2, one epoch, bf16 + pure_bf16, eager attention. The two settings alternate, each run its own
process; train time is `train_runtime` (all_results.json), peak RSS the process tree's (os.wait4's rusage).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from lf_compare import run_row  # noqa: E402  (one process per row, its rusage)
from train_speed import DATA  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=96, help="how many pairs to train on")
    parser.add_argument("--repeats", type=int, default=2, help="alternations of the two settings")
    args = parser.parse_args()

    from tuneforge.machine import cpu_description

    work = Path(tempfile.mkdtemp(prefix="tuneforge-grouped-dpo-"))
    records = json.loads(DATA.read_text(encoding="utf-8"))
    pairs = [{"instruction": r["instruction"], "input": r.get("input", ""), "chosen": r["output"],
              "rejected": records[(i + 7) % len(records)]["output"]} for i, r in enumerate(records)]
    (work / "pairs.json").write_text(json.dumps(pairs[: args.pairs]), encoding="utf-8")
    (work / "dataset_info.json").write_text(json.dumps({"bench_pairs": {
        "file_name": "pairs.json", "ranking": True,
        "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}}}))
    config = dict(model_name_or_path="smollm2-135m-instruct", stage="dpo", do_train=True, finetuning_type="lora",
                  lora_rank=8, lora_target="all", pref_beta=0.1, dataset="bench_pairs", dataset_dir=str(work),
                  template="chatml", cutoff_len=256, overwrite_output_dir=True, report_to="none",
                  per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1.0e-4,
                  num_train_epochs=1.0, lr_scheduler_type="constant", bf16=True, pure_bf16=True, flash_attn="eager")
    (work / "dpo.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cli = Path(sys.executable).parent / "tuneforge"
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    results = []
    for repeat in range(args.repeats):
        for strategy in ("random", "group_by_length"):
            output_dir = work / f"{strategy}-{repeat}"
            command = [str(cli), "train", str(work / "dpo.yaml"), f"output_dir={output_dir}",
                       f"train_sampling_strategy={strategy}"]
            measured = run_row(strategy, command, env, output_dir, work / f"{strategy}-{repeat}.log",
                               cuda=False)  # peak RSS only: GPU memory is not what this compares
            results.append({"strategy": strategy, **measured})
            print(json.dumps(results[-1]), flush=True)
    print(f"\n{cpu_description()}, {args.pairs} pairs\n\n| train_sampling_strategy | train time | peak RSS | loss |\n"
          "|---|---|---|---|")
    for r in results:
        print(f"| {r['strategy']} | {r['train_runtime_s']:.1f} s | {r['peak_rss_gb']} GB | {r['train_loss']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
