"""New tokens (add_tokens, add_special_tokens, new_special_tokens_config, init_special_tokens, resize_vocab): the
tokenizer and the embeddings grow together, only the new rows train under LoRA, and what a run saves carries them
to chat, export and plain PEFT."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import alpaca_rows, read_log, relative_update_gap, run_training, train_config, write_jsonl

from tuneforge.config import build_config, notices, problems
from tuneforge.models.load import load_base_model, load_tokenizer

THINK = "<think>,</think>"


def think_rows(n: int = 24) -> list[dict]:
    """Answers that open with a thought between the new special tokens."""
    return [{**row, "output": f"<think>{row['instruction'][:12]}</think>{row['output']}"} for row in alpaca_rows(n)]


def model_args(model: str, **values):
    return build_config({"model_name_or_path": model, **values}, source="test").model


def test_new_rows_start_from_the_old_rows_and_are_the_same_on_every_load(tiny_model, tmp_path):
    descriptions = tmp_path / "tokens.yaml"
    # </think>'s description is made only of new tokens, which have no rows to average yet
    descriptions.write_text("<think>: What is two plus two\n</think>: <think>\n", encoding="utf-8")
    old = load_base_model(model_args(tiny_model))
    rows = old.get_input_embeddings().weight.shape[0]
    args = model_args(tiny_model, add_tokens="flibbertigibbet", new_special_tokens_config=str(descriptions),
                      init_special_tokens="desc_init")
    tokenizer = load_tokenizer(args)
    assert len(tokenizer) == rows + 3  # grown by exactly the new tokens: no padding rows without a token
    ids = tokenizer.convert_tokens_to_ids(["flibbertigibbet", "<think>", "</think>"])
    assert ids == [rows, rows + 1, rows + 2]
    assert [tokenizer.added_tokens_decoder[i].special for i in ids] == [False, True, True]
    assert tokenizer.tokenize("a <think> b").count("<think>") == 1  # one token, never split

    model = load_base_model(args)
    for matrix, base in ((model.get_input_embeddings().weight, old.get_input_embeddings().weight),
                         (model.get_output_embeddings().weight, old.get_output_embeddings().weight)):
        assert matrix.shape[0] == rows + 3 and torch.equal(matrix[:rows], base)
        think = tokenizer("What is two plus two", add_special_tokens=False)["input_ids"]
        # desc_init: exactly the mean of the description's rows (of this matrix: the head's rows for the head)
        torch.testing.assert_close(matrix[rows + 1], base[think].mean(0))
        # a token without a description (add_tokens), or whose description has no old tokens, starts at the mean
        # of every old row
        torch.testing.assert_close(matrix[rows], base.mean(0))
        torch.testing.assert_close(matrix[rows + 2], base.mean(0))
    assert model.config.vocab_size == rows + 3

    noisy = model_args(tiny_model, add_special_tokens=THINK)
    first, second = load_base_model(noisy), load_base_model(noisy)
    new = first.get_input_embeddings().weight[rows:]
    # a policy and its reference model load separately: their new rows must be the same
    assert torch.equal(new, second.get_input_embeddings().weight[rows:])
    # noise_init: the mean of the old rows plus N(0, 1/dim) noise; 64 dims x 2 rows estimate the spread within a
    # factor of 1.5 with overwhelming probability (chi-square with 128 degrees of freedom)
    spread = (new.detach() - old.get_input_embeddings().weight.mean(0)).std().item()
    assert 1 / 1.5 < spread * math.sqrt(new.shape[1]) < 1.5


def test_new_tokens_take_the_spare_rows_of_a_padded_embedding(tmp_path):
    """Qwen2 pads its tokenizer's 151,665 tokens to 151,936 rows: new tokens take spare rows, which are set as
    init_special_tokens says, and nothing grows."""
    from conftest import build_llama, build_tokenizer

    tokenizer = build_tokenizer(tmp_path)
    known = len(tokenizer)
    build_llama(tmp_path, known + 8)
    descriptions = tmp_path / "tokens.yaml"
    descriptions.write_text("<think>: What is two plus two\n", encoding="utf-8")
    base = load_base_model(model_args(str(tmp_path))).get_input_embeddings().weight
    args = model_args(str(tmp_path), add_tokens="zorp", new_special_tokens_config=str(descriptions),
                      init_special_tokens="desc_init")
    model = load_base_model(args)
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == known + 8 and load_tokenizer(args).convert_tokens_to_ids(["zorp", "<think>"]) == \
        [known, known + 1]
    torch.testing.assert_close(weight[known], base[:known].mean(0))  # the mean of the trained rows only
    think = tokenizer("What is two plus two", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(weight[known + 1], base[think].mean(0))
    assert torch.equal(weight[known + 2:], base[known + 2:]) and torch.equal(weight[:known], base[:known])


def test_lora_trains_only_the_new_rows_and_the_adapter_loads_in_plain_peft(tiny_model, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.infer.engine import Engine

    data = write_jsonl(tmp_path / "think.jsonl", think_rows())
    out = tmp_path / "run"
    run_training(train_config(tiny_model, str(data), out, add_special_tokens=THINK, max_steps=6))
    rows = load_base_model(model_args(tiny_model)).get_input_embeddings().weight.shape[0]
    ids = [rows, rows + 1]
    config = json.loads((out / "adapter_config.json").read_text())
    # this model's head is untied: its rows for the new tokens train too, or it could never learn to say them
    assert config["trainable_token_indices"] == {"embed_tokens": ids, "lm_head": ids}
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as saved:
        names = list(saved.keys())
        deltas = {n: saved.get_tensor(n) for n in names if "trainable_tokens" in n}
    assert not [n for n in names if "base_layer" in n or "modules_to_save" in n]  # no copies of whole matrices
    assert len(deltas) == 2 and all(d.shape == (2, 64) for d in deltas.values())

    # the chat engine, told only the adapter, takes the tokens from the tokenizer saved beside it
    engine = Engine(build_config({"model_name_or_path": tiny_model, "adapter_name_or_path": str(out),
                                  "template": "chatml"}, source="test"))
    assert engine.tokenizer.convert_tokens_to_ids(["<think>", "</think>"]) == ids
    initial = load_base_model(model_args(tiny_model, add_special_tokens=THINK))
    for name in ("get_input_embeddings", "get_output_embeddings"):  # the engine folds the adapter into the model
        before, weight = getattr(initial, name)().weight, getattr(engine.model, name)().weight
        assert torch.equal(weight[:rows], before[:rows])  # the old vocabulary is untouched
        assert (weight[rows:] - before[rows:]).abs().amin(dim=1).gt(0).all()  # every new row trained

    # plain PEFT: grow the base's embeddings to the saved tokenizer, load the adapter; the same logits
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    base.resize_token_embeddings(len(tokenizer))
    plain = PeftModel.from_pretrained(base, str(out)).eval()
    prompt = torch.tensor([engine.prompt_ids([{"role": "user", "content": "What is 1 plus 2?"}]) + ids])
    with torch.no_grad():
        # the engine's folded weights against PEFT's layers: the same sums in another order; 1e-5 allows float32's
        # rounding of them
        torch.testing.assert_close(plain(prompt).logits, engine.model(prompt).logits, rtol=0, atol=1e-5)


def test_tied_embeddings_stay_tied_and_learn_to_say_the_new_tokens(smollm2, tmp_path):
    """The bundled SmolLM2 ties its head to its embeddings: one set of new rows serves both, and after a few steps
    on answers that open with <think> the model says it, in chat and in the merged export."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.export import run_export
    from tuneforge.infer.engine import Engine

    data = write_jsonl(tmp_path / "think.jsonl", think_rows(16))
    out = tmp_path / "run"
    run_training(train_config(smollm2, str(data), out, add_special_tokens=THINK, max_steps=10,
                              learning_rate=3e-3, bf16=True, pure_bf16=True, cutoff_len=96))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"embed_tokens": [49152, 49153]}
    assert read_log(out)[-1]["loss"] < 0.5 * read_log(out)[0]["loss"]

    cfg = build_config({"model_name_or_path": smollm2, "adapter_name_or_path": str(out),
                        "template": "chatml", "max_new_tokens": 8, "skip_special_tokens": False}, source="test")
    engine = Engine(cfg)
    assert engine.chat([{"role": "user", "content": "What is 3 plus 1?"}]).startswith("<think>")
    merged = run_export(build_config({"model_name_or_path": smollm2, "adapter_name_or_path": str(out),
                                      "template": "chatml", "export_dir": str(tmp_path / "merged")}, source="test"))
    model, tokenizer = AutoModelForCausalLM.from_pretrained(merged), AutoTokenizer.from_pretrained(merged)
    assert model.config.vocab_size == len(tokenizer) == 49154 and model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_full_fine_tuning_resumes_with_the_same_new_rows(tiny_model, tmp_path):
    """A resumed run grows the model before it loads the checkpoint, and ends where the uninterrupted run ended."""
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "think.jsonl", think_rows())
    out = tmp_path / "full"
    values = train_config(tiny_model, str(data), out, finetuning_type="full", add_special_tokens=THINK, max_steps=4,
                          save_steps=2, learning_rate=1e-4)
    run_training(values)
    uninterrupted = load_file(out / "model.safetensors")
    rows = load_base_model(model_args(tiny_model)).get_input_embeddings().weight.shape[0]
    assert uninterrupted["model.embed_tokens.weight"].shape[0] == rows + 2
    for name in ("model.safetensors", "train_results.json"):  # as a run stopped after step 2 leaves it (checkpoint-2)
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run_training(values)
    resumed = load_file(out / "model.safetensors")
    start = load_base_model(model_args(tiny_model, add_special_tokens=THINK)).state_dict()
    start = {k: start[k] for k in resumed}
    # the same steps on the same batches; float32 reductions may still order differently between the two processes'
    # thread schedules, so the updates are compared as a whole (conftest.relative_update_gap), not bit for bit
    assert relative_update_gap(start, resumed, uninterrupted) < 1e-4


def test_vocabulary_settings_are_checked_and_explained(tiny_model, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- <think>\n", encoding="utf-8")

    def found(**values) -> list[str]:
        return problems(build_config(train_config(tiny_model, "x.jsonl", tmp_path, **values), source="test"))

    assert any("no such file" in p for p in found(new_special_tokens_config=str(tmp_path / "missing.yaml")))
    assert any("a mapping of each new token" in p for p in found(new_special_tokens_config=str(bad)))
    assert any("set one of `add_special_tokens` and `new_special_tokens_config`" in p
               for p in found(new_special_tokens_config=str(bad), add_special_tokens=THINK))
    assert any("needs `new_special_tokens_config`" in p for p in found(init_special_tokens="desc_init"))
    assert any("quantised model's embeddings cannot grow" in p
               for p in found(add_tokens="zorp", quantization_bit=4))
    assert any("stage cls uses the tokenizer's own tokens" in p for p in found(add_tokens="zorp", stage="cls"))
    assert "`init_special_tokens` must be one of noise_init, desc_init, desc_init_w_noise; got 'zeros'" in \
        found(init_special_tokens="zeros")

    def said(**values) -> str:
        return " ".join(notices(build_config(train_config(tiny_model, "x.jsonl", tmp_path, **values),
                                             source="test")))

    assert "LoRA trains the new tokens' embedding rows" in said(add_special_tokens=THINK)
    assert "keep their initial values" in said(add_special_tokens=THINK, finetuning_type="freeze")
    assert said(add_special_tokens=THINK, additional_target="embed_tokens,lm_head") == ""
    assert said() == ""


@pytest.mark.parametrize("finetuning_type", ["lora", "oft"])
def test_resize_vocab_alone_trains_the_whole_embeddings_as_llamafactory_does(tiny_model, tmp_path,
                                                                             finetuning_type):
    """LLaMA-Factory's `resize_vocab: true` without listed tokens: the embeddings and head train whole
    (modules_to_save); the tokenizer here already fits the model, so nothing grows."""
    from tuneforge.models.adapters import setup_trainable

    cfg = build_config(train_config(tiny_model, "x.jsonl", tmp_path, resize_vocab=True,
                                    finetuning_type=finetuning_type, oft_block_size=16), source="test")
    model = setup_trainable(load_base_model(cfg.model), cfg.model, cfg.finetune)
    trained = {name for name, p in model.named_parameters() if p.requires_grad and "modules_to_save" in name}
    assert any("embed_tokens" in name for name in trained) and any("lm_head" in name for name in trained)


@pytest.mark.parametrize("rows_per_chunk", [8, 128])
def test_new_token_rows_take_the_fused_head_with_autograds_gradient(tiny_model, tmp_path, monkeypatch,
                                                                     rows_per_chunk):
    """The output head with trainable new-token rows keeps the fused cross-entropy (no logits kept for backward):
    its loss and its gradients, for the hidden states and for the new rows, are autograd's through the module."""
    from tuneforge.models.adapters import setup_trainable
    from tuneforge.train import losses

    monkeypatch.setattr(losses, "_FROZEN_HEAD_ROWS", rows_per_chunk)  # 37 rows: several chunks, or one
    cfg = build_config(train_config(tiny_model, "x.jsonl", tmp_path, add_special_tokens=THINK), source="test")
    model = setup_trainable(load_base_model(cfg.model), cfg.model, cfg.finetune)
    head = losses.decoder_and_head(model)[1]
    delta = head.token_adapter.trainable_tokens_delta["default"]
    rows = head.token_adapter.base_layer.weight.shape[0]
    torch.manual_seed(0)
    start = torch.randn(37, 64)
    labels = torch.randint(0, rows, (37,))
    labels[::5] = rows - 1  # some targets are the new tokens themselves
    upstream = torch.rand(37)
    results = {}
    for name in ("fused", "module"):
        hidden = start.clone().requires_grad_()
        if name == "fused":
            assert losses._fused_head(head, hidden) is not None
            token_losses = chunked_token_losses_kept(hidden, head, labels)
        else:
            token_losses = torch.nn.functional.cross_entropy(head(hidden).float(), labels, reduction="none"), None
        delta.grad = None
        (token_losses[0] * upstream).sum().backward()
        results[name] = token_losses[0].detach(), hidden.grad, delta.grad.clone(), token_losses[1]
    (fused, fused_hidden, fused_delta, kept), (plain, plain_hidden, plain_delta, _) = results.values()
    # the same fp32 logits and products, summed in another order: ~1e-6; a missing row or chunk is off by O(1e-1)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused_hidden, plain_hidden, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused_delta, plain_delta, rtol=0, atol=1e-5)
    assert plain_delta.abs().amin(dim=1).gt(0).all()
    assert kept <= 37 * 64 * 4 * 2 + 37 * 2 * 4 < 37 * rows * 4  # gradient rows, hidden, new-row columns: no logits


def chunked_token_losses_kept(hidden, head, labels):
    """(chunked_token_losses, bytes autograd keeps for backward)."""
    from tuneforge.train.losses import chunked_token_losses

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        out = chunked_token_losses(hidden, head, labels)
    return out, sum(saved)


def test_tied_embeddings_train_as_one_copy_or_are_refused(smollm2, tmp_path):
    """SmolLM2 ties its head to its embeddings. LoRA's whole-embedding training (additional_target, or resize_vocab
    without listed tokens) keeps one trained copy for both; OFT, which PEFT cannot keep tied, is refused."""
    from tuneforge.models.adapters import setup_trainable
    from tuneforge.models.load import ModelError

    def trained(**values) -> list[str]:
        cfg = build_config(train_config(smollm2, "x.jsonl", tmp_path, **values), source="test")
        model = setup_trainable(load_base_model(cfg.model), cfg.model, cfg.finetune)
        return [name for name, p in model.named_parameters() if p.requires_grad and "modules_to_save" in name]

    one = ["base_model.model.model.embed_tokens.modules_to_save.default.weight"]
    assert trained(additional_target="embed_tokens,lm_head") == one
    assert trained(resize_vocab=True) == one
    with pytest.raises(ModelError, match="would train the tied embeddings and head as two copies"):
        trained(resize_vocab=True, finetuning_type="oft", oft_block_size=16)
