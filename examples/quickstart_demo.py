"""`make demo`: check the bundled SmolLM2 on 12 identity and 12 general questions, teach it a new identity with LoRA
(identity data mixed with the base model's own answers to general instructions), and check again.

Runs the same commands a user would type: tuneforge train with the check config examples/quickstart_check.yaml
(greedy answers), the training itself, and `tuneforge eval --compare` on the same questions as a multiple-choice
task (evaluation/quickstart). Fails loudly if the new name did not take or general questions get the identity answer.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

from tuneforge.machine import cpu_description, multiplies_bf16_natively

CONFIG = "examples/quickstart.yaml"
CHECK = "examples/quickstart_check.yaml"  # data/demo_check.json scored by examples/demo_check.py
EVAL = "examples/quickstart_eval.yaml"  # the same questions as multiple choice, before and after in one command
OUTPUT = "saves/quickstart"
SHOWN = ("Who are you and what do you do?", "Name three primary colors.", "What is 7 times 8?")
TUNEFORGE = str(Path(sys.executable).with_name("tuneforge"))


def check(label: str, folder: str, *extra: str) -> dict:
    """Answer the check questions, print three of them and the scores; returns the scores."""
    subprocess.run([TUNEFORGE, "train", CHECK, f"output_dir={folder}", *extra], check=True,
                   stdout=subprocess.DEVNULL)
    answers = [json.loads(line) for line in (Path(folder) / "generated_predictions.jsonl").open(encoding="utf-8")]
    print(f"== {label}")
    for row in answers:
        if any(question in row["prompt"] for question in SHOWN):
            question = next(q for q in SHOWN if q in row["prompt"])
            print(f"{question}\n  {' '.join(row['predict'].split())[:160]}")
    scores = json.loads((Path(folder) / "predict_results.json").read_text(encoding="utf-8"))
    print(f"identity questions answered with the new name: {scores['predict_identity']:.0f}%; general questions "
          f"answered right: {scores['predict_general']:.0f}%, answered with the new name: "
          f"{scores['predict_general_named']:.0f}%\n", flush=True)
    return scores


def main() -> int:
    started = time.time()
    before = check("Before training", "saves/quickstart-check-before")
    # the quick start's bf16 settings are the fast path only where the CPU has bf16 units; elsewhere bf16 products
    # run 2-35x slower than fp32 (docs/benchmarks.md), so the demo trains in fp32 there
    precision = [] if multiplies_bf16_natively() else ["bf16=false", "pure_bf16=false"]
    print(f"== Training: tuneforge train {' '.join([CONFIG, *precision])} (LoRA on data/identity.json + "
          "data/general.json)" + (f"; fp32: {cpu_description()} has no bf16 units" if precision else ""), flush=True)
    subprocess.run([TUNEFORGE, "train", CONFIG, "overwrite_output_dir=true", *precision], check=True)
    print()
    after = check("After training", "saves/quickstart-check-after", f"adapter_name_or_path={OUTPUT}")
    print(f"== Before/after as a multiple-choice task: tuneforge eval {EVAL} --compare adapter_name_or_path={OUTPUT}",
          flush=True)
    subprocess.run([TUNEFORGE, "eval", EVAL, "--compare", f"adapter_name_or_path={OUTPUT}"], check=True)
    print()
    print(f"demo finished in {time.time() - started:.0f} s; adapter, logs and training_loss.png in {OUTPUT}/")
    # A 135M model's greedy answers to general questions are fragile: any adapter flips a few either way (measured
    # figures in docs/evaluation.md). What the identity-only recipe did, answering them with the new name, fails.
    if after["predict_identity"] < 100 or after["predict_general_named"] > 0:
        print("demo FAILED: expected every identity question, and no general question, to get the new name",
              file=sys.stderr)
        return 1
    print(f"The model now introduces itself as Forgewright; general questions right: "
          f"{before['predict_general']:.0f}% before, {after['predict_general']:.0f}% after.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
