"""FSDP in real torchrun processes (gloo on CPU): two sharded processes give the same weights as one process on the
same global batch, their checkpoints are normal model files that resume at another world size, and the sharding
keys fail with one line when they cannot work; LLaMA-Factory's accelerate FSDP configs under `accelerate launch`,
where only the main process reads the weights. DeepSpeed: tests/test_deepspeed.py."""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (LOGGED_LOSS, SHARDED_GAP, alpaca_rows, check_same_lora_run, gate_problems, read_log,
                      relative_update_gap, train_here, write_jsonl)
from safetensors.torch import load_file, save_file

from tuneforge.config import ConfigError, build_config, validate

TORCHRUN = Path(sys.executable).parent / "torchrun"
ACCELERATE = Path(sys.executable).parent / "accelerate"
needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason="needs torchrun")
FSDP = ["fsdp=full_shard auto_wrap", "per_device_train_batch_size=2", "gradient_accumulation_steps=2"]
ONE = ["per_device_train_batch_size=8"]  # the same global batch: 2 x 2 x 2 processes


def _train(args: list[str], processes: int = 1) -> subprocess.CompletedProcess:
    """`tuneforge train ARGS` in `processes` torchrun processes; one process runs in the test's own."""
    done = train_here(args) if processes == 1 else subprocess.run(
        [str(TORCHRUN), "--nproc_per_node", str(processes), "-m", "tuneforge.cli", "train", *args],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _accelerate_launch(config: Path, args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run([str(ACCELERATE), "launch", "--config_file", str(config), "-m", "tuneforge.cli", "train",
                           *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _accelerate_fsdp_config(path: Path, fsdp_config: dict) -> Path:
    """An accelerate config file for 2 processes on this machine, written as LLaMA-Factory's examples/accelerate
    ones are, with `fsdp_config` and mixed precision off (the comparisons run in fp32)."""
    with socket.socket() as free:  # a port of its own: accelerate's default 29500 may still be held by another run
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    lines = ["compute_environment: LOCAL_MACHINE", "distributed_type: FSDP", "fsdp_config:",
             *[f"  {key}: {json.dumps(value)}" for key, value in fsdp_config.items()],
             "machine_rank: 0", f"main_process_port: {port}", "mixed_precision: 'no'", "num_machines: 1",
             "num_processes: 2", "rdzv_backend: static", "same_network: true", "use_cpu: false"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _common(tiny_model, data, **extra) -> list[str]:
    values = dict(model_name_or_path=tiny_model, dataset=data, template="chatml", cutoff_len=64, max_steps=4,
                  logging_steps=1, learning_rate=1e-3, do_train="true", **extra)
    return [f"{k}={v}" for k, v in values.items()]




@needs_torchrun
def test_fsdp_full_matches_one_process_and_resumes_across_world_sizes(tiny_model, tmp_path):
    data = str(write_jsonl(tmp_path / "d.jsonl", alpaca_rows(32)))  # 32 rows: no process gets padding rows
    common = _common(tiny_model, data, finetuning_type="full", save_steps=2)
    sharded = _train([*common, *FSDP, f"output_dir={tmp_path / 'fsdp'}"], processes=2)
    assert "fsdp: sharded across 2 processes (4 layer units and the root)" in sharded.stdout
    _train([*common, *ONE, f"output_dir={tmp_path / 'one'}"])
    start = load_file(f"{tiny_model}/model.safetensors")
    final = load_file(tmp_path / "one" / "model.safetensors")
    assert relative_update_gap(start, load_file(tmp_path / "fsdp" / "model.safetensors"), final) < SHARDED_GAP
    assert [r["loss"] for r in read_log(tmp_path / "fsdp")] == \
        pytest.approx([r["loss"] for r in read_log(tmp_path / "one")], abs=LOGGED_LOSS)

    # the 2-process checkpoint resumes in one process (fsdp still set: nothing to shard) ...
    shutil.copytree(tmp_path / "fsdp" / "checkpoint-2", tmp_path / "to-one" / "checkpoint-2")
    resumed = _train([*common, "fsdp=full_shard auto_wrap", *ONE, f"output_dir={tmp_path / 'to-one'}"])
    assert "resuming from" in resumed.stdout and "runs unsharded" in resumed.stdout
    assert relative_update_gap(start, load_file(tmp_path / "to-one" / "model.safetensors"), final) < SHARDED_GAP
    # ... and the one-process checkpoint in two sharded processes (each takes its shard of the optimizer state)
    shutil.copytree(tmp_path / "one" / "checkpoint-2", tmp_path / "to-two" / "checkpoint-2")
    resumed = _train([*common, *FSDP, f"output_dir={tmp_path / 'to-two'}"], processes=2)
    assert "resuming from" in resumed.stdout
    assert relative_update_gap(start, load_file(tmp_path / "to-two" / "model.safetensors"), final) < SHARDED_GAP


@needs_torchrun
def test_fsdp_lora_matches_one_process_and_evaluates(tiny_model, tmp_path):
    # 5 evaluation rows: 3 on the first process (2 batches), 2 on the second (1 batch), which must still join
    # every forward the sharded model makes; 32 training rows
    data = str(write_jsonl(tmp_path / "d.jsonl", alpaca_rows(37)))
    common = _common(tiny_model, data, finetuning_type="lora", val_size=5, per_device_eval_batch_size=2,
                     do_eval="true")
    settings = tmp_path / "fsdp.json"  # transformers 5's form, with FSDP's activation checkpointing
    settings.write_text(json.dumps({"fsdp_version": 2, "activation_checkpointing": True,
                                    "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}))
    _train([*common, "fsdp=true", f"fsdp_config={settings}", *FSDP[1:], f"output_dir={tmp_path / 'fsdp'}"],
           processes=2)
    _train([*common, *ONE, f"output_dir={tmp_path / 'one'}"])
    check_same_lora_run(tiny_model, tmp_path / "fsdp", tmp_path / "one")


RANK_SCRIPT = """import os, sys
from tuneforge.cli import main
code = main(sys.argv[1:])
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
left = sorted(name for name in names if "gloo" in name)
os.write(1, f"gloo threads left: {left}\\n".encode())  # one write: the two ranks share the pipe, print() could interleave
sys.exit(code)
"""


# LLaMA-Factory's examples/accelerate/fsdp_config.yaml (FSDP1) and fsdp2_config.yaml, as `accelerate launch
# --config_file` reads them; both have the main process alone read the weights (cpu_ram_efficient_loading)
LF_FSDP1 = {"fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_backward_prefetch": "BACKWARD_PRE",
            "fsdp_forward_prefetch": False, "fsdp_cpu_ram_efficient_loading": True, "fsdp_offload_params": False,
            "fsdp_sharding_strategy": "FULL_SHARD", "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_sync_module_states": True, "fsdp_use_orig_params": True}
LF_FSDP2 = {"fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_offload_params": False, "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_version": 2}


@needs_torchrun
def test_llamafactory_accelerate_fsdp_config_matches_one_process_and_resumes(tiny_model, tmp_path):
    data = str(write_jsonl(tmp_path / "d.jsonl", alpaca_rows(32)))
    common = _common(tiny_model, data, finetuning_type="full", save_steps=2)
    config = _accelerate_fsdp_config(tmp_path / "fsdp_config.yaml", LF_FSDP1)
    sharded = _accelerate_launch(config, [*common, *FSDP[1:], f"output_dir={tmp_path / 'fsdp'}"])
    assert "fsdp: sharded across 2 processes (4 layer units and the root), weights read by the main process only" \
        in sharded.stdout
    assert sharded.stderr.count("asks for FSDP1; tuneforge runs FSDP2") == 1  # said by the first process only
    _train([*common, *ONE, f"output_dir={tmp_path / 'one'}"])
    start = load_file(f"{tiny_model}/model.safetensors")
    final = load_file(tmp_path / "one" / "model.safetensors")
    # the second process built its model empty: had the main process's weights (or its buffers: the rotary
    # frequencies are in no state dict) not reached it, its shards would have trained from garbage
    assert relative_update_gap(start, load_file(tmp_path / "fsdp" / "model.safetensors"), final) < SHARDED_GAP
    shutil.copytree(tmp_path / "fsdp" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = _accelerate_launch(config, [*common, *FSDP[1:], f"output_dir={tmp_path / 'resumed'}"])
    assert "resuming from" in resumed.stdout and "copying from a non-meta" not in resumed.stderr
    assert relative_update_gap(start, load_file(tmp_path / "resumed" / "model.safetensors"), final) < SHARDED_GAP


@needs_torchrun
def test_llamafactory_fsdp2_config_with_lora_and_new_tokens(tiny_model, tmp_path):
    # the grown vocabulary's rows and the LoRA matrices of the empty second process come from the main process too
    data = str(write_jsonl(tmp_path / "d.jsonl", alpaca_rows(37)))
    common = _common(tiny_model, data, finetuning_type="lora", val_size=5, per_device_eval_batch_size=2,
                     do_eval="true", add_special_tokens="<think>,</think>")
    config = _accelerate_fsdp_config(tmp_path / "fsdp2_config.yaml", LF_FSDP2)
    sharded = _accelerate_launch(config, [*common, *FSDP[1:], f"output_dir={tmp_path / 'fsdp'}"])
    assert "weights read by the main process only" in sharded.stdout
    _train([*common, *ONE, f"output_dir={tmp_path / 'one'}"])
    check_same_lora_run(tiny_model, tmp_path / "fsdp", tmp_path / "one")


@needs_torchrun
def test_dpo_with_its_reference_loads_in_the_main_process_only(tiny_model, tmp_path):
    # DPO's full fine-tuning holds the trained model (empty in the second process) beside a full reference model
    rows = [{"instruction": f"Tell me about topic {i}.", "chosen": "Sure! Here is a fact." * (1 + i % 3),
             "rejected": "No." * (1 + i % 2)} for i in range(16)]
    common = _common(tiny_model, str(write_jsonl(tmp_path / "p.jsonl", rows)), stage="dpo", finetuning_type="full")
    runs = {}
    for efficient in (True, False):
        config = _accelerate_fsdp_config(tmp_path / f"{efficient}.yaml",
                                         {**LF_FSDP1, "fsdp_cpu_ram_efficient_loading": efficient})
        _accelerate_launch(config, [*common, *FSDP[1:], f"output_dir={tmp_path / str(efficient)}"])
        runs[efficient] = load_file(tmp_path / str(efficient) / "model.safetensors")
    # the same processes computing the same sharded steps: only where the starting weights were read differs
    assert all(torch.equal(runs[True][k], runs[False][k]) for k in runs[False])


def test_accelerate_fsdp_variables_read_as_the_yaml_keys(monkeypatch):
    from tuneforge.config import load_config
    from tuneforge.train.sharding import adopt_accelerate_fsdp, fsdp_settings

    def adopted(yaml: dict, **variables):
        t = build_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "do_train": True,
                          **yaml}).train
        return t, adopt_accelerate_fsdp(t, {"ACCELERATE_USE_FSDP": "true", **variables})

    # what `accelerate launch` sets for an FSDP1 config (accelerate/utils/launch.py), here sharding as ZeRO-2
    t, notes = adopted({}, FSDP_VERSION="1", FSDP_SHARDING_STRATEGY="SHARD_GRAD_OP", FSDP_RESHARD_AFTER_FORWARD="true",
                       FSDP_MIN_NUM_PARAMS="100000000", FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP",
                       FSDP_TRANSFORMER_CLS_TO_WRAP="LlamaDecoderLayer", FSDP_CPU_RAM_EFFICIENT_LOADING="true",
                       FSDP_OFFLOAD_PARAMS="false", FSDP_USE_ORIG_PARAMS="true", FSDP_SYNC_MODULE_STATES="true")
    s = fsdp_settings(t)
    assert (t.fsdp, s.reshard_after_forward, s.auto_wrap, s.wrap_classes, s.ram_efficient_loading) == \
        ("shard_grad_op", False, True, ["LlamaDecoderLayer"], True)
    assert "asks for FSDP1" in notes[0] and notes[-1].startswith("note: sharding as accelerate's config asks")
    # FSDP2: RESHARD_AFTER_FORWARD decides; no policy named wraps nothing (accelerate's default)
    t, _ = adopted({}, FSDP_VERSION="2", FSDP_RESHARD_AFTER_FORWARD="false", FSDP_SHARDING_STRATEGY="FULL_SHARD")
    s = fsdp_settings(t)
    assert (s.reshard_after_forward, s.auto_wrap, s.ram_efficient_loading) == (False, False, False)
    t, notes = adopted({"fsdp": "full_shard auto_wrap"}, FSDP_VERSION="2", FSDP_RESHARD_AFTER_FORWARD="false")
    assert fsdp_settings(t).reshard_after_forward and notes == [
        "note: the YAML's `fsdp` applies, not the FSDP settings of accelerate's config"]
    for variables, message in (
            ({"FSDP_SHARDING_STRATEGY": "HYBRID_SHARD"},
             "accelerate's fsdp_sharding_strategy HYBRID_SHARD: use FULL_SHARD or SHARD_GRAD_OP"),
            ({"FSDP_SHARDING_STRATEGY": "3"}, "fsdp_sharding_strategy 3: "),
            ({"FSDP_VERSION": "2", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"},
             "accelerate's FSDP_STATE_DICT_TYPE=SHARDED_STATE_DICT: tuneforge saves full state dicts only"),
            ({"FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": "true"},
             "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD=true: not built"),
            ({"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, "size-based wrapping is not built")):
        with pytest.raises(ConfigError, match=message):
            adopted({}, **variables)
    # a process of `accelerate launch` reads it when its config loads
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    cfg = load_config(None, ["model_name_or_path=m", "dataset=d", "output_dir=o", "do_train=true"])
    assert cfg.train.fsdp == "full_shard" and any("accelerate's config asks" in n for n in cfg.notes)


def test_an_empty_model_has_its_buffers_and_ties_but_no_weights(tiny_model, tmp_path):
    from tuneforge.models.load import load_base_model

    tied = tmp_path / "tied"  # the tiny model with its head tied to the embeddings, as SmolLM2's is
    shutil.copytree(tiny_model, tied)
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    weights = load_file(tied / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "lm_head.weight"}, tied / "model.safetensors")
    args = build_config({"model_name_or_path": str(tied)}).model
    loaded, empty = load_base_model(args), load_base_model(args, empty=True)
    assert {p.device.type for p in empty.parameters()} == {"meta"}
    assert empty.lm_head.weight is empty.model.embed_tokens.weight
    assert [n for n, _ in empty.named_parameters()] == [n for n, _ in loaded.named_parameters()]
    assert {n: b.tolist() for n, b in empty.named_buffers()} == {n: b.tolist() for n, b in loaded.named_buffers()}


@needs_torchrun
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the rank's threads from /proc")
def test_finished_ranks_join_their_gloo_threads(tiny_model, tmp_path):
    # a gloo worker still running while the interpreter shuts down may drop the last reference to a collective's
    # tensors there and abort the rank ("terminate called without an active exception"); before the fix both of
    # gloo's workers and its transport loop were still alive here (cli._leave_process_group says why)
    data = str(write_jsonl(tmp_path / "d.jsonl", alpaca_rows(16)))
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    args = _common(tiny_model, data, finetuning_type="lora", fsdp="full_shard auto_wrap")
    done = subprocess.run([str(TORCHRUN), "--nproc_per_node", "2", str(script), "train", *args, *FSDP[1:],
                           f"output_dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("gloo threads left: []") == 2, done.stdout[-1000:]


def test_sharding_keys_fail_in_one_line(tmp_path):
    assert "unknown option 'full-shard'" in gate_problems(tmp_path, fsdp="full-shard")
    assert "hybrid_shard is not built" in gate_problems(tmp_path, fsdp="hybrid_shard auto_wrap")
    assert "FSDP's versions are 1 and 2" in gate_problems(tmp_path, fsdp="full_shard", fsdp_config={"fsdp_version": 3})
    assert "unknown key" in gate_problems(tmp_path, fsdp="full_shard", fsdp_config={"shard_everything": True})
    assert "set `fsdp: full_shard auto_wrap` too" in gate_problems(tmp_path, fsdp_transformer_layer_cls_to_wrap="X")
    assert "size-based wrapping is not built" in gate_problems(tmp_path, fsdp="true",
                                                          fsdp_config={"auto_wrap_policy": "SIZE_BASED_WRAP"})
    missing = tmp_path / "nowhere.json"
    assert f"`fsdp_config: {missing}`: no such file" in gate_problems(tmp_path, fsdp="full_shard", fsdp_config=missing)
    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": {"stage": 3,}}')
    assert "not valid JSON (line 1" in gate_problems(tmp_path, deepspeed=str(broken))
    assert "no such file" in gate_problems(tmp_path, deepspeed=str(missing))
    assert "`do_predict` with `fsdp` is not built" in gate_problems(tmp_path, fsdp="full_shard", do_predict=True)
    assert "`upcast_layernorm` with `fsdp` is not built (FSDP shards a layer's parameters as one dtype" in \
        gate_problems(tmp_path, fsdp="full_shard", upcast_layernorm=True, pure_bf16=True, bf16=True)
    good = tmp_path / "fsdp.json"
    good.write_text(json.dumps({"fsdp_transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "use_orig_params": True,
                                "fsdp_version": 2, "min_num_params": 0, "xla": False, "activation_checkpointing": True}))
    cfg = build_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "do_train": True,
                        "fsdp": True, "fsdp_config": str(good)})  # transformers 5's form
    validate(cfg)
    from tuneforge.train.sharding import fsdp_settings

    s = fsdp_settings(cfg.train)
    assert (s.wrap_classes, s.auto_wrap, s.reshard_after_forward, s.activation_checkpointing) == \
        (["LlamaDecoderLayer"], True, True, True)
    assert s.notes[0].startswith("note: fsdp_config `use_orig_params` is an FSDP1 setting")
    assert fsdp_settings(build_config({"fsdp": "shard_grad_op offload"}).train).reshard_after_forward is False


def test_a_checkpoint_resumes_only_with_its_global_batch(tmp_path):
    from tuneforge import __version__
    from tuneforge.train.checkpoint import MARKER, check_identity, global_batch

    config = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1e-3}
    saved = global_batch(build_config(config).train, 2)
    (tmp_path / MARKER).write_text(json.dumps({"tuneforge_version": __version__, "config": config, "data": "x",
                                               **saved}))
    same = {"config": {**config, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}, "data": "x",
            "global_batch": 8, "world_size": 1}
    check_identity(tmp_path, same)  # 8 x 1 x 1 process = 2 x 2 x 2 processes
    with pytest.raises(ConfigError, match=r"global batch of 8 \(.* x 2 processes\); this run's is 4 \(with 1 process\)"):
        check_identity(tmp_path, {**same, "global_batch": 4})
    with pytest.raises(ConfigError, match=r"other settings \(learning_rate"):  # the rest is still compared
        check_identity(tmp_path, {**same, "config": {**same["config"], "learning_rate": 2e-3}})


def test_an_accelerate_deepspeed_config_cannot_shard_behind_the_yaml(monkeypatch):
    from tuneforge.train.sharding import accelerator_kwargs

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets for DEEPSPEED
    with pytest.raises(ConfigError, match="set `deepspeed: ds_config.json` in the YAML"):
        accelerator_kwargs(build_config({}).train)
