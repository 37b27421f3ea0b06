"""The inference engine (chat, api, predict, eval) folds a LoRA adapter into the base weights, as LLaMA-Factory
loads adapters for inference and as export writes them, and answers as the base with the adapter attached does."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import alpaca_rows, run_training, train_config, write_jsonl
from tuneforge.config import build_config
from tuneforge.infer.engine import Engine


def _random_adapter(base: str, folder: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, target_modules="all-linear", lora_alpha=8))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; an adapter that changes nothing could not show a wrong merge
            param.data.normal_(0, 0.05)
    model.save_pretrained(folder)


def test_inference_folds_the_adapter_into_the_base_and_answers_the_same(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _random_adapter(tiny_model, tmp_path / "adapter")
    engine = Engine(build_config({"model_name_or_path": tiny_model, "adapter_name_or_path": str(tmp_path / "adapter"),
                                  "infer_dtype": "float32"}, source="test"))
    assert not hasattr(engine.model, "peft_config")  # a plain transformers model: no adapter layers left
    ids = torch.tensor([engine.prompt_ids([{"role": "user", "content": "What is 1 plus 2?"}])])
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        merged = engine.model(ids).logits
        before = base(ids).logits
        attached = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(ids).logits
    # W + BA folded in float32 against the same sum taken layer by layer: float32 noise, measured 4e-7 of the
    # logits' scale (avx2 kernels and one thread alike); the adapter itself moves them by about that scale
    scale = before.abs().max()
    assert (merged - attached).abs().max() < 1e-4 * scale
    assert (merged - before).abs().max() > 1e-2 * scale


def test_predict_without_training_folds_the_adapter_as_chat_does(tiny_model, tmp_path, monkeypatch):
    """LLaMA-Factory's predict-only config (do_predict with adapter_name_or_path, no do_train) generates with the
    adapter folded in, and answers as the chat engine does."""
    from tuneforge.train import sft

    _random_adapter(tiny_model, tmp_path / "adapter")
    original, seen = sft.predict, []

    def spy(cfg, model, *rest):  # the model predict is given
        seen.append(model)
        return original(cfg, model, *rest)

    monkeypatch.setattr(sft, "predict", spy)
    data = write_jsonl(tmp_path / "eval.jsonl", alpaca_rows(4))
    run_training(train_config(tiny_model, None, tmp_path / "out", do_train=False, do_predict=True,
                              predict_with_generate=True, eval_dataset=str(data), max_new_tokens=6, do_sample=False,
                              adapter_name_or_path=str(tmp_path / "adapter"), per_device_eval_batch_size=2))
    assert len(seen) == 1 and not hasattr(seen[0], "peft_config")
    engine = Engine(build_config({"model_name_or_path": tiny_model, "adapter_name_or_path": str(tmp_path / "adapter"),
                                  "template": "chatml", "max_new_tokens": 6, "do_sample": False,
                                  "infer_dtype": "float32"}, source="test"))
    predicted = [json.loads(line)["predict"] for line in (tmp_path / "out" / "generated_predictions.jsonl").open()]
    prompts = [engine.prompt_ids([{"role": "user", "content": row["instruction"]}]) for row in alpaca_rows(4)]
    assert predicted == engine.generate(prompts, batch_size=2)
