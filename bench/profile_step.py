"""Where a training step's time goes: torch.profiler over a few optimizer steps of the benchmark workload.

    .venv/bin/python bench/profile_step.py [--only smollm2-lora] [--set key=value ...] [--shapes]

Prints the operators that take the most self CPU time (and CUDA time on a GPU), grouped by kind (matmul,
attention, elementwise, optimizer, ...), and with --shapes every operator by input shapes, so the next speed lever
is a reading, not a guess. The model is set up as a training run sets it up
(train.common.prepare_model).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import WORKLOADS, OneProcess, row_config  # noqa: E402

KINDS = {
    "matmul": ("mm", "addmm", "bmm", "matmul", "linear"),
    "attention": ("scaled_dot_product", "attention", "softmax"),
    "cross-entropy / head": ("cross_entropy", "log_softmax", "nll_loss"),
    "optimizer": ("adam", "_foreach", "lerp", "addcdiv", "sqrt"),
    "casts / copies": ("to", "_to_copy", "copy_", "clone", "contiguous"),
}


def kind_of(name: str) -> str:
    short = name.replace("aten::", "")
    for kind, keys in KINDS.items():
        if any(short == k or short.startswith(k + "_") or k in short for k in keys):
            return kind
    return "other (elementwise, norms, indexing)"


def main() -> int:
    import os

    from tuneforge.machine import training_allocator

    # profile on the allocator `tuneforge train` runs on: on glibc, large temporaries page-fault on every use,
    # which shows up as copies (the output head's casts took 14% of a step on glibc, 6% on tcmalloc)
    environment = training_allocator(os.environ)
    if environment is not None:
        os.execve(sys.executable, [sys.executable, *sys.argv], environment)
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from tuneforge.data import prepare_lm_data
    from tuneforge.models.load import load_tokenizer
    from tuneforge.train.loop import Precision, _optimizer_step
    from tuneforge.train.optimizers import build_optimizer
    from tuneforge.train.schedules import build_scheduler
    from tuneforge.train.losses import CausalLMLoss, head_chunk_size
    from tuneforge.train.common import prepare_model
    from tuneforge.data.collate import PadCollator

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(WORKLOADS), default="smollm2-lora")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[])
    parser.add_argument("--rows", type=int, default=15, help="operators listed")
    parser.add_argument("--shapes", action="store_true",
                        help="also list the operators by input shapes")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tuneforge-profile-"))
    cfg = row_config(args.only, args.set, work, 100, "profile")
    tokenizer = load_tokenizer(cfg.model)
    rows = prepare_lm_data(cfg, tokenizer).train

    single = OneProcess()
    device = single.device
    # the training run's own set-up: checkpointing scope, adapters, compiled layers
    model = prepare_model(cfg, single, packed=cfg.data.packing)
    module = CausalLMLoss(model, head_chunk_size(cfg.train)).to(device).train()
    optimizer = build_optimizer(model, cfg.train, cfg.finetune)
    scheduler = build_scheduler(optimizer, cfg.train, 100)
    collator = PadCollator(tokenizer.pad_token_id)
    precision = Precision(cfg.train, device)

    def step(i: int):
        size, accum = cfg.train.per_device_train_batch_size, cfg.train.gradient_accumulation_steps
        micro = []
        for j in range(accum):
            batch = collator(rows[(i * accum + j) * size: (i * accum + j + 1) * size])
            batch.pop("num_tokens")
            micro.append({k: v.to(device) for k, v in batch.items()})
        units = sum(module.units(b) for b in micro)
        _optimizer_step(module, micro, units, optimizer, scheduler, single, precision, cfg.train.max_grad_norm, True)

    step(0)  # warm-up
    gpu = device.type == "cuda"
    # on a GPU, each operator's kernels' time (its self device time: a kernel counts for the operator that launched
    # it, and again as an event of its own, which the sums below leave out); the host's time is in the table
    where, self_time = ("GPU", lambda e: e.self_device_time_total) if gpu else ("CPU", lambda e: e.self_cpu_time_total)

    def on_host(events) -> list:
        return [e for e in events if e.device_type == DeviceType.CPU]

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities, record_shapes=args.shapes) as prof:
        started = time.perf_counter()
        for i in range(1, args.steps + 1):
            step(i)
        if gpu:
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    events = prof.key_averages()
    total = sum(self_time(e) for e in on_host(events))
    by_kind = defaultdict(float)
    for e in on_host(events):
        by_kind[kind_of(e.key)] += self_time(e)
    print(f"profile of {args.steps} optimizer steps, {args.only} {' '.join(args.set)}: {wall:.2f} s, "
          f"{total / 1e6:.2f} s of {where} time by kind ({100 * total / 1e6 / wall:.0f}% of the wall time):")
    for kind, micros in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<38} {micros / 1e6:8.2f} s  {100 * micros / total:5.1f}%")
    print("\ntop operators:")
    print(events.table(sort_by="self_cuda_time_total" if gpu else "self_cpu_time_total", row_limit=args.rows))
    if args.shapes:
        products = on_host(prof.key_averages(group_by_input_shape=True))
        print("\noperators by input shapes:")
        print(f"  {'operator':<10} {'input shapes':<58} {'calls':>6} {'self s':>8} {'share':>6}")
        for e in sorted(products, key=lambda e: -self_time(e))[:args.rows]:
            print(f"  {e.key.replace('aten::', ''):<10} {str(e.input_shapes)[:58]:<58} {e.count:>6} "
                  f"{self_time(e) / 1e6:>8.2f} {100 * self_time(e) / total:>5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
