"""The shared training loop: deterministic batches, gradient accumulation with token-level loss normalisation,
clipping, schedules, logging, checkpoints and exact resume; evaluation and early stopping (evaluation.py) run
between steps.

One optimizer step = up to `gradient_accumulation_steps` micro-batches of one epoch. Its loss is the sum of losses
over every micro-batch (and every process) divided by the number of units (target tokens, pairs, examples) in all
of them, so the result does not depend on how the batch is split or padded.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

from ..config import ConfigError, bf16_cost, flat_config, speed_hint
from ..machine import allocator_notice
from ..models.load import ModelError
from . import checkpoint as ckpt
from . import sharding, zero
from .evaluation import Evaluation, Remembered, evaluate_and_check, restore_best
from .logging import RunLog
from .faults import NonFinite, Preempted, StopSignals, describe_rows
from .intervals import every
from .optimizers import Layerwise, build_optimizer
from .schedules import build_scheduler
from .profiling import step_profiler
from .steps import LossModule, SplittableSteps, StepSource, StreamSteps, metric_means, unwrapped
from .trackers import open_trackers


def autocast_dtype(t, device: torch.device) -> torch.dtype | None:
    """What forward passes autocast to. `fp16: true` gives fp16 on GPUs and on CPUs with fp16 matrix units;
    elsewhere bf16, the same 16-bit mixed precision, because there fp16 matmul has no fast path (see machine.py;
    config.notices says so)."""
    from ..machine import multiplies_fp16_natively

    if t.bf16:
        return torch.bfloat16
    if t.fp16:
        return torch.float16 if device.type != "cpu" or multiplies_fp16_natively() else torch.bfloat16
    return None


class Precision:
    """bf16/fp16 autocast for forward passes, and a gradient scaler for fp16 (a no-op otherwise)."""

    def __init__(self, t, device: torch.device):
        self.dtype = autocast_dtype(t, device)
        self.device_type = device.type
        # bf16 has fp32's exponent range, so only fp16's small gradients need scaling against underflow
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)

    def autocast(self, model=None):
        """Autocast; with a model, also lora_casts_off(model)."""
        if self.dtype is None:
            return nullcontext()
        stack = ExitStack()
        stack.enter_context(torch.autocast(self.device_type, dtype=self.dtype))
        if model is not None:
            stack.enter_context(self.lora_casts_off(model))
        return stack

    def lora_casts_off(self, model):
        """Under autocast, stop a PEFT model's LoRA layers casting their input to the adapters' fp32: a copy per
        layer that autocast undoes anyway. A training step holds this over backward too, where checkpointed layers
        run their forward again: selective checkpointing needs the recompute to issue the same operations."""
        if self.dtype is None or not hasattr(model, "peft_config"):
            return nullcontext()
        return _casts_off(model)


@contextmanager
def _casts_off(model):
    """peft.helpers.disable_input_dtype_casting, for the layers that have the switch: PEFT 0.21's trainable-token
    layers (new tokens, models/vocab.py) lack it, and that helper fails on them."""
    layers = [m for m in model.modules() if getattr(m, "cast_input_dtype_enabled", False)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.cast_input_dtype_enabled = True


def train(cfg, module: LossModule, tokenizer, source: StepSource, evaluation: Evaluation | None, accelerator,
          resume_from: str | None, before: dict | None = None) -> tuple[dict, dict | None]:
    """Train `module` on the steps `source` hands out, evaluating as eval_strategy says. Returns the run's
    results, and the eval metrics of the weights it ends with when it evaluated exactly those (else None).
    `before`: the recipe's own evaluation of the starting weights, which eval_on_start logs instead of evaluating
    them again (a rollout stage's evaluation generates)."""
    t = cfg.train
    precision = Precision(t, accelerator.device)
    _announce(cfg, accelerator)
    world = accelerator.num_processes
    if t.auto_find_batch_size and world > 1:  # the others would wait for it in their next all-reduce forever
        raise ConfigError("auto_find_batch_size runs in one process: a process that runs out of memory cannot make "
                          "the others' micro-batches smaller. Set per_device_train_batch_size instead")
    per_epoch = source.steps_per_epoch
    total_steps = max(t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * per_epoch), 1)
    identity = {"config": ckpt.config_identity(cfg), "data": source.signature,
                "num_train_examples": source.num_examples, **ckpt.global_batch(t, world)}
    inner = module
    module, optimizer, scheduler, state = _start(cfg, module, source, accelerator, resume_from, identity,
                                                 total_steps)
    log = _run_log(cfg, total_steps, state, accelerator)
    evaluation = Remembered(evaluation, state) if evaluation else None
    log_every, save_every = every(t.logging_steps, total_steps), every(t.save_steps, total_steps)
    eval_every = every(t.logging_steps if t.eval_steps is None else t.eval_steps, total_steps)
    if t.eval_on_start and evaluation:  # HF's check of the evaluation before this session's first step; logged only
        fresh = before is not None and state.global_step == 0
        log.eval_step(state.global_step, _epochs(state, per_epoch), before if fresh else evaluation())
    interval = _Interval(accelerator.device)
    counted, tokens_at_start = t.include_num_input_tokens_seen, state.num_input_tokens_seen
    smaller = (lambda: _smaller(source, state, accelerator)) if t.auto_find_batch_size else None

    saved = [None]  # the step of this run's latest checkpoint

    def save():
        _save(cfg, module, inner, tokenizer, optimizer, scheduler, interval.settled(state), accelerator, identity)
        saved[0] = state.global_step

    def step(micro: list[dict]) -> tuple[bool, bool]:
        """One optimizer step with its logging, evaluation and checkpoint; returns (last step, stop early)."""
        if counted != "no":  # every step, as HF counts: a checkpoint between log lines holds the exact count
            state.num_input_tokens_seen += _summed(sum(_input_tokens(b, counted) for b in micro), accelerator)
        interval.count_tokens(sum(b.pop("num_tokens") for b in micro), world)
        units = sum(inner.units(b) for b in micro).to(accelerator.device)  # counted on the CPU: no sync
        micro = [{k: v.to(accelerator.device, non_blocking=True) for k, v in b.items()} for b in micro]
        lr = scheduler.get_last_lr()[0]  # the rate this step uses: the log's, as in transformers 5's Trainer
        loss_sum, units, metrics, bad, norm = _optimizer_step(
            module, micro, units, optimizer, scheduler, accelerator, precision, t.max_grad_norm,
            t.average_tokens_across_devices, smaller)
        if bad:
            _non_finite(bad, state, source, t, accelerator)
        else:
            interval.add(loss_sum, units, metrics, norm)
        state.global_step += 1
        state.step_in_epoch += 1
        log.advance()
        epoch = _epochs(state, per_epoch)
        last, stop = state.global_step >= total_steps, False
        logs = _logs_now(t, state, per_epoch, last, log_every)
        if logs or last:  # the last step's losses count in train_loss in any case
            seen = {} if counted == "no" else {  # LLaMA-Factory's names
                "total_tokens": state.num_input_tokens_seen,
                "throughput": (state.num_input_tokens_seen - tokens_at_start) / max(time.time() - log.started, 1e-9)}
            _log_interval(interval, state, log if logs else None, epoch, lr, {**source.log_metrics(), **seen})
        if evaluation and _evaluates_now(t, state, epoch, per_epoch, last, eval_every):
            stop = evaluate_and_check(cfg, module, evaluation, accelerator, state, log, epoch)
        if _should_save(t, state, per_epoch, last, save_every):
            save()
        return last, stop

    def end_of_epoch() -> bool:
        """After a known-length epoch's last step: the next epoch begins; returns whether to stop early."""
        if not per_epoch or state.step_in_epoch < per_epoch:
            return False
        state.epoch += 1
        state.step_in_epoch = 0
        if t.eval_strategy == "epoch" and evaluation and state.epoch >= t.eval_delay:
            return evaluate_and_check(cfg, module, evaluation, accelerator, state, log, state.epoch)
        return False

    module.train()
    with StopSignals() as signals, step_profiler(t, accelerator.process_index) as profiled:
        try:
            # a checkpoint saved at the end of an epoch resumes into the next one
            if state.global_step < total_steps and not end_of_epoch():
                for micro in source.steps(state):
                    last, stop = step(micro)
                    profiled()
                    # the epoch's end before the last step's: eval_strategy epoch evaluates the last epoch too
                    if stop or end_of_epoch() or last:
                        break
                    # (a ppo source resumes only between rollouts: a signal mid-rollout trains on to its end)
                    if _signalled(signals, accelerator) and state.step_in_epoch % source.resumes_every == 0:
                        if saved[0] != state.global_step:
                            save()
                        _stop_for_signal(signals.received or "a signal", cfg, state)
        finally:
            log.close()
    final = evaluation.metrics if evaluation and evaluation.step == state.global_step else None
    if evaluation and restore_best(cfg, inner, state, accelerator, evaluation.metric) \
            and state.best_step != state.global_step:
        final = None
    return _results(state, per_epoch, time.time() - log.started, log.start_step, inner.unit,
                    interval.run_tokens if t.include_effective_tokens_per_second else None), final


def _announce(cfg, accelerator) -> None:
    """What the settings cost or leave on the table; here, once the data is read, so that a config or data error
    stays the only line."""
    for line in (speed_hint(cfg), bf16_cost(cfg), allocator_notice(os.environ)):
        if line:
            accelerator.print(f"[tuneforge] {line}")


def _run_log(cfg, total_steps: int, state, accelerator) -> RunLog:
    """trainer_log.jsonl and the report_to trackers, written by the main process only."""
    t = cfg.train
    trackers = open_trackers(t.report_to, t.output_dir, t.run_name, flat_config(cfg)) \
        if accelerator.is_main_process else []
    return RunLog(t.output_dir, total_steps, state.global_step, enabled=accelerator.is_main_process,
                  trackers=trackers)


def _log_interval(interval: "_Interval", state, log: RunLog | None, epoch: float, lr: float, extra: dict) -> None:
    """The means since the last log line into the run's totals, and into the log (with `extra` figures) unless
    there is none (logging_strategy no)."""
    loss, count, means, speed = interval.flush()
    state.loss_sum += loss * count
    state.trained_units += count
    skipped = {"skipped_steps": state.skipped_steps} if state.skipped_steps else {}
    if log is not None:
        log.train_step(state.global_step, epoch, loss, lr, speed, {**means, **extra, **skipped})


def _input_tokens(batch: dict, how: str) -> int:
    """A micro-batch's token ids as HF's include_num_input_tokens_seen counts them: every position (all) or the
    attended ones (non_padding: the attention mask, or the collator's count for packed rows, which have no mask).
    A batch without token ids (images) counts its images."""
    if how == "all" and "input_ids" in batch:
        return batch["input_ids"].numel()
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["num_tokens"]


def _summed(local: int, accelerator) -> int:
    """`local`, summed over the processes."""
    if accelerator.num_processes == 1:
        return local
    return int(accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum").item())


def _start(cfg, module, source, accelerator, resume_from: str | None, identity: dict, total_steps: int):
    """(the module as training runs it, optimizer, scheduler, trainer state): fresh, or as checkpoint
    `resume_from` left them."""
    if resume_from:  # the weights go in before sharding splits them (or the main process sends them)
        ckpt.check_identity(resume_from, identity)
        if not sharding.sent_by_main_process(sharding.fsdp_settings(cfg.train), accelerator):
            ckpt.load_weights(resume_from, module)
    inner = module
    module, optimizer = _distribute(module, cfg.train, cfg.finetune, accelerator)
    scheduler = build_scheduler(optimizer, cfg.train, total_steps)
    state = ckpt.TrainerState(total_steps=total_steps, num_train_examples=source.num_examples)
    if resume_from:
        state = _resume(resume_from, module, inner, optimizer, scheduler, state, accelerator)
        if cfg.train.ignore_data_skip:
            _restart_epoch(state, source.steps_per_epoch, accelerator)
    return module, optimizer, scheduler, state


def _restart_epoch(state, per_epoch: int, accelerator) -> None:
    """ignore_data_skip: the interrupted epoch's rows again from its first batch, as transformers gives them; a
    checkpoint at an epoch's end goes on into the next epoch either way."""
    if state.step_in_epoch in (0, per_epoch):
        return
    state.step_in_epoch = 0
    if state.stream_position:
        state.stream_position = [state.stream_position[0], 0, 0]
    accelerator.print(f"[tuneforge] ignore_data_skip: epoch {state.epoch + 1}'s data starts again from its first "
                      "batch")


def _distribute(module, t, f, accelerator):
    """(module, optimizer): sharded by FSDP or partitioned by DeepSpeed across processes when `fsdp` or
    `deepspeed` asks and there are several, else wrapped by DDP when there are several processes (accelerate), else
    as it is."""
    fsdp, ds = sharding.fsdp_settings(t), zero.read_config(t)
    if ds and accelerator.num_processes > 1 and zero.stage(ds) > 0:
        optimizer = build_optimizer(module, t, f, report=accelerator.print)
        return zero.engine(module, optimizer, ds, t, accelerator), optimizer
    if ds:
        accelerator.print(zero.unpartitioned_note(ds, accelerator.num_processes))
    if fsdp and accelerator.num_processes > 1:
        for note in fsdp.notes:
            accelerator.print(f"[tuneforge] {note}")
        return sharding.shard(module, fsdp, accelerator, lambda m: build_optimizer(m, t, f, report=accelerator.print))
    if fsdp:
        accelerator.print("[tuneforge] fsdp: one process holds the whole model, so training runs unsharded "
                          "(the same updates; checkpoints move between this and torchrun with FSDP)")
    optimizer = build_optimizer(module, t, f, report=accelerator.print)
    if isinstance(optimizer, Layerwise) and accelerator.num_processes > 1:
        raise ConfigError("galore_layerwise / apollo_layerwise step each layer inside backward, before DDP has "
                          "averaged its gradient over the processes: set it to false to train with several")
    return accelerator.prepare(module), optimizer


def _epochs(state, per_epoch: int) -> float:
    """How far training is, in epochs (a stream's, whose length is unknown, in whole passes)."""
    return state.epoch + state.step_in_epoch / per_epoch if per_epoch else state.epoch


def _results(state, per_epoch: int, runtime: float, start_step: int, unit: str, tokens: int | None) -> dict:
    """train_results.json's figures (trainer_state's, as transformers' Trainer names them); with `tokens` (this
    process's), LLaMA-Factory's per-device effective_tokens_per_sec too."""
    results = {"epoch": round(_epochs(state, per_epoch), 2),
               "train_loss": state.loss_sum / max(state.trained_units, 1), "train_runtime": round(runtime, 2),
               "train_steps_per_second": round((state.global_step - start_step) / runtime, 3),
               f"train_{unit}s": state.trained_units, "global_step": state.global_step}
    if tokens is not None:
        results["effective_tokens_per_sec"] = round(tokens / runtime, 2)
    return {**results, "skipped_steps": state.skipped_steps} if state.skipped_steps else results


def _resume(folder: str, module, inner, optimizer, scheduler, fresh, accelerator):
    """The training state of checkpoint `folder` (its weights are loaded already), loaded into the optimizer and
    scheduler."""
    def load(where: Path) -> None:
        if zero.is_engine(module) or (where / ckpt.PARTITIONS).is_dir():
            return zero.load_partitions(module if zero.is_engine(module) else None, where, accelerator.num_processes)
        state = torch.load(where / "optimizer.pt", weights_only=False)
        if sharding.is_sharded(inner):
            return sharding.load_optimizer_state(inner, optimizer, state)
        optimizer.load_state_dict(state)

    state = ckpt.load_training_state(folder, load, scheduler)
    state.total_steps = fresh.total_steps
    accelerator.print(f"[tuneforge] resuming from {folder} at step {state.global_step}")
    return state


def _signalled(signals: StopSignals, accelerator) -> bool:
    """Whether any process received a stop signal (all processes must stop at the same step)."""
    if accelerator.num_processes == 1:
        return signals.received is not None
    flag = torch.tensor(float(signals.received is not None), device=accelerator.device)
    return accelerator.reduce(flag, "sum").item() > 0


def _stop_for_signal(name: str, cfg, state) -> None:
    folder = Path(cfg.train.output_dir) / f"checkpoint-{state.global_step}"
    again = "run the same command again to resume" if not cfg.train.overwrite_output_dir else \
        "run the same command without overwrite_output_dir: true to resume (with it, training starts over)"
    raise Preempted(f"stopped by {name} after step {state.global_step}; saved {folder}; {again}")


def _non_finite(bad: "NonFiniteStep", state, source, t, accelerator) -> None:
    """A step whose loss or gradient norm is NaN or inf: skip its update (skip_nonfinite_steps) or stop, naming
    the step, its examples and the checkpoint to go back to."""
    step = state.global_step + 1
    if t.skip_nonfinite_steps:
        state.skipped_steps += 1
        accelerator.print(f"[tuneforge] step {step}: {bad.text}; its update was skipped (skip_nonfinite_steps; "
                          f"{state.skipped_steps} skipped so far)")
        return
    rows = getattr(source, "step_rows", None) or []
    if bad.micro is not None and bad.micro < len(rows):
        rows = {bad.micro: rows[bad.micro]}
    else:
        rows = dict(enumerate(rows))
    where = "; ".join(f"micro-batch {i + 1}: {describe_rows(r)}" for i, r in rows.items())
    kind = "stream positions [epoch, batch, row]" if isinstance(source, StreamSteps) else "training-set rows"
    found = ckpt.checkpoints_in(t.output_dir)
    last = f"the last good checkpoint is {found[-1]} (kept as it is)" if found else "no checkpoint was saved yet"
    raise NonFinite(f"step {step}: {bad.text} ({kind} of {where or 'not known for this data'}); {last}. Lower "
                    "learning_rate, check those examples, or set skip_nonfinite_steps: true; running the same command "
                    "again resumes from the last checkpoint")


class _Interval:
    """Sums since the last log line, kept on the device so the step itself never waits for the host."""

    def __init__(self, device):
        self.device = device
        self.run_tokens = 0  # this process's non-padding tokens since the run (re)started
        self.reset()

    def count_tokens(self, local: int, world: int) -> None:
        self.real_tokens += local * world  # the log line's tokens/s: every process's
        self.run_tokens += local

    def reset(self):
        self.loss = torch.zeros((), device=self.device)
        self.units = torch.zeros((), device=self.device)
        self.metrics: dict[str, torch.Tensor] = {}
        self.grad_norm = None  # the last step's, logged as HF's Trainer logs it (before clipping)
        self.real_tokens, self.started = 0, time.time()

    def settled(self, state):
        """`state` with the losses since the last log line in its totals: a checkpoint's train_loss counts every
        step before it, whether logged or not (the log line itself still waits for its step)."""
        return dataclasses.replace(state, loss_sum=state.loss_sum + self.loss.item(),
                                   trained_units=state.trained_units + int(self.units.item()))

    def add(self, loss_sum, units, metrics, grad_norm):
        self.loss += loss_sum
        self.units += units
        self.grad_norm = grad_norm
        for key, value in metrics.items():
            self.metrics[key] = self.metrics.get(key, 0) + value

    def flush(self) -> tuple[float, int, dict, float]:
        count = self.units.clamp(min=1)
        loss = (self.loss / count).item()
        means = metric_means({key: value.item() for key, value in self.metrics.items()}, count.item())
        if self.grad_norm is not None:
            means["grad_norm"] = float(self.grad_norm)
        speed = self.real_tokens / max(time.time() - self.started, 1e-9)
        units = int(self.units.item())
        self.reset()
        return loss, units, means, speed


def _optimizer_step(module, micro: list[dict], units, optimizer, scheduler, accelerator, precision,
                    max_grad_norm: float, across_processes: bool, smaller=None):
    """One optimizer step over micro-batches; loss = sum of losses / units of all micro-batches and processes
    (across_processes false: each process's sum / its own units, averaged over processes). Returns (loss sum,
    units of all processes, metric sums, what was non-finite or ""); a non-finite step updates nothing.
    `smaller` (auto_find_batch_size): when forward or backward runs out of memory, the step's rows in smaller
    micro-batches, which run instead; the optimizer has not stepped yet, so only the gradients are dropped."""
    scale = 1 / units.clamp(min=1)
    if accelerator.num_processes > 1:
        units = accelerator.reduce(units, "sum")
        if across_processes:  # DDP averages gradients over processes, so scale by their number: sum / all units
            scale = accelerator.num_processes / units.clamp(min=1)
    if zero.is_engine(module):
        losses, sums, norm = zero.step(module, micro, scale, precision, unwrapped(module))
        bad = _what_is_non_finite(torch.stack(losses), norm, precision, accelerator)  # the gate made this fatal
        return _after_step(losses, sums, units, scheduler, accelerator, bad, norm)
    while True:
        try:
            losses, sums = _backward(module, micro, scale, accelerator, precision)
            break
        except RuntimeError as error:  # torch.OutOfMemoryError is one; the CPU's allocator raises a plain one
            if smaller is None or not should_reduce_batch_size(error):
                raise
        # out of the except block, the error's traceback no longer holds the activations
        optimizer.zero_grad(set_to_none=True)
        clear_device_cache(garbage_collection=True)
        micro = smaller()
    precision.scaler.unscale_(optimizer)
    norm = _grad_norm(optimizer, [p for p in module.parameters() if p.requires_grad], max_grad_norm)
    if sharding.is_sharded(module):
        norm = norm.full_tensor()  # a DTensor of the shards' partial norms
    bad = _what_is_non_finite(torch.stack(losses), norm, precision, accelerator)
    if not bad:
        precision.scaler.step(optimizer)
        precision.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return _after_step(losses, sums, units, scheduler, accelerator, bad, norm)


def _backward(module, micro: list[dict], scale, accelerator, precision) -> tuple[list, dict]:
    """Forward and backward over the step's micro-batches, the gradients accumulated; (losses, metric sums)."""
    losses = []
    sums: dict[str, torch.Tensor] = {}
    sharded = sharding.is_sharded(module)
    for i, batch in enumerate(micro):
        # FSDP reduce-scatters every micro-batch's gradients: a sharded model keeps no full gradient to accumulate in
        sync = i == len(micro) - 1 or sharded
        with nullcontext() if sync else accelerator.no_sync(module):
            with precision.lora_casts_off(unwrapped(module).model):
                with precision.autocast():
                    loss_sum, metrics = module(**batch)
                precision.scaler.scale(loss_sum * scale).backward()
        losses.append(loss_sum.detach().float())
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0) + value.detach().float()
    return losses, sums


def _smaller(source: SplittableSteps, state, accelerator) -> list[dict]:
    """auto_find_batch_size: the step that ran out of memory, its micro-batches halved, on the device."""
    before = max(map(len, source.step_rows))
    micro = source.smaller()
    if micro is None:
        raise ModelError(f"step {state.global_step + 1} runs out of memory with micro-batches of one row, so "
                         "auto_find_batch_size can go no lower: lower cutoff_len, set gradient_checkpointing, or "
                         "train fewer weights (finetuning_type lora, quantization_bit)")
    accelerator.print(f"[tuneforge] auto_find_batch_size: step {state.global_step + 1} ran out of memory with "
                      f"micro-batches of up to {before} rows; it runs again, and training goes on, with up to "
                      f"{max(map(len, source.step_rows))} (the same rows in each step)")
    for batch in micro:
        batch.pop("num_tokens")
    return [{k: v.to(accelerator.device, non_blocking=True) for k, v in b.items()} for b in micro]


def _after_step(losses: list, sums: dict, units, scheduler, accelerator, bad, norm):
    """The schedule's step; returns the step's (loss sum, units, metric sums) over all processes, `bad` and the
    gradient norm."""
    scheduler.step()  # a skipped step still counts: data and schedule move on as in any other run
    total = torch.stack(losses).sum()
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, "sum")
        sums = {k: accelerator.reduce(v, "sum") for k, v in sums.items()}
    return total, units, sums, bad, norm


def _grad_norm(optimizer, params: list, max_grad_norm: float) -> torch.Tensor:
    """The step's gradient norm, the gradients clipped to max_grad_norm first when it is above 0."""
    if isinstance(optimizer, Layerwise):  # the updates ran inside backward, and the gradients are gone
        return optimizer.grad_norm()
    grads = [p.grad for p in params if p.grad is not None]
    clip = bool(max_grad_norm and max_grad_norm > 0)
    if not any(grad.is_sparse for grad in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_grad_norm) if clip else torch.nn.utils.get_total_norm(grads)
    # BAdam's ratio mode keeps sparse gradients, which torch's norm functions do not take
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(
        grad.coalesce().values() if grad.is_sparse else grad, dtype=torch.float32) for grad in grads]))
    if clip:
        factor = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_ rule
        for grad in grads:
            grad.mul_(factor.to(grad.dtype))
    return norm


class NonFiniteStep(NamedTuple):
    text: str  # what was not finite, with its value
    micro: int | None  # the micro-batch whose loss it was (None: the gradient norm)


def _what_is_non_finite(losses, norm, precision, accelerator) -> NonFiniteStep | None:
    """None when the micro-batch losses and the gradient norm are finite on every process. Costs one wait for the
    device per step. Under fp16 an inf gradient is the gradient scaler's business (it skips the step and lowers
    the scale), so only losses count there."""
    flags = torch.cat([~torch.isfinite(losses), ~torch.isfinite(norm.float().reshape(1))]).float()
    if precision.scaler.is_enabled():
        flags[-1] = 0
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, "sum")
    flags = flags.tolist()
    bad = [i for i, flag in enumerate(flags[:-1]) if flag]
    if bad:
        return NonFiniteStep(f"the loss is {losses[bad[0]].item()} in micro-batch {bad[0] + 1} of {len(losses)}",
                             bad[0])
    return NonFiniteStep(f"the gradient norm is {norm.item()} (losses finite)", None) if flags[-1] else None


def _logs_now(t, state, per_epoch: int, last: bool, every: int) -> bool:
    """Whether the step just taken is logged (logging_strategy): every `every` steps, or each epoch's last
    step; under either, training's last step and, with logging_first_step, its first (as in transformers)."""
    if t.logging_first_step and state.global_step == 1:
        return True
    if t.logging_strategy == "steps":
        return last or state.global_step % every == 0
    return t.logging_strategy == "epoch" and (last or state.step_in_epoch == per_epoch)


def _evaluates_now(t, state, epoch: float, per_epoch: int, last: bool, every: int) -> bool:
    """Whether training evaluates after the step just taken: every `every` steps (eval_strategy steps), and the
    last step of training always, so that the final weights are a candidate for the best model (an epoch's end,
    the last one included, is end_of_epoch's to evaluate); not before eval_delay steps or epochs."""
    if t.eval_strategy == "steps":
        return state.global_step >= t.eval_delay and (state.global_step % every == 0 or last)
    return t.eval_strategy == "epoch" and last and state.step_in_epoch < per_epoch and epoch >= t.eval_delay


def _should_save(t, state, steps_in_epoch: int, last: bool, every: int) -> bool:
    if last:
        return False  # the final model goes to output_dir itself
    if t.save_strategy == "steps":
        return state.global_step % every == 0
    return t.save_strategy == "epoch" and state.step_in_epoch == steps_in_epoch


def _save(cfg, module, inner, tokenizer, optimizer, scheduler, state, accelerator, identity: dict) -> None:
    accelerator.wait_for_everyone()
    folder = Path(cfg.train.output_dir) / f"checkpoint-{state.global_step}"
    gathered = sharding.full_state(inner, optimizer, not cfg.train.save_only_model) \
        if sharding.is_sharded(inner) else (None, None)
    partitions = zero.save_partitions(module, folder, accelerator) \
        if zero.is_engine(module) and not cfg.train.save_only_model else None
    with zero.gathered(inner):
        if accelerator.is_main_process:
            ckpt.save_checkpoint(folder, inner, tokenizer, optimizer, scheduler, state, cfg.train.save_only_model,
                                 identity, *gathered, partitions=partitions)
            ckpt.rotate_checkpoints(cfg.train.output_dir, cfg.train.save_total_limit)
    accelerator.wait_for_everyone()
