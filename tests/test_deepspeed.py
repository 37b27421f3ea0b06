"""DeepSpeed ZeRO in real torchrun processes (gloo on CPU, DeepSpeed's CPU accelerator): two partitioned processes
give the same weights as one process on the same global batch, resume from their own partitions, evaluate and save
adapters that load in plain PEFT; LLaMA-Factory's configs run as they are; what cannot run fails in one line."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (LOGGED_LOSS, SHARDED_GAP, alpaca_rows, check_same_lora_run, gate_problems, read_log,
                      relative_update_gap, train_here, write_jsonl)
from safetensors.torch import load_file

from tuneforge.config import ConfigError, build_config
from tuneforge.train.zero import filled

TORCHRUN = Path(sys.executable).parent / "torchrun"
pytestmark = [pytest.mark.skipif(not TORCHRUN.exists(), reason="needs torchrun"),
              pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is None,
                                 reason="needs deepspeed (make install installs it)")]
TWO = ["per_device_train_batch_size=2", "gradient_accumulation_steps=2"]
ONE = ["per_device_train_batch_size=8"]  # the same global batch: 2 x 2 x 2 processes
# LLaMA-Factory's form of a ZeRO-3 config: the "auto" values come from the YAML and the model
LF_ZERO3 = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
            "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16}, "bf16": {"enabled": "auto"},
            "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                                  "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                  "stage3_param_persistence_threshold": "auto",
                                  "stage3_gather_16bit_weights_on_model_save": True}}


def _run(args: list[str], processes: int) -> subprocess.CompletedProcess:
    """`tuneforge train ARGS` in `processes` torchrun processes; one process runs in the test's own."""
    return train_here(args) if processes == 1 else subprocess.run(
        [str(TORCHRUN), "--nproc_per_node", str(processes), "-m", "tuneforge.cli", "train", *args],
        capture_output=True, text=True, timeout=300)


def _train(args: list[str], processes: int = 1) -> subprocess.CompletedProcess:
    done = _run(args, processes)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _common(tiny_model, data, **extra) -> list[str]:
    values = dict(model_name_or_path=tiny_model, dataset=data, template="chatml", cutoff_len=64, max_steps=4,
                  logging_steps=1, learning_rate=1e-3, do_train="true")
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


# Plain SGD without clipping moves the weights by the gradient itself: a loss the engine divides once more by the
# accumulation steps measured a gap of 1.6 there (Adam's update hardly changes when every gradient halves). AdamW
# with clipping (max_grad_norm 1, the default) checks the engine's clipping.
@pytest.mark.parametrize("stage,optimizer", [(2, {"optim": "sgd", "max_grad_norm": 0, "learning_rate": 0.1}), (3, {})])
def test_zero_full_matches_one_process_and_resumes_from_its_partitions(tiny_model, tmp_path, stage, optimizer):
    data = str(write_jsonl(tmp_path / "d.jsonl", alpaca_rows(32)))  # 32 rows: no process gets padding rows
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": stage}, "gradient_clipping": "auto"}))
    common = _common(tiny_model, data, finetuning_type="full", save_steps=2, deepspeed=config, **optimizer)
    zero = _train([*common, *TWO, f"output_dir={tmp_path / 'zero'}"], processes=2)
    assert f"deepspeed: ZeRO stage {stage} across 2 processes" in zero.stdout
    one = _train([*common, *ONE, f"output_dir={tmp_path / 'one'}"])
    assert "one process holds the whole model, so training runs without the engine" in one.stdout
    start = load_file(f"{tiny_model}/model.safetensors")
    final = load_file(tmp_path / "one" / "model.safetensors")
    assert relative_update_gap(start, load_file(tmp_path / "zero" / "model.safetensors"), final) < SHARDED_GAP
    assert [r["loss"] for r in read_log(tmp_path / "zero")] == \
        pytest.approx([r["loss"] for r in read_log(tmp_path / "one")], abs=LOGGED_LOSS)
    assert sorted(p.name for p in (tmp_path / "zero" / "checkpoint-2" / "deepspeed" / "zero").glob("*optim*")) == \
        [f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)]

    # the partitions resume in as many processes, to the uninterrupted run's weights ...
    shutil.copytree(tmp_path / "zero" / "checkpoint-2", tmp_path / "again" / "checkpoint-2")
    resumed = _train([*common, *TWO, f"output_dir={tmp_path / 'again'}"], processes=2)
    assert "resuming from" in resumed.stdout
    assert relative_update_gap(start, load_file(tmp_path / "again" / "model.safetensors"),
                               load_file(tmp_path / "zero" / "model.safetensors")) < 1e-6  # measured 0
    # ... and are refused in one line elsewhere, as a one-process checkpoint is under the engine (checked for one
    # stage: the refusal reads the partition files, which both stages write alike, as the assertion above shows)
    if stage == 3:
        return
    shutil.copytree(tmp_path / "zero" / "checkpoint-2", tmp_path / "to-one" / "checkpoint-2")
    refused = _run([*common, *ONE, f"output_dir={tmp_path / 'to-one'}"], processes=1)
    assert refused.returncode != 0
    assert "holds DeepSpeed's optimizer state in 2 partitions: resume it with `deepspeed` (ZeRO stage 1-3) in 2 " \
           "processes" in refused.stderr
    shutil.copytree(tmp_path / "one" / "checkpoint-2", tmp_path / "to-two" / "checkpoint-2")
    refused = _run([*common, *TWO, f"output_dir={tmp_path / 'to-two'}"], processes=2)
    assert refused.returncode != 0 and "was saved without DeepSpeed's partitions" in refused.stderr


def test_zero3_lora_from_a_llamafactory_config_evaluates_and_loads_in_peft(tiny_model, tmp_path):
    # 5 evaluation rows: 3 on the first process (2 batches), 2 on the second (1 batch), which must still join
    # every forward the partitioned model makes; 32 training rows
    data = str(write_jsonl(tmp_path / "d.jsonl", alpaca_rows(37)))
    config = tmp_path / "ds_z3_config.json"
    config.write_text(json.dumps(LF_ZERO3))
    common = _common(tiny_model, data, finetuning_type="lora", val_size=5, per_device_eval_batch_size=2,
                     do_eval="true")
    _train([*common, f"deepspeed={config}", *TWO, f"output_dir={tmp_path / 'zero'}"], processes=2)
    _train([*common, *ONE, f"output_dir={tmp_path / 'one'}"])
    check_same_lora_run(tiny_model, tmp_path / "zero", tmp_path / "one")


def test_zero3_dpo_keeps_its_frozen_reference_whole(tiny_model, tmp_path):
    # full-fine-tuning DPO's reference is a frozen copy outside the partitioned module: it must score the pairs
    # with whole weights on every process (measured 4.8e-6 from one process, as the SFT runs above)
    from test_preference import preference_rows

    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(0, 16))
    (tmp_path / "dataset_info.json").write_text(f'{{"pairs": {{"file_name": "{data.name}", "ranking": true}}}}')
    common = _common(tiny_model, "pairs", dataset_dir=tmp_path, stage="dpo", finetuning_type="full", max_steps=3)
    _train([*common, *TWO, f"deepspeed={json.dumps(LF_ZERO3)}", f"output_dir={tmp_path / 'zero'}"], processes=2)
    _train([*common, *ONE, f"output_dir={tmp_path / 'one'}"])
    start, zero, one = (load_file(path / "model.safetensors") for path in (Path(tiny_model), tmp_path / "zero",
                                                                           tmp_path / "one"))
    assert relative_update_gap(start, zero, one) < SHARDED_GAP


def test_auto_values_come_from_the_yaml_and_the_model():
    t = build_config({"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "max_grad_norm": 0.5}).train
    out = filled(LF_ZERO3, t, world=3, hidden_size=64)
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"], out["train_batch_size"],
            out["gradient_clipping"]) == (2, 4, 24, 0.5)
    zero = out["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (4096, 3686, 640)  # transformers' h*h, 0.9*h*h, 10*h
    assert out["bf16"]["enabled"] is False and out["fp16"]["enabled"] is False  # the YAML's autocast runs instead
    with pytest.raises(ConfigError, match=r"train_batch_size is 16, and .* x 3 processes is 24; set it to auto"):
        filled({**LF_ZERO3, "train_batch_size": 16}, t, world=3, hidden_size=64)
    with pytest.raises(ConfigError, match=r"zero_optimization.sub_group_size is auto, which tuneforge does not fill"):
        filled({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, t, world=2, hidden_size=64)


def test_what_deepspeed_cannot_run_fails_in_one_line(tmp_path):
    z2 = {"zero_optimization": {"stage": 2}}
    assert "remove its `optimizer` section; tuneforge builds the optimizer from the YAML" in \
        gate_problems(tmp_path, deepspeed={**z2, "optimizer": {"type": "AdamW"}})
    assert "set bf16.enabled to auto or false" in gate_problems(tmp_path, deepspeed={**z2, "bf16": {"enabled": True}})
    assert "zero_optimization.offload_optimizer is not built" in gate_problems(
        tmp_path, deepspeed={"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}})
    assert "tensor_parallel.autotp_size is not built" in \
        gate_problems(tmp_path, deepspeed={**z2, "tensor_parallel": {"autotp_size": 2}})
    assert "zero_optimization.stage must be 0, 1, 2 or 3; got 4" in \
        gate_problems(tmp_path, deepspeed={"zero_optimization": {"stage": 4}})
    assert "train_micro_batch_size_per_gpu is 4 and per_device_train_batch_size is 2; set it to auto" in gate_problems(
        tmp_path, deepspeed={**z2, "train_micro_batch_size_per_gpu": 4}, per_device_train_batch_size=2)
    assert "`skip_nonfinite_steps` with `deepspeed` is not built" in \
        gate_problems(tmp_path, deepspeed=z2, skip_nonfinite_steps=True)
    assert "`stage: ppo` with `deepspeed` is not built" in gate_problems(tmp_path, deepspeed=z2, stage="ppo")
    assert "`fsdp` and `deepspeed` both shard the model" in gate_problems(tmp_path, deepspeed=z2, fsdp="full_shard")
