"""Every key is honoured or refused: LLaMA-Factory's keys load at its defaults, no accepted key is silently ignored,
and one run reports every refused key."""

import dataclasses
import re
from pathlib import Path

import pytest

from tuneforge.config import ConfigError, build_config, notices, validate
from tuneforge.hf_options import HF_NO_EFFECT, HF_REFUSED
from tuneforge.options import GROUPS, KEY_GROUP, LLAMAFACTORY_ONLY, NO_EFFECT_YET, NOT_YET

SOURCE = Path(__file__).parents[1] / "src" / "tuneforge"
# LLaMA-Factory 0.9.5's user-settable keys (the fields of its hparams/*_args.py dataclasses, without the four it sets
# itself: compute_dtype, device_map, model_max_length, block_diag_attn).
LLAMAFACTORY_KEYS = (Path(__file__).parent / "data" / "llamafactory_keys.txt").read_text().split()
# Keys other helpers are wiring in right now (PPO and its reward model; QLoRA's quantisation options): no code reads
# them on this branch yet. The lead empties this at merge; the test then holds them to the same rule.
BEING_BUILT: set[str] = set()  # keys whose feature is under way on another branch; empty on main


def _minimal(**extra) -> dict:
    return {"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "do_train": True, **extra}


def test_every_llamafactory_key_is_accepted():
    missing = [key for key in LLAMAFACTORY_KEYS if key not in KEY_GROUP]
    assert not missing, missing


def test_every_hugging_face_training_key_is_accepted():
    """LLaMA-Factory passes every field of transformers' Seq2SeqTrainingArguments through; a transformers upgrade
    that adds one shows up here."""
    from transformers import Seq2SeqTrainingArguments

    fields = [f.name for f in dataclasses.fields(Seq2SeqTrainingArguments) if not f.name.startswith("_")]
    assert [key for key in fields if key not in KEY_GROUP] == []


def test_every_key_is_read_by_code_or_refused():
    """A key that no code reads would be accepted and ignored. Reading means an attribute access `.key` in the
    package outside options.py (the gate's own checks count: they refuse values)."""
    code = "\n".join(p.read_text() for p in SOURCE.rglob("*.py") if p.name != "options.py")
    unread = [key for key in KEY_GROUP if not re.search(rf"\.{key}\b", code)
              and key not in NOT_YET and key not in NO_EFFECT_YET and key not in BEING_BUILT]
    assert not unread, f"accepted but read nowhere: {unread}"


def test_the_being_built_allowance_holds_only_unread_keys():
    code = "\n".join(p.read_text() for p in SOURCE.rglob("*.py") if p.name != "options.py")
    assert [key for key in BEING_BUILT if re.search(rf"\.{key}\b", code)] == []


@pytest.mark.parametrize("key, kind, default, why", LLAMAFACTORY_ONLY + HF_REFUSED,
                         ids=[k[0] for k in LLAMAFACTORY_ONLY + HF_REFUSED])
def test_llamafactory_only_keys_pass_at_default_and_fail_otherwise(key, kind, default, why):
    validate(build_config(_minimal(**{key: default}), source="lf.yaml"))
    kind = kind.replace(" | None", "")
    other = not default if kind == "bool" else (default or 0) + 3 if kind in ("int", "float") else "something-else"
    with pytest.raises(ConfigError) as err:
        validate(build_config(_minimal(**{key: other}), source="lf.yaml"))
    assert f"`{key}: " in str(err.value) and why in str(err.value)


def test_defaults_are_llamafactory_defaults():
    assert build_config({}).train.do_train is False  # LLaMA-Factory's default, so its predict-only configs run
    with pytest.raises(ConfigError, match="nothing to do: set `do_train: true`"):
        validate(build_config(_minimal(do_train=False)))


def test_every_problem_is_reported_in_one_run():
    values = _minimal(infer_backend="vllm", use_unsloth=True, report_to="comet_ml", use_kt=True, enable_liger_kernel=True,
                      image_max_pixels=1000, finetuning_type="lorax", optim="lion")
    with pytest.raises(ConfigError) as err:
        validate(build_config(values, source="lf.yaml"))
    message = str(err.value)
    assert message.startswith("lf.yaml: 8 problems:")
    for key in ("infer_backend", "use_unsloth", "report_to", "use_kt", "enable_liger_kernel", "image_max_pixels",
                "finetuning_type", "optim"):
        assert f"`{key}" in message, key


def test_sharding_keys_are_honoured_not_noted():  # tests/test_fsdp.py and test_deepspeed.py run them
    cfg = build_config(_minimal(fsdp="full_shard auto_wrap", fsdp_transformer_layer_cls_to_wrap="LlamaDecoderLayer"))
    validate(cfg)
    assert notices(cfg) == []


def test_groups_hold_distinct_keys():
    names = [f.name for cls in GROUPS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("key, kind, default, why", HF_NO_EFFECT, ids=[k[0] for k in HF_NO_EFFECT])
def test_hugging_face_keys_without_effect_load_with_a_notice(key, kind, default, why):
    kind = kind.replace(" | None", "")
    other = (not default) if kind == "bool" else (default or 0) + 3 if kind == "int" else "something-else"
    cfg = build_config(_minimal(**{key: other}), source="lf.yaml")
    validate(cfg)
    assert f"note: `{key}` has no effect yet: {why}" in notices(cfg)
    assert not any(f"`{key}`" in n for n in notices(build_config(_minimal(**{key: default}))))


def test_low_cpu_mem_usage_false_loads_with_a_notice():
    """LLaMA-Factory passes it to from_pretrained, which transformers 5 drops unread."""
    cfg = build_config(_minimal(low_cpu_mem_usage=False), source="lf.yaml")
    validate(cfg)
    assert any("`low_cpu_mem_usage` has no effect yet: transformers 5's from_pretrained drops it" in n
               for n in notices(cfg))
    assert not any("low_cpu_mem_usage" in n for n in notices(build_config(_minimal())))


def test_llamafactory_v1_configs_get_one_line_that_maps_their_keys():
    """LLaMA-Factory 0.9.5's examples/v1 configs (USE_V1=1) use another set of keys; one line says so and maps the
    common ones, and the main format's keys beside them still go through."""
    with pytest.raises(ConfigError) as err:
        build_config({"model": "Qwen/Qwen3-4B", "peft_config": {"name": "freeze"}, "train_dataset": "v1.yaml",
                      "micro_batch_size": 1, "cutoff_len": 2048, "learning_rate": 2e-5}, source="v1.yaml")
    message = str(err.value)
    assert "\n" not in message and message.startswith("v1.yaml: `model`, `peft_config`, `train_dataset`, "
                                                      "`micro_batch_size` are keys of LLaMA-Factory's experimental v1")
    assert "model -> model_name_or_path, train_dataset -> dataset" in message


def test_megatron_keys_get_one_line_that_says_what_they_are():
    """LLaMA-Factory's examples/megatron configs set a dozen Megatron-Core keys: one line names them all."""
    with pytest.raises(ConfigError) as err:
        build_config(_minimal(tensor_model_parallel_size=2, sequence_parallel=True, moe_grouped_gemm=True),
                     source="lf.yaml")
    message = str(err.value)
    assert "\n" not in message and message.startswith("lf.yaml: `tensor_model_parallel_size`, `sequence_parallel`, "
                                                      "`moe_grouped_gemm` configure Megatron-Core")
