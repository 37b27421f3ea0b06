"""moe_aux_loss_coef: the router load-balancing loss of a mixture-of-experts model, added to the pt / sft loss as
transformers adds it, through the training loop's normalisation, and refused where it cannot apply."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tokenizer, read_log, run_training, train_config
from tuneforge.config import ConfigError


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> str:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    folder = tmp_path_factory.mktemp("tiny-moe")
    tokenizer = build_tokenizer(folder)
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, max_position_embeddings=512,
                            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    Qwen3MoeForCausalLM(config).save_pretrained(folder)
    return str(folder)


def test_loss_and_gradients_match_transformers(tiny_moe):
    """One micro-batch with padding: our loss sum / target tokens equals transformers' mean token loss plus
    router_aux_loss_coef x its balancing loss, and so do the gradients (the router's included)."""
    from transformers import AutoModelForCausalLM

    from tuneforge.train.losses import CausalLMLoss
    from tuneforge.train.moe import RouterBalance

    coef = 0.3
    ours, theirs = (AutoModelForCausalLM.from_pretrained(tiny_moe) for _ in range(2))
    theirs.config.router_aux_loss_coef = theirs.router_aux_loss_coef = coef
    ids = torch.randint(3, 300, (3, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 14:] = mask[2, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100  # a prompt
    module = CausalLMLoss(ours, chunk_size=16, router_balance=RouterBalance(ours, coef)).train()
    loss_sum, metrics = module(input_ids=ids, labels=labels, attention_mask=mask)
    units = CausalLMLoss.units({"labels": labels})
    (loss_sum / units).backward()
    expected = theirs(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    expected.loss.backward()
    # float32: the chunked cross-entropy sums the same terms in another order than transformers' full one; 1e-5
    # relative is a hundred times that noise, and far below coef x aux (about 0.6)
    assert (loss_sum / units).item() == pytest.approx(expected.loss.item(), rel=1e-5)
    assert (metrics["aux_loss"] / units).item() == pytest.approx(expected.aux_loss.item(), rel=1e-5)
    ours_grads, theirs_grads = dict(ours.named_parameters()), dict(theirs.named_parameters())
    for name in ("model.layers.0.mlp.gate.weight", "model.layers.1.mlp.experts.gate_up_proj",
                 "model.layers.0.self_attn.q_proj.weight"):
        torch.testing.assert_close(ours_grads[name].grad, theirs_grads[name].grad, rtol=1e-4, atol=1e-6)


def test_training_adds_the_weighted_balancing_loss(tiny_moe, alpaca_file, tmp_path):
    """Through the loop, with accumulation: the first step's logged loss is the plain run's plus coef x the logged
    balancing loss (both from the same starting weights and batches), and the run saves a model that loads."""
    steps = dict(max_steps=1, gradient_accumulation_steps=2, finetuning_type="full")
    run_training(train_config(tiny_moe, alpaca_file, tmp_path / "plain", **steps))
    run_training(train_config(tiny_moe, alpaca_file, tmp_path / "balanced", moe_aux_loss_coef=1.0, **steps))
    plain, balanced = read_log(tmp_path / "plain")[0], read_log(tmp_path / "balanced")[0]
    assert "aux_loss" not in plain
    assert 1.9 < balanced["aux_loss"] < 4  # top_k = 2 for an even routing, up to 4 experts
    # each logged figure is rounded to 4 decimals; 3e-4 allows the three roundings
    assert balanced["loss"] - plain["loss"] == pytest.approx(balanced["aux_loss"], abs=3e-4)


def test_full_fine_tuning_resumes_and_reloads_its_best_model(tiny_moe, alpaca_file, tmp_path):
    """save_pretrained writes the fused experts one tensor per expert (transformers' conversion mapping), so a
    checkpoint's weights are not under the model's own names: resume and load_best_model_at_end read them back,
    and a resumed run finds its best model in that step's checkpoint."""
    # the highest eval loss is the best: the first evaluation's model, not the last one, becomes the final model
    common = dict(finetuning_type="full", max_steps=4, save_steps=2, val_size=4, eval_strategy="steps", eval_steps=2,
                  load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    run_training(train_config(tiny_moe, alpaca_file, tmp_path / "straight", **common))
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    run_training(train_config(tiny_moe, alpaca_file, tmp_path / "resumed", **common))
    assert read_log(tmp_path / "resumed")[0]["current_steps"] == 3  # it resumed from checkpoint-2
    evals = {r["current_steps"]: r["eval_loss"] for r in read_log(tmp_path / "straight") if "eval_loss" in r}
    best = max(evals, key=evals.get)
    final, checkpoint = (load_file(tmp_path / "straight" / f / "model.safetensors") for f in ("", f"checkpoint-{best}"))
    assert best == 2 and all(torch.equal(final[k], checkpoint[k]) for k in final)
    # the resumed run's folder has no best_model (only the checkpoint was copied): the best step's checkpoint is it
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(final[k], resumed[k]) for k in final)


def test_refused_where_it_cannot_apply(tiny_moe, tiny_model, alpaca_file, tmp_path):
    with pytest.raises(ConfigError, match="Llama.* has no router load-balancing loss"):
        run_training(train_config(tiny_model, alpaca_file, tmp_path / "dense", moe_aux_loss_coef=0.01))
    with pytest.raises(ConfigError, match="stage dpo does not add it"):
        run_training(train_config(tiny_moe, alpaca_file, tmp_path / "dpo", stage="dpo", moe_aux_loss_coef=0.01))
    with pytest.raises(ConfigError, match="with `use_asft_loss` is not built yet"):
        run_training(train_config(tiny_moe, alpaca_file, tmp_path / "asft", moe_aux_loss_coef=0.01, use_asft_loss=True))
    with pytest.raises(ConfigError, match="0 or more; got -1"):
        run_training(train_config(tiny_moe, alpaca_file, tmp_path / "negative", moe_aux_loss_coef=-1))


def test_lora_all_adapts_the_fused_experts(tiny_moe, alpaca_file, tmp_path):
    """transformers 5 keeps each layer's experts as 3-D parameters, not nn.Linear: `lora_target: all` still adapts
    them (PEFT target_parameters), the adapter loads in plain PEFT and merges to the same logits."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge.export import run_export
    from tuneforge.config import build_config, validate

    run_training(train_config(tiny_moe, alpaca_file, tmp_path / "run", max_steps=4))
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert sorted(saved["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
    assert sorted(saved["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_moe)(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_moe), tmp_path / "run")
        expert_b = [p for n, p in adapted.named_parameters() if "experts" in n and "lora_B" in n]
        assert expert_b and all(p.abs().sum() > 0 for p in expert_b)  # B starts at zero: the experts' adapters trained
        logits = adapted(input_ids=ids).logits
        cfg = build_config({"model_name_or_path": tiny_moe, "adapter_name_or_path": str(tmp_path / "run"),
                            "template": "chatml", "export_dir": str(tmp_path / "merged")})
        validate(cfg, "export")
        merged = AutoModelForCausalLM.from_pretrained(run_export(cfg))(input_ids=ids).logits
    assert (logits - base).abs().max() > 1e-3
    # float32: the merged weight sums W + BA before the matmul, the adapter after it; 1e-5 is ~100x that rounding
    torch.testing.assert_close(merged, logits, rtol=0, atol=1e-5)


def test_expert_targets_by_name_and_what_peft_cannot_do(tiny_moe, alpaca_file, tmp_path):
    import json

    from tuneforge.models.load import ModelError

    run_training(train_config(tiny_moe, alpaca_file, tmp_path / "named", max_steps=1, lora_target="q_proj,gate_up_proj"))
    saved = json.loads((tmp_path / "named" / "adapter_config.json").read_text())
    assert saved["target_parameters"] == ["experts.gate_up_proj"] and saved["target_modules"] == ["q_proj"]
    with pytest.raises(ModelError, match="PEFT cannot adapt those with lora_dropout: turn it off"):
        run_training(train_config(tiny_moe, alpaca_file, tmp_path / "dropout", lora_dropout=0.1))
    with pytest.raises(ModelError, match="which PEFT's OFT cannot adapt"):
        run_training(train_config(tiny_moe, alpaca_file, tmp_path / "oft", finetuning_type="oft", oft_rank=4,
                                  oft_block_size=0))


def test_a_name_reaches_dense_layers_and_experts_alike(tmp_path):
    """A model whose first layer keeps a dense MLP (mlp_only_layers): `lora_target: down_proj` adapts that layer's
    down_proj module and the experts' fused down_proj weight of the MoE layers."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from tuneforge.config import build_config
    from tuneforge.models.adapters import lora_config

    config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                            num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0])
    model = Qwen3MoeForCausalLM(config)
    lora = lora_config(model, build_config({"lora_target": "down_proj"}).finetune)
    assert list(lora.target_modules) == ["down_proj"] and lora.target_parameters == ["experts.down_proj"]
