"""On an NVIDIA GPU: `tuneforge train` processes with the GPU visible. The rest of the suite checks CPU numerics and
runs with the GPU hidden (conftest); these run where `nvidia-smi` and a CUDA torch are, and are skipped elsewhere
(CI has no GPU). Each case is one that a GPU run on an H200 found broken, or the path GPU users take."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from urllib.request import Request, urlopen

import pytest
import torch
from conftest import GPU_VISIBLE, alpaca_rows, read_log, write_jsonl
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="needs an NVIDIA GPU")


@pytest.fixture(scope="module")
def gpu_env() -> dict:
    """The environment with CUDA_VISIBLE_DEVICES as the suite found it."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if GPU_VISIBLE is not None:
        env["CUDA_VISIBLE_DEVICES"] = GPU_VISIBLE
    probe = subprocess.run([sys.executable, "-c", "import sys, torch; sys.exit(not torch.cuda.is_available())"],
                           env=env, timeout=120)
    if probe.returncode:
        pytest.skip("nvidia-smi is there, but this torch sees no CUDA GPU")
    return env


def launch(env: dict, out, command: list[str] | None = None, **keys) -> subprocess.CompletedProcess:
    """`tuneforge train` with these keys in a process (`command`: a Python that runs it otherwise)."""
    keys = {"output_dir": out, "template": "chatml", "cutoff_len": 64, "logging_steps": 1, "do_train": True,
            "seed": 1, "report_to": "none", **keys}
    args = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in keys.items()]
    return subprocess.run([*(command or [sys.executable, "-m", "tuneforge.cli"]), "train", *args], env=env,
                          capture_output=True, text=True, timeout=600)


def train(env: dict, out, **keys) -> list[dict]:
    """Runs `tuneforge train` with these keys in a process; its logged steps."""
    run = launch(env, out, **keys)
    assert run.returncode == 0, run.stderr[-3000:]
    return [r for r in read_log(out) if "loss" in r]


def test_lora_sft_on_the_gpu_logs_the_cpus_losses(tiny_model, alpaca_file, tmp_path, gpu_env):
    keys = dict(model_name_or_path=tiny_model, dataset=alpaca_file, finetuning_type="lora", max_steps=6,
                per_device_train_batch_size=4, learning_rate=1e-3)
    gpu = train(gpu_env, tmp_path / "gpu", **keys)
    cpu = train({**gpu_env, "CUDA_VISIBLE_DEVICES": ""}, tmp_path / "cpu", **keys)
    # float32 on both (torch leaves TF32 off for matrix products); cuBLAS sums in another order than the CPU's
    # kernels, which moves the losses by float noise: on CPUs, other kernels and thread counts move logged losses
    # by under 1e-4 (conftest's LOGGED_LOSS). 2e-3 leaves room for six steps of drift; passed on an H200.
    assert [r["loss"] for r in gpu] == pytest.approx([r["loss"] for r in cpu], abs=2e-3)


def test_the_fast_settings_learn_on_the_gpu(tiny_model, tmp_path, gpu_env):
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(64))
    log = train(gpu_env, tmp_path / "out", model_name_or_path=tiny_model, dataset=data, finetuning_type="lora",
                max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2, bf16=True, pure_bf16=True,
                packing=True)
    assert log[-1]["loss"] < log[0]["loss"]


@pytest.mark.parametrize("stage", ["dpo", "kto", "asft"])
def test_full_fine_tuning_with_a_frozen_reference_trains_on_the_gpu(tiny_model, tmp_path, gpu_env, stage):
    """Full fine-tuning compares with a frozen copy of the starting model, which the losses hold outside their
    submodules; it was left on the CPU while the batches went to the GPU (index_select: 'index is on cuda:0')."""
    rows = [{"instruction": f"Tell me about topic {i}.", "input": "", "chosen": "Sure! Here is a fact.",
             "rejected": "Sorry, I will not."} for i in range(24)]
    if stage == "dpo":
        write_jsonl(tmp_path / "d.jsonl", rows)
        info, keys = {"file_name": "d.jsonl", "ranking": True}, dict(stage="dpo")
    elif stage == "kto":
        write_jsonl(tmp_path / "d.jsonl", [{"instruction": r["instruction"], "input": "", "label": i % 3 != 0,
                                             "output": r["chosen"] if i % 3 else r["rejected"]}
                                            for i, r in enumerate(rows)])
        info, keys = {"file_name": "d.jsonl", "columns": {"kto_tag": "label"}}, dict(stage="kto")
    else:
        write_jsonl(tmp_path / "d.jsonl", alpaca_rows(24))
        info, keys = {"file_name": "d.jsonl"}, dict(stage="sft", use_asft_loss=True)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": info}))
    log = train(gpu_env, tmp_path / "out", model_name_or_path=tiny_model, dataset="d", dataset_dir=tmp_path,
                finetuning_type="full", max_steps=4, per_device_train_batch_size=4, learning_rate=1e-4, **keys)
    assert len(log) == 4


def test_tf32_multiplies_in_tf32_for_the_run_only(gpu_env):
    script = """import json, torch
from tuneforge.train.common import float32_products
a, b = torch.randn(2, 1024, 1024, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
exact = a.double() @ b.double()
error = lambda: ((a @ b).double() - exact).abs().max().item() / exact.abs().max().item()
with float32_products(True):
    fast, precision = error(), torch.get_float32_matmul_precision()
with float32_products(False):
    full = error()
print(json.dumps([fast, full, precision, error()]))"""
    done = subprocess.run([sys.executable, "-c", script], env=gpu_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    fast, full, precision, after = json.loads(done.stdout)
    # TF32 keeps 10 of float32's 23 mantissa bits: products err ~1e-3 relative against ~1e-6 in float32
    assert fast > 50 * full and precision == "high"
    assert after == full  # torch's default on NVIDIA GPUs, float32, came back after the run


def test_full_determinism_repeats_a_run_exactly_on_the_gpu(tiny_model, alpaca_file, tmp_path, gpu_env):
    # full fine-tuning: the embedding's backward accumulates with atomics unless deterministic algorithms are on
    keys = dict(model_name_or_path=tiny_model, dataset=alpaca_file, finetuning_type="full", max_steps=4,
                per_device_train_batch_size=4, learning_rate=1e-3, full_determinism=True)
    first, second = (train(gpu_env, tmp_path / name, **keys) for name in ("first", "second"))
    assert [r["loss"] for r in first] == [r["loss"] for r in second]
    weights = [load_file(tmp_path / name / "model.safetensors") for name in ("first", "second")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_full_eval_casts_to_fp16_itself_on_the_gpu(tiny_model, tmp_path, gpu_env):
    """On a CPU without fp16 matrix units fp16_full_eval evaluates in bf16; on a GPU it must be fp16 itself."""
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(24))
    losses = {}
    for key in ("none", "fp16_full_eval", "bf16_full_eval"):
        extra = {key: True} if key != "none" else {}
        done = launch(gpu_env, tmp_path / key, model_name_or_path=tiny_model, dataset=data, do_train=False,
                      do_eval=True, val_size=8, **extra)
        assert done.returncode == 0, done.stderr[-3000:]
        losses[key] = json.loads((tmp_path / key / "eval_results.json").read_text())["eval_loss"]
    # the same weights in three precisions: each rounding moves the loss (by ~1e-4 here), and differently
    assert len(set(losses.values())) == 3
    assert losses["fp16_full_eval"] == pytest.approx(losses["none"], abs=1e-2)
    assert losses["bf16_full_eval"] == pytest.approx(losses["none"], abs=5e-2)


# a Python that runs `tuneforge` with PyTorch's allocator capped at 1.5 GiB of the GPU, so that running out of
# memory is CUDA's own error at a size the test chooses, not at the 141 GB of an H200
CAPPED = [sys.executable, "-c", "import sys, torch; torch.cuda.set_per_process_memory_fraction(1.5 * 2**30 / "
          "torch.cuda.get_device_properties(0).total_memory); from tuneforge.cli import entry; sys.exit(entry())"]


def test_auto_find_batch_size_recovers_from_cudas_out_of_memory(tiny_model, tmp_path, gpu_env):
    rows = [{"instruction": f"Count the words {i}.", "input": "", "output": "word " * 600} for i in range(256)]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    # eager attention keeps a 4-head 512 x 512 score matrix per layer and row: ~35 MB a row, ~4.5 GB for 128 rows
    keys = dict(model_name_or_path=tiny_model, dataset=data, finetuning_type="full", cutoff_len=512, max_steps=2,
                per_device_train_batch_size=128, learning_rate=1e-3, flash_attn="eager")
    whole = train(gpu_env, tmp_path / "whole", **keys)
    capped = launch(gpu_env, tmp_path / "capped", command=CAPPED, auto_find_batch_size=True, **keys)
    assert capped.returncode == 0, capped.stderr[-3000:]
    assert "auto_find_batch_size: step 1 ran out of memory with micro-batches of up to 128 rows" in capped.stdout
    # the same rows in smaller micro-batches, the loss normalised over the whole step's tokens: the same losses up
    # to the order of float sums (logged to 4 decimals)
    steps = [r for r in read_log(tmp_path / "capped") if "loss" in r]
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in whole], abs=1e-3)


def test_cuda_graph_compile_modes_are_refused_in_one_line(tiny_model, alpaca_file, tmp_path, gpu_env):
    done = launch(gpu_env, tmp_path / "out", model_name_or_path=tiny_model, dataset=alpaca_file, max_steps=1,
                  torch_compile=True, torch_compile_mode="reduce-overhead")
    assert done.returncode != 0 and "set max-autotune-no-cudagraphs or default" in done.stderr


def test_the_api_on_the_gpu_answers_and_exits_cleanly(tiny_model, tmp_path, gpu_env):
    """The server's batcher decodes on the GPU from a thread of its own; stopped while that thread still held CUDA
    tensors, the process once aborted at exit (`terminate called without an active exception`, exit 134)."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = dict(gpu_env, API_HOST="127.0.0.1", API_PORT=str(port))
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "api", f"model_name_or_path={tiny_model}",
                                   "template=chatml", "max_new_tokens=16"], env=env, stdout=out,
                                  stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                with urlopen(f"{url}/models", timeout=5) as response:
                    name = json.loads(response.read())["data"][0]["id"]
                break
            except OSError:  # not listening yet
                time.sleep(0.3)
        body = json.dumps({"model": name, "messages": [{"role": "user", "content": "Hello"}]}).encode()
        with urlopen(Request(f"{url}/chat/completions", data=body,
                             headers={"Content-Type": "application/json"}), timeout=60) as response:
            assert json.loads(response.read())["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C, as a user stops it
        code = server.wait(timeout=60)
    assert code == 0 and "terminate called" not in log.read_text(), log.read_text()[-3000:]
