"""What stops a training run before its end, and how it says so: a signal (preemption), non-finite values, a save
that fails. Each has its own exit code, so scripts and schedulers can tell them apart (docs/reliability.md):

  0 finished · 2 bad config, data or model · 3 non-finite loss or gradient · 74 a save failed (disk full,
  unwritable output) · 75 stopped by SIGTERM/SIGINT after saving a checkpoint (run again to resume) ·
  128 + signal number: a second signal ended the run at once.
Kept free of torch imports: cli.py imports it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
from array import array


class TrainingStopped(Exception):
    """Training ended early on purpose; the message says why and what the user can do."""

    exit_code = 1


class Preempted(TrainingStopped):
    exit_code = 75  # EX_TEMPFAIL: try again later (the same command resumes)


class NonFinite(TrainingStopped):
    exit_code = 3


class SaveFailed(TrainingStopped):
    exit_code = 74  # EX_IOERR


class StopSignals:
    """While active: the first SIGTERM / SIGINT only asks the loop to stop at the next step boundary (it saves a
    checkpoint there); a second one ends the process at once. Outside the main thread (signals can only be handled
    there) it does nothing."""

    def __init__(self):
        self.received: str | None = None  # the first signal's name
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame):
        name = signal.Signals(signum).name
        if self.received:
            print(f"\n[tuneforge] second signal ({name}): exiting now without saving", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = name
        print(f"\n[tuneforge] {name} received: saving a checkpoint after this step, then stopping "
              "(send it again to exit at once)", file=sys.stderr, flush=True)


def _as_bytes(value) -> bytes:
    if hasattr(value, "numpy"):  # a tensor (image pixels)
        return value.detach().cpu().numpy().tobytes()
    if isinstance(value, list):
        try:
            return array("q", value).tobytes()  # token ids, labels, masks
        except (TypeError, OverflowError):
            pass
    return json.dumps(value, default=str, sort_keys=True).encode()


def rows_signature(rows: list[dict]) -> str:
    """A hash of encoded training rows: a checkpoint resumes only on the very rows it was trained on."""
    digest = hashlib.sha256()
    for row in rows:
        for key in sorted(row):
            digest.update(key.encode())
            digest.update(_as_bytes(row[key]))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def describe_rows(rows) -> str:
    """Where a micro-batch's examples are: row indices of the training set, or positions in a stream."""
    shown = ", ".join(str(r) for r in rows[:16])
    return shown + (f" and {len(rows) - 16} more" if len(rows) > 16 else "")
