"""Where a training step's memory goes: resident memory after each phase of the benchmark workload, and the peak
within it, next to the bytes of tensors autograd saves for backward.

    .venv/bin/python bench/memory_profile.py [--only smollm2-lora] [--set key=value ...]

Wall and CPU seconds per phase: with one thread, CPU seconds are what to compare on a busy machine.
Phases: import, tokenizer and data, the model as a training run sets it up (train.common.prepare_model: base,
adapters), optimizer, forward (with the saved tensors by size), backward, optimizer step; then a second step (the
steady state). "peak in phase" comes from the kernel's high-water mark,
reset before each phase (/proc/self/clear_refs), so each phase's own peak shows, not the run's so far.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _status(field: str) -> float:
    """A /proc/self/status field (VmRSS, VmHWM) in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024 ** 2
    return float("nan")


class Phases:
    """Prints each phase's RSS, its change, the peak within the phase and its wall and CPU seconds."""

    def __init__(self):
        self.last = _status("VmRSS")
        self.started, self.cpu = time.perf_counter(), time.process_time()
        self._reset_peak()

    @staticmethod
    def _reset_peak():
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass

    def done(self, name: str, note: str = "") -> None:
        rss, peak = _status("VmRSS"), _status("VmHWM")
        now, cpu = time.perf_counter(), time.process_time()
        print(f"  {name:<34} RSS {rss:5.2f} GB ({rss - self.last:+.2f})   peak in phase {peak:5.2f} GB  "
              f"{now - self.started:6.2f} s ({cpu - self.cpu:5.2f} s CPU)  {note}", flush=True)
        self.last, self.started, self.cpu = rss, now, cpu
        self._reset_peak()


def main() -> int:
    from tuneforge.machine import map_large_allocations

    map_large_allocations()  # as the tuneforge command does
    phases = Phases()
    import torch
    import transformers  # noqa: F401  (its import is part of every run's baseline)
    import peft  # noqa: F401

    from train_speed import WORKLOADS, OneProcess, row_config
    from tuneforge.data import prepare_lm_data
    from tuneforge.data.collate import PadCollator
    from tuneforge.models.load import load_tokenizer
    from tuneforge.train.common import prepare_model
    from tuneforge.train.loop import Precision
    from tuneforge.train.optimizers import build_optimizer
    from tuneforge.train.losses import CausalLMLoss, head_chunk_size

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(WORKLOADS), default="smollm2-lora")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps")
    parser.add_argument("--set", nargs="*", default=[])
    args = parser.parse_args()
    print(f"memory of {args.only} {' '.join(args.set)}, {torch.get_num_threads()} threads:")
    phases.done("import torch, transformers, peft")

    work = Path(tempfile.mkdtemp(prefix="tuneforge-memory-"))
    cfg = row_config(args.only, args.set, work, 100, "memory")
    tokenizer = load_tokenizer(cfg.model)
    rows = prepare_lm_data(cfg, tokenizer).train
    phases.done("tokenizer + data")
    # the training run's own set-up: the base model, checkpointing scope, CPU paths, adapters
    model = prepare_model(cfg, OneProcess(torch.device("cpu")), packed=cfg.data.packing)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 1024 ** 3
    phases.done("load base model + adapters", f"(weights {weights:.2f} GB)")
    module = CausalLMLoss(model, head_chunk_size(cfg.train)).train()
    optimizer = build_optimizer(model, cfg.train, cfg.finetune)
    precision = Precision(cfg.train, torch.device("cpu"))
    collator = PadCollator(tokenizer.pad_token_id)
    phases.done("optimizer")

    size = cfg.train.per_device_train_batch_size
    for step in range(args.steps):
        for micro in range(cfg.train.gradient_accumulation_steps):
            start = (step * cfg.train.gradient_accumulation_steps + micro) * size
            batch = collator(rows[start: start + size])
            batch.pop("num_tokens")
            saved = SavedBytes({p.untyped_storage().data_ptr() for p in model.parameters()})
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda x: x), precision.autocast(model):
                loss, _ = module(**batch)
            phases.done(f"step {step + 1}.{micro + 1} forward ({batch['input_ids'].numel()} tokens)",
                        f"(saved for backward {saved.total() / 1024 ** 3:.2f} GB)")
            if step == 0 and micro == 0:
                saved.report()
            with precision.lora_casts_off(model):  # as in the training step: recomputed layers run as in forward
                loss.backward()
            del loss
            phases.done(f"step {step + 1}.{micro + 1} backward")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        phases.done(f"step {step + 1} optimizer")
    return 0


class SavedBytes:
    """Bytes of the distinct tensor storages autograd keeps for backward, grouped by shape and dtype."""

    def __init__(self, weights: set[int]):
        self.weights = weights  # storages of parameters: kept anyway, not activations
        self.storages: dict[int, tuple[int, str]] = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in self.weights:
            self.storages.setdefault(storage.data_ptr(), (storage.nbytes(), f"{tuple(tensor.shape)} {tensor.dtype}"))
        return tensor

    def total(self) -> int:
        return sum(n for n, _ in self.storages.values())

    def report(self, top: int = 12) -> None:
        by_kind = defaultdict(lambda: [0, 0])
        for nbytes, kind in self.storages.values():
            by_kind[kind][0] += nbytes
            by_kind[kind][1] += 1
        for kind, (nbytes, count) in sorted(by_kind.items(), key=lambda kv: -kv[1][0])[:top]:
            print(f"      {nbytes / 1024 ** 2:8.1f} MB  {count:4d} x {kind}")


if __name__ == "__main__":
    sys.exit(main())
