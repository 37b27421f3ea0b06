"""LLaMA-Factory and tuneforge side by side: one script runs them one after the other on the same workload.

    .venv/bin/python bench/lf_compare.py --lf-python /work/lfvenv/bin/python --lf-bf16 --lowmem   # every row
    .venv/bin/python bench/lf_compare.py --max-records 32                                # a quick check of the harness

Workload (issue 17): bench/data/alpaca_bench.json (256 records), SmolLM2-135M-Instruct, LoRA r8 on all linear
layers, template chatml, cutoff 256, batch 4 x accumulation 2, one epoch, lr 1e-4 constant. Rows:
  lf                  LLaMA-Factory with its defaults (fp32, gradient checkpointing on), from its own venv;
  lf-bf16             (with --lf-bf16) LLaMA-Factory with `bf16: true` and `use_cpu: true`: without use_cpu the
                      HF TrainingArguments under it refuse bf16 on CPU ("Your setup doesn't support bf16/gpu");
  tuneforge-defaults  tuneforge on the very same YAML and dataset_info.json, nothing added;
  tuneforge-fast      the same plus bench/train_speed.py's `smollm2-lora` settings (bf16, pure_bf16, packing, ...);
  tuneforge-fast-lowmem  (with --lowmem) the same plus gradient_checkpointing, which LLaMA-Factory has on by default;
  tuneforge-compile   (with --compile) the fast settings plus torch_compile and gradient_checkpointing_scope
                      selective (projection outputs kept, the rest recomputed: the same gradients as without
                      checkpointing); its train time includes compiling, which torch caches under
                      /tmp/torchinductor_$USER: a second run on the same machine compiles faster;
  tuneforge-compile-lowmem  (with --compile) the fast settings plus torch_compile and gradient_checkpointing;
  lf-bf16-grouped, tuneforge-padded, tuneforge-grouped  (with --grouped) length-grouped batches as the alternative
                      to packing: LLaMA-Factory's bf16 row with `train_sampling_strategy: group_by_length` (HF's
                      key since transformers 5; 4's `group_by_length: true` is refused by the transformers 5.6
                      under LLaMA-Factory 0.9.5), tuneforge's fast settings with `packing: false`, and the same
                      with `train_sampling_strategy: group_by_length`.
Each row is its own process (tree). Measured:
  train time      `train_runtime` as each framework writes it to all_results.json (its step loop: model loading,
                  tokenisation and the final save are not in it; the process's whole wall time is recorded too);
  input tokens/s  the non-padding tokens of the dataset as tuneforge tokenises it (unpacked, after cutoff, one
                  epoch) / train time: one token count for every row, so the ratios compare like with like
                  (LLaMA-Factory's chatml also trains on a newline after each answer's <|im_end|>: it tokenises
                  the 256 records to 38,984 tokens against tuneforge's 38,735, 0.6% more, not counted);
  peak RSS        ru_maxrss of the row's process and all its descendants (os.wait4's rusage, taken by a small
                  launcher so that the harness's own peak is not the row's floor);
  peak GPU        on a CUDA machine, the most GPU memory in use while the row ran (nvidia-smi polled every 100 ms,
                  less what was in use before it started): LLaMA-Factory's process cannot be asked from outside,
                  so both frameworks are measured the same way, CUDA context included.
On a CUDA machine the LLaMA-Factory bf16 row is plain `bf16: true`, and tuneforge's fast settings leave the
attention to SDPA (`flash_attn: auto`): eager attention is the CPU's choice. --epochs and --batch lengthen the
workload for a GPU, where one epoch of batch 4 takes seconds; every row gets them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from train_speed import DATA, SMOL_LORA, WORKLOADS  # noqa: E402  (the fast row's settings live there)

FAST = {k: v for k, v in WORKLOADS["smollm2-lora"].items() if k not in SMOL_LORA}
FAST_GPU = {k: v for k, v in FAST.items() if k != "flash_attn"}  # SDPA's fused kernels, not eager, on a GPU
GROUPED = {"train_sampling_strategy": "group_by_length"}


def workload_yaml(model: str, data_dir: Path, output_dir: Path) -> dict:
    """The workload in LLaMA-Factory's YAML keys (those of its example LoRA SFT file, minus the speed settings);
    every row gets exactly these, and LLaMA-Factory's defaults decide the rest."""
    return dict(model_name_or_path=model, stage="sft", do_train=True, finetuning_type="lora", lora_rank=8,
                lora_target="all", dataset="alpaca_bench", dataset_dir=str(data_dir), template="chatml",
                cutoff_len=256, output_dir=str(output_dir), logging_steps=10, overwrite_output_dir=True,
                report_to="none", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                learning_rate=1.0e-4, num_train_epochs=1.0, lr_scheduler_type="constant")


def write_data(folder: Path, max_records: int | None) -> int:
    records = json.loads(DATA.read_text(encoding="utf-8"))[:max_records]
    (folder / "alpaca_bench.json").write_text(json.dumps(records), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"alpaca_bench": {"file_name": "alpaca_bench.json"}}))
    return len(records)


def input_tokens(keys: dict) -> int:
    """Non-padding tokens of one epoch, as tuneforge tokenises the data (no packing: packing adds none)."""
    from tuneforge.config import build_config
    from tuneforge.data import prepare_lm_data
    from tuneforge.models.load import load_tokenizer

    cfg = build_config(keys, source="lf_compare")
    return sum(len(row["input_ids"]) for row in prepare_lm_data(cfg, load_tokenizer(cfg.model)).train)


class RowFailed(Exception):
    """A row's process failed; the others still run (a GPU lease is too short to lose them)."""


class GpuMemory:
    """The peak of the GPU's used memory while a row runs, above what was in use before it, in GB (nvidia-smi)."""

    def __enter__(self):
        query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "--id=0"]
        self.before = int(subprocess.run(query, capture_output=True, text=True, check=True).stdout.split()[0])
        self.poll = subprocess.Popen([*query, "-lms", "100"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        self.poll.terminate()
        used = [int(line) for line in self.poll.communicate()[0].split() if line.isdigit()]
        self.peak_gb = round((max(used, default=self.before) - self.before) / 1024, 2)  # MiB -> GiB


# A child's ru_maxrss starts at its parent's peak RSS: Linux carries the high-water mark of the memory a process
# replaces at exec (fork's copy, or vfork's shared parent) into the new program's. This harness peaks at 1.49 GB when
# it converts the bundled model on a fresh machine, and on 2026-11-25 three rows under that read 1.48 GB. So each row
# is started by a fresh, small Python (about 8 MB) that waits for it and writes the row's own rusage to a file.
_LAUNCH = ("import os, sys; pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ); "
           "_, status, usage = os.wait4(pid, 0); open(sys.argv[1], 'w').write(str(usage.ru_maxrss)); "
           "code = os.waitstatus_to_exitcode(status); sys.exit(code if code >= 0 else 128 - code)")


def run_row(name: str, command: list[str], env: dict, output_dir: Path, log: Path, cuda: bool) -> dict:
    """Runs one row to completion; its train_runtime, wall time, the peak RSS of its process tree and, on a CUDA
    machine, the peak GPU memory."""
    print(f"[lf_compare] {name}: {' '.join(command)}  (log: {log})", flush=True)
    gpu = GpuMemory() if cuda and shutil.which("nvidia-smi") else contextlib.nullcontext()
    start = time.perf_counter()
    with gpu, open(log, "w", encoding="utf-8") as out:
        # the launcher's wait4 covers the row and every descendant it reaped: the row's own peak, not a running max
        maxrss = log.with_suffix(".maxrss")
        launch = [sys.executable, "-c", _LAUNCH, str(maxrss), *command]
        pid = os.posix_spawn(launch[0], launch, env, file_actions=[(os.POSIX_SPAWN_DUP2, out.fileno(), 1),
                                                                   (os.POSIX_SPAWN_DUP2, out.fileno(), 2)])
        _, status, _ = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-15:])
        raise RowFailed(f"[lf_compare] {name} failed (exit {code}); the end of {log}:\n{tail}")
    results = json.loads((output_dir / "all_results.json").read_text(encoding="utf-8"))
    return {"train_runtime_s": results["train_runtime"], "process_wall_s": round(wall, 1),
            "train_loss": results.get("train_loss"), "peak_rss_gb": round(int(maxrss.read_text()) / 1024 ** 2, 2),
            **({"peak_gpu_gb": gpu.peak_gb} if isinstance(gpu, GpuMemory) else {})}


def _cli_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)  # `true`, as a YAML user writes it


def markdown(rows: list[dict]) -> str:
    """The table; on a GPU the memory compared is the GPU's, with the RSS beside it."""
    base = next((r for r in rows if r["row"] == "lf"), None)
    memory = "peak_gpu_gb" if "peak_gpu_gb" in rows[0] else "peak_rss_gb"
    gpu = memory == "peak_gpu_gb"
    lines = [f"| run | train time | input tokens/s | {'peak GPU memory | ' if gpu else ''}peak RSS "
             "| vs LLaMA-Factory (speed, memory) |", f"|---|---|---|---|{'---|' if gpu else ''}---|"]
    for r in rows:
        ratio = (f"{r['tokens_per_second'] / base['tokens_per_second']:.2f}x, "
                 f"{r[memory] / base[memory]:.2f}x" if base else "n/a (no LLaMA-Factory row)")
        lines.append(f"| {r['label']} | {r['train_runtime_s']:.1f} s | {r['tokens_per_second']:.0f} | "
                     f"{f'{r[memory]:.2f} GB | ' if gpu else ''}{r['peak_rss_gb']:.2f} GB | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    lf_venv = os.environ.get("LF_VENV")
    parser.add_argument("--lf-python", default=str(Path(lf_venv) / "bin" / "python") if lf_venv else None,
                        help="python of the LLaMA-Factory venv (default: $LF_VENV/bin/python); row skipped without")
    parser.add_argument("--lf-bf16", action="store_true", help="also run LLaMA-Factory with bf16 (+ use_cpu on a CPU)")
    parser.add_argument("--lowmem", action="store_true",
                        help="also run tuneforge's fast settings with gradient_checkpointing (LLaMA-Factory's default)")
    parser.add_argument("--compile", action="store_true",
                        help="also run tuneforge's fast settings with torch_compile, selective or whole layers recomputed")
    parser.add_argument("--grouped", action="store_true",
                        help="also run padded batches with and without group_by_length (both frameworks)")
    parser.add_argument("--fp32", action="store_true",
                        help="also run tuneforge's fast settings in fp32, eager and compiled with selective "
                             "recompute (CPUs without bf16 units; docs/benchmarks.md)")
    parser.add_argument("--only", help="run only these rows (comma list of row names, e.g. lf,tuneforge-fast)")
    parser.add_argument("--max-records", type=int, help="only the first N records (a quick check, not a result)")
    parser.add_argument("--epochs", type=float, default=1.0, help="num_train_epochs for every row (default 1)")
    parser.add_argument("--batch", type=int, default=4, help="per_device_train_batch_size for every row (default 4)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "lf_compare.jsonl"), help="append JSON lines here")
    args = parser.parse_args()

    import torch

    from tuneforge.machine import cpu_description
    from tuneforge.models.load import resolve_model_path

    work = Path(tempfile.mkdtemp(prefix="tuneforge-lfc-"))
    records = write_data(work, args.max_records)
    model = resolve_model_path("smollm2-135m-instruct")  # the bundled alias as a local folder both can read
    workload = {"num_train_epochs": args.epochs, "per_device_train_batch_size": args.batch}
    tokens = round(input_tokens(workload_yaml(model, work, work / "tokens")) * args.epochs)
    cuda = torch.cuda.is_available()
    fast = FAST_GPU if cuda else FAST
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    rows = []
    lf_cli = Path(args.lf_python).parent / "llamafactory-cli" if args.lf_python else None
    if lf_cli and lf_cli.is_file():
        rows.append(("lf", "LLaMA-Factory 0.9.5, its defaults", lf_cli, {}))
        lf_bf16 = {"bf16": True} if cuda else {"bf16": True, "use_cpu": True}
        bf16_label = "LLaMA-Factory 0.9.5, bf16" + ("" if cuda else " + use_cpu")
        if args.lf_bf16:
            rows.append(("lf-bf16", bf16_label, lf_cli, lf_bf16))
        if args.grouped:
            rows.append(("lf-bf16-grouped", f"{bf16_label}, grouped by length", lf_cli,
                         {**lf_bf16, **GROUPED}))
    else:
        print(f"[lf_compare] LLaMA-Factory row skipped: no llamafactory-cli next to --lf-python / $LF_VENV "
              f"({args.lf_python or 'not set'}); bench/README.md says how to install it", flush=True)
    tuneforge_cli = Path(sys.executable).parent / "tuneforge"
    rows.append(("tuneforge-defaults", "tuneforge, defaults", tuneforge_cli, {}))
    fast_label = "tuneforge, " + ", ".join(f"{k}={_cli_value(v)}" for k, v in fast.items())
    rows.append(("tuneforge-fast", fast_label, tuneforge_cli, fast))
    if args.lowmem:
        rows.append(("tuneforge-fast-lowmem", "tuneforge, the same + gradient_checkpointing=true", tuneforge_cli,
                     {**fast, "gradient_checkpointing": True}))
    if args.compile:
        compiled = {**fast, "torch_compile": True, "gradient_checkpointing": True}
        rows.append(("tuneforge-compile", "tuneforge, the fast settings + torch_compile, selective recompute",
                     tuneforge_cli, {**compiled, "gradient_checkpointing_scope": "selective"}))
        rows.append(("tuneforge-compile-lowmem", "tuneforge, the fast settings + torch_compile, layers recomputed",
                     tuneforge_cli, compiled))
    if args.fp32:
        fp32 = {k: v for k, v in fast.items() if k not in ("bf16", "pure_bf16")}
        rows.append(("tuneforge-fp32-fast", "tuneforge, " + ", ".join(f"{k}={_cli_value(v)}" for k, v in fp32.items()),
                     tuneforge_cli, fp32))
        rows.append(("tuneforge-fp32-compile", "tuneforge, the same + torch_compile, selective recompute",
                     tuneforge_cli, {**fp32, "torch_compile": True, "gradient_checkpointing": True,
                                     "gradient_checkpointing_scope": "selective"}))
    if args.grouped:
        padded = {**fast, "packing": False}
        rows.append(("tuneforge-padded", "tuneforge, the fast settings with packing=false", tuneforge_cli, padded))
        rows.append(("tuneforge-grouped", "tuneforge, the fast settings with packing=false, grouped by length",
                     tuneforge_cli, {**padded, **GROUPED}))
    if args.only:
        rows = [row for row in rows if row[0] in args.only.split(",")]
    done, failed = [], []
    for name, label, cli, overrides in rows:
        output_dir = work / name
        config = work / f"{name}.yaml"
        config.write_text(yaml.safe_dump({**workload_yaml(model, work, output_dir), **workload}, sort_keys=False))
        # LLaMA-Factory runs on its own venv only: our PYTHONPATH (a tuneforge source tree) stays out of it
        row_env = {k: v for k, v in env.items() if k != "PYTHONPATH"} if name.startswith("lf") else env
        command = [str(cli), "train", str(config), *(f"{k}={_cli_value(v)}" for k, v in overrides.items())]
        try:
            measured = run_row(name, command, row_env, output_dir, work / f"{name}.log", cuda)
        except RowFailed as failure:
            print(failure, flush=True)
            failed.append(name)
            continue
        result = {"row": name, "label": label, **measured, "input_tokens": tokens,
                  "tokens_per_second": round(tokens / measured["train_runtime_s"], 1), "overrides": overrides,
                  "records": records, "epochs": args.epochs, "batch": args.batch,
                  "torch_threads": torch.get_num_threads(),
                  "gpu": torch.cuda.get_device_name() if cuda else None,
                  "cpu": cpu_description(), "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
                  "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        print(json.dumps(result), flush=True)
        with open(args.out, "a", encoding="utf-8") as out:
            out.write(json.dumps(result) + "\n")
        done.append(result)
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    machine = cpu_description() + (f" (oneDNN capped at {cap})" if cap else "") + \
        (f", {torch.cuda.get_device_name()}" if cuda else "")
    print(f"\n{machine}, {torch.get_num_threads()} threads, {records} records, "
          f"{tokens} input tokens in {args.epochs:g} epoch(s) of batch {args.batch}\n")
    if done:
        print(markdown(done))
    if failed:
        print(f"\n[lf_compare] failed rows: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
