"""The same training run in LLaMA-Factory and tuneforge, step by step: loss, gradient norm and learning rate.

    .venv/bin/python bench/lf_parity.py --lf-python /work/lfvenv/bin/python --lf-repo /path/to/LLaMA-Factory

Each case is one YAML given to both (`llamafactory-cli train` in LLaMA-Factory's venv, as bench/README.md installs
it, and `tuneforge train`): SmolLM2-135M-Instruct (the bundled model), LLaMA-Factory's own demo data from its
checkout's data/ folder, unshuffled batches (`disable_shuffling`), so that both train on the same rows in the same
order. Template `mistral`, whose answers end at eos: LLaMA-Factory's chatml also trains on the newline after each
`<|im_end|>`, which tuneforge leaves to the next prompt (docs/config.md), and that alone would move the losses.
It prints each step's figures side by side from LLaMA-Factory's trainer_state.json and tuneforge's trainer_log.jsonl
(rounded to 4 decimals there) and the largest difference. CPU-heavy: about a minute per run on two cores.
ipo-lora, hinge-lora (a bug of LLaMA-Factory's), pt-full, the packing cases and sft-lora-embeddings (tied
embeddings trained as one copy here, two there) differ (docs/llamafactory.md says why).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

TUNEFORGE = str(Path(sys.executable).with_name("tuneforge"))
COMMON = dict(model_name_or_path="smollm2-135m-instruct", stage="sft", do_train=True, dataset="alpaca_en_demo",
              template="mistral", cutoff_len=256, max_samples=40, overwrite_cache=True,
              per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=6, lr_scheduler_type="cosine",
              warmup_steps=2, logging_steps=1, save_steps=1000, report_to="none", disable_shuffling=True,
              optim="adamw_torch", weight_decay=0.01, max_grad_norm=1.0)
CASES = {
    "sft-full": dict(finetuning_type="full", learning_rate=2e-5),
    "sft-lora": dict(finetuning_type="lora", lora_target="all", learning_rate=2e-4),
    # a cutoff no pair reaches: the two truncate long prompts differently (tuneforge keeps a prompt's end)
    "dpo-lora": dict(finetuning_type="lora", lora_target="all", learning_rate=5e-5, stage="dpo", pref_beta=0.1,
                     dataset="dpo_en_demo", cutoff_len=4096),
    **{f"{loss}-lora": dict(finetuning_type="lora", lora_target="all", learning_rate=5e-5, stage="dpo", pref_beta=0.1,
                            pref_loss=loss, dataset="dpo_en_demo", cutoff_len=4096)
       for loss in ("ipo", "hinge", "orpo", "simpo")},
    # DPO's extra terms: the SFT term on the chosen answers (pref_ftx) and conservative DPO's label smoothing
    "dpo-ftx-smoothing-lora": dict(finetuning_type="lora", lora_target="all", learning_rate=5e-5, stage="dpo",
                                   pref_beta=0.1, pref_ftx=0.5, dpo_label_smoothing=0.1, dataset="dpo_en_demo",
                                   cutoff_len=4096),
    "kto-lora": dict(finetuning_type="lora", lora_target="all", learning_rate=5e-5, stage="kto", pref_beta=0.1,
                     dataset="kto_en_demo", cutoff_len=4096),
    "kto-weighted-lora": dict(finetuning_type="lora", lora_target="all", learning_rate=5e-5, stage="kto",
                              pref_beta=0.1, kto_chosen_weight=2.0, kto_rejected_weight=0.5, dataset="kto_en_demo",
                              cutoff_len=4096),
    # 5 micro-batches an epoch: each epoch's last optimizer step has one, and the second epoch is shuffled anew
    "sft-lora-2-epochs": dict(finetuning_type="lora", lora_target="all", learning_rate=2e-4, disable_shuffling=False,
                              max_samples=10, max_steps=-1, num_train_epochs=2),
    "sft-freeze": dict(finetuning_type="freeze", learning_rate=2e-5),
    "sft-freeze-first-mlp": dict(finetuning_type="freeze", learning_rate=2e-5, freeze_trainable_layers=-2,
                                 freeze_trainable_modules="mlp"),
    "sft-lora-qv-r16": dict(finetuning_type="lora", lora_target="q_proj,v_proj", lora_rank=16, lora_alpha=64,
                            learning_rate=2e-4),
    "sft-lora-embeddings": dict(finetuning_type="lora", lora_target="all", learning_rate=2e-4,
                                additional_target="embed_tokens,lm_head"),
    "sft-lora-min-lr": dict(finetuning_type="lora", lora_target="all", learning_rate=2e-4, warmup_steps=0,
                            warmup_ratio=0.2, lr_scheduler_type="cosine_with_min_lr",
                            lr_scheduler_kwargs={"min_lr_rate": 0.1}),
    "sft-lora-shuffled": dict(finetuning_type="lora", lora_target="all", learning_rate=2e-4, disable_shuffling=False),
    "sft-dora": dict(finetuning_type="lora", lora_target="all", learning_rate=2e-4, use_dora=True),
    "sft-rslora-loraplus": dict(finetuning_type="lora", lora_target="all", learning_rate=2e-4, use_rslora=True,
                                loraplus_lr_ratio=16.0),
    "sft-pissa": dict(finetuning_type="lora", lora_target="all", learning_rate=2e-4, pissa_init=True, pissa_iter=-1),
    "pt-full": dict(finetuning_type="full", learning_rate=2e-5, stage="pt", dataset="c4_demo"),
    "sft-packing": dict(finetuning_type="lora", lora_target="all", learning_rate=2e-4, packing=True),
    "sft-neat-packing": dict(finetuning_type="lora", lora_target="all", learning_rate=2e-4, packing=True,
                             neat_packing=True),
    # 4 of the 40 rows held out (the same 4: both permute with the seed), evaluated every 3 steps, in one batch:
    # LLaMA-Factory averages each batch's mean loss, tuneforge takes the mean over all target tokens
    # (docs/config.md), which is the same thing for one batch
    "sft-lora-eval": dict(finetuning_type="lora", lora_target="all", learning_rate=2e-4, do_eval=True, val_size=0.1,
                          eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=4),
}
KEYS = (("loss", "loss"), ("grad_norm", "grad_norm"), ("learning_rate", "lr"))


def run(command: list[str], config: dict, out: Path) -> tuple[list[dict], list[float]]:
    """The run's training log records and its evaluation losses, in order."""
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump({**config, "output_dir": str(out)}))
    env = {**os.environ, "DISABLE_VERSION_CHECK": "1"}  # LLaMA-Factory's check of its pinned library versions
    done = subprocess.run([*command, "train", str(path)], capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{command[0]} failed on {path}:\n{done.stderr[-3000:]}")
    if (out / "trainer_state.json").is_file():  # LLaMA-Factory: the Trainer's log history
        records = json.loads((out / "trainer_state.json").read_text())["log_history"]
    else:
        records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r["eval_loss"] for r in records if "eval_loss" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lf-python", required=True, help="python of the LLaMA-Factory venv")
    parser.add_argument("--lf-repo", required=True, help="a LLaMA-Factory checkout, for its data/ folder")
    parser.add_argument("--only", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    model = subprocess.run([sys.executable, "-c", "from tuneforge.models.load import resolve_model_path; "
                            "print(resolve_model_path('smollm2-135m-instruct'))"], capture_output=True, text=True,
                           check=True).stdout.strip()  # LLaMA-Factory gets the same folder tuneforge loads
    lf_cli = str(Path(args.lf_python).with_name("llamafactory-cli"))
    work = Path(tempfile.mkdtemp(prefix="lf_parity_"))
    for name in args.only:
        config = {**COMMON, **CASES[name], "model_name_or_path": model,
                  "dataset_dir": str(Path(args.lf_repo) / "data")}
        (theirs, their_evals), (ours, our_evals) = (run([lf_cli], config, work / f"{name}-lf"),
                                                    run([TUNEFORGE], config, work / f"{name}-tf"))
        print(f"\n{name}: step | " + " | ".join(f"{key} LF / tuneforge" for key, _ in KEYS))
        for step, (a, b) in enumerate(zip(theirs, ours), 1):
            print(f"  {step} | " + " | ".join(f"{a[k]:.6g} / {b[t]:.6g}" for k, t in KEYS))
        for key, ours_key in KEYS:
            gap = max(abs(a[key] - b[ours_key]) for a, b in zip(theirs, ours))
            print(f"  largest {key} difference: {gap:.2g}")
        if their_evals or our_evals:
            print("  eval_loss LF / tuneforge: " + ", ".join(f"{a:.6g} / {b:.6g}" for a, b in
                                                            zip(their_evals, our_evals))
                  + f" ({len(their_evals)} / {len(our_evals)} evaluations)")


if __name__ == "__main__":
    main()
