"""LLaMA-Factory's extras, built on maintained libraries: optimizers (bitsandbytes 8-bit / paged, GaLore, APOLLO,
Adam-mini, BAdam, Muon), pure_bf16 full fine-tuning, OFT and PiSSA (PEFT), LLaMA Pro's block choice; and the Hugging
Face training keys that LLaMA-Factory configs set: NEFTune, greater_is_better, logging_first_step. The token-loss
variants (DFT, EAFT, ASFT, label smoothing): tests/test_token_losses.py."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import read_log, run_training, train_config

from tuneforge.config import build_config
from tuneforge.train.optimizers import OPTIMS

# Each extra trains the tiny model 20 steps at a constant rate; its loss must end at least 0.3 nats below where it
# started (plain AdamW full fine-tuning at 3e-3 falls by more than 1 nat here, so 0.3 says "it learns" with room for
# the extras that update less per step, and no float noise comes near 0.3).
EXTRAS = {
    "adamw_8bit": dict(optim="adamw_8bit"),
    "paged_adamw_8bit": dict(optim="paged_adamw_8bit"),
    "galore": dict(use_galore=True, galore_rank=8, galore_update_interval=5, galore_scale=1.0),
    "apollo": dict(use_apollo=True, apollo_rank=8, apollo_update_interval=5, apollo_scale=1.0),
    "adam_mini": dict(use_adam_mini=True),
    "badam": dict(use_badam=True, badam_switch_interval=5),
    "badam_ratio": dict(use_badam=True, badam_mode="ratio", badam_update_ratio=0.5, badam_switch_interval=5),
    "muon": dict(use_muon=True),
    "pure_bf16_full": dict(pure_bf16=True),
    "adafactor": dict(optim="adafactor"),
    "adagrad": dict(optim="adagrad"),
    "rmsprop": dict(optim="rmsprop", optim_args="alpha=0.95"),
    "sgd_nesterov": dict(optim="sgd", optim_args="momentum=0.9,nesterov=true", learning_rate=3e-2),
    "lion_8bit": dict(optim="lion_8bit"),
    "ademamix_8bit": dict(optim="ademamix_8bit", optim_args="beta3=0.999,alpha=2,t_alpha=10"),
    "rmsprop_bnb_8bit": dict(optim="rmsprop_bnb_8bit"),
}


@pytest.mark.parametrize("name", list(EXTRAS))
def test_each_extra_learns(tiny_model, alpaca_file, tmp_path, name):
    out = tmp_path / "out"
    settings = {"learning_rate": 3e-3, **EXTRAS[name]}
    run_training(train_config(tiny_model, alpaca_file, out, finetuning_type="full", max_steps=20,
                              lr_scheduler_type="constant", **settings))
    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    assert len(losses) == 20 and all(loss == loss for loss in losses), losses
    assert losses[-1] < losses[0] - 0.3, losses


# Every `optim` with arguments where it reads them. bitsandbytes' RMSprop goes without: transformers hands it
# optim_args as strings, which it cannot compute with (tuneforge reads them as numbers).
SOME_ARGS = {"sgd": "momentum=0.9,dampening=0.1", "adagrad": "lr_decay=0.01,eps=1e-6",
             "rmsprop": "momentum=0.5,alpha=0.9,eps=1e-6,centered=yes",
             "ademamix": "beta1=0.8,beta2=0.99,beta3=0.995,alpha=3,eps=1e-6,t_alpha=5,t_beta3=7"}
OPTIM_CASES = [(name, SOME_ARGS.get("ademamix" if "ademamix" in name else name)) for name in OPTIMS]


@pytest.mark.parametrize("optim,optim_args", OPTIM_CASES, ids=[name for name, _ in OPTIM_CASES])
def test_each_optim_is_the_optimizer_transformers_builds(tiny_model, optim, optim_args):
    """`optim` and `optim_args` give the optimizer class and hyperparameters that transformers' Trainer gives
    LLaMA-Factory for the same keys (Adam's betas and epsilon set away from their defaults, to see them arrive)."""
    from transformers import Trainer, TrainingArguments

    from tuneforge.train.optimizers import make_optimizer

    model, cfg = _model_and_args(tiny_model, optim=optim, optim_args=optim_args, finetuning_type="full",
                                 adam_beta1=0.85, adam_beta2=0.98, adam_epsilon=1e-7, learning_rate=2e-4)

    def groups():
        params = list(model.parameters())
        return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]

    ours = make_optimizer(model, groups(), cfg.train, cfg.finetune)
    args = TrainingArguments(output_dir="unused", optim=optim, optim_args=optim_args, adam_beta1=0.85,
                             adam_beta2=0.98, adam_epsilon=1e-7, learning_rate=2e-4, report_to="none")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    theirs = cls(groups(), **kwargs)
    assert type(ours) is type(theirs)
    settings = [[{k: v for k, v in group.items() if k != "params"} for group in o.param_groups] for o in (ours, theirs)]
    assert settings[0] == settings[1]


def test_optim_args_are_checked_before_training(tiny_model):
    from tuneforge.train.optimizers import check

    def problems(optim, optim_args):
        return " | ".join(check(build_config({"model_name_or_path": tiny_model, "optim": optim,
                                              "optim_args": optim_args})))

    assert problems("sgd", "momentum=0.9,nesterov=true") == ""
    assert "`optim: adamw_torch` takes none" in problems("adamw_torch", "beta1=0.5")  # transformers ignores them
    assert "`foo` is not an argument of rmsprop; it takes momentum, alpha, eps, centered" in problems("rmsprop",
                                                                                                       "foo=1")
    assert "with the `weight_decay` key" in problems("sgd", "weight_decay=0.1")  # the groups' own would win
    assert "`nesterov=maybe` is not true or false" in problems("sgd", "momentum=0.9,nesterov=maybe")
    assert "`t_alpha=1.5` is not a whole number" in problems("ademamix", "t_alpha=1.5")
    assert "Nesterov momentum requires a momentum" in problems("sgd", "nesterov=true")  # torch's own check
    assert "RMSprop with alpha==0.0 is not supported" in problems("rmsprop_bnb", "alpha=0")


def test_full_eval_casts_the_model_for_the_evaluation_after_training(tiny_model, alpaca_file, tmp_path):
    """bf16_full_eval: the evaluation after training runs on the whole model cast to bf16, as transformers does
    outside train(); the evaluations during training keep the training precision (fp32 here)."""
    common = dict(finetuning_type="full", val_size=6, do_eval=True, learning_rate=3e-3)
    during = dict(eval_strategy="steps", eval_steps=4, max_steps=8)
    fp32 = run_training(train_config(tiny_model, alpaca_file, tmp_path / "fp32", **common, **during))
    cast = run_training(train_config(tiny_model, alpaca_file, tmp_path / "cast", bf16_full_eval=True, **common,
                                     **during))
    alone = run_training(train_config(str(tmp_path / "fp32"), alpaca_file, tmp_path / "alone", do_train=False,
                                      bf16_full_eval=True, **common))
    # the same weights and operations on one machine: equal to float rounding (measured 0.0)
    assert cast["eval_loss"] == pytest.approx(alone["eval_loss"], abs=1e-6)
    # bf16 weights and activations move this loss by ~1e-3 (measured 9.3e-4 here, 1.1e-3 with avx2 kernels on one
    # thread): far above the 1e-6 that float32 summation order gives, far below what another model would give
    assert 1e-4 < abs(cast["eval_loss"] - fp32["eval_loss"]) < 1e-2
    logged = [[r["eval_loss"] for r in read_log(tmp_path / name) if "eval_loss" in r] for name in ("fp32", "cast")]
    assert logged[0] == logged[1] and len(logged[0]) == 2


def test_full_eval_keys_say_when_they_cannot_apply(tiny_model, alpaca_file, tmp_path):
    from tuneforge.config import ConfigError, notices, validate

    def config(**keys):
        return build_config(train_config(tiny_model, alpaca_file, tmp_path / "out", val_size=4, **keys))

    with pytest.raises(ConfigError) as err:
        validate(config(bf16_full_eval=True, fp16_full_eval=True, quantization_bit=4, do_eval=True), "train")
    assert "are both true" in str(err.value) and "quantised weights cannot be cast" in str(err.value)
    assert any("`bf16_full_eval` has no effect without do_eval or do_predict" in n
               for n in notices(config(bf16_full_eval=True)))
    fp16 = " ".join(notices(config(fp16_full_eval=True, do_eval=True)))
    from tuneforge.machine import multiplies_fp16_natively

    assert ("evaluates in bf16" in fp16) != (multiplies_fp16_natively() or torch.cuda.is_available())


def test_full_determinism_holds_for_the_run_and_is_undone_after_it(tiny_model, alpaca_file, tmp_path, monkeypatch):
    """full_determinism: torch's deterministic algorithms (which raise on an operation without a deterministic
    kernel, so training and evaluation here use none), cuDNN's deterministic mode and cuBLAS's workspace setting,
    for the run only: the next run in the same process is as it was."""
    import os

    from tuneforge.train import sft

    seen, real = [], sft.train_and_evaluate

    def spy(*args, **kwargs):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                     os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return real(*args, **kwargs)

    monkeypatch.setattr(sft, "train_and_evaluate", spy)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, None)
    results = run_training(train_config(tiny_model, alpaca_file, tmp_path / "out", full_determinism=True, val_size=4,
                                        do_eval=True, max_steps=2))
    assert "eval_loss" in results and seen == [(True, True, ":16:8")]
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            os.environ.get("CUBLAS_WORKSPACE_CONFIG")) == before == (False, False, None)


def test_oft_trains_an_adapter(tiny_model, alpaca_file, tmp_path):
    out = tmp_path / "out"
    run_training(train_config(tiny_model, alpaca_file, out, finetuning_type="oft", oft_block_size=16,
                              learning_rate=2e-2, max_steps=20, lr_scheduler_type="constant"))
    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    assert losses[-1] < losses[0] - 0.3, losses  # see EXTRAS for the 0.3
    assert '"peft_type": "OFT"' in (out / "adapter_config.json").read_text()


def _model_and_args(tiny_model, **extra):
    from tuneforge.models.load import load_base_model

    cfg = build_config({"model_name_or_path": tiny_model, **extra})
    return load_base_model(cfg.model), cfg


def test_pissa_starts_from_the_base_models_outputs(tiny_model):
    """PiSSA moves each target weight's principal part into the adapter and leaves the residual in the base, so the
    wrapped model computes what the base did; unlike plain LoRA its B matrices are not zero."""
    from tuneforge.models.adapters import setup_trainable

    base, cfg = _model_and_args(tiny_model, pissa_init=True, pissa_iter=-1, lora_rank=4)
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        before = base(input_ids=ids).logits
        model = setup_trainable(base, cfg.model, cfg.finetune)
        after = model(input_ids=ids).logits
    # W = W_res + B A is exact up to float32 rounding of the SVD product (measured ~1e-6 on these unit-scale
    # logits); 1e-4 leaves room for other CPUs' summation order and nothing more.
    assert torch.allclose(before, after, atol=1e-4), (before - after).abs().max()
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert b and all(p.abs().sum() > 0 for p in b)


def test_pissa_convert_gives_an_adapter_for_the_original_base(tiny_model, alpaca_file, tmp_path):
    """The converted adapter on the untouched base computes what the trained PiSSA model (adapter on the residual
    base) computes."""
    from peft import PeftModel

    from tuneforge.models.adapters import attach_adapters
    from tuneforge.models.load import load_base_model

    out = tmp_path / "out"
    run_training(train_config(tiny_model, alpaca_file, out, pissa_init=True, pissa_iter=-1, pissa_convert=True,
                              lora_rank=4, learning_rate=2e-2, max_steps=5))
    ids = torch.arange(3, 19)[None]
    cfg = build_config({"model_name_or_path": tiny_model, "pissa_init": True, "pissa_iter": -1, "lora_rank": 4})
    with torch.no_grad():
        # the trained PiSSA model: the residual base (PiSSA's SVD of the original weights) plus the trained adapter
        residual = attach_adapters(load_base_model(cfg.model), cfg.model, cfg.finetune, is_trainable=True)
        residual.load_adapter(str(out / "pissa_backup"), "default")
        trained = residual(input_ids=ids).logits
        converted = PeftModel.from_pretrained(load_base_model(cfg.model), str(out / "pissa_converted"))
        plain = converted(input_ids=ids).logits
    # two float32 routes to the same function (rank-8 product vs SVD residual + rank-4 product): ~1e-6 apart on
    # unit-scale logits; 1e-4 allows for other CPUs' summation order
    assert torch.allclose(trained, plain, atol=1e-4), (trained - plain).abs().max()


def test_pissa_convert_after_a_resume_from_only_the_checkpoint(tiny_model, alpaca_file, tmp_path):
    """The conversion subtracts the initial adapter that the run wrote to output_dir/pissa_init at its start. A run
    resumed from a copied checkpoint alone writes it again (the same seeded SVD, before the checkpoint loads);
    before, its conversion failed after training with a hub error about the folder's name."""
    import shutil

    from safetensors.torch import load_file

    out = tmp_path / "out"
    values = train_config(tiny_model, alpaca_file, out, pissa_init=True, pissa_convert=True, lora_rank=4,
                          learning_rate=2e-2, max_steps=2, save_steps=1)
    run_training(values)
    straight = load_file(out / "pissa_converted" / "adapter_model.safetensors")
    for path in out.iterdir():
        if path.name != "checkpoint-1":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    run_training(values)
    resumed = load_file(out / "pissa_converted" / "adapter_model.safetensors")
    # the same steps on the same numbers (measured 0 apart); another initial adapter would move them by ~1e-2
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) < 1e-6


@pytest.mark.parametrize("stage, start", [("dpo", "pissa"), ("kto", "pissa"), ("dpo", "adapter")])
def test_a_lora_reference_is_the_starting_model(tiny_model, tmp_path, stage, start):
    """With LoRA the reference is the base with the adapter off, unless that is not the starting model: PiSSA left
    its residual W - BA in the base, and a run going on with `adapter_name_or_path` would drop that adapter. Those
    get a frozen copy of the starting model, so the first step compares equal models (DPO's loss is ln 2, the
    rewards and KTO's KL 0). Measured with the adapter off as reference: first DPO losses 0.73 and 0.51."""
    from conftest import write_jsonl
    from peft import LoraConfig, get_peft_model
    from test_preference import preference_rows
    from transformers import AutoModelForCausalLM

    rows = preference_rows(0, 8)
    if stage == "kto":
        rows = [{"instruction": r["instruction"], "output": r["chosen" if i % 2 else "rejected"], "kto_tag": i % 2 == 1}
                for i, r in enumerate(rows)]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"rows": {
        "file_name": "rows.jsonl", **({"ranking": True} if stage == "dpo" else {"columns": {"kto_tag": "kto_tag"}})}}))
    extra = {"pissa_init": True}
    if start == "adapter":  # an sft adapter (random, non-zero) that dpo goes on training
        torch.manual_seed(0)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), lora).save_pretrained(tmp_path / "sft")
        extra = {"adapter_name_or_path": str(tmp_path / "sft")}
    run_training(train_config(tiny_model, "rows", tmp_path / "out", dataset_dir=str(tmp_path), stage=stage,
                              max_steps=1, learning_rate=1e-9, **extra))
    first = read_log(tmp_path / "out")[0]
    # the same model twice: log-ratios 0 up to float32 rounding of the SVD product (1e-6), under the log's 4 digits
    keys = [key for key in first if key.startswith(("rewards/", "kl")) and key != "rewards/accuracies"]
    assert keys and all(first[key] == 0 for key in keys), first
    if stage == "dpo":
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_a_pissa_adapter_from_a_fast_svd_is_refused_where_it_loads(tiny_model, alpaca_file, tmp_path):
    """PEFT runs a PiSSA adapter's initialisation again when it loads one: with pissa_iter's random fast SVD it
    subtracts another product from the base each time, so chat, export or another run would get another model
    (measured: 0.33 and 0.64 apart in two loads). The refusal names the converted adapter when there is one."""
    from tuneforge.config import validate
    from tuneforge.export import run_export
    from tuneforge.models.load import ModelError

    out = tmp_path / "out"
    run_training(train_config(tiny_model, alpaca_file, out, pissa_init=True, pissa_convert=True, lora_rank=4,
                              max_steps=1))
    cfg = build_config({"model_name_or_path": tiny_model, "adapter_name_or_path": str(out), "template": "chatml",
                        "export_dir": str(tmp_path / "merged")})
    validate(cfg, "export")
    with pytest.raises(ModelError, match=r"a PiSSA adapter \(pissa_niter_16\) .* another model; load "
                                         rf"{out / 'pissa_converted'}, the plain LoRA adapter"):
        run_export(cfg)
    cfg.model.adapter_name_or_path = str(out / "pissa_converted")
    assert (Path(run_export(cfg)) / "model.safetensors").is_file()


def test_llama_pro_trains_the_evenly_spaced_blocks(tiny_model):
    from tuneforge.models.adapters import setup_trainable

    model, cfg = _model_and_args(tiny_model, finetuning_type="freeze", use_llama_pro=True, freeze_trainable_layers=2)
    setup_trainable(model, cfg.model, cfg.finetune)
    trained = {int(n.split(".")[2]) for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {1, 3}  # 4 layers, 2 trainable: stride 2, the second block of each pair (as expanded)


LAYERWISE = {f"{name}_layerwise": {**EXTRAS[name], f"{name}_layerwise": True} for name in ("galore", "apollo")}


def _final_weights(tiny_model, alpaca_file, out, **settings) -> dict:
    from safetensors.torch import load_file

    settings = {"learning_rate": 3e-3, **settings}
    run_training(train_config(tiny_model, alpaca_file, out, finetuning_type="full", max_steps=6, save_steps=3,
                              lr_scheduler_type="cosine", **settings))
    return load_file(out / "model.safetensors")


def _gap(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("name", ["galore", "apollo"])
def test_layerwise_steps_give_the_same_weights(tiny_model, alpaca_file, tmp_path, name):
    """galore_layerwise / apollo_layerwise step each parameter inside backward and free its gradient: the same
    per-parameter updates as the one optimizer over all of them."""
    settings = dict(max_grad_norm=0, **EXTRAS[name])  # no clipping: layerwise steps cannot clip the whole gradient
    together = _final_weights(tiny_model, alpaca_file, tmp_path / "together", **settings)
    layerwise = _final_weights(tiny_model, alpaca_file, tmp_path / "layerwise", **settings,
                               **{f"{name}_layerwise": True})
    # The same arithmetic per parameter in the same order (each optimizer keeps its own per-parameter state): equal
    # to float32 rounding, measured 0.0; a missed or doubled step moves weights by about the rate, 3e-3.
    assert _gap(together, layerwise) < 1e-6


@pytest.mark.parametrize("name", ["badam", "badam_ratio", "muon", *LAYERWISE, "ademamix_8bit", "sgd_nesterov"])
def test_optimizers_with_their_own_state_resume_exactly(tiny_model, alpaca_file, tmp_path, name):
    """Optimizers made of several (Muon with AdamW, one per parameter), keeping a schedule of their own (BAdam's
    block order) or state of another kind (8-bit AdEMAMix's quantised moments, SGD's momentum) checkpoint all of it: a run stopped after its step-3 checkpoint and resumed ends where the
    uninterrupted run does."""
    settings = {**EXTRAS, **LAYERWISE}[name]
    straight = _final_weights(tiny_model, alpaca_file, tmp_path / "straight", **settings)
    out = tmp_path / "resumed"
    _final_weights(tiny_model, alpaca_file, out, **settings)
    for file in ("model.safetensors", "train_results.json", "all_results.json"):  # as if stopped after step 3
        (out / file).unlink()
    resumed = _final_weights(tiny_model, alpaca_file, out, **settings)
    # The same operations in the same order on the same machine: measured 0.0. A lost learning rate, Adam state or
    # block position moves weights by about the rate, 3e-3.
    assert _gap(straight, resumed) < 1e-6


def test_layerwise_refuses_what_needs_the_whole_step(tiny_model, alpaca_file, tmp_path):
    from tuneforge.config import ConfigError, validate

    cfg = build_config(train_config(tiny_model, alpaca_file, tmp_path / "out", finetuning_type="full",
                                    galore_layerwise=True, gradient_accumulation_steps=2, skip_nonfinite_steps=True))
    with pytest.raises(ConfigError) as err:
        validate(cfg, "train")
    text = str(err.value)
    for expected in ("set `use_galore: true` too", "gradient_accumulation_steps: 1", "skip_nonfinite_steps"):
        assert expected in text, text


def test_print_param_status_lists_every_parameter(tiny_model, alpaca_file, tmp_path, capsys):
    """LoRA on a bf16 base: the listing shows the frozen bf16 weights and the trainable fp32 adapters."""
    run_training(train_config(tiny_model, alpaca_file, tmp_path / "out", max_steps=1, bf16=True, pure_bf16=True,
                              print_param_status=True))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ") and "trainable:" in line]
    assert any("lora_A" in line and "torch.float32" in line and "trainable: True" in line for line in lines)
    assert any("q_proj.base_layer.weight" in line and "torch.bfloat16" in line and "trainable: False" in line
               for line in lines)
    assert len(lines) == len({line.split(":")[0] for line in lines}) > 20  # one line per parameter


def test_expand_adds_silent_blocks_that_llama_pro_trains(tiny_model, alpaca_file, tmp_path):
    """tuneforge expand (LLaMA Pro): the expanded model gives the original's logits exactly (the new blocks' output
    projections are zero, so they add exact zeros to the residual); use_llama_pro then trains only the new blocks."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tuneforge.cli import main

    pro = tmp_path / "pro"
    assert main(["expand", f"model_name_or_path={tiny_model}", "--num_expand", "2", "--out", str(pro)]) == 0
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        before = AutoModelForCausalLM.from_pretrained(tiny_model)(input_ids=ids).logits
        after = AutoModelForCausalLM.from_pretrained(pro)(input_ids=ids).logits
    assert torch.equal(before, after)
    out = tmp_path / "out"
    run_training(train_config(str(pro), alpaca_file, out, finetuning_type="freeze", use_llama_pro=True,
                              freeze_trainable_layers=2, max_steps=3))
    start, trained = load_file(pro / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {int(k.split(".")[2]) for k in start if not torch.equal(start[k], trained[k])}
    assert changed == {2, 5}  # 4 layers in 2 groups, each followed by its copy
    assert main(["expand", f"model_name_or_path={tiny_model}", "--num_expand", "3", "--out", str(tmp_path / "x")]) == 2
    assert main(["expand", f"model_name_or_path={tiny_model}", "--num_expand", "2", "--out", str(pro)]) == 2


def test_neftune_noise_is_uniform_within_its_bound_and_only_while_training(tiny_model):
    from transformers import AutoModelForCausalLM

    from tuneforge.models.neftune import add_noise_to_embeddings

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    clean = model.get_input_embeddings()(ids)
    add_noise_to_embeddings(model, 5.0)
    model.train()
    noise = model.get_input_embeddings()(ids) - clean
    bound = 5.0 / math.sqrt(24 * clean.size(-1))  # alpha / sqrt(sequence length x hidden size)
    # (clean + u) - clean rounds u by at most float32's spacing near |clean| (< 1e-6 here)
    assert noise.abs().max() <= bound + 1e-6
    # U(-b, b) has mean |u| = b / 2; over these 2 x 24 x hidden draws the mean lands within a few percent of it
    assert noise.abs().mean().item() == pytest.approx(bound / 2, rel=0.1)
    with torch.no_grad():  # a pass that trains nothing (a LoRA reference with its adapter off) is clean too
        assert torch.equal(model.get_input_embeddings()(ids), clean)
    model.eval()
    assert torch.equal(model.get_input_embeddings()(ids), clean)


def test_neftune_changes_the_training_forward(tiny_model, alpaca_file, tmp_path):
    losses = {}
    for name, alpha in (("plain", None), ("neftune", 50.0)):
        run_training(train_config(tiny_model, alpaca_file, tmp_path / name, max_steps=2, neftune_noise_alpha=alpha))
        losses[name] = read_log(tmp_path / name)[0]["loss"]
    # the first step's loss is the starting model's on noisy embeddings: at alpha 50 the noise outweighs the tiny
    # model's embeddings, a change far above float noise
    assert abs(losses["neftune"] - losses["plain"]) > 1e-3


@pytest.mark.parametrize("metric, greater, higher", [
    ("accuracy", None, True), ("eval_loss", None, False), ("accuracy", False, False), ("loss", True, True)])
def test_greater_is_better_overrides_the_metric_names_direction(metric, greater, higher):
    from tuneforge.train.evaluation import best_metric_name

    t = build_config({"metric_for_best_model": metric, "greater_is_better": greater}).train
    assert best_metric_name(t) == (metric if metric.startswith("eval_") else f"eval_{metric}", higher)


def test_logging_first_step_logs_step_one_too(tiny_model, alpaca_file, tmp_path):
    run_training(train_config(tiny_model, alpaca_file, tmp_path / "o", max_steps=4, logging_steps=3,
                              logging_first_step=True))
    assert [r["current_steps"] for r in read_log(tmp_path / "o")] == [1, 3, 4]
