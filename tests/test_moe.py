"""moe_aux_loss_coef: the router load-balancing loss of a mixture-of-experts model, added to the pt / sft loss as
transformers adds it, through the training loop's normalisation, and refused where it cannot apply."""

import pytest
import torch

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


def test_refused_where_it_cannot_apply(tiny_moe, tiny_model, alpaca_file, tmp_path):
    with pytest.raises(ConfigError, match="Llama.* has no router load-balancing loss"):
        run_training(train_config(tiny_model, alpaca_file, tmp_path / "dense", moe_aux_loss_coef=0.01))
    with pytest.raises(ConfigError, match="stage dpo does not add it"):
        run_training(train_config(tiny_moe, alpaca_file, tmp_path / "dpo", stage="dpo", moe_aux_loss_coef=0.01))
    with pytest.raises(ConfigError, match="with `use_asft_loss` is not built yet"):
        run_training(train_config(tiny_moe, alpaca_file, tmp_path / "asft", moe_aux_loss_coef=0.01, use_asft_loss=True))
    with pytest.raises(ConfigError, match="0 or more; got -1"):
        run_training(train_config(tiny_moe, alpaca_file, tmp_path / "negative", moe_aux_loss_coef=-1))
