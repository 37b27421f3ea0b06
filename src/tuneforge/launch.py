"""LLaMA-Factory's launcher forms for several processes: `FORCE_TORCHRUN=1 tuneforge train CONFIG`, and a plain
`tuneforge train CONFIG` on a machine with more than one GPU, run the training under torchrun, set up by the
environment variables LLaMA-Factory's launcher reads (docs/distributed.md):

  NPROC_PER_NODE (default: the GPU count), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT;
  RDZV_ID (an elastic job: a c10d rendezvous at MASTER_ADDR:MASTER_PORT), MIN_NNODES, MAX_NNODES, MAX_RESTARTS;
  OPTIM_TORCH (default on; with GPUs: expandable CUDA segments and no NCCL record_stream, as LLaMA-Factory sets).

A worker that dies is restarted with the others up to MAX_RESTARTS times, and the restarted run resumes from the
output_dir's latest checkpoint, as any rerun of the same command does.

`tuneforge train` stays the parent of torchrun (`supervise`): it hands torchrun the signals it gets, and exits with
the code the processes agree on (75 after a SIGTERM that saved a checkpoint, 3 for non-finite values, ...; see
train/faults.py), where torchrun itself would only say 1. `launcher_precision` and `launcher_compile` read accelerate
launch's mixed precision and dynamo backend as transformers does. Kept free of torch imports: cli.py imports it.
"""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Mapping, get_args, get_type_hints

from .config import ConfigError
from .options import TrainArgs

# each of these makes LLaMA-Factory train with another engine, which tuneforge does not have
_OTHER_ENGINES = {"USE_RAY": "Ray is not built; run several processes with FORCE_TORCHRUN=1 or torchrun",
                  "USE_MCA": "Megatron-Core (mcore_adapter) training is not built; use fsdp or deepspeed for "
                             "sharding",
                  "USE_KT": "KTransformers training is not built"}


class LaunchError(ConfigError):
    """The launch variables do not describe a run that can start; the message says which and how to fix it."""


def launched(environ: Mapping[str, str]) -> bool:
    """Whether this is one of the processes a launcher (torchrun, accelerate, srun) started."""
    return any(name in environ for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE"))


def enabled(environ: Mapping[str, str], name: str, default: str = "0") -> bool:
    return environ.get(name, default).lower() in ("true", "y", "1")  # LLaMA-Factory's is_env_enabled


def _count(environ: Mapping[str, str], name: str, default: str, least: int = 1) -> str:
    value = environ.get(name) or default
    if not value.isdigit() or int(value) < least:
        raise LaunchError(f"{name}={value}: expected a whole number of at least {least}")
    return value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def torchrun_command(args: list[str], environ: Mapping[str, str], gpus: int) -> tuple[list[str], str] | None:
    """(the command that runs `tuneforge train ARGS` under torchrun, a line saying how) when the environment asks
    for several processes; None when this process trains by itself (it is one of a launcher's processes already,
    or nothing asks for more than one)."""
    if launched(environ) or "-h" in args or "--help" in args:
        return None
    for name, reason in _OTHER_ENGINES.items():
        if enabled(environ, name):
            raise LaunchError(f"{name}={environ[name]}: {reason}")
    forced = enabled(environ, "FORCE_TORCHRUN")
    if not forced and gpus <= 1:
        return None
    if not gpus and not environ.get("NPROC_PER_NODE"):
        raise LaunchError("FORCE_TORCHRUN=1 on a machine without GPUs: set NPROC_PER_NODE to the number of "
                          "processes (each trains on the CPU; give each its share of the cores with OMP_NUM_THREADS)")
    nproc = _count(environ, "NPROC_PER_NODE", str(gpus))
    nnodes = _count(environ, "NNODES", "1")
    restarts = _count(environ, "MAX_RESTARTS", "0", least=0)
    rdzv_id, low, high = environ.get("RDZV_ID"), environ.get("MIN_NNODES"), environ.get("MAX_NNODES")
    if (low or high) and not (low and high and rdzv_id):
        raise LaunchError("MIN_NNODES and MAX_NNODES (an elastic job's fewest and most machines) go together, "
                          "with RDZV_ID naming the job")
    machines = f"{_count(environ, 'MIN_NNODES', '1')}:{_count(environ, 'MAX_NNODES', '1')}" if low else nnodes
    addr, port = environ.get("MASTER_ADDR"), environ.get("MASTER_PORT")
    if port is not None:
        _count(environ, "MASTER_PORT", port)
    if machines != "1" and not (addr and port):
        raise LaunchError(f"{'MAX_NNODES=' + high if low else 'NNODES=' + nnodes}: set MASTER_ADDR (the first "
                          "machine's address, reachable from every machine) and MASTER_PORT (the same free port on "
                          "every machine)")
    if rdzv_id:  # elastic: the machines meet at a c10d store, and may come and go between MIN_NNODES and MAX_NNODES
        where = f"{addr or '127.0.0.1'}:{port or _free_port()}"
        options = ["--nnodes", machines, "--rdzv-id", rdzv_id, "--rdzv-backend", "c10d", "--rdzv-endpoint", where,
                   "--max-restarts", restarts]
    elif int(nnodes) > 1:
        if int(restarts):
            raise LaunchError(f"MAX_RESTARTS={restarts} with NNODES={nnodes}: the machines restart together only "
                              "through a rendezvous; set RDZV_ID (any name, the same on every machine) as well")
        where = f"{addr}:{port}"
        options = ["--nnodes", nnodes, "--node-rank", _count(environ, "NODE_RANK", "0", least=0),
                   "--master-addr", addr, "--master-port", port]
    elif addr or port:
        where = f"{addr or '127.0.0.1'}:{port or _free_port()}"
        options = ["--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", where, "--max-restarts", restarts]
    else:  # one machine: torchrun finds a free port itself
        where = "a free local port"
        options = ["--standalone", "--max-restarts", restarts]
    why = "FORCE_TORCHRUN=1" if forced else f"{gpus} GPUs visible"
    line = (f"tuneforge: training in {nproc} processes per machine ({why}) with torchrun, rendezvous at {where}"
            + (f", on {machines.replace(':', ' to ')} machines" if machines != "1" else "")
            + (f"; a failed process restarts them all, at most {restarts} time{'s' * (restarts != '1')}"
               if int(restarts) else ""))
    command = [sys.executable, "-m", "torch.distributed.run", *options, "--nproc-per-node", nproc,
               "-m", "tuneforge.cli", "train", *args]
    return command, line


def torchrun_environment(environ: Mapping[str, str], gpus: int, cores: int) -> dict[str, str]:
    """The processes' environment: the user's, plus what the user has not set of
    - on CPUs, each process's share of the `cores` as its thread count (torchrun would give each one thread);
    - with GPUs, LLaMA-Factory's two CUDA settings for DDP (OPTIM_TORCH, on by default);
    - with restarts, a fresh rendezvous store for each attempt: in the store torchrun shares with the processes by
      default, a restarted process can read the dead attempt's addresses and fail or hang connecting to them
      (pytorch/pytorch#135712; with gloo and torch 2.13, 3 of 7 restarts failed or hung here, none of 11 with this)."""
    env = dict(environ)
    if int(environ.get("MAX_RESTARTS") or 0):
        env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if not gpus:
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // int(environ["NPROC_PER_NODE"]))))
    if gpus and enabled(environ, "OPTIM_TORCH", "1"):
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        env.setdefault("TORCH_NCCL_AVOID_RECORD_STREAMS", "1")
    return env


def launcher_precision(environ: Mapping[str, str], bf16: bool, fp16: bool) -> tuple[str | None, str | None]:
    """(the precision key to switch on, a note) from accelerate launch's mixed precision (`--mixed_precision`, or
    `mixed_precision:` in its config file, passed on as ACCELERATE_MIXED_PRECISION). transformers' TrainingArguments,
    and so LLaMA-Factory, train in it when the config sets neither bf16 nor fp16; a config that sets one wins."""
    value = environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if value == "no":
        return None, None
    where = f"accelerate's mixed precision {value} (ACCELERATE_MIXED_PRECISION)"
    if value not in ("bf16", "fp16"):
        raise LaunchError(f"{where}: {value} training is not built; launch with --mixed_precision bf16, fp16 or no")
    if bf16 or fp16:
        chosen = "bf16" if bf16 else "fp16"
        return None, None if chosen == value else f"note: the config's `{chosen}: true` is used, not {where}"
    return value, f"note: training in {value}, from {where}: the config sets neither `bf16` nor `fp16`"


def launcher_compile(environ: Mapping[str, str], t) -> str | None:
    """accelerate launch's dynamo backend (`--dynamo_backend`, or `dynamo_config:` in its config file, passed on as
    ACCELERATE_DYNAMO_BACKEND and ACCELERATE_DYNAMO_MODE) set as the run's torch_compile keys on `t`, with a note.
    transformers' Trainer, and so LLaMA-Factory, compiles the whole model with it; tuneforge compiles each decoder
    layer (train/common.py compile_layers). A config that sets torch_compile wins."""
    backend = environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    if backend == "no":
        return None
    where = f"accelerate's dynamo backend {backend} (ACCELERATE_DYNAMO_BACKEND)"
    if t.torch_compile:
        return f"note: the config's torch_compile settings are used, not {where}"
    mode = environ.get("ACCELERATE_DYNAMO_MODE", "default")
    backends, modes = (get_args(get_args(get_type_hints(TrainArgs)[key])[0])  # the keys' Literal choices
                       for key in ("torch_compile_backend", "torch_compile_mode"))
    if backend not in backends:
        raise LaunchError(f"{where}: compiling with {backend} is not built; launch with --dynamo_backend "
                          f"{', '.join(backends)} or no")
    if mode not in modes:
        raise LaunchError(f"accelerate's dynamo mode {mode} (ACCELERATE_DYNAMO_MODE) is no torch.compile mode; "
                          f"launch with --dynamo_mode {', '.join(modes)}")
    t.torch_compile, t.torch_compile_backend, t.torch_compile_mode = True, backend, mode
    return (f"note: each decoder layer is compiled with {backend}, mode {mode}, from {where}: tuneforge compiles "
            "layer by layer with dynamic shapes (torch_compile), whatever accelerate's fullgraph and dynamic "
            "settings say")


EXIT_CODES = "TUNEFORGE_EXIT_CODES"  # the folder where each process started by `supervise` leaves its exit code


def supervise(command: list[str], environ: Mapping[str, str]) -> int:
    """Run torchrun in a session of its own, pass it SIGTERM, SIGINT and SIGHUP, and return the processes' exit
    code (`agreed_exit_code`). Its own session keeps a terminal's Ctrl-C from reaching the processes twice (once
    from the terminal, once from torchrun), which would end them at once instead of after saving a checkpoint."""
    with tempfile.TemporaryDirectory(prefix="tuneforge-exit-") as folder:
        child = subprocess.Popen(command, env={**environ, EXIT_CODES: folder}, start_new_session=True,
                                 preexec_fn=_end_with_parent)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda number, frame: child.send_signal(number))
        return agreed_exit_code(child.wait(), Path(folder))


def _end_with_parent() -> None:
    """In torchrun's process: SIGTERM when this supervisor dies (even by SIGKILL), so no training is left behind."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def agreed_exit_code(torchrun_code: int, folder: Path) -> int:
    """torchrun's 0, or the one code the processes that left one agree on (`report_exit_code`), else torchrun's."""
    codes = {int(path.read_text()) for path in folder.glob("rank-*")} - {0}
    return codes.pop() if torchrun_code and len(codes) == 1 else torchrun_code


def report_exit_code(code: int, environ: Mapping[str, str]) -> None:
    """In a process `supervise` started: leave this process's exit code for the supervisor."""
    if EXIT_CODES in environ and Path(environ[EXIT_CODES]).is_dir():
        (Path(environ[EXIT_CODES]) / f"rank-{environ.get('RANK', '0')}").write_text(str(code))
