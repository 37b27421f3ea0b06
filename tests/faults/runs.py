"""Real `tuneforge train` processes for the fault tests: start one, wait for a moment in it, inflict a fault."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

TIMEOUT = 120  # a tiny-model run takes seconds; this only stops a hung test


class Run:
    """One `tuneforge train CONFIG` process; its output goes to a log file in the output_dir's parent."""

    def __init__(self, values: dict, name: str, limit_file_bytes: int | None = None):
        self.out = Path(values["output_dir"])
        folder = self.out.parent
        config = folder / f"{self.out.name}-{name}.yaml"
        config.write_text(yaml.safe_dump(values), encoding="utf-8")
        self.log_path = folder / f"{self.out.name}-{name}.log"

        def limit():  # in the child only: writes past this size fail with EFBIG (Python ignores SIGXFSZ)
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

        with self.log_path.open("w") as log:
            # unbuffered: what the run printed must be in the log even when it is killed
            self.process = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "train", str(config)],
                                            stdout=log, stderr=subprocess.STDOUT,
                                            env=dict(os.environ, PYTHONUNBUFFERED="1"),
                                            preexec_fn=limit if limit_file_bytes else None)

    @property
    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait(self) -> int:
        try:
            return self.process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"run did not end:\n{self.output}") from None

    def wait_for(self, moment, poll_s: float = 0.0005) -> None:
        """Poll until `moment(out)` holds; fail if the process ends first."""
        deadline = time.monotonic() + TIMEOUT
        while not moment(self.out):
            if self.process.poll() is not None:
                raise AssertionError(f"run ended (rc {self.process.returncode}) before the moment:\n{self.output}")
            if time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"moment never came:\n{self.output}")
            time.sleep(poll_s)

    def send(self, sig: int) -> None:
        os.kill(self.process.pid, sig)

    def kill(self) -> None:
        self.send(signal.SIGKILL)
        assert self.wait() == -signal.SIGKILL, self.output


def logged_steps(out: Path, key: str = "loss") -> list[int]:
    """Steps of trainer_log.jsonl records that hold `key` (a half-written last line is skipped)."""
    path = out / "trainer_log.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if key in record:
            steps.append(record["current_steps"])
    return steps


def after_step(step: int, key: str = "loss"):
    """The moment trainer_log.jsonl shows `step` (key loss: the step is done; eval_loss: its evaluation is)."""
    return lambda out: step in logged_steps(out, key)


def writing_checkpoint(step: int):
    """The moment checkpoint-<step> is being written (its .partial folder exists)."""
    return lambda out: (out / f"checkpoint-{step}.partial").is_dir()


def trained_weights(out: Path) -> dict:
    """Every tensor a finished run or checkpoint saved (adapter or full model, plus extra heads)."""
    from safetensors.torch import load_file

    weights = {}
    for file in sorted(out.glob("*.safetensors")):
        weights.update({f"{file.name}:{k}": v for k, v in load_file(file).items()})
    assert weights, f"no weights in {out}"
    return weights


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)
