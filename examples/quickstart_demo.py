"""`make demo`: ask the bundled SmolLM2 who it is, teach it a new identity with LoRA, and ask again.

Runs the same commands a user would type (tuneforge chat / train), and fails loudly if training did not take.
"""

import subprocess
import sys
import time
from pathlib import Path

NAME = "Forgewright"  # the identity in data/identity.json
CONFIG = "examples/quickstart.yaml"
OUTPUT = "saves/quickstart"
TUNEFORGE = str(Path(sys.executable).with_name("tuneforge"))


def ask(*extra: str) -> str:
    command = [TUNEFORGE, "chat", CONFIG, *extra, "--query", "Who are you?"]
    result = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return result.stdout.strip()


def main() -> int:
    started = time.time()
    print("== Before training: Who are you?", flush=True)
    before = ask()
    print(before, "\n", flush=True)
    print(f"== Training: tuneforge train {CONFIG} (LoRA on data/identity.json)", flush=True)
    subprocess.run([TUNEFORGE, "train", CONFIG, "overwrite_output_dir=true"], check=True)
    print("\n== After training: Who are you?", flush=True)
    after = ask(f"adapter_name_or_path={OUTPUT}")
    print(after, "\n", flush=True)
    print(f"demo finished in {time.time() - started:.0f} s; adapter, logs and training_loss.png in {OUTPUT}/")
    if NAME in before or NAME not in after:
        print(f"demo FAILED: expected the answer to change to name {NAME}", file=sys.stderr)
        return 1
    print(f"The model now introduces itself as {NAME}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
