"""LLaMA-Factory's launch variables (FORCE_TORCHRUN, NPROC_PER_NODE, NNODES, RDZV_ID, MAX_RESTARTS, ...): the
torchrun command each form makes, each refusal, and real runs of `tuneforge train` that start torchrun themselves,
one of them with a process killed and restarted."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import SHARDED_GAP, alpaca_rows, relative_update_gap, train_here, write_jsonl
from safetensors.torch import load_file

from tuneforge.launch import LaunchError, agreed_exit_code, torchrun_command, torchrun_environment

RUN = [sys.executable, "-m", "torch.distributed.run"]
TAIL = ["-m", "tuneforge.cli", "train", "c.yaml", "note=two words"]


def command(gpus=0, **environ):
    launch = torchrun_command(["c.yaml", "note=two words"], environ, gpus)
    return None if launch is None else launch[0]


def test_the_torchrun_command_of_each_form():
    # one machine: torchrun's own free port; the arguments pass through as they are, spaces and all
    assert command(FORCE_TORCHRUN="1", NPROC_PER_NODE="2") == \
        [*RUN, "--standalone", "--max-restarts", "0", "--nproc-per-node", "2", *TAIL]
    # LLaMA-Factory's rule: more than one GPU visible is enough, one process per GPU
    assert command(gpus=4) == [*RUN, "--standalone", "--max-restarts", "0", "--nproc-per-node", "4", *TAIL]
    assert command(gpus=4, MASTER_PORT="29500", MAX_RESTARTS="2") == \
        [*RUN, "--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:29500", "--max-restarts",
         "2", "--nproc-per-node", "4", *TAIL]
    assert command(gpus=8, NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="29500") == \
        [*RUN, "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "29500",
         "--nproc-per-node", "8", *TAIL]
    assert command(gpus=8, RDZV_ID="job", MIN_NNODES="2", MAX_NNODES="4", MASTER_ADDR="10.0.0.1",
                   MASTER_PORT="29500", MAX_RESTARTS="3") == \
        [*RUN, "--nnodes", "2:4", "--rdzv-id", "job", "--rdzv-backend", "c10d", "--rdzv-endpoint", "10.0.0.1:29500",
         "--max-restarts", "3", "--nproc-per-node", "8", *TAIL]
    # nothing asks for several processes, or this already is one of them, or the user asks for help
    assert command() is None and command(gpus=1) is None and command(FORCE_TORCHRUN="0", gpus=1) is None
    assert command(gpus=4, LOCAL_RANK="0", RANK="0", WORLD_SIZE="4") is None
    assert torchrun_command(["-h"], {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}, 0) is None


@pytest.mark.parametrize("environ, says", [
    ({"FORCE_TORCHRUN": "1"}, "FORCE_TORCHRUN=1 on a machine without GPUs: set NPROC_PER_NODE"),
    ({"FORCE_TORCHRUN": "true", "NPROC_PER_NODE": "two"}, "NPROC_PER_NODE=two: expected a whole number of at least 1"),
    ({"FORCE_TORCHRUN": "y", "NPROC_PER_NODE": "0"}, "NPROC_PER_NODE=0: expected a whole number of at least 1"),
    ({"NNODES": "2"}, "NNODES=2: set MASTER_ADDR"),
    ({"NNODES": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1", "MAX_RESTARTS": "1"}, "set RDZV_ID"),
    ({"RDZV_ID": "j", "MIN_NNODES": "1"}, "MIN_NNODES and MAX_NNODES"),
    ({"MIN_NNODES": "1", "MAX_NNODES": "2"}, "with RDZV_ID naming the job"),
    ({"RDZV_ID": "j", "MIN_NNODES": "1", "MAX_NNODES": "2"}, "MAX_NNODES=2: set MASTER_ADDR"),
    ({"MASTER_PORT": "any"}, "MASTER_PORT=any: expected a whole number"),
    ({"USE_RAY": "1"}, "USE_RAY=1: Ray is not built"),
    ({"USE_MCA": "true"}, "USE_MCA=true: Megatron-Core"),
])
def test_each_refusal_says_what_to_set(environ, says):
    with pytest.raises(LaunchError, match=says.replace("(", r"\(")):
        torchrun_command(["c.yaml"], environ, 0 if "FORCE_TORCHRUN" in environ else 2)


def test_the_processes_environment():
    # CPUs: each process its share of the cores (torchrun alone would give each one thread); the user's value wins
    assert torchrun_environment({"NPROC_PER_NODE": "2"}, 0, 16)["OMP_NUM_THREADS"] == "8"
    assert torchrun_environment({"NPROC_PER_NODE": "4", "OMP_NUM_THREADS": "3"}, 0, 16)["OMP_NUM_THREADS"] == "3"
    # GPUs: LLaMA-Factory's two CUDA settings, unless OPTIM_TORCH=0 or the user set them
    gpu = torchrun_environment({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, 2, 16)
    assert gpu["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128" and gpu["TORCH_NCCL_AVOID_RECORD_STREAMS"] == "1"
    assert "TORCH_NCCL_AVOID_RECORD_STREAMS" not in torchrun_environment({"OPTIM_TORCH": "0"}, 2, 16)
    # restarts: a store of its own per attempt (launch.py says why); without restarts torchrun's default stays
    assert torchrun_environment({"NPROC_PER_NODE": "2", "MAX_RESTARTS": "1"}, 0, 2)[
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in torchrun_environment({"NPROC_PER_NODE": "2"}, 0, 2)


def test_the_exit_code_the_processes_agree_on(tmp_path):
    assert agreed_exit_code(0, tmp_path) == 0
    assert agreed_exit_code(1, tmp_path) == 1  # no process left a code (killed, or failed before it could)
    (tmp_path / "rank-0").write_text("75")
    (tmp_path / "rank-1").write_text("75")
    assert agreed_exit_code(1, tmp_path) == 75  # both saved a checkpoint after SIGTERM: "run again to resume"
    (tmp_path / "rank-1").write_text("0")
    assert agreed_exit_code(1, tmp_path) == 75
    (tmp_path / "rank-1").write_text("3")
    assert agreed_exit_code(1, tmp_path) == 1  # they disagree: torchrun's own code


def _keys(tiny_model, data, out, *keys) -> list[str]:
    return [f"model_name_or_path={tiny_model}", f"dataset={data}", "template=chatml", "cutoff_len=64",
            "learning_rate=1e-3", "finetuning_type=full", f"output_dir={out}", *keys]


def _train(tiny_model, data, out, environ, *keys, **popen):
    return subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "train", *_keys(tiny_model, data, out, *keys)],
                            env={**os.environ, **environ, "PYTHONUNBUFFERED": "1"}, text=True, **popen)


def test_a_config_error_is_said_once_before_any_process_starts(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(8))
    run = _train(tiny_model, data, tmp_path / "out", {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"},
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # no do_train
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 2
    assert stderr.strip().splitlines() == ["tuneforge: error: command line: nothing to do: set `do_train: true` "
                                           "(false by default, as in LLaMA-Factory), `do_eval` or `do_predict`"]


def _worker(top: int, local_rank: str) -> psutil.Process | None:
    for process in psutil.Process(top).children(recursive=True):
        try:
            if process.environ().get("LOCAL_RANK") == local_rank:
                return process
        except psutil.Error:  # a process that ended meanwhile
            continue
    return None


def test_a_killed_process_restarts_them_all_from_the_last_checkpoint(tiny_model, tmp_path):
    """FORCE_TORCHRUN=1 NPROC_PER_NODE=2 RDZV_ID=... MAX_RESTARTS=1: one process dies (SIGKILL) after the first
    checkpoint; torchrun restarts both, they resume from the latest complete checkpoint and finish with the same
    weights as one uninterrupted process on the same global batch."""
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(32))
    keys = ["do_train=true", "max_steps=30", "save_steps=2", "logging_steps=1"]
    log = (tmp_path / "elastic.log").open("w")
    run = _train(tiny_model, data, tmp_path / "two", {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "RDZV_ID": "t",
                                                     "MAX_RESTARTS": "1"},
                 *keys, "per_device_train_batch_size=2", "gradient_accumulation_steps=2", stdout=log,
                 stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (tmp_path / "two" / "checkpoint-2").is_dir():
        assert run.poll() is None and time.monotonic() < deadline, (tmp_path / "elastic.log").read_text()
        time.sleep(0.0005)
    victim = _worker(run.pid, "1")
    assert victim is not None, (tmp_path / "elastic.log").read_text()
    victim.send_signal(signal.SIGKILL)
    assert run.wait(timeout=180) == 0, (tmp_path / "elastic.log").read_text()[-3000:]
    output = (tmp_path / "elastic.log").read_text()
    assert "tuneforge: training in 2 processes per machine (FORCE_TORCHRUN=1) with torchrun" in output
    assert f"(pid: {victim.pid})" in output  # torchrun saw it fail ...
    assert f"[tuneforge] resuming from {tmp_path / 'two'}/checkpoint-" in output  # ... and the restart resumed

    one = train_here(_keys(tiny_model, data, tmp_path / "one", *keys, "per_device_train_batch_size=8"))
    assert one.returncode == 0, one.stderr[-2000:]
    start = load_file(f"{tiny_model}/model.safetensors")
    gap = relative_update_gap(start, load_file(tmp_path / "two" / "model.safetensors"),
                              load_file(tmp_path / "one" / "model.safetensors"))
    assert gap < SHARDED_GAP  # two processes' all-reduce sums in another order than one process (conftest)


@pytest.mark.parametrize("launcher, keys, bf16, fp16, note", [
    # accelerate launch --mixed_precision bf16 (or its config's mixed_precision) with a config that sets neither
    ("bf16", [], True, False, "note: training in bf16, from accelerate's mixed precision bf16 "
                              "(ACCELERATE_MIXED_PRECISION): the config sets neither `bf16` nor `fp16`"),
    ("fp16", ["bf16=false"], False, True, "note: training in fp16, from accelerate's mixed precision fp16 "
                                          "(ACCELERATE_MIXED_PRECISION): the config sets neither `bf16` nor `fp16`"),
    ("fp16", ["bf16=true"], True, False, "note: the config's `bf16: true` is used, not accelerate's mixed "
                                         "precision fp16 (ACCELERATE_MIXED_PRECISION)"),
    ("bf16", ["bf16=true"], True, False, None),
    ("no", [], False, False, None),
])
def test_accelerate_launchs_mixed_precision_as_transformers_reads_it(monkeypatch, launcher, keys, bf16, fp16, note):
    from tuneforge.config import load_config, notices

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    cfg = load_config(None, ["model_name_or_path=m", "dataset=d", "do_train=true", "output_dir=o", *keys])
    assert (cfg.train.bf16, cfg.train.fp16) == (bf16, fp16)
    assert [n for n in notices(cfg) if "ACCELERATE_MIXED_PRECISION" in n] == ([note] if note else [])
    assert load_config(None, ["model_name_or_path=m"], validate_for="chat").train.bf16 is False  # train only


def test_accelerate_launchs_fp8_is_refused(monkeypatch):
    from tuneforge.config import ConfigError, load_config

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(ConfigError, match=r"ACCELERATE_MIXED_PRECISION\): fp8 training is not built; launch with "
                                          "--mixed_precision bf16, fp16 or no"):
        load_config(None, ["model_name_or_path=m", "dataset=d", "do_train=true", "output_dir=o"])


COMPILE_NOTE = ("note: each decoder layer is compiled with {}, mode {}, from accelerate's dynamo backend {} "
                "(ACCELERATE_DYNAMO_BACKEND): tuneforge compiles layer by layer with dynamic shapes (torch_compile), "
                "whatever accelerate's fullgraph and dynamic settings say")


@pytest.mark.parametrize("backend, mode, keys, compiled, note", [
    # accelerate launch --dynamo_backend inductor --dynamo_mode max-autotune-no-cudagraphs (or its dynamo_config)
    ("INDUCTOR", "max-autotune-no-cudagraphs", [], (True, "inductor", "max-autotune-no-cudagraphs"),
     COMPILE_NOTE.format("inductor", "max-autotune-no-cudagraphs", "inductor")),
    ("EAGER", "default", [], (True, "eager", "default"), COMPILE_NOTE.format("eager", "default", "eager")),
    ("INDUCTOR", "default", ["torch_compile=true"], (True, None, None),
     "note: the config's torch_compile settings are used, not accelerate's dynamo backend inductor "
     "(ACCELERATE_DYNAMO_BACKEND)"),
    ("NO", "default", [], (False, None, None), None),
])
def test_accelerate_launchs_dynamo_backend_compiles_the_layers(monkeypatch, backend, mode, keys, compiled, note):
    from tuneforge.config import load_config, notices

    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", backend)
    monkeypatch.setenv("ACCELERATE_DYNAMO_MODE", mode)
    cfg = load_config(None, ["model_name_or_path=m", "dataset=d", "do_train=true", "output_dir=o", *keys])
    assert (cfg.train.torch_compile, cfg.train.torch_compile_backend, cfg.train.torch_compile_mode) == compiled
    assert [n for n in notices(cfg) if "ACCELERATE_DYNAMO" in n] == ([note] if note else [])


@pytest.mark.parametrize("backend, mode, message", [
    ("TVM", "default", r"accelerate's dynamo backend tvm \(ACCELERATE_DYNAMO_BACKEND\): compiling with tvm is not "
                       "built; launch with --dynamo_backend inductor, aot_eager, eager or no"),
    ("INDUCTOR", "fastest", r"accelerate's dynamo mode fastest \(ACCELERATE_DYNAMO_MODE\) is no torch.compile mode"),
])
def test_accelerate_launchs_other_dynamo_settings_are_refused(monkeypatch, backend, mode, message):
    from tuneforge.config import ConfigError, load_config

    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", backend)
    monkeypatch.setenv("ACCELERATE_DYNAMO_MODE", mode)
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model_name_or_path=m", "dataset=d", "do_train=true", "output_dir=o"])


def test_accelerate_does_not_compile_the_whole_model_over_the_compiled_layers(monkeypatch):
    """The dynamo variables became torch_compile (above); accelerate, which reads them too, must not also wrap the
    model in a whole-model torch.compile when it prepares it."""
    import torch
    from accelerate.state import AcceleratorState

    from tuneforge.config import build_config
    from tuneforge.train.common import make_accelerator

    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    AcceleratorState._reset_state(True)  # accelerate keeps its state for the process: start from the variables
    try:
        prepared = make_accelerator(build_config({}).train).prepare(torch.nn.Linear(2, 2))
    finally:
        AcceleratorState._reset_state(True)
    assert not isinstance(prepared, torch._dynamo.eval_frame.OptimizedModule)


def test_compile_layers_passes_the_backend_and_mode(monkeypatch, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from tuneforge.train.common import compile_layers

    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    compile_layers(model, "aot_eager", "default")
    compile_layers(model, "inductor", "max-autotune-no-cudagraphs")
    layers = len(model.model.layers)
    assert calls == ([{"dynamic": True, "backend": "aot_eager", "mode": None}] * layers +
                     [{"dynamic": True, "backend": "inductor", "mode": "max-autotune-no-cudagraphs"}] * layers)


def test_a_run_under_accelerate_launch_with_a_dynamo_backend(tiny_model, tmp_path):
    """What a user runs: `accelerate launch --dynamo_backend eager` (eager: dynamo traces each layer without
    generating code, so the test stays quick); the run records the compile it made."""
    data, out = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(8)), tmp_path / "out"
    accelerate = Path(sys.executable).parent / "accelerate"
    done = subprocess.run([str(accelerate), "launch", "--num_processes", "1", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "eager", "-m", "tuneforge.cli", "train",
                           f"model_name_or_path={tiny_model}", f"dataset={data}", "template=chatml", "cutoff_len=64",
                           "do_train=true", "max_steps=2", f"output_dir={out}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tuneforge: " + COMPILE_NOTE.format("eager", "default", "eager") in done.stderr
    saved = (out / "tuneforge_config.yaml").read_text()
    assert "torch_compile: true" in saved and "torch_compile_backend: eager" in saved


def _wait_for_steps(run, out: Path, steps: int) -> None:
    deadline, log = time.monotonic() + 120, out / "trainer_log.jsonl"
    while not log.is_file() or log.read_text().count('"loss"') < steps:
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.001)


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C", "SIGKILL"])
def test_a_signal_to_tuneforge_reaches_every_process_once(tiny_model, tmp_path, how):
    """SIGTERM to `tuneforge train` (what a scheduler sends), or Ctrl-C in its terminal (SIGINT to its whole process
    group): every process saves the step's checkpoint and stops, once, and the command exits 75 as one process
    does (torchrun alone would exit 1; a Ctrl-C reaching the processes from the terminal and again from torchrun
    would end them at once). SIGKILL, which tuneforge cannot pass on: torchrun, told by the kernel, stops the
    processes the same way, leaving none behind."""
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(32))
    keys = ["do_train=true", "max_steps=400", "save_steps=1000", "logging_steps=1", "per_device_train_batch_size=2"]
    log = tmp_path / "run.log"
    run = _train(tiny_model, data, tmp_path / "out", {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}, *keys,
                 stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)  # a terminal's group
    _wait_for_steps(run, tmp_path / "out", 3)
    workers = psutil.Process(run.pid).children(recursive=True)
    if how == "Ctrl-C":
        os.killpg(run.pid, signal.SIGINT)
    else:
        run.send_signal(getattr(signal, how))
    assert run.wait(timeout=120) == (-signal.SIGKILL if how == "SIGKILL" else 75), log.read_text()[-3000:]
    gone, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, log.read_text()[-3000:]
    output, name = log.read_text(), "SIGINT" if how == "Ctrl-C" else "SIGTERM"
    assert output.count(f"{name} received: saving a checkpoint after this step, then stopping") == 2  # once each
    assert output.count(f"tuneforge: stopped: stopped by {name} after step ") == 2, output[-3000:]
    assert [p.name for p in (tmp_path / "out").glob("checkpoint-*")], output[-3000:]
