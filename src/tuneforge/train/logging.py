"""What a run reports: the progress bar, trainer_log.jsonl (LLaMA-Factory's record shape), results, loss plots."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

from tqdm.auto import tqdm


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


class RunLog:
    def __init__(self, output_dir: str, total_steps: int, start_step: int, enabled: bool, trackers=()):
        self.path = Path(output_dir) / "trainer_log.jsonl"
        self.total_steps, self.start_step, self.enabled = total_steps, start_step, enabled
        self.trackers = list(trackers)  # report_to: they get the same scalars as the log file
        self.started = time.time()
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not enabled)
        if enabled and self.path.is_file():  # a new run starts a new log; a resumed one keeps records up to its step
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("current_steps", 0) <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def _timing(self, step: int) -> dict:
        elapsed = time.time() - self.started
        done = max(step - self.start_step, 1)
        remaining = elapsed / done * (self.total_steps - step)
        return {"percentage": round(100 * step / self.total_steps, 2), "elapsed_time": _clock(elapsed),
                "remaining_time": _clock(remaining)}

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(record) + "\n")

    def train_step(self, step: int, epoch: float, loss: float, lr: float, tokens_per_second: float,
                   metrics: dict | None = None) -> None:
        record = {"current_steps": step, "total_steps": self.total_steps, "loss": round(loss, 4), "lr": lr,
                  "epoch": round(epoch, 2), **{k: round(v, 4) for k, v in (metrics or {}).items()},
                  **self._timing(step), "tokens_per_second": round(tokens_per_second, 1)}
        self.write(record)
        self._track(record, "train", step)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:.0f}", refresh=False)

    def eval_step(self, step: int, epoch: float, metrics: dict) -> None:
        record = {"current_steps": step, "total_steps": self.total_steps, "epoch": round(epoch, 2),
                  **{k: round(v, 4) for k, v in metrics.items()}, **self._timing(step)}
        self.write(record)
        self._track(record, "eval", step)
        if self.enabled:
            self.bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def advance(self) -> None:
        self.bar.update(1)

    def _track(self, record: dict, prefix: str, step: int) -> None:
        from .trackers import scalars

        for tracker in self.trackers:
            tracker.log(scalars(record, prefix), step)

    def close(self) -> None:
        self.bar.close()
        for tracker in self.trackers:
            tracker.close()


def write_results(output_dir: str, name: str, metrics: dict) -> None:
    """`<name>_results.json` and the merged `all_results.json`, as LLaMA-Factory writes them."""
    folder = Path(output_dir)
    (folder / f"{name}_results.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    merged_path = folder / "all_results.json"
    merged = json.loads(merged_path.read_text(encoding="utf-8")) if merged_path.is_file() else {}
    merged.update(metrics)
    merged_path.write_text(json.dumps(merged, indent=2), encoding="utf-8")


def plot_loss(output_dir: str) -> list[Path]:
    """training_loss.png (and training_eval_loss.png when there were evaluations) from trainer_log.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(output_dir)
    records = [json.loads(line) for line in (folder / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip()]
    written = []
    for key, file in (("loss", "training_loss.png"), ("eval_loss", "training_eval_loss.png")):
        points = [(r["current_steps"], r[key]) for r in records if key in r]
        if not points:
            continue
        steps, values = zip(*points)
        plt.figure(figsize=(6, 4))
        plt.plot(steps, values, marker="o" if len(points) < 30 else None, label=key)
        if key == "loss" and len(values) >= 20:  # with many noisy points a moving average shows the trend
            smooth, last = [], values[0]
            for v in values:
                last = 0.8 * last + 0.2 * v
                smooth.append(last)
            plt.plot(steps, smooth, label="smoothed")
        plt.xlabel("step")
        plt.ylabel(key)
        plt.title(f"{key} of {folder.name}")
        plt.legend()
        plt.tight_layout()
        plt.savefig(folder / file, dpi=100)
        plt.close()
        written.append(folder / file)
    return written
