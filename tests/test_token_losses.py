"""The token-loss variants of stages pt and sft that LLaMA-Factory offers: DFT, EAFT and ASFT (each weighs or
anchors the per-token cross-entropy), and Hugging Face's label_smoothing_factor; each checked against its formula on
the model's own logits, and each lowering the plain evaluation loss when it trains."""

import pytest
import torch
from conftest import read_log, run_training, train_config

from tuneforge.config import build_config
from tuneforge.train.losses import dft_weighted

# 20 steps at a constant rate must take the plain evaluation loss at least 0.3 nats below the untrained model's
# (tests/test_extras.py's rule for its extras: plain AdamW full fine-tuning falls by more than 1 nat there, and no
# float noise comes near 0.3)
LEARNS = 0.3


def test_dft_lowers_the_plain_loss(tiny_model, alpaca_file, tmp_path):
    """DFT's own (logged) loss rises as the model grows confident, since each token's loss is weighted by its
    probability: judge it by the plain evaluation loss, before (do_train: false) and after training."""
    common = dict(val_size=6, do_eval=True, finetuning_type="full", learning_rate=3e-3, lr_scheduler_type="constant")
    before = run_training(train_config(tiny_model, alpaca_file, tmp_path / "base", do_train=False, **common))
    after = run_training(train_config(tiny_model, alpaca_file, tmp_path / "dft", max_steps=20, use_dft_loss=True,
                                      **common))
    assert after["eval_loss"] < before["eval_loss"] - LEARNS, (before, after)


def test_dft_weights_each_token_by_its_detached_probability():
    losses = torch.tensor([0.1, 1.0, 3.0], requires_grad=True)
    total = dft_weighted(losses)
    total.backward()
    probs = torch.exp(-torch.tensor([0.1, 1.0, 3.0]))
    assert torch.allclose(total, (losses * probs).sum())
    assert torch.allclose(losses.grad, probs)  # the weight scales the gradient and is not differentiated


def test_eaft_weights_each_token_by_its_top20_entropy_and_lowers_the_plain_loss(tiny_model, alpaca_file,
                                                                                 tmp_path):
    """LLaMA-Factory's EAFT: a token's loss times (H / 3) ** alpha, detached, H the entropy over the 20 largest
    logits. The module's training loss equals that formula on the model's own logits, with autograd's gradient
    through the loss only; and training with it lowers the plain evaluation loss."""
    from tuneforge.config import build_config
    from tuneforge.data.collate import PadCollator
    from tuneforge.models.load import load_base_model, load_tokenizer
    from tuneforge.train.losses import CausalLMLoss

    cfg = build_config(train_config(tiny_model, alpaca_file, tmp_path), source="test")
    tokenizer, model = load_tokenizer(cfg.model), load_base_model(cfg.model)
    batch = PadCollator(tokenizer.pad_token_id)([{"input_ids": list(range(5, 17)), "labels": [-100] * 4 +
                                                  list(range(9, 17))}])
    module = CausalLMLoss(model, chunk_size=3, eaft_alpha=0.5).train()  # 7 targets in chunks of 3
    loss, _ = module(batch["input_ids"], batch["labels"])
    loss.backward()
    fused_grad = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()

    logits = model(input_ids=batch["input_ids"]).logits[0, 3:-1]  # the positions that predict the 8 targets
    targets = batch["labels"][0, 4:]
    top = torch.topk(logits.detach(), 20, dim=-1).values
    p = torch.softmax(top, dim=-1)
    weight = (-(p * p.log()).sum(-1) / 3.0) ** 0.5
    expected = (torch.nn.functional.cross_entropy(logits, targets, reduction="none") * weight).sum()
    expected.backward()
    # the same float32 logits and sums in another order (the module's chunks): ~1e-6 of a loss of ~20
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert 0 < weight.min() and weight.max() <= 1.0001  # ln 20 / 3 = 0.9986: at most ~1
    # float32 gradients summed in another order: measured 1.7e-6 apart at most, for entries up to ~0.3; a weight
    # that took a gradient itself, or a token left unweighted, moves them by percents
    torch.testing.assert_close(fused_grad, model.model.embed_tokens.weight.grad, rtol=1e-4, atol=1e-5)

    common = dict(val_size=6, do_eval=True, finetuning_type="full", learning_rate=3e-3, lr_scheduler_type="constant")
    before = run_training(train_config(tiny_model, alpaca_file, tmp_path / "base", do_train=False, **common))
    after = run_training(train_config(tiny_model, alpaca_file, tmp_path / "eaft", max_steps=20, use_eaft_loss=True,
                                      **common))
    assert after["eval_loss"] < before["eval_loss"] - LEARNS, (before, after)

@pytest.mark.parametrize("frozen_head", [True, False])
def test_label_smoothing_equals_transformers_label_smoother(tiny_model, alpaca_file, tmp_path, frozen_head):
    """HF's label_smoothing_factor: the loss module's mean over target tokens is what transformers' LabelSmoother
    (the Trainer's) computes from the model's logits, on the frozen-head path (LoRA) and the trainable one."""
    from transformers.modeling_outputs import CausalLMOutput
    from transformers.trainer_pt_utils import LabelSmoother

    from tuneforge.data.collate import PadCollator
    from tuneforge.models.load import load_base_model, load_tokenizer
    from tuneforge.train.losses import CausalLMLoss

    cfg = build_config(train_config(tiny_model, alpaca_file, tmp_path), source="test")
    tokenizer, model = load_tokenizer(cfg.model), load_base_model(cfg.model)
    model.lm_head.requires_grad_(not frozen_head)
    batch = PadCollator(tokenizer.pad_token_id)([
        {"input_ids": list(range(5, 17)), "labels": [-100] * 4 + list(range(9, 17))},
        {"input_ids": list(range(20, 27)), "labels": [-100] * 2 + list(range(22, 27))}])  # padded, masked
    module = CausalLMLoss(model, chunk_size=3, label_smoothing=0.2).train()
    loss, _ = module(batch["input_ids"], batch["labels"], batch["attention_mask"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = LabelSmoother(epsilon=0.2)(CausalLMOutput(logits=logits), batch["labels"], shift_labels=True)
    # float32 sums over the vocabulary in another order: ~1e-6 of a loss of ~5 nats; without smoothing the two
    # differ by 0.2 x (mean loss - target loss), about 0.1
    assert (loss / CausalLMLoss.units(batch)).item() == pytest.approx(expected.item(), abs=1e-5)


def test_label_smoothing_reaches_the_loss_and_is_checked(tiny_model, alpaca_file, tmp_path):
    from conftest import gate_problems

    evals = {}
    for factor in (0.0, 0.3):
        out = tmp_path / str(factor)
        run_training(train_config(tiny_model, alpaca_file, out, val_size=0.25, eval_on_start=True, max_steps=1,
                                  label_smoothing_factor=factor))
        evals[factor] = [r["eval_loss"] for r in read_log(out) if "eval_loss" in r][0]  # the untrained model's
    assert abs(evals[0.3] - evals[0.0]) > 1e-3
    assert "`label_smoothing_factor` with `use_dft_loss` is not built" in gate_problems(
        tmp_path, model_name_or_path=tiny_model, dataset=alpaca_file, template="chatml", label_smoothing_factor=0.1,
        use_dft_loss=True)
    assert "smooths the token losses of stages pt and sft; stage rm has none" in gate_problems(
        tmp_path, stage="rm", label_smoothing_factor=0.1)


def test_eaft_settings_are_checked(tiny_model, tmp_path):
    from tuneforge.config import build_config, problems

    def found(**values) -> list[str]:
        return problems(build_config(train_config(tiny_model, "x.jsonl", tmp_path, **values), source="test"))

    assert any("weight the same token losses in different ways" in p
               for p in found(use_eaft_loss=True, use_dft_loss=True))
    assert any("`eaft_alpha` is the exponent" in p for p in found(use_eaft_loss=True, eaft_alpha=-1.0))
    assert any("`asft_alpha` weighs ASFT's KL term" in p for p in found(use_asft_loss=True, asft_alpha=-0.1))
    assert any("`use_eaft_loss` weights token losses of stages" in p for p in found(use_eaft_loss=True, stage="rm"))
    assert found(use_eaft_loss=True, eaft_alpha=0.5) == []

@pytest.mark.parametrize("kind", ["lora", "full"])
def test_asft_is_dft_plus_a_kl_to_the_starting_model(tiny_model, alpaca_file, tmp_path, kind):
    """LLaMA-Factory's ASFT per target token: p_y * CE (p_y detached) + alpha * KL(q || p), q the starting model's
    prediction (LoRA: the adapter switched off; full: a frozen copy). Checked against that formula on both models'
    own logits, in value and gradient, with a policy that has moved away from the reference."""
    from peft import LoraConfig, get_peft_model

    from tuneforge.config import build_config
    from tuneforge.data.collate import PadCollator
    from tuneforge.models.load import load_base_model, load_tokenizer
    from tuneforge.train import asft
    from tuneforge.train.losses import CausalLMLoss

    cfg = build_config(train_config(tiny_model, alpaca_file, tmp_path), source="test")
    tokenizer, reference = load_tokenizer(cfg.model), load_base_model(cfg.model).eval()
    torch.manual_seed(0)
    if kind == "lora":  # random A and B: the adapter moves every projection
        policy, ref_arg = get_peft_model(load_base_model(cfg.model), LoraConfig(
            r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)), None
    else:
        policy, ref_arg = load_base_model(cfg.model), reference
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    module = asft.AnchoredLMLoss(CausalLMLoss(policy), alpha=0.3, reference=ref_arg).train()
    batch = PadCollator(tokenizer.pad_token_id)([{"input_ids": list(range(5, 17)),
                                                  "labels": [-100] * 4 + list(range(9, 17))}])
    trainable = [p for p in policy.parameters() if p.requires_grad]
    loss, _ = module(batch["input_ids"], batch["labels"])
    grads = torch.autograd.grad(loss, trainable)

    targets = batch["labels"][0, 1:] != -100  # the 8 positions that predict a target (the collator pads the row)
    logits = policy(input_ids=batch["input_ids"]).logits[0, :-1][targets]
    with torch.no_grad():
        if kind == "lora":
            with policy.disable_adapter():
                ref_logits = policy(input_ids=batch["input_ids"]).logits[0, :-1][targets]
        else:
            ref_logits = reference(input_ids=batch["input_ids"]).logits[0, :-1][targets]
    ce = torch.nn.functional.cross_entropy(logits, batch["labels"][0, 1:][targets], reduction="none")
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), ref_logits.softmax(-1), reduction="none").sum(-1)
    expected = (ce * torch.exp(-ce).detach()).sum() + 0.3 * kl.sum()
    assert kl.sum() > 0.01  # the policy has moved: the KL term is in play
    # the same float32 logits, summed in another order: ~1e-6 of a loss of ~10
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for got, want in zip(grads, torch.autograd.grad(expected, trainable)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)  # as in the EAFT test: summation order only

    module.eval()  # evaluation reports the plain loss
    plain, _ = CausalLMLoss(policy).eval()(batch["input_ids"], batch["labels"])
    assert module(batch["input_ids"], batch["labels"])[0].item() == pytest.approx(plain.item())


def test_asft_trains(tiny_model, alpaca_file, tmp_path):
    common = dict(val_size=6, do_eval=True, learning_rate=1e-2, lr_scheduler_type="constant")
    before = run_training(train_config(tiny_model, alpaca_file, tmp_path / "base", do_train=False, **common))
    after = run_training(train_config(tiny_model, alpaca_file, tmp_path / "asft", max_steps=20, use_asft_loss=True,
                                      asft_alpha=0.05, **common))
    assert after["eval_loss"] < before["eval_loss"] - LEARNS, (before, after)
