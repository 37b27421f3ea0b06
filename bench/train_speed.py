"""Training-speed benchmark: a fixed workload, measured the same way every time.

    .venv/bin/python bench/train_speed.py                         # the standard rows (SmolLM2 LoRA, full, tiny)
    .venv/bin/python bench/train_speed.py --only smollm2-lora --set torch_compile=true   # one row, overrides

Each row trains in its own process (so peak memory is its own) for `--warmup` + `--steps` optimizer steps on
bench/data/alpaca_bench.json, and prints one JSON line: real (non-padding) tokens/s over the measured steps,
padding fraction, step time, peak RSS (and peak CUDA memory), and MFU = achieved model FLOP/s / the matmul peak
measured in the same process (GEMM microbenchmark in the training precision).
Model FLOPs per real token: 6 x parameters for full fine-tuning, 4 x parameters for LoRA (frozen base: forward
plus input gradients; the adapters themselves are negligible). Attention score FLOPs are not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data" / "alpaca_bench.json"

SMOL_LORA = dict(model_name_or_path="smollm2-135m-instruct", finetuning_type="lora", lora_rank=8, lora_target="all")
FAST = dict(bf16=True, packing=True, flash_attn="eager")  # the quickstart's settings (plus pure_bf16 for LoRA)
WORKLOADS = {
    "smollm2-lora-plain": dict(SMOL_LORA, bf16=False),  # fp32, padded batches, SDPA: the incumbent's setting
    "smollm2-lora": dict(SMOL_LORA, **FAST, pure_bf16=True),
    "smollm2-lora-compile": dict(SMOL_LORA, **FAST, pure_bf16=True, torch_compile=True),
    "smollm2-lora-lowmem": dict(SMOL_LORA, **FAST, pure_bf16=True, gradient_checkpointing=True),
    # only eager attention's core recomputed (gradient_checkpointing_scope): same gradients, most of the memory saved
    "smollm2-lora-attn-ckpt": dict(SMOL_LORA, **FAST, pure_bf16=True, gradient_checkpointing=True,
                                   gradient_checkpointing_scope="attention"),
    "smollm2-full": dict(model_name_or_path="smollm2-135m-instruct", finetuning_type="full", **FAST),
    # QLoRA: the same LoRA on a base quantised by bitsandbytes (docs/benchmarks.md#qlora compares eval loss too)
    "smollm2-qlora4": dict(SMOL_LORA, **FAST, pure_bf16=True, quantization_bit=4),
    "smollm2-qlora8": dict(SMOL_LORA, **FAST, pure_bf16=True, quantization_bit=8),
    "tiny-lora": dict(model_name_or_path="tiny", finetuning_type="lora", lora_rank=8, lora_target="all", **FAST),
}
FIXED = dict(stage="sft", do_train=True, template="chatml", cutoff_len=256, per_device_train_batch_size=4,
             gradient_accumulation_steps=2, learning_rate=1e-4, lr_scheduler_type="constant", logging_steps=1,
             save_steps=100000, seed=0)


def gemm_peak_gflops(dtype_name: str, reps: int = 30) -> float:
    """Best-of matmul throughput for shapes like the model's projections (tokens x 576 x 1536)."""
    import torch

    dtype = getattr(torch, dtype_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(2048, 576, dtype=dtype, device=device)
    b = torch.randn(576, 1536, dtype=dtype, device=device)
    warm_until = time.perf_counter() + 2.0  # AMX/AVX units and caches warm up before the numbers settle
    while time.perf_counter() < warm_until:
        a @ b
    best = float("inf")
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / 5)
    return 2 * 2048 * 576 * 1536 / best / 1e9


def tiny_model(folder: Path) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_llama, build_tokenizer

    tokenizer = build_tokenizer(folder)
    build_llama(folder, len(tokenizer))
    return str(folder)


class OneProcess:
    """A one-process accelerator, as far as model set-up (train.common.prepare_model) and the step function look:
    how the other bench scripts set a model up as a training run does."""

    num_processes = 1
    print = staticmethod(print)

    def __init__(self, device=None):
        import torch  # (this script's parent process runs without it)

        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @staticmethod
    def no_sync(_):
        return contextlib.nullcontext()


def row_config(name: str, overrides: list[str], work: Path, max_steps: int, source: str):
    """The validated config of workload `name` with key=value overrides, writing under `work`."""
    from tuneforge.cmdline import parse_overrides
    from tuneforge.config import build_config, validate

    values = {**FIXED, **WORKLOADS[name], "dataset": str(DATA), "output_dir": str(work / "out"),
              "max_steps": max_steps, **parse_overrides(overrides)}
    if values["model_name_or_path"] == "tiny":
        values["model_name_or_path"] = tiny_model(work / "tiny")
    cfg = build_config(values, source=source)
    validate(cfg, "train")
    return cfg


def batch_plan_stats(cfg, rows, warmup: int) -> tuple[float, float]:
    """(padding fraction, real tokens per optimizer step) over the measured steps, replaying the loop's plan."""
    from tuneforge.train.steps import epoch_batches

    t = cfg.train
    batches = epoch_batches(len(rows), t.per_device_train_batch_size, t.seed, 0, True)
    real = padded = 0
    measured = batches[warmup * t.gradient_accumulation_steps: t.max_steps * t.gradient_accumulation_steps]
    for batch in measured:
        lengths = [len(rows[i]["input_ids"]) for i in batch]
        real += sum(lengths)
        padded += max(lengths) * len(lengths)
    return 1 - real / padded, real / (t.max_steps - warmup)


def child(name: str, steps: int, warmup: int, overrides: list[str]) -> dict:
    from tuneforge.machine import map_large_allocations

    map_large_allocations()  # as the tuneforge command does
    import torch

    from tuneforge.data import prepare_lm_data
    from tuneforge.machine import allocator_in_use, cpu_description
    from tuneforge.models.load import load_tokenizer
    from tuneforge.train.sft import run

    work = Path(tempfile.mkdtemp(prefix="tuneforge-bench-"))
    cfg = row_config(name, overrides, work, warmup + steps, "bench")
    rows = prepare_lm_data(cfg, load_tokenizer(cfg.model)).train
    precision = "bfloat16" if cfg.train.bf16 or cfg.finetune.pure_bf16 else "float32"
    peak = gemm_peak_gflops(precision)
    results = run(cfg)
    log = [json.loads(line) for line in (work / "out" / "trainer_log.jsonl").read_text().splitlines()]
    measured = [r for r in log if "loss" in r and r["current_steps"] > warmup]
    tokens_per_second = len(measured) / sum(1 / r["tokens_per_second"] for r in measured)  # harmonic: per token
    from transformers import AutoConfig

    from tuneforge.models.load import resolve_model_path

    model_config = AutoConfig.from_pretrained(resolve_model_path(cfg.model.model_name_or_path))
    n_params = _count_params(model_config)
    flops_per_token = (4 if cfg.finetune.finetuning_type == "lora" else 6) * n_params
    padding, real_tokens_per_step = batch_plan_stats(cfg, rows, warmup)
    result = {
        "workload": name, "overrides": overrides, "tokens_per_second": round(tokens_per_second, 1),
        "padding_fraction": round(padding, 3),
        "step_time_s": round(real_tokens_per_step / tokens_per_second, 3),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 2),
        "mfu": round(tokens_per_second * flops_per_token / (peak * 1e9), 3),
        "matmul_peak_gflops": round(peak, 1), "precision": precision, "params": n_params,
        "final_loss": measured[-1]["loss"], "eval_loss": results.get("eval_loss"), "steps": steps,
        "warmup_steps": warmup,
        "seq_len": cfg.data.cutoff_len, "batch": f"{cfg.train.per_device_train_batch_size}x"
                                                 f"{cfg.train.gradient_accumulation_steps}",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_description(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "allocator": allocator_in_use(),
    }
    if torch.cuda.is_available():
        result["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 1024 ** 3, 2)
    return result


def _count_params(config) -> int:
    from transformers import AutoModelForCausalLM

    import torch

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(WORKLOADS), action="append", help="run only these workloads")
    parser.add_argument("--steps", type=int, default=8, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps not measured")
    parser.add_argument("--set", nargs="*", default=[], help="key=value overrides for every row")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results.jsonl"), help="append JSON lines here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from tuneforge.machine import training_allocator

    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.steps, args.warmup, args.set)), flush=True)
        return 0
    for name in args.only or list(WORKLOADS):
        command = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--set", *args.set]
        environment = training_allocator(os.environ) or os.environ  # the allocator `tuneforge train` would run on
        done = subprocess.run(command, capture_output=True, text=True, env={**environment, "TQDM_DISABLE": "1"})
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        print(lines[-1][7:], flush=True)
        with open(args.out, "a", encoding="utf-8") as out:
            out.write(lines[-1][7:] + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
