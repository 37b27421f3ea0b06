"""The stage table: every stage is declared once, its recipe checks its own options, and config problems are
reported all together."""

import pytest

from tuneforge.config import ConfigError, build_config, validate
from tuneforge.train.stages import STAGES


def test_every_built_stage_has_a_recipe_with_run_and_check():
    for stage in STAGES.values():
        if stage.built:
            recipe = stage.recipe_module()
            assert callable(recipe.run) and callable(recipe.check), stage.name


def test_several_problems_are_reported_together():
    cfg = build_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "do_train": True, "stage": "dpo",
                        "pref_loss": "nope", "packing": True, "cutoff_len": 1}, source="c.yaml")
    with pytest.raises(ConfigError) as caught:
        validate(cfg, "train")
    lines = str(caught.value).splitlines()
    assert lines[0] == "c.yaml: 3 problems:"
    assert lines[1:] == ["  - `cutoff_len` must be at least 2; got 1",
                         "  - packing is not built for stage dpo; remove `packing` / `neat_packing`",
                         "  - `pref_loss: nope` is not supported; choose one of sigmoid, hinge, ipo, orpo, simpo"]


def test_one_problem_is_one_line():
    cfg = build_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "do_train": True, "stage": "pt",
                        "neat_packing": True}, source="c.yaml")
    with pytest.raises(ConfigError) as caught:
        validate(cfg, "train")
    assert str(caught.value) == ("c.yaml: `neat_packing` is built for sft; stage pt concatenates documents "
                                 "(set `neat_packing: false`)")


@pytest.mark.parametrize("keys, why", [
    ({"stage": "sft"}, "stage sft uses a reference model only with `use_asft_loss`"),
    ({"stage": "pt"}, "stage pt uses a reference model only with `use_asft_loss`"),
    ({"stage": "rm"}, "stage rm trains without a reference model"),
    ({"stage": "cls"}, "stage cls trains without a reference model"),
    ({"stage": "dpo", "pref_loss": "simpo"}, "`pref_loss: simpo` uses no reference model"),
    ({"stage": "grpo", "beta": 0.0, "do_sample": True},
     "`beta: 0` turns off the KL penalty, the reference model's only use"),
])
def test_ref_model_where_no_reference_is_loaded_is_refused(keys, why):
    cfg = build_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "do_train": True,
                        "ref_model": "r", "ref_model_adapters": "a", **keys})
    with pytest.raises(ConfigError) as caught:
        validate(cfg, "train")
    assert f"`ref_model` / `ref_model_adapters`: {why}; remove it" in str(caught.value)


@pytest.mark.parametrize("keys", [{"stage": "dpo"}, {"stage": "kto"}, {"stage": "sft", "use_asft_loss": True},
                                  {"stage": "grpo", "do_sample": True, "beta": 0.04, "reward_funcs": "length"}])
def test_ref_model_where_a_reference_is_loaded_is_accepted(keys):
    validate(build_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "do_train": True,
                           "ref_model": "r", **keys}), "train")


def test_ref_model_adapters_need_ref_model():
    cfg = build_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "do_train": True,
                        "stage": "dpo", "ref_model_adapters": "a"})
    with pytest.raises(ConfigError, match="`ref_model_adapters` adds adapters to `ref_model`, which is unset"):
        validate(cfg, "train")
