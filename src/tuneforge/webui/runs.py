"""Training runs started from the web UI, and the runs found under its output root.

Each run is a `tuneforge train` subprocess, so a crash of the run never takes the UI down, and the UI's runs are
the same as the command line's. Its YAML and console output are kept beside the run's output_dir
(`<output_dir>.webui/`), so the user's output_dir holds only what `tuneforge train` itself writes.

Stop sends SIGTERM: the trainer saves a checkpoint at the next step boundary and exits. Resume starts the same
command again; `tuneforge train` resumes from the newest checkpoint in output_dir.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..train.checkpoint import FINISHED, checkpoints_in

LOG_TAIL = 40  # console lines the page shows


@dataclass
class Run:
    output_dir: Path
    process: subprocess.Popen | None = None
    started: float = field(default_factory=time.time)

    @property
    def side(self) -> Path:
        """Where the UI keeps the run's YAML and console output: beside output_dir, never inside it."""
        return self.output_dir.with_name(self.output_dir.name + ".webui")

    def status(self) -> str:
        if self.process is not None and self.process.poll() is None:
            return "running"
        code = self.returncode()
        if (self.output_dir / FINISHED).exists() and code in (None, 0):
            return "finished"
        if code not in (None, 0):
            return "stopped" if checkpoints_in(self.output_dir) else "failed"
        return "stopped" if checkpoints_in(self.output_dir) else "unknown"

    def returncode(self) -> int | None:
        if self.process is not None:
            return self.process.poll()
        saved = self.side / "exit_code"
        return int(saved.read_text()) if saved.is_file() else None

    def records(self) -> list[dict]:
        path = self.output_dir / "trainer_log.jsonl"
        if not path.is_file():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written right now
                break
        return out

    def console_tail(self) -> list[str]:
        path = self.side / "console.log"
        if not path.is_file():
            return []
        # a progress bar redraws its line with carriage returns: keep what a terminal would show, the last draw
        lines = [line.split("\r")[-1] for line in path.read_text(encoding="utf-8", errors="replace").split("\n")]
        return [line for line in lines if line.strip()][-LOG_TAIL:]

    def results(self) -> dict:
        path = self.output_dir / "all_results.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def summary(self) -> dict:
        records = [r for r in self.records() if "loss" in r]
        last = records[-1] if records else {}
        return {"name": self.output_dir.name, "output_dir": str(self.output_dir), "status": self.status(),
                "returncode": self.returncode(), "step": last.get("current_steps", 0),
                "total_steps": last.get("total_steps"), "loss": last.get("loss"), "lr": last.get("lr"),
                "tokens_per_second": last.get("tokens_per_second"), "remaining_time": last.get("remaining_time"),
                "results": self.results(),
                "plot": (self.output_dir / "training_loss.png").is_file()}


class Runs:
    """The runs under `root` (each a folder with a trainer_log.jsonl or a UI side folder), and the ones started here."""

    def __init__(self, root: Path):
        self.root = root
        self.live: dict[str, Run] = {}
        self.lock = threading.Lock()

    def find(self, name: str) -> Run | None:
        if name in self.live:
            return self.live[name]
        folder = self.root / name
        if "/" in name or name.startswith(".") or not folder.is_dir():
            return None
        return Run(folder)

    def all(self) -> list[dict]:
        found = {p.parent.name for p in self.root.glob("*/trainer_log.jsonl")} if self.root.is_dir() else set()
        found |= set(self.live)
        runs = [self.find(name) for name in sorted(found)]
        return [r.summary() for r in runs if r is not None]

    def start(self, output_dir: Path, config_yaml: str) -> Run:
        with self.lock:
            name = output_dir.name
            current = self.live.get(name)
            listed = current or (Run(self.root / name) if (self.root / name / "trainer_log.jsonl").is_file() else None)
            # runs are listed and addressed by folder name: another folder of that name would hide this one
            if listed is not None and listed.output_dir.resolve() != output_dir.resolve():
                raise RuntimeError(f"the run list already has a run named {name} (in {listed.output_dir}): give "
                                   "this one an output_dir whose folder name is not taken")
            if current is not None and current.status() == "running":
                raise RuntimeError(f"run {name} is already running")
            run = Run(output_dir)
            run.side.mkdir(parents=True, exist_ok=True)
            (run.side / "config.yaml").write_text(config_yaml, encoding="utf-8")
            self._launch(run)
            self.live[name] = run
            return run

    def resume(self, name: str) -> Run:
        run = self.find(name)
        if run is None or not (run.side / "config.yaml").is_file():
            raise RuntimeError(f"run {name} was not started from this UI: resume it with `tuneforge train` and its "
                               "YAML")
        if run.status() == "running":
            raise RuntimeError(f"run {name} is already running")
        with self.lock:
            self._launch(run)
            self.live[name] = run
        return run

    def _launch(self, run: Run) -> None:
        (run.side / "exit_code").unlink(missing_ok=True)
        console = (run.side / "console.log").open("a", encoding="utf-8")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        run.process = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "train", str(run.side / "config.yaml")],
                                       stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                       cwd=os.getcwd())
        run.started = time.time()
        threading.Thread(target=self._reap, args=(run, console), daemon=True).start()

    @staticmethod
    def _reap(run: Run, console) -> None:
        code = run.process.wait()
        console.close()
        (run.side / "exit_code").write_text(str(code))

    def stop(self, name: str) -> Run:
        run = self.live.get(name)
        if run is None or run.status() != "running":
            raise RuntimeError(f"run {name} is not running")
        run.process.send_signal(signal.SIGTERM)
        return run

    def shutdown(self) -> None:
        """The UI is closing: its runs get the same SIGTERM as a stop, so each saves and exits."""
        for run in self.live.values():
            if run.status() == "running":
                run.process.send_signal(signal.SIGTERM)
