"""Real torchrun processes (gloo on CPU): DDP must give the same weights as one process on the same global batch, as
two machines and as srun starts processes too; machines that disagree about the checkpoint stop at once."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LOGGED_LOSS, alpaca_rows, read_log, relative_update_gap, train_here, write_jsonl
from safetensors.torch import load_file

from tuneforge.train.common import _processes


ACCUMULATING = ["per_device_train_batch_size=2", "gradient_accumulation_steps=2"]
# HF's DDP settings change how gradients travel (buckets of 1 MB: several all-reduces a step; a search for unused
# parameters; DDP's static-graph mode, which cannot accumulate), not what they are
DDP_KEYS = ["ddp_find_unused_parameters=true", "ddp_bucket_cap_mb=1", "ddp_static_graph=true",
            "ddp_broadcast_buffers=false", "per_device_train_batch_size=4", "gradient_accumulation_steps=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _together(args: list[str], environments: list[dict], folders: list | None = None) -> subprocess.CompletedProcess:
    """`python ARGS` once per environment (in its own working folder, if given), all at once; their outputs
    joined, the worst exit code."""
    started = [subprocess.Popen([sys.executable, *args], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **env}, cwd=folder)
               for env, folder in zip(environments, folders or [None] * len(environments))]
    try:
        outputs = [process.communicate(timeout=300) for process in started]
    finally:  # a hung pair must not outlive the test
        for process in started:
            process.kill()
    return subprocess.CompletedProcess(args, max(process.returncode for process in started),
                                       "".join(out for out, _ in outputs), "".join(err for _, err in outputs))


def _two_machines(args: list[str], disks: list | None = None) -> subprocess.CompletedProcess:
    """`tuneforge train ARGS` as two machines of one process each would run it, with LLaMA-Factory's launch
    variables (docs/distributed.md), here both on this machine: the second one's process is rank 1 and also
    local rank 0, the first process of its machine. `disks`: each machine's working folder, where relative paths
    lead (as machines without a shared file system)."""
    env = {"FORCE_TORCHRUN": "1", "NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    return _together(["-m", "tuneforge.cli", "train", *args], [{**env, "NODE_RANK": str(rank)} for rank in (0, 1)],
                     disks)


def _as_srun(args: list[str], processes: int) -> subprocess.CompletedProcess:
    """`python ARGS` in `processes` processes started as SLURM's srun or MPI start them, with no torchrun: each gets
    its rank and the rendezvous address in its environment (torch's env:// rendezvous)."""
    env = {"WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    return _together(args, [{**env, "RANK": str(rank), "LOCAL_RANK": str(rank)} for rank in range(processes)])


def test_machines_that_see_different_checkpoints_stop_before_training(tiny_model, tmp_path):
    """Two machines that do not share output_dir, one of which holds a checkpoint: resuming on one and starting
    over on the other would train different steps and wait for each other forever (ddp_timeout). Both stop at
    once, saying what each saw."""
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(16))
    common = [f"model_name_or_path={tiny_model}", f"dataset={data}", "template=chatml", "cutoff_len=64", "max_steps=4",
              "save_steps=2", "learning_rate=1e-3", "finetuning_type=full", "do_train=true", "ddp_timeout=60"]
    first = train_here([*common, "per_device_train_batch_size=4", f"output_dir={tmp_path / 'first'}"])
    assert first.returncode == 0, first.stderr[-2000:]
    shutil.copytree(tmp_path / "first" / "checkpoint-2", tmp_path / "m0" / "out" / "checkpoint-2")
    (tmp_path / "m1").mkdir()
    run = _two_machines([*common, "per_device_train_batch_size=2", "output_dir=out"],
                        [tmp_path / "m0", tmp_path / "m1"])
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.count("the processes see different checkpoints in output_dir out: process 0 resumes from "
                            "out/checkpoint-2; process 1 starts from the beginning") == 2, run.stderr[-2000:]
    assert not (tmp_path / "m1" / "out" / "checkpoint-2").exists()
    # with many processes, the message names groups of them
    assert [_processes(r) for r in ([3], [0, 1, 2, 3, 5], [0, 2])] == ["process 3", "processes 0-3, 5",
                                                                       "processes 0, 2"]


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="needs torchrun")
@pytest.mark.parametrize("streaming,ddp_keys,machines", [(False, ACCUMULATING, 1), (True, ACCUMULATING, 1),
                                                         (False, DDP_KEYS, 2)])
def test_ddp_two_processes_match_one(tiny_model, tmp_path, streaming, ddp_keys, machines):
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(32))
    common = [f"model_name_or_path={tiny_model}", f"dataset={data}", "template=chatml", "cutoff_len=64", "max_steps=4",
              "logging_steps=1", "learning_rate=1e-3", "finetuning_type=full", "do_train=true",
              f"streaming={streaming}", "include_num_input_tokens_seen=non_padding"]
    args = [*common, *ddp_keys, f"output_dir={tmp_path / 'ddp'}"]
    if machines == 2:  # both see one cache folder: only the first process of all tokenises
        ddp = _two_machines([*args, "data_shared_file_system=true"])
        assert ddp.stderr.count("on 2 machines") == 2  # each machine's launcher says how it starts
    else:
        torchrun = str(Path(sys.executable).parent / "torchrun")
        ddp = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "tuneforge.cli", "train", *args],
                             capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    # the first process of each machine prints, so that every machine's log shows the run (accelerate's print)
    assert ddp.stdout.count("trainable params") == machines
    # one process tokenised and cached the rows, the other read its cache (streamed rows are not cached)
    assert ddp.stdout.count("tokenised data loaded from the cache") == (0 if streaming else 1)
    single = train_here([*common, f"output_dir={tmp_path / 'one'}", "per_device_train_batch_size=8"])
    assert single.returncode == 0, single.stderr[-2000:]
    a, b = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    # AdamW over gloo's all-reduce, whose summation order differs from one process's: measured at most 7e-6 of the update
    # (streaming 8e-7); the accumulation test's rule (2e-3) applies. Processes taking the wrong rows, or a wrong
    # normalisation across processes, move the update by percents.
    assert relative_update_gap(load_file(f"{tiny_model}/model.safetensors"), a, b) < 2e-3
    ddp_loss = [r["loss"] for r in read_log(tmp_path / "ddp")]
    assert ddp_loss == pytest.approx([r["loss"] for r in read_log(tmp_path / "one")], abs=LOGGED_LOSS)
    # the same rows each step: their tokens, summed over both processes, are the one process's count
    tokens = {run: [r["total_tokens"] for r in read_log(tmp_path / run)] for run in ("ddp", "one")}
    assert tokens["ddp"] == tokens["one"]


def test_ddp_divides_by_each_process_tokens_when_not_averaging_across_devices(tiny_model, tmp_path):
    """average_tokens_across_devices: false. Two processes, one row each, of a few and of many target tokens: each
    divides its loss by its own tokens and DDP averages the gradients, so with plain SGD (no clipping) the update is
    the mean of the two rows' single-process updates; dividing by all tokens would weigh the long row more. The two
    processes start as srun starts them, without torchrun."""
    short = {"instruction": "Say yes.", "input": "", "output": "yes"}
    long = {"instruction": "Count.", "input": "", "output": " ".join(str(i) for i in range(20))}
    common = [f"model_name_or_path={tiny_model}", "template=chatml", "cutoff_len=64", "max_steps=1", "do_train=true",
              "finetuning_type=full", "optim=sgd", "learning_rate=0.1", "max_grad_norm=0",
              "per_device_train_batch_size=1", "gradient_accumulation_steps=1", "average_tokens_across_devices=false"]
    runs = {"both": [short, long], "short": [short], "long": [long]}
    for name, rows in runs.items():
        data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        args = [*common, f"dataset={data}", f"output_dir={tmp_path / name}"]
        run = _as_srun(["-m", "tuneforge.cli", "train", *args], 2) if name == "both" else train_here(args)
        assert run.returncode == 0, run.stderr[-2000:]
        assert ("average_tokens_across_devices: false` divides" in run.stdout + run.stderr) == (name != "both")
    start = load_file(f"{tiny_model}/model.safetensors")
    moved = {name: {k: v - start[k] for k, v in load_file(tmp_path / name / "model.safetensors").items()}
             for name in runs}
    mean = {k: (moved["short"][k] + moved["long"][k]) / 2 for k in start}
    # SGD's update is linear in the gradient; gloo's sum and the halving round at float32 (~1e-7 of the update). The
    # token-weighted update (the default's) is 0.89 of its size away from the mean here (measured)
    assert relative_update_gap({k: 0 * v for k, v in start.items()}, moved["both"], mean) < 1e-4


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="needs torchrun")
def test_ddp_bco_baseline_counts_every_process(tiny_model, tmp_path):
    """BCO's baseline under DDP: each micro-batch's mean reward is averaged over the processes (an all-reduce inside
    the loss), so both keep one baseline; it counts each process's micro-batch once, as TRL's RunningMoments."""
    from test_preference import preference_rows

    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(0, 16))
    (tmp_path / "dataset_info.json").write_text(f'{{"pairs": {{"file_name": "{data.name}", "ranking": true}}}}')
    torchrun = str(Path(sys.executable).parent / "torchrun")
    run = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "tuneforge.cli", "train",
                          f"model_name_or_path={tiny_model}", "dataset=pairs", f"dataset_dir={tmp_path}",
                          "template=chatml", "cutoff_len=64", "stage=dpo", "pref_bco_weight=0.5",
                          "finetuning_type=full", "do_train=true", "max_steps=2", "per_device_train_batch_size=2",
                          "gradient_accumulation_steps=2", f"output_dir={tmp_path / 'out'}"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    baseline = load_file(tmp_path / "out" / "bco_baseline.safetensors")
    assert baseline["count"].item() == 2 * 2 * 2  # steps x micro-batches per step x processes


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="needs torchrun")
def test_an_unshared_cache_folder_is_tokenised_again(tiny_model, tmp_path):
    """data_shared_file_system: true says all processes see one cache folder, so only the first tokenises. Here each
    process has its own (as on nodes without a shared disk): the second finds nothing after waiting, says so,
    tokenises for itself, and training goes on."""
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(16))
    launcher = tmp_path / "own_cache.py"
    launcher.write_text("import os, sys\n"
                        f"os.environ['TUNEFORGE_CACHE'] = {str(tmp_path / 'cache')!r} + os.environ['RANK']\n"
                        "from tuneforge.cli import main\n"
                        "sys.exit(main())\n")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    ddp = subprocess.run([torchrun, "--nproc_per_node", "2", str(launcher), "train", f"model_name_or_path={tiny_model}",
                          f"dataset={data}", "template=chatml", "cutoff_len=64", "max_steps=1", "do_train=true",
                          "data_shared_file_system=true", f"output_dir={tmp_path / 'out'}"],
                         capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert ddp.stdout.count("is not in") == 1 and "is the cache folder shared" in ddp.stdout
    assert ddp.stdout.count("loaded from the cache") == 0
    assert all(len(list((tmp_path / f"cache{rank}" / "data").glob("*.pkl"))) == 1 for rank in (0, 1))


def test_more_processes_than_gpus_is_said_before_cuda_fails(monkeypatch):
    """torchrun --nproc_per_node 2 on a one-GPU machine: the second process would have no cuda:1 and fail inside
    CUDA or NCCL; it is refused first, naming both counts. (The suite hides GPUs, so the machine is simulated.)"""
    import torch

    from tuneforge.config import ConfigError, build_config
    from tuneforge.train.common import make_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"2 processes were started on this machine and it has 1 GPU: each process "
                                          r"trains on a GPU of its own, so start --nproc_per_node 1"):
        make_accelerator(build_config({}).train)


def test_the_ddp_keys_reach_accelerate_and_say_when_they_do_nothing(tmp_path, monkeypatch):
    from conftest import gate_problems
    from tuneforge.config import build_config, notices
    from tuneforge.train.common import make_accelerator

    base = {"model_name_or_path": "m", "dataset": "d", "output_dir": str(tmp_path), "do_train": True}
    cfg = build_config({**base, "ddp_find_unused_parameters": True, "ddp_bucket_cap_mb": 1})
    handler = make_accelerator(cfg.train).ddp_handler  # what accelerate's prepare() gives DistributedDataParallel
    assert (handler.find_unused_parameters, handler.bucket_cap_mb, handler.static_graph,
            handler.broadcast_buffers) == (True, 1, False, True)  # the keys left unset keep accelerate's defaults
    assert make_accelerator(build_config(base).train).ddp_handler is None
    assert notices(cfg) == ["note: `ddp_find_unused_parameters`, `ddp_bucket_cap_mb` tune DistributedDataParallel, "
                            "which this run does not use (it trains in one process): no effect"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert notices(cfg) == []
    sharded = build_config({**base, "ddp_static_graph": False, "fsdp": "full_shard"})
    assert "(`fsdp` shards the model)" in notices(sharded)[0]
    assert "DDP fails on the first micro-batch it does not sync" in gate_problems(
        tmp_path, ddp_static_graph=True, gradient_accumulation_steps=2)
