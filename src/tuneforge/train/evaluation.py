"""Evaluation during and after training: unit-weighted losses and metrics over the evaluation rows, the best
model (load_best_model_at_end) and early stopping."""

from __future__ import annotations

import json
import math
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..config import ConfigError
from . import checkpoint as ckpt
from . import sharding, zero
from .steps import metric_means, unwrapped


@torch.no_grad()
def evaluate(module, rows: list[dict], collator, batch_size: int, accelerator, precision=None) -> dict:
    """Unit-weighted eval loss and metrics of a loss module over `rows` (plus perplexity for token losses).

    Runs the unwrapped module: evaluation needs no gradient sync, and processes may hold different numbers of
    batches, so no DDP collective may run per batch.

    `rows` may be a dict of named sets (eval_on_each_dataset): each reports its own eval_<name>_... metrics."""
    if isinstance(rows, dict):
        return {key.replace("eval_", f"eval_{name}_", 1): value for name, part in rows.items()
                for key, value in evaluate(module, part, collator, batch_size, accelerator, precision).items()}
    module = unwrapped(module)
    module.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = rows[rank::world]
    loss_sum = torch.zeros((), device=accelerator.device)
    units = torch.zeros((), device=accelerator.device)
    sums: dict[str, torch.Tensor] = {}
    starts: list = list(range(0, len(mine), batch_size))
    # FSDP's and ZeRO-3's forwards gather weights from every process: all run as many
    if sharding.is_sharded(module) or zero.partitioned(module):
        starts += [None] * (math.ceil(len(rows[::world]) / batch_size) - len(starts))  # (None: discarded)
    for start in starts:
        batch = collator(mine[start: start + batch_size] if start is not None else rows[:1])
        batch.pop("num_tokens")
        batch_units = module.units(batch).to(accelerator.device)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with precision.autocast(module.model) if precision else nullcontext():
            loss, metrics = module(**batch)
        if start is None:
            continue
        units += batch_units
        loss_sum += loss.detach().float()
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0) + value.detach().float()
    totals = torch.stack([loss_sum, units, *sums.values()])
    totals = accelerator.reduce(totals, "sum") if world > 1 else totals
    module.train()
    count = totals[1].clamp(min=1)
    loss = (totals[0] / count).item()
    result = {"eval_loss": loss}
    if module.unit == "token":
        result["eval_perplexity"] = math.exp(min(loss, 50))
    result.update({f"eval_{key}": value for key, value in metric_means(dict(zip(sums, totals[2:].tolist())),
                                                                      count.item()).items()})
    return result


class Evaluation(Protocol):
    """What the loop evaluates during training (eval_strategy): called in every process, it returns the same
    eval_* metrics of the model as it is now in each."""
    metric: str  # the metric that decides the best model and early stopping unless metric_for_best_model names one

    def __call__(self) -> dict[str, float]: ...


@dataclass
class RowsEvaluation:
    """The losses and metrics of a loss module over encoded evaluation rows (evaluate above)."""
    module: object
    rows: list[dict] | dict[str, list[dict]]
    collator: object
    batch_size: int
    accelerator: object
    precision: object = None
    metric: str = "eval_loss"

    def __call__(self) -> dict[str, float]:
        return evaluate(self.module, self.rows, self.collator, self.batch_size, self.accelerator, self.precision)


@dataclass
class Remembered:
    """An evaluation that keeps its latest metrics and the optimizer step they were taken at, so that the
    evaluation after training can reuse them when training ended on those weights (for the rollout stages that
    is a whole round of generation)."""
    evaluation: Evaluation
    state: object  # the trainer state; its global_step dates the metrics
    step: int | None = None
    metrics: dict[str, float] | None = None

    @property
    def metric(self) -> str:
        return self.evaluation.metric

    def __call__(self) -> dict[str, float]:
        self.metrics, self.step = self.evaluation(), self.state.global_step
        return self.metrics


BEST = "best_model"
BEST_STEP = "best_step.json"  # in BEST: the step its weights are from


def best_metric_name(t, default: str = "eval_loss") -> tuple[str, bool]:
    """(metric that decides the best model and early stopping, whether higher is better)."""
    name = t.metric_for_best_model or default
    name = name if name.startswith("eval_") else f"eval_{name}"
    higher = t.greater_is_better if t.greater_is_better is not None else not name.endswith(("loss", "perplexity"))
    return name, higher


def evaluate_and_check(cfg, module, evaluation: Evaluation, accelerator, state, log, epoch) -> bool:
    """Evaluate, log, keep the best model (load_best_model_at_end), and say whether early stopping should end
    training."""
    t = cfg.train
    metrics = evaluation()
    log.eval_step(state.global_step, epoch, metrics)
    name, higher = best_metric_name(t, evaluation.metric)
    if name not in metrics and not (t.load_best_model_at_end or cfg.finetune.early_stopping_steps):
        return False  # nothing depends on the best metric (e.g. eval_on_each_dataset without a named one)
    if name not in metrics:
        raise ConfigError(f"metric_for_best_model `{t.metric_for_best_model}`: evaluation reports "
                          f"{', '.join(metrics)}; pick one of those")
    value = metrics[name]
    if state.best_metric is None or (value > state.best_metric if higher else value < state.best_metric):
        state.best_metric, state.best_step, state.evals_without_improvement = value, state.global_step, 0
        if t.load_best_model_at_end and accelerator.is_main_process:
            best = Path(t.output_dir) / BEST
            (best / BEST_STEP).unlink(missing_ok=True)  # a save stopped half-way must not claim an earlier step
            ckpt.save_model(unwrapped(module), None, best)
            (best / BEST_STEP).write_text(json.dumps({"step": state.global_step}))
    else:
        state.evals_without_improvement += 1
    patience = cfg.finetune.early_stopping_steps
    if patience and state.evals_without_improvement >= patience:
        accelerator.print(f"[tuneforge] early stopping: {name} has not improved for {patience} evaluations")
        return True
    return False


def restore_best(cfg, inner, state, accelerator, metric: str) -> bool:
    """With load_best_model_at_end: put the best evaluated weights back and drop their temporary copy; returns
    whether it did."""
    if not cfg.train.load_best_model_at_end or state.best_step is None:
        return False
    accelerator.wait_for_everyone()  # the main process may still be writing the last best model
    folder = _best_weights(Path(cfg.train.output_dir), state.best_step)
    name = f"{best_metric_name(cfg.train, metric)[0]} = {state.best_metric:.4f}"
    if folder is None:
        accelerator.print(f"[tuneforge] the best model (step {state.best_step}, {name}) was saved by the run this one "
                          f"resumed, and neither {BEST} nor checkpoint-{state.best_step} holds it any more: the final "
                          "model is the last step's")
        return False
    ckpt.load_trainable_weights(inner.model, folder)
    ckpt.load_extra_weights(inner, folder)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.print(f"[tuneforge] loaded the best model (step {state.best_step}, {name})")
        if folder.name == BEST:
            shutil.rmtree(folder)
    return True


def _best_weights(output_dir: Path, step: int) -> Path | None:
    """Where the best step's weights are: BEST, unless it holds another step's (a run that was stopped after a
    checkpoint may have kept a later evaluation's model, which its resumed run has not reached), else that step's
    checkpoint."""
    best = output_dir / BEST
    if (best / BEST_STEP).is_file() and json.loads((best / BEST_STEP).read_text())["step"] == step:
        return best
    checkpoint = output_dir / f"checkpoint-{step}"
    return checkpoint if (checkpoint / ckpt.MARKER).is_file() else None


def full_eval_dtype(t, device: torch.device) -> torch.dtype | None:
    """What bf16_full_eval / fp16_full_eval cast the whole model to once training is over, for do_eval's evaluation
    and do_predict, as transformers does outside train(). fp16 is chosen as `fp16` chooses it: bf16 on a CPU
    without fp16 matrix units, where fp16 products run ~100x slower (a notice says so)."""
    from ..machine import multiplies_fp16_natively

    if t.bf16_full_eval:
        return torch.bfloat16
    if t.fp16_full_eval:
        return torch.float16 if device.type != "cpu" or multiplies_fp16_natively() else torch.bfloat16
    return None


def full_eval_problems(cfg) -> list[str]:
    t, out = cfg.train, []
    if t.bf16_full_eval and t.fp16_full_eval:
        out.append("`bf16_full_eval` and `fp16_full_eval` are both true; pick one")
    if (t.bf16_full_eval or t.fp16_full_eval) and cfg.model.quantization_bit:
        out.append("`bf16_full_eval` / `fp16_full_eval` cast the whole model, and quantised weights cannot be cast "
                   "(transformers refuses it too): remove it or quantization_bit")
    return out


def full_eval_notices(cfg) -> list[str]:
    from ..machine import cpu_description, multiplies_fp16_natively

    t = cfg.train
    key = "bf16_full_eval" if t.bf16_full_eval else "fp16_full_eval" if t.fp16_full_eval else None
    if key and not (t.do_eval or t.do_predict):
        return [f"note: `{key}` has no effect without do_eval or do_predict: it casts the model for the evaluation "
                "after training and for prediction (evaluations during training keep the training precision)"]
    if key == "fp16_full_eval" and not torch.cuda.is_available() and not multiplies_fp16_natively():
        return [f"note: `fp16_full_eval` on this CPU ({cpu_description()}) evaluates in bf16, the same 16-bit "
                "width: it has no fp16 matrix units, and fp16 products would run ~100x slower"]
    return []
