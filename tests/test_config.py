import pytest

from tuneforge.config import ConfigError, build_config, load_config

LLAMAFACTORY_YAML = """\
### model
model_name_or_path: {model}
trust_remote_code: true
adapter_name_or_path: null
flash_attn: auto
infer_dtype: auto

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_alpha: 16
lora_dropout: 0.05
lora_target: all
additional_target: null
use_rslora: false
freeze_trainable_layers: 2
freeze_trainable_modules: all
pref_beta: 0.1
pref_loss: sigmoid

### dataset
dataset: identity,alpaca_en_demo
dataset_dir: data
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4
mix_strategy: concat
train_on_prompt: false
mask_history: false
val_size: 0.1

### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500

### generate
do_sample: true
temperature: 0.95
top_p: 0.7
top_k: 50
max_new_tokens: 1024
"""


def test_llamafactory_yaml_is_accepted(tmp_path):
    path = tmp_path / "llama3_lora_sft.yaml"
    path.write_text(LLAMAFACTORY_YAML.format(model="some/model"))
    cfg = load_config(str(path))
    assert cfg.model.trust_remote_code is True
    assert cfg.data.dataset == "identity,alpaca_en_demo" and cfg.data.cutoff_len == 2048
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.train.gradient_accumulation_steps == 8 and cfg.train.bf16 is True
    assert cfg.finetune.lora_dropout == pytest.approx(0.05) and cfg.train.eval_steps == 500
    from tuneforge.config import notices

    assert notices(cfg) == []  # its preprocessing_num_workers applies; nothing it sets is ignored
    assert notices(load_config(str(path), ["run_name=x"]))[0].startswith("note: `run_name` has no effect here")
    assert notices(load_config(str(path), ["buffer_size=1"]))[0].startswith(
        "note: `buffer_size` has no effect without streaming")
    assert [n.split(":")[1] for n in notices(load_config(str(path), [
        "streaming=true", "max_steps=10", "val_size=100", "dataloader_num_workers=2", "overwrite_cache=true"]))] == [
        " `dataloader_num_workers` has no effect with streaming", " `preprocessing_num_workers` has no effect "
        "with streaming", " `overwrite_cache` has no effect with streaming"]
    assert notices(load_config(str(path), ["dataloader_num_workers=0", "dataloader_prefetch_factor=4"])) == [
        "note: `dataloader_prefetch_factor` has no effect without workers (dataloader_num_workers: 0)"]
    dora = [n for n in notices(load_config(str(path), ["use_dora=true", "torch_compile=true"])) if "DoRA" in n]
    assert dora and "leave torch_compile off" in dora[0]
    assert not [n for n in notices(load_config(str(path), ["use_dora=true"])) if "DoRA" in n]


def test_unknown_key_suggests_the_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: m\nlearnig_rate: 1e-4\n")
    with pytest.raises(ConfigError, match="unknown key `learnig_rate`; did you mean learning_rate"):
        load_config(str(path))


def test_overrides_and_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: m\ndataset: d\noutput_dir: o\ndo_train: true\n"
                    "learning_rate: 1e-4\n")  # YAML reads 1e-4 as str
    cfg = load_config(str(path), ["learning_rate=3e-4", "num_train_epochs=2", "bf16=true", "lora_target=q_proj,v_proj"])
    assert cfg.train.learning_rate == pytest.approx(3e-4) and cfg.train.num_train_epochs == 2.0
    assert cfg.train.bf16 is True and cfg.finetune.lora_target == "q_proj,v_proj"
    with pytest.raises(ConfigError, match="`per_device_train_batch_size` expects int, got 'four'"):
        load_config(str(path), ["per_device_train_batch_size=four"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(str(path), ["learning_rate"])


def test_a_bare_no_is_the_choice_no(tmp_path):
    """YAML (and LLaMA-Factory's OmegaConf) read a bare `no` as false; for a key whose choices include "no" it
    means that choice, in a file and on the command line."""
    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: m\ndataset: d\noutput_dir: o\ndo_train: true\neval_strategy: no\n")
    cfg = load_config(str(path), ["save_strategy=no"])
    assert (cfg.train.eval_strategy, cfg.train.save_strategy) == ("no", "no")
    with pytest.raises(ConfigError, match="`save_strategy` must be one of no, steps, epoch; got 'True'"):
        load_config(str(path), ["save_strategy=yes"])


@pytest.mark.parametrize("override, message", [
    ("quantization_bit=4 finetuning_type=full", "`quantization_bit` trains adapters on a frozen quantised base"),
    ("stage=ppo", "stage ppo needs `reward_model`"),
    ("pissa_init=true quantization_bit=4", "`pissa_init` with `quantization_bit` is not supported"),
    ("logging_steps=0", "`logging_steps` must be above 0: a number of steps, or below 1 a share of the run's"),
    ("save_steps=2.5", "`save_steps` above 1 is a number of steps and must be whole"),
    ("warmup_steps=2.5", "`warmup_steps` is a whole number of steps, or below 1 a share of all steps; got 2.5"),
    ("stage=kto precompute_ref_log_probs=true", "`precompute_ref_log_probs` applies to stage dpo only"),
    ("stage=dpo pref_loss=simpo precompute_ref_log_probs=true", "`precompute_ref_log_probs`: `pref_loss: simpo` uses no"),
    ("stage=kto pref_ftx=0.5", "`pref_ftx` applies to stage dpo only"),
    ("stage=dpo kto_chosen_weight=2", "`kto_chosen_weight` applies to stage kto only"),
    ("stage=dpo pref_loss=ipo dpo_label_smoothing=0.1", "`dpo_label_smoothing` applies to `pref_loss: sigmoid` only"),
    ("train_on_prompt=true mask_history=true", "contradict each other"),
    ("bf16=true fp16=true", "pick one mixed-precision mode"),
    ("lr_scheduler_type=reduce_lr_on_plateau", "which is not built: the schedules here follow the step count"),
    ("finetuning_type=half", r"`finetuning_type` must be one of full, freeze, lora, oft; got 'half' \(set on"),
    # another tool's name for something asked for otherwise here: the refusal says how to ask for it
    ("finetuning_type=qlora", "got 'qlora'; QLoRA is `finetuning_type: lora` with `quantization_bit: 4`"),
    ("stage=SimPO", "unknown stage `SimPO`; choose one of .*; SimPO is `stage: dpo` with `pref_loss: simpo`"),
    ("eval_strategy=steps", "needs evaluation data"),
    ("do_eval=true", "`do_eval` needs evaluation data"),
    ("early_stopping_steps=3 val_size=0.1", "`early_stopping_steps` needs evaluations during training"),
    ("report_to=comet_ml", "`report_to: comet_ml` is not supported; use tensorboard, wandb, mlflow"),
    ("stage=cls torch_compile=true", "`torch_compile` is not supported for stage cls yet"),
    ("stage=cls torch_compile_backend=eager", "`torch_compile` is not supported for stage cls yet"),  # HF: implies
    ("stage=cls pure_bf16=true bf16=true upcast_layernorm=true", "`upcast_layernorm` is not supported for stage cls"),
    ("stage=cls train_on_prompt=true", "`train_on_prompt` masks the turns of a conversation; stage cls trains on"),
    ("stage=cls finetuning_type=freeze freeze_extra_modules=embed", "`freeze_extra_modules` is not supported for stage"),
    ("torch_compile_backend=eager torch_compile_mode=max-autotune", "`torch_compile_mode: max-autotune` is an "
                                                                    "inductor mode; backend eager takes none"),
    ("torch_compile_backend=tvm", "`torch_compile_backend` must be one of inductor, aot_eager, eager; got 'tvm'"),
    ("stage=dpo compute_accuracy=true", "`compute_accuracy` is token accuracy for stages pt and sft"),
    ("group_by_length=true packing=true", "packed rows all share \\(about cutoff_len\\): set `packing: false`"),
    ("group_by_length=true stage=pt packing=false", "stage pt's blocks of cutoff_len tokens all share: remove"),
    ("group_by_length=true streaming=true", "a stream never holds whole"),
    ("group_by_length=true stage=grpo", "stage grpo trains on completions it generates"),
    ("train_sampling_strategy=group_by_length packing=true", "`train_sampling_strategy: group_by_length` sorts"),
    ("group_by_length=true train_sampling_strategy=sequential", "contradict each other"),
    ("train_sampling_strategy=batch_rebalance", "`train_sampling_strategy` must be one of random, sequential"),
])
def test_conflicts_are_explained(tmp_path, override, message):
    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: m\ndataset: d\noutput_dir: o\ndo_train: true\n")
    with pytest.raises(ConfigError, match=message):
        load_config(str(path), override.split())


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_compile_modes_that_capture_cuda_graphs_are_refused_on_a_gpu_only(monkeypatch, mode):
    """Naming a backend or mode turns torch_compile on (HF's rule). Inductor applies CUDA graphs to CUDA kernels
    only, so on a CPU these modes compile as their no-cudagraphs forms; on a GPU they are not built."""
    import tuneforge.config as config_module
    from tuneforge.config import problems

    values = {"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "do_train": True,
              "torch_compile_mode": mode}
    assert build_config(values).train.torch_compile is True
    monkeypatch.setattr(config_module, "_cuda_available", lambda: False)
    assert problems(build_config(values)) == []
    monkeypatch.setattr(config_module, "_cuda_available", lambda: True)
    assert problems(build_config(values)) == [
        f"`torch_compile_mode: {mode}` captures CUDA graphs, which tuneforge's layer-wise compile in training does "
        "not support yet: set max-autotune-no-cudagraphs or default"]


@pytest.mark.parametrize("command", ["train", "chat", "export", "eval"])
@pytest.mark.parametrize("key, value, choices", [
    ("finetuning_type", "half", "full, freeze, lora, oft"),
    ("flash_attn", "fa3", "auto, sdpa, eager, fa2, disabled"),
    ("infer_dtype", "int8", "auto, float32, bfloat16, float16"),
])
def test_a_fixed_choice_key_is_refused_once_naming_its_choices(key, value, choices, command):
    """Literal keys are checked by the gate for every command, with one message (no hand-written twin)."""
    from tuneforge.config import problems

    cfg = build_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "do_train": True,
                        "export_dir": "e", "task": "basics_test", key: value})
    named = [p for p in problems(cfg, command) if f"`{key}`" in p]
    assert named == [f"`{key}` must be one of {choices}; got {value!r}"]


@pytest.mark.parametrize("values, expected", [
    ({"temperature": 0}, "`temperature` must be above 0 when sampling; got 0.0 (for greedy decoding set "
                         "`do_sample: false`)"),
    ({"top_p": 1.5}, "`top_p` is a share of probability in (0, 1]; got 1.5"),
    ({"top_k": -1}, "`top_k` must be 0 (off) or more; got -1"),
    ({"temperature": 0, "do_sample": False}, None),  # greedy decoding reads none of them
])
def test_sampling_keys_are_checked_for_every_command(values, expected):
    from tuneforge.config import problems

    cfg = build_config({"model_name_or_path": "m", **values})
    ours = [p for p in problems(cfg, "chat") if p.startswith(("`temperature`", "`top_p`", "`top_k`"))]
    assert ours == ([expected] if expected else [])


def test_sequential_sampling_is_disable_shuffling():
    from tuneforge.config import shuffles_rows

    assert shuffles_rows(build_config({"model_name_or_path": "m"}))
    assert not shuffles_rows(build_config({"model_name_or_path": "m", "train_sampling_strategy": "sequential"}))
    assert not shuffles_rows(build_config({"model_name_or_path": "m", "disable_shuffling": True}))


def test_required_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: d\n")
    with pytest.raises(ConfigError, match="`model_name_or_path` is required"):
        load_config(str(path))


def test_data_options_a_stage_would_ignore():
    from tuneforge.config import ConfigError, build_config, notices, validate

    cfg = build_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "do_train": True, "stage": "cls",
                        "skip_bad_records": True})
    with pytest.raises(ConfigError, match="`skip_bad_records` is built for the chat and text stages"):
        validate(cfg, "train")
    cfg = build_config({"model_name_or_path": "m", "stage": "dpo", "preprocessing_num_workers": 4})
    assert notices(cfg) == ["note: `preprocessing_num_workers` applies to stages pt and sft; stage dpo preprocesses "
                            "in one process"]
    assert notices(build_config({"model_name_or_path": "m", "preprocessing_num_workers": 4})) == []


def test_speed_hint_names_the_fast_settings_a_cpu_run_leaves_off(monkeypatch):
    import tuneforge.config as config_module
    import tuneforge.machine as machine

    monkeypatch.setattr(config_module, "_cuda_available", lambda: False)
    monkeypatch.setattr(machine, "multiplies_bf16_natively", lambda: True)
    lora = {"model_name_or_path": "m", "stage": "sft", "do_train": True, "finetuning_type": "lora"}
    hint = config_module.speed_hint(build_config(lora))
    assert "`bf16: true`" in hint and "`packing: true`" in hint and "pure_bf16" not in hint  # no autocast yet
    hint = config_module.speed_hint(build_config({**lora, "bf16": True}))
    assert "`bf16: true`" not in hint and "`pure_bf16: true`" in hint and "`packing: true`" in hint
    assert config_module.speed_hint(build_config({**lora, "bf16": True, "pure_bf16": True, "packing": True})) is None
    assert "packing" not in (config_module.speed_hint(build_config({**lora, "stage": "pt", "bf16": True})) or "")
    monkeypatch.setattr(machine, "multiplies_bf16_natively", lambda: False)  # bf16 would be emulated: no gain
    assert "bf16: true" not in config_module.speed_hint(build_config(lora))
    assert "pure_bf16" not in config_module.speed_hint(build_config({**lora, "bf16": True}))  # it would slow it
    assert config_module.speed_hint(build_config({**lora, "stage": "dpo"})) is None  # not a language-modelling stage
    assert config_module.speed_hint(build_config({**lora, "do_train": False})) is None
    monkeypatch.setattr(config_module, "_cuda_available", lambda: True)
    assert config_module.speed_hint(build_config(lora)) is None  # the hints are about CPUs


def test_decoding_commands_say_what_bf16_would_gain_on_a_cpu_with_bf16_units(monkeypatch):
    import torch

    import tuneforge.machine as machine
    from tuneforge.models.load import decode_dtype_hint

    monkeypatch.setattr(machine, "_cpuinfo", lambda: ("AMD EPYC", {"avx512f", "avx512_bf16"}))
    assert "`infer_dtype: bfloat16` decodes faster" in decode_dtype_hint(build_config({"model_name_or_path": "m"}).model)
    chosen = build_config({"model_name_or_path": "m", "infer_dtype": "float32"}).model
    assert decode_dtype_hint(chosen) is None  # the user chose
    monkeypatch.setattr(machine, "_cpuinfo", lambda: ("Intel Core i5", {"avx2"}))
    assert decode_dtype_hint(build_config({"model_name_or_path": "m"}).model) is None  # bf16 would be emulated
    monkeypatch.setattr(machine, "_cpuinfo", lambda: ("AMD EPYC", {"avx512f", "avx512_bf16"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert decode_dtype_hint(build_config({"model_name_or_path": "m"}).model) is None  # auto is bf16 on a GPU
