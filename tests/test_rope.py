"""rope_scaling: RoPE positions scaled by LLaMA-Factory's rule, and kept the same from training to chat and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import alpaca_rows, run_training, train_config, write_jsonl

from tuneforge.config import build_config, problems
from tuneforge.models import rope


def llama_config(**extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **extra)


def test_the_factor_follows_llamafactorys_rule_for_each_kind():
    config = llama_config()
    assert "RoPE scaled by 2" in rope.scale(config, "linear", 1024, training=True)
    assert config.rope_parameters["factor"] == 2.0 and config.max_position_embeddings == 1024
    config = llama_config()
    rope.scale(config, "linear", 1100, training=True)  # ceil(1100 / 512) = 3
    assert config.rope_parameters["factor"] == 3.0 and config.max_position_embeddings == 1536

    config = llama_config()
    assert "cutoff_len 512 fits the 512 positions" in rope.scale(config, "linear", 512, training=True)
    assert config.rope_parameters["rope_type"] == "default" and config.max_position_embeddings == 512
    rope.scale(config, "linear", 256, training=False)  # inference: 2 when cutoff_len says nothing longer
    assert config.rope_parameters["factor"] == 2.0

    for kind in ("yarn", "llama3"):
        config = llama_config()
        rope.scale(config, kind, 1024, training=True)
        assert config.rope_parameters["original_max_position_embeddings"] == 512
    config = llama_config()
    rope.scale(config, "dynamic", 1024, training=True)
    assert config.max_position_embeddings == 512  # dynamic NTK scales beyond max_position_embeddings itself
    assert "already scaled (linear, factor 2.0)" in rope.scale(
        llama_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "yarn", 4096,
        training=True)


def test_linear_scaling_gives_position_2p_the_angles_of_position_p():
    from transformers import LlamaForCausalLM

    scaled_config = llama_config()
    rope.scale(scaled_config, "linear", 1024, training=True)
    torch.manual_seed(0)
    base, scaled = LlamaForCausalLM(llama_config()), LlamaForCausalLM(scaled_config)
    x = torch.zeros(1, 1, 64)
    positions = torch.arange(0, 1024, 2)[None]
    for a, b in zip(scaled.model.rotary_emb(x, positions), base.model.rotary_emb(x, positions // 2)):
        torch.testing.assert_close(a, b)  # the same formula on the same angles: float32 equal up to rounding


def test_an_adapter_trained_with_rope_scaling_is_scaled_the_same_in_chat_and_export(tiny_model, tmp_path):
    from gguf import GGUFReader

    from tuneforge.export import run_export
    from tuneforge.infer.engine import Engine

    rows = [{**row, "output": (row["output"] + " ") * 60} for row in alpaca_rows(8)]  # past the 512 positions
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    out = tmp_path / "run"
    run_training(train_config(tiny_model, str(data), out, cutoff_len=1100, rope_scaling="yarn", max_steps=2))
    chat = Engine(build_config({"model_name_or_path": tiny_model, "adapter_name_or_path": str(out)}, source="test"))
    assert chat.model.config.rope_parameters["rope_type"] == "yarn"
    assert chat.model.config.rope_parameters["factor"] == 3.0  # from the run's cutoff_len, not inference's 2

    merged = Path(run_export(build_config({"model_name_or_path": tiny_model, "adapter_name_or_path": str(out),
                                           "export_dir": str(tmp_path / "merged"), "export_gguf": "f16"},
                                          source="test")))
    config = json.loads((merged / "config.json").read_text())
    assert config["rope_parameters"]["factor"] == 3.0 and config["max_position_embeddings"] == 1536
    fields = GGUFReader(next(merged.glob("*.gguf"))).fields

    def value(key):
        field = fields[key]
        return field.parts[field.data[0]].tolist()

    # the names and values llama.cpp's convert_hf_to_gguf.py writes for a YaRN model
    assert bytes(value("llama.rope.scaling.type")).decode() == "yarn"
    assert value("llama.rope.scaling.factor") == [3.0] and value("llama.rope.scaling.original_context_length") == [512]
    assert value("llama.context_length") == [1536]


def test_rope_settings_are_checked(tiny_model, tmp_path):
    from tuneforge.export.gguf import _rope
    from tuneforge.models.load import ModelError

    def found(**values) -> list[str]:
        return problems(build_config(train_config(tiny_model, "x.jsonl", tmp_path, **values), source="test"))

    assert "`rope_scaling` must be one of linear, dynamic, yarn, llama3; got 'ntk'" in found(rope_scaling="ntk")
    assert any("built for the language-model stages" in p for p in found(rope_scaling="linear", stage="cls"))
    config = llama_config()
    rope.scale(config, "dynamic", 1024, training=True)
    with pytest.raises(ModelError, match="GGUF export of rope scaling `dynamic` is not built"):
        _rope(None, config)
