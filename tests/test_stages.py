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
