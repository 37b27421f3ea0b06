"""On an NVIDIA GPU: `tuneforge train` processes with the GPU visible. The rest of the suite checks CPU numerics and
runs with the GPU hidden (conftest); these run where `nvidia-smi` and a CUDA torch are, and are skipped elsewhere
(CI has no GPU). Each case is one that a GPU run on an H200 found broken, or the path GPU users take."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import GPU_VISIBLE, alpaca_rows, read_log, write_jsonl

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


def train(env: dict, out, **keys) -> list[dict]:
    """Runs `tuneforge train` with these keys in a process; its logged steps."""
    keys = {"output_dir": out, "template": "chatml", "cutoff_len": 64, "logging_steps": 1, "do_train": True,
            "seed": 1, "report_to": "none", **keys}
    args = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in keys.items()]
    run = subprocess.run([sys.executable, "-m", "tuneforge.cli", "train", *args], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return [r for r in read_log(out) if "loss" in r]


def test_lora_sft_on_the_gpu_logs_the_cpus_losses(tiny_model, alpaca_file, tmp_path, gpu_env):
    keys = dict(model_name_or_path=tiny_model, dataset=alpaca_file, finetuning_type="lora", max_steps=6,
                per_device_train_batch_size=4, learning_rate=1e-3)
    gpu = train(gpu_env, tmp_path / "gpu", **keys)
    cpu = train({**gpu_env, "CUDA_VISIBLE_DEVICES": ""}, tmp_path / "cpu", **keys)
    # float32 on both (torch leaves TF32 off for matrix products); cuBLAS sums in another order than the CPU's
    # kernels, which moves the losses by float noise: on CPUs, other kernels and thread counts move logged losses
    # by under 1e-4 (conftest's LOGGED_LOSS). 2e-3 leaves room for six steps of drift; not yet measured on a GPU.
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
