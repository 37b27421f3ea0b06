"""enable_torch_profiler: torch.profiler over training steps, with LLaMA-Factory's keys and schedule; one trace
folder per process, read by TensorBoard's profiler plugin, Perfetto or chrome://tracing."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch


@contextmanager
def step_profiler(t, rank: int) -> Iterator[Callable[[], None]]:
    """A function to call after every optimizer step: the profiler's step when `enable_torch_profiler`, else
    nothing."""
    if not t.enable_torch_profiler:
        yield lambda: None
        return
    folder = Path(t.profiler_output_dir or Path(t.output_dir) / "profiler") / f"rank_{rank}"
    folder.mkdir(parents=True, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=t.profiler_wait_steps, warmup=t.profiler_warmup_steps,
                                       active=t.profiler_active_steps, repeat=t.profiler_repeat)
    with torch.profiler.profile(activities=activities, schedule=schedule,
                                on_trace_ready=torch.profiler.tensorboard_trace_handler(str(folder)),
                                record_shapes=t.profiler_record_shapes, profile_memory=t.profiler_profile_memory,
                                with_stack=t.profiler_with_stack) as profiler:
        yield profiler.step


def check(t) -> list[str]:
    """Problems with the profiler keys (read only when the profiler is on)."""
    if not t.enable_torch_profiler:
        return []
    return [f"`{key}` counts steps: it must be >= {least}; got {value}"
            for key, value, least in (("profiler_wait_steps", t.profiler_wait_steps, 0),
                                      ("profiler_warmup_steps", t.profiler_warmup_steps, 0),
                                      ("profiler_active_steps", t.profiler_active_steps, 1),
                                      ("profiler_repeat", t.profiler_repeat, 0)) if value < least]
