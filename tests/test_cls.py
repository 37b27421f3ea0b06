"""Stage cls on a tiny random BERT: strategies, saved heads, frozen weights, per-layer rates, bad input."""

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import LOGGED_LOSS, gate_problems, read_log, run_training
from safetensors.torch import load_file

from tuneforge.data.registry import DataError

WORDS = {"good": 1, "great": 1, "fine": 1, "bad": 0, "awful": 0, "poor": 0}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"the movie was is a film plot acting".split()]
    core = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def reviews(tmp_path):
    rng = random.Random(0)
    words = [rng.choice(list(WORDS)) for _ in range(120)]
    lines = [f"the {rng.choice(['movie', 'film', 'plot'])} was {w},{'positive' if WORDS[w] else 'negative'}"
             for w in words]
    path = tmp_path / "reviews.csv"
    path.write_text("review,sentiment\n" + "\n".join(lines) + "\n")
    return str(path)


def _cls(model, data, out, **overrides):
    values = dict(model_name_or_path=model, stage="cls", dataset=data, val_size=0.25, output_dir=str(out),
                  do_train=True, learning_rate=5e-3, num_train_epochs=6, per_device_train_batch_size=8, logging_steps=5,
                  lr_scheduler_type="constant", do_eval=True, seed=0)
    values.update(overrides)
    return values


@pytest.mark.parametrize("kind, extra", [("freeze", {"freeze_trainable_layers": 1, "learning_rate": 1e-2}),
                                         ("lora", {"lora_target": "query,value", "learning_rate": 2e-2}),
                                         ("full", {})])
def test_every_strategy_learns_and_the_head_reloads(tiny_bert, reviews, tmp_path, kind, extra):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / kind
    results = run_training(_cls(tiny_bert, reviews, out, finetuning_type=kind, **extra))
    log = [r for r in read_log(out) if "loss" in r]
    assert log[-1]["loss"] < log[0]["loss"] and results["eval_accuracy"] >= 0.9, (kind, results)
    assert (out / "confusion_matrix.png").is_file() and json.loads((out / "label_map.json").read_text())[
        "label2id"] == {"negative": 0, "positive": 1}
    if kind == "lora":
        from peft import PeftModel

        base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
        model = PeftModel.from_pretrained(base, str(out)).eval()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(out).eval()
        assert model.config.id2label == {0: "negative", 1: "positive"}
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(tiny_bert)(["the film was great", "the plot was awful"], return_tensors="pt",
                                                     padding=True)
    with torch.no_grad():
        assert model(**batch).logits.argmax(-1).tolist() == [1, 0]


def test_frozen_weights_stay_bit_identical(tiny_bert, reviews, tmp_path):
    out = tmp_path / "freeze"
    run_training(_cls(tiny_bert, reviews, out, finetuning_type="freeze", freeze_trainable_layers=0, num_train_epochs=1))
    before, after = load_file(f"{tiny_bert}/model.safetensors"), load_file(out / "model.safetensors")
    assert set(after) == {f"bert.{name}" for name in before} | {"classifier.weight", "classifier.bias"}
    for name, value in before.items():  # head only: every backbone tensor is exactly as loaded
        assert torch.equal(value, after[f"bert.{name}"]), name


@pytest.mark.parametrize("scope", ["layers", "selective"])
def test_gradient_checkpointing_recomputes_the_layers_and_trains_alike(tiny_bert, reviews, tmp_path, monkeypatch,
                                                                      scope):
    """Each encoder layer runs again in backward, and the weights come out bit for bit as without checkpointing: the
    same operations, and dropout's draws replayed (checkpointing restores the random state)."""
    from transformers.models.bert import modeling_bert

    calls = []  # the MLP's first half inside each layer (the layer's own forward is the one checkpointing wraps)
    forward = modeling_bert.BertIntermediate.forward
    monkeypatch.setattr(modeling_bert.BertIntermediate, "forward", lambda self, x: calls.append(1) or forward(self, x))
    weights = []
    for extra in ({}, {"gradient_checkpointing": True, "gradient_checkpointing_scope": scope}):
        calls.clear()
        out = tmp_path / str(len(weights))
        run_training(_cls(tiny_bert, reviews, out, finetuning_type="full", max_steps=3, do_eval=False, val_size=0,
                          **extra))
        weights.append(load_file(out / "model.safetensors"))
        assert len(calls) == 2 * 3 * (2 if extra else 1)  # 2 layers x 3 steps, twice with recomputation
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert "stage cls takes `layers` or `selective`" in gate_problems(
        tmp_path, stage="cls", gradient_checkpointing=True, gradient_checkpointing_scope="attention")


@pytest.mark.parametrize("flash_attn, expected", [("auto", "sdpa"), ("eager", "eager")])
def test_flash_attn_chooses_the_classifiers_attention(tiny_bert, flash_attn, expected):
    from tuneforge.config import build_config
    from tuneforge.train.cls import load_classifier

    cfg = build_config({"model_name_or_path": tiny_bert, "stage": "cls", "flash_attn": flash_attn}, source="test")
    model = load_classifier(cfg, {"a": 0, "b": 1}, {0: "a", 1: "b"}, images=False)
    assert model.config._attn_implementation == expected


def test_per_layer_rates_land_in_the_right_groups(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    from tuneforge.config import FinetuneArgs, TrainArgs
    from tuneforge.train.optimizers import build_optimizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    optimizer = build_optimizer(model, TrainArgs(learning_rate=1e-4),
                                FinetuneArgs(layer_lr="classifier=5e-3", layerwise_lr_decay=0.5))
    rate = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert rate[id(named["classifier.weight"])] == pytest.approx(5e-3)
    assert rate[id(named["bert.encoder.layer.1.attention.self.query.weight"])] == pytest.approx(1e-4)
    assert rate[id(named["bert.encoder.layer.0.attention.self.query.weight"])] == pytest.approx(5e-5)
    assert rate[id(named["bert.embeddings.word_embeddings.weight"])] == pytest.approx(2.5e-5)


def test_bad_classification_data(tiny_bert, tmp_path):
    one = tmp_path / "one.csv"
    one.write_text("text,label\nthe film was good,1\nthe plot was fine,1\n")
    with pytest.raises(DataError, match="has only one class"):
        run_training(_cls(tiny_bert, str(one), tmp_path / "a", val_size=0, do_eval=False))
    missing = tmp_path / "missing.csv"
    missing.write_text("comment,label\nthe film was good,1\nthe film was bad,0\n")
    with pytest.raises(DataError, match=r"missing.csv row 2: no text column \(looked for text, sentence"):
        run_training(_cls(tiny_bert, str(missing), tmp_path / "b", val_size=0, do_eval=False))
    train = tmp_path / "train.csv"
    train.write_text("text,label\nthe film was good,pos\nthe film was bad,neg\n")
    unseen = tmp_path / "unseen.csv"
    unseen.write_text("text,label\nthe film was fine,neutral\n")
    with pytest.raises(DataError, match="unseen.csv row 2: label 'neutral' did not occur in the training data"):
        run_training(_cls(tiny_bert, str(train), tmp_path / "c", val_size=0, eval_dataset=str(unseen)))
    assert not any((tmp_path / n).exists() for n in "abc")


def _image_folder(root, per_class=12):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, channel in (("red", 0), ("green", 1), ("blue", 2)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (20, 24, 3), dtype=np.uint8)
            pixels[..., channel] = rng.integers(180, 255, (20, 24), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module", params=["vit", "resnet"])
def tiny_image_model(request, tmp_path_factory):
    from transformers import (ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification,
                              ViTImageProcessorPil)

    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    if request.param == "vit":
        model = ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=2))
    else:
        model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                          num_labels=2))
    model.save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("kind", ["full", "partial", "pure_bf16"])
def test_image_classifier_learns_colours(tiny_image_model, tmp_path, kind):
    from transformers import AutoModelForImageClassification

    from tuneforge.config import build_config
    from tuneforge.infer.classify import classify, load_trained_classifier

    data = _image_folder(tmp_path / "colours")
    out = tmp_path / "out"
    if kind == "partial":  # LoRA on the ViT's attention; the ResNet's top stage (LoRA is for linear layers)
        kind = "lora" if "vit" in tiny_image_model else "freeze"
    # pure_bf16: the model held and saved in bf16 (a ResNet does not cast the fp32 pixels to its weights' dtype)
    precision = {"bf16": True, "pure_bf16": True} if kind == "pure_bf16" else {}
    results = run_training(_cls(tiny_image_model, str(data), out, finetuning_type="full" if precision else kind,
                                lora_target="q_proj,v_proj", freeze_trainable_layers=1, learning_rate=1e-2,
                                num_train_epochs=8, per_device_train_batch_size=6, **precision))
    assert results["eval_accuracy"] >= 0.85, results
    assert (out / "preprocessor_config.json").is_file() and (out / "confusion_matrix.png").is_file()
    if kind == "full":
        assert AutoModelForImageClassification.from_pretrained(out).config.id2label == {0: "blue", 1: "green",
                                                                                         2: "red"}
    if precision:
        assert {t.dtype for t in load_file(out / "model.safetensors").values() if t.is_floating_point()} == \
            {torch.bfloat16}
        loaded = load_trained_classifier(build_config({"model_name_or_path": str(out)}, source="test"))
        images = sorted(str(p) for p in data.glob("*/*.png"))
        labels = [r["predict"] for r in classify(*loaded[:4], images, saved=loaded[4])]
        assert sum(label == Path(p).parent.name for label, p in zip(labels, images)) >= 0.85 * len(images)


def test_image_paths_from_a_csv_and_a_broken_image(tiny_image_model, tmp_path):
    data = _image_folder(tmp_path / "colours", per_class=4)
    rows = [f"colours/{c}/{i}.png,{c}" for c in ("red", "green", "blue") for i in range(4)]
    (tmp_path / "images.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    results = run_training(_cls(tiny_image_model, str(tmp_path / "images.csv"), tmp_path / "a", num_train_epochs=1,
                                finetuning_type="full"))
    assert "eval_accuracy" in results and data.is_dir()
    (data / "red" / "0.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot open image .*red/0.png"):
        run_training(_cls(tiny_image_model, str(data), tmp_path / "b"))
    assert not (tmp_path / "b").exists()


def test_best_model_by_accuracy_is_kept(tiny_bert, reviews, tmp_path):
    out = tmp_path / "best"
    results = run_training(_cls(tiny_bert, reviews, out, finetuning_type="full", eval_strategy="steps", eval_steps=4,
                                metric_for_best_model="accuracy", load_best_model_at_end=True, learning_rate=2e-2,
                                num_train_epochs=4))
    evals = [r for r in read_log(out) if "eval_accuracy" in r]
    best = next(r for r in evals if r["eval_accuracy"] == max(e["eval_accuracy"] for e in evals))  # first best
    # the last evaluation really is another model: its loss differs by more than any rounding or float noise
    assert best is not evals[-1] and best["eval_loss"] != pytest.approx(evals[-1]["eval_loss"], abs=1e-3)
    # the final model is the one evaluated at the best step, not the last one
    assert results["eval_accuracy"] == best["eval_accuracy"]
    assert results["eval_loss"] == pytest.approx(best["eval_loss"], abs=LOGGED_LOSS)  # the logged one is rounded
    assert not (out / "best_model").exists()  # the best weights became the final model


def test_a_lora_classifier_continues_from_its_adapter(tiny_bert, reviews, tmp_path):
    """adapter_name_or_path continues the saved adapter and head: at learning rate 0 the continued run evaluates
    exactly as the first run ended; data with other labels is refused."""
    first = run_training(_cls(tiny_bert, reviews, tmp_path / "first", finetuning_type="lora",
                              lora_target="query,value", learning_rate=2e-2))
    again = run_training(_cls(tiny_bert, reviews, tmp_path / "again", finetuning_type="lora", learning_rate=0.0,
                              adapter_name_or_path=str(tmp_path / "first"), max_steps=2))
    assert first["eval_accuracy"] >= 0.9 and again["eval_loss"] == first["eval_loss"]
    other = tmp_path / "other.csv"
    other.write_text("review,sentiment\n" + "\n".join(f"the film was {w},{'fun' if i % 2 else 'dull'}"
                                                       for i, w in enumerate(["good", "bad"] * 6)) + "\n")
    with pytest.raises(DataError, match=r"the data's labels \['dull', 'fun'\] are not the \['negative', 'positive'\]"):
        run_training(_cls(tiny_bert, str(other), tmp_path / "x", finetuning_type="lora",
                          adapter_name_or_path=str(tmp_path / "first")))


def test_predict_command_labels_texts_and_files(tiny_bert, reviews, tmp_path, capsys):
    from tuneforge.cli import main

    out = tmp_path / "lora"
    run_training(_cls(tiny_bert, reviews, out, finetuning_type="lora", lora_target="query,value", learning_rate=2e-2))
    common = [f"model_name_or_path={tiny_bert}", f"adapter_name_or_path={out}"]
    assert main(["predict", *common, "--text", "the film was great", "--text", "the plot was awful"]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert [l["predict"] for l in lines] == ["positive", "negative"]
    assert set(lines[0]["probabilities"]) == {"negative", "positive"}
    labelled = tmp_path / "check.csv"
    labelled.write_text("text,label\nthe movie was good,positive\nthe movie was poor,negative\n")
    assert main(["predict", *common, "--file", str(labelled), "--out", str(tmp_path / "p.jsonl")]) == 0
    assert "accuracy 1.0000 on 2 labelled inputs" in capsys.readouterr().out
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("text,label\nthe movie was good,neutral\n")
    assert main(["predict", *common, "--file", str(wrong)]) == 2
    assert "labels ['neutral'] are not among the classifier's labels" in capsys.readouterr().err


def test_decoder_lm_with_a_classification_head(tiny_model, reviews, tmp_path):
    out = tmp_path / "llama-cls"
    results = run_training(_cls(tiny_model, reviews, out, finetuning_type="lora", lora_target="q_proj,v_proj",
                                learning_rate=2e-2))
    assert results["eval_accuracy"] >= 0.9, results  # LlamaForSequenceClassification reads the last real token
