"""Run LLaMA-Factory's own example configs through tuneforge and record what happens.

    python bench/lf_examples.py /path/to/LLaMA-Factory [--only NAME_PART ...] [--max-steps 1]

For each YAML under examples/{train_lora,train_full,train_qlora,extras,merge_lora,inference} of a LLaMA-Factory
checkout (0.9.5), it runs the command LLaMA-Factory's README gives for it (train, export, chat) in one scratch folder
that holds a copy of LLaMA-Factory's data/ folder, so `dataset_dir: data` and the `saves/...` paths that later
examples read (merge_lora and inference load what train_lora / train_full wrote) work as written, and so do the
`examples/deepspeed/...` paths, copied too. It changes only:
- `model_name_or_path` to the bundled `smollm2-135m-instruct` (unless it names a `saves/` folder an earlier example
  wrote), and `dataset_dir` to that data/ copy where a config points elsewhere (a remote store);
- `max_steps` (default 1) for training, and for chat a `--query` with `max_new_tokens=32` so a reply ends quickly.
Results go to bench/lf_examples.jsonl (one line per config: outcome, return code, the error lines) and the table
of docs/llamafactory.md is printed for pasting. Each run is a separate `tuneforge` process; CPU-heavy: all configs
take tens of minutes on two cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

FOLDERS = ("train_lora", "train_full", "train_qlora", "extras", "merge_lora", "inference")  # training first
COMMAND = {"merge_lora": "export", "inference": "chat"}
MODEL = "smollm2-135m-instruct"
TUNEFORGE = str(Path(sys.executable).with_name("tuneforge"))


def prepared(path: Path, work: Path, max_steps: int) -> tuple[dict, list[str]] | None:
    """The config with the allowed changes, and the list of changes; None when the file is no training config."""
    config = yaml.safe_load(path.read_text()) or {}
    if "model_name_or_path" not in config:
        return None
    changes = []
    if not str(config["model_name_or_path"]).startswith("saves/"):
        config["model_name_or_path"] = MODEL
        changes.append(f"model_name_or_path: {MODEL}")
    if "dataset_dir" in config and config["dataset_dir"] != "data":
        config["dataset_dir"] = str(work / "data")
        changes.append("dataset_dir: data (LLaMA-Factory's, copied)")
    if path.parent.name not in COMMAND and path.parent.parent.name != "inference":
        config["max_steps"] = max_steps
        changes.append(f"max_steps: {max_steps}")
    return config, changes


def run_one(path: Path, root: Path, work: Path, max_steps: int, timeout: int) -> dict:
    name = str(path.relative_to(root / "examples"))
    folder = path.relative_to(root / "examples").parts[0]
    got = prepared(path, work, max_steps)
    if got is None:
        return {"config": name, "outcome": "not a config", "reasons": ["no model_name_or_path: a file another "
                                                                        "config points at"]}
    config, changes = got
    command = COMMAND.get(folder, "train")
    edited = work / "configs" / name
    edited.parent.mkdir(parents=True, exist_ok=True)
    edited.write_text(yaml.safe_dump(config, sort_keys=False))
    extra = ["max_new_tokens=32", "--query", "Who are you?"] if command == "chat" else []
    started = time.time()
    try:
        done = subprocess.run([TUNEFORGE, command, str(edited), *extra], cwd=work, capture_output=True, text=True,
                              timeout=timeout)
        code, stderr = done.returncode, done.stderr
    except subprocess.TimeoutExpired:
        code, stderr = None, f"tuneforge: error: still running after {timeout} s (stopped)"
    errors = [line for line in stderr.splitlines() if line.startswith(("tuneforge: error", "  - "))]
    if code == 0:
        outcome = "ran"
    elif "multimodal" in stderr:
        outcome = "multimodal: refused"
    else:
        outcome = "failed"
        errors = errors or stderr.strip().splitlines()[-3:]
    errors = [line.replace(str(edited), name) for line in errors]
    return {"config": name, "command": f"tuneforge {command}", "changes": changes, "outcome": outcome,
            "returncode": code, "seconds": round(time.time() - started, 1), "reasons": errors}


def _cost(path: Path, root: Path) -> tuple[int, int]:
    """Run order: training (pt, sft), then merge_lora and inference (they read its output), then the stages that
    score pairs or hold a reference (rm, dpo, kto), the slowest."""
    folder = path.relative_to(root / "examples").parts[0]
    stage = (yaml.safe_load(path.read_text()) or {}).get("stage", "sft")
    phase = 2 if stage in ("rm", "dpo", "kto", "ppo") else 1 if folder in COMMAND else 0
    return phase, FOLDERS.index(folder)


def markdown(results: list[dict]) -> str:
    lines = ["| config | command | outcome | reasons (all of them, from one run) |", "|---|---|---|---|"]
    for r in results:
        reasons = "<br>".join(x.replace("tuneforge: error: ", "").replace("|", "\\|").strip("- ").strip()
                              for x in r["reasons"])
        lines.append(f"| {r['config']} | {r.get('command', '')} | {r['outcome']} | {reasons} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("llamafactory", type=Path, help="a LLaMA-Factory checkout (its examples/ and data/)")
    parser.add_argument("--only", nargs="*", default=[], help="run only configs whose path contains one of these")
    parser.add_argument("--max-steps", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per config")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("lf_examples.jsonl"))
    parser.add_argument("--resume", action="store_true", help="keep the results already in --out; run the rest")
    args = parser.parse_args()
    root = args.llamafactory.resolve()
    work = Path(tempfile.mkdtemp(prefix="tuneforge-lf-examples-"))
    shutil.copytree(root / "data", work / "data")
    for configs in ("deepspeed", "accelerate"):  # `deepspeed: examples/deepspeed/...` as from LLaMA-Factory's root
        shutil.copytree(root / "examples" / configs, work / "examples" / configs)
    paths = [p for folder in FOLDERS for p in sorted((root / "examples" / folder).rglob("*.yaml"))
             if not args.only or any(part in str(p) for part in args.only)]
    paths.sort(key=lambda p: _cost(p, root))
    results = [json.loads(line) for line in args.out.read_text().splitlines()] if args.resume else []
    done = {r["config"] for r in results}
    paths = [p for p in paths if str(p.relative_to(root / "examples")) not in done]
    with args.out.open("a" if args.resume else "w", encoding="utf-8") as out:
        for path in paths:
            result = run_one(path, root, work, args.max_steps, args.timeout)
            print(f"{result['outcome']:22} {result['config']}", flush=True)
            out.write(json.dumps(result) + "\n")
            out.flush()
            results.append(result)
    shutil.rmtree(work, ignore_errors=True)
    print(markdown(results))
    counts = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    print(", ".join(f"{n} {k}" for k, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
