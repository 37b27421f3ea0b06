"""QLoRA: LoRA adapters trained in full precision on a base whose linear layers bitsandbytes quantised to 4 or 8
bits (on the CPU here), for every causal-LM stage; the adapter loads in plain PEFT; chat loads it on a quantised
base. QOFT: the same with OFT adapters."""

import json
import math

import pytest
import torch
from conftest import read_log, run_training, train_config, write_jsonl
from safetensors.torch import load_file
from test_preference import preference_rows

from tuneforge.config import ConfigError, build_config, validate

pytest.importorskip("bitsandbytes")


def _falls(out) -> list[float]:
    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    assert all(math.isfinite(x) for x in losses), losses
    return losses


@pytest.mark.parametrize("bits, kind, bf16", [(4, "nf4", True), (4, "fp4", False), (8, None, True)])
def test_qlora_learns_and_saves_a_full_precision_adapter(tiny_model, alpaca_file, tmp_path, bits, kind, bf16):
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge.models.load import load_base_model

    quant = {"quantization_bit": bits, **({"quantization_type": kind} if kind else {})}
    base = load_base_model(build_config({"model_name_or_path": tiny_model, **quant}).model,
                           compute_dtype=torch.bfloat16)
    layer = base.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)
    assert type(base.lm_head) is torch.nn.Linear and base.lm_head.weight.dtype == torch.float32  # head not quantised
    out = tmp_path / "out"
    run_training(train_config(tiny_model, alpaca_file, out, learning_rate=2e-2, max_steps=20, bf16=bf16,
                              lr_scheduler_type="constant", **quant))
    losses = _falls(out)
    # The tiny model's loss falls from ~6.0 to its ~5.5 floor within a few steps, then stays there: the last 4 steps'
    # mean must be 0.3 nats under the first step's loss (taken before any update; ~0.5 lower when the adapters
    # learn, 0 when they get no gradient). Not under the first 4 steps' mean: a bf16 rounding difference can move
    # one early step by 0.2 nats (8-bit, lr 2e-2, steps 1-4: 6.0168, 5.7996, 5.5815, 5.742 with the frozen-head
    # path; 6.0168, 5.7987, 5.5804, 5.9508 with autograd's).
    assert sum(losses[-4:]) / 4 < losses[0] - 0.3, losses
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())  # adapters in full precision
    plain = AutoModelForCausalLM.from_pretrained(tiny_model)  # no quantisation: plain PEFT loads the adapter
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    before = plain(ids).logits
    tuned = PeftModel.from_pretrained(plain, str(out)).eval()
    after = tuned(ids).logits
    assert torch.isfinite(after).all() and not torch.allclose(before, after)  # the trained adapter acts
    loaded = {k: v for k, v in tuned.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved)


def test_gradients_survive_an_evaluation(tiny_model, alpaca_file, tmp_path):
    """bitsandbytes repacks 4-bit weights into a kernel without backward when a layer runs in eval mode on an
    AVX512-BF16 CPU; a training model must keep its gradients after evaluating."""
    from tuneforge.train.common import make_accelerator, prepare_model

    cfg = build_config(train_config(tiny_model, alpaca_file, tmp_path / "o", quantization_bit=4, bf16=True))
    model = prepare_model(cfg, make_accelerator(cfg.train))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])

    def gradients() -> dict:
        model.train().zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = gradients()
    with torch.no_grad():
        model.eval()(input_ids=ids)  # an evaluation
    after = gradients()
    assert all(before[n].abs().sum() > 0 for n in before if "lora_B" in n)  # B starts at zero; A's grads flow to B
    # the same inputs through the same kernels: equal up to float noise (none is expected; 1e-6 relative allows it)
    assert all(torch.allclose(before[n], after[n], rtol=1e-6, atol=1e-9) for n in before)


@pytest.mark.parametrize("bits", [4, 8])
def test_qoft_learns_and_saves_an_adapter_plain_peft_loads(tiny_model, alpaca_file, tmp_path, bits):
    """QOFT (LLaMA-Factory's examples/extras/qoft): OFT's block rotations trained on the bitsandbytes base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    run_training(train_config(tiny_model, alpaca_file, out, finetuning_type="oft", quantization_bit=bits, bf16=True,
                              learning_rate=2e-2, max_steps=20, lr_scheduler_type="constant"))
    losses = _falls(out)
    # as for QLoRA above (measured here: 6.03 -> 5.26 at 4 bits, 6.02 -> 5.23 at 8)
    assert sum(losses[-4:]) / 4 < losses[0] - 0.3, losses
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all("oft_R" in k and t.dtype == torch.float32 for k, t in saved.items())
    plain = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    before = plain(ids).logits
    after = PeftModel.from_pretrained(plain, str(out)).eval()(ids).logits
    assert torch.isfinite(after).all() and not torch.allclose(before, after)


@pytest.mark.parametrize("stage", ["pt", "rm", "dpo", "kto"])
def test_qlora_trains_every_stage(tiny_model, tmp_path, stage):
    rows = preference_rows(0, 24)
    if stage == "kto":
        rows = [{"instruction": r["instruction"], "output": r["chosen" if i % 3 else "rejected"], "label": i % 3 > 0}
                for i, r in enumerate(rows)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    info = {"file_name": "d.jsonl", "ranking": stage in ("rm", "dpo")}
    if stage == "kto":
        info["columns"] = {"kto_tag": "label"}
    if stage == "pt":
        (tmp_path / "d.txt").write_text("\n".join(r["chosen"] for r in rows))
        info = {"file_name": "d.txt"}
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": info}))
    out = tmp_path / "out"
    run_training(train_config(tiny_model, "d", out, stage=stage, dataset_dir=str(tmp_path), quantization_bit=4,
                              max_steps=3, per_device_train_batch_size=8))
    assert len(_falls(out)) == 3 and (out / "adapter_model.safetensors").is_file()


def test_chat_loads_an_adapter_on_a_quantised_base(tiny_model, alpaca_file, tmp_path):
    from tuneforge.infer.engine import Engine

    out = tmp_path / "out"
    # packed: the packing check must not take 8-bit's batch-dependent rounding for examples mixing
    run_training(train_config(tiny_model, alpaca_file, out, quantization_bit=8, max_steps=2, packing=True))
    engine = Engine(build_config({"model_name_or_path": tiny_model, "adapter_name_or_path": str(out),
                                  "quantization_bit": 8, "do_sample": False, "max_new_tokens": 4}))
    assert type(engine.model.get_base_model().model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear8bitLt"
    assert len(engine.generate([engine.prompt_ids([{"role": "user", "content": "What is 1 plus 2?"}])])) == 1


def test_an_adapter_is_never_merged_into_quantised_weights(tiny_model, alpaca_file, tmp_path):
    """Merging an adapter into 4-bit weights rounds them again: measured on the tiny model, a merged adapter's
    logits 0.10 away from the same adapter unmerged, against its effect of 1.1. LLaMA-Factory refuses it too."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.infer.engine import Engine
    from tuneforge.models.load import ModelError

    adapter = tmp_path / "a"
    lora = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), lora).save_pretrained(adapter)
    merging = f"merging {adapter} into weights that `quantization_bit` quantises"
    with pytest.raises(ModelError, match=merging):  # inference merges all but the last adapter
        Engine(build_config({"model_name_or_path": tiny_model, "quantization_bit": 4,
                             "adapter_name_or_path": f"{adapter},{adapter}"}))
    with pytest.raises(ModelError, match=merging + ".*, or leave out create_new_adapter"):  # a new one on top
        run_training(train_config(tiny_model, alpaca_file, tmp_path / "out", quantization_bit=4,
                                  adapter_name_or_path=str(adapter), create_new_adapter=True))


@pytest.mark.parametrize("values, message", [
    ({"quantization_bit": 4, "finetuning_type": "full"}, "trains adapters on a frozen quantised base"),
    ({"quantization_bit": 3}, "`quantization_bit` must be 4 or 8"),
    ({"quantization_bit": 4, "quantization_method": "hqq"}, "`quantization_method: hqq` is not built"),
    ({"quantization_type": "int4"}, "`quantization_type` must be one of nf4, fp4; got 'int4'"),
    ({"quantization_bit": 4, "stage": "cls"}, "`quantization_bit` is not supported for stage cls"),
])
def test_qlora_options_are_checked(values, message):
    cfg = build_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "o", **values})
    with pytest.raises(ConfigError, match=message):
        validate(cfg, "train")


def test_qlora_trains_grpo(tiny_model, tmp_path):
    from test_grpo import _grpo, _prompt_files

    data, reward = _prompt_files(tmp_path)
    out = tmp_path / "out"
    run_training(_grpo(tiny_model, data, reward, out, max_steps=2, quantization_bit=4, beta=0.1))
    assert len(_falls(out)) == 2 and (out / "adapter_model.safetensors").is_file()


def test_classifier_predict_refuses_quantization(capsys):
    from tuneforge.cli import main

    assert main(["predict", "model_name_or_path=m", "--quantization_bit", "4", "--text", "a film"]) == 2
    assert "classifiers load in full precision" in capsys.readouterr().err
