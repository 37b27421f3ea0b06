"""`report_to`: the scalars of trainer_log.jsonl, also sent to TensorBoard, Weights & Biases or MLflow.

Names follow the Hugging Face Trainer's integrations (`train/loss`, `train/learning_rate`, `eval/loss`), so
dashboards built for runs of LLaMA-Factory or the Trainer show ours the same way. Each tracker writes locally by
default: TensorBoard event files under `<output_dir>/runs`, wandb in its offline mode when `WANDB_MODE=offline`,
MLflow to `./mlruns` unless `MLFLOW_TRACKING_URI` says otherwise.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Protocol

TRACKERS = ("tensorboard", "wandb", "mlflow")
PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


class Tracker(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def requested(report_to: str | None) -> list[str]:
    """The tracker names a `report_to` value asks for: a comma list, `all` (every installed one) or `none`."""
    names = [n.strip() for n in (report_to or "none").split(",") if n.strip() and n.strip() != "none"]
    if names == ["all"]:
        return [n for n in TRACKERS if _installed(n)]
    return names


def _installed(name: str) -> bool:
    return importlib.util.find_spec(PACKAGE[name]) is not None


def problems(report_to: str | None) -> list[str]:
    out = []
    for name in requested(report_to):
        if name not in TRACKERS:
            out.append(f"`report_to: {name}` is not supported; use tensorboard, wandb, mlflow, all or none "
                       "(trainer_log.jsonl is always written)")
        elif not _installed(name):
            out.append(f"`report_to: {name}` needs the `{PACKAGE[name]}` package: pip install {PACKAGE[name]}")
    return out


class _TensorBoard:
    def __init__(self, output_dir: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "runs"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a run watched live, or killed, still has its points on disk

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, output_dir: str, config: dict, run_name: str | None):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tuneforge"), name=run_name, dir=output_dir,
                              config=config)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, config: dict, run_name: str | None):
        import mlflow

        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=run_name)
        # MLflow caps a parameter value at 6,000 characters; config values are far shorter
        mlflow.log_params({k: v for k, v in config.items() if v is not None})

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def open_trackers(report_to: str | None, output_dir: str, run_name: str | None, config: dict) -> list[Tracker]:
    out: list[Tracker] = []
    for name in requested(report_to):
        if name == "tensorboard":
            out.append(_TensorBoard(output_dir, config))
        elif name == "wandb":
            out.append(_Wandb(output_dir, config, run_name))
        elif name == "mlflow":
            out.append(_MLflow(config, run_name))
    return out


def scalars(record: dict, prefix: str) -> dict[str, float]:
    """A trainer_log.jsonl record as tracker scalars: numbers only, `lr` under the Trainer's name."""
    skip = {"current_steps", "total_steps", "percentage"}
    out = {}
    for key, value in record.items():
        if key in skip or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = "learning_rate" if key == "lr" else key.removeprefix("eval_") if prefix == "eval" else key
        out[f"{prefix}/{name}"] = float(value)
    return out
