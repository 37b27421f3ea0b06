"""Stage cls: the pooling the head reads (cls / mean / last, read from sentence-transformers configs), saved with the
classifier so predict pools the same way; head+tail truncation of long texts."""

import json

import pytest
import torch
from conftest import run_training
from test_cls import _cls, reviews, tiny_bert  # noqa: F401 (fixtures)

from tuneforge.data.classify import encode_text
from tuneforge.models.load import ModelError
from tuneforge.models.pooling import pool, pooled_logits, resolve_pooling, sentence_transformers_pooling


def _sentence_transformers_files(folder, **modes):
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **modes}))


def test_pooling_is_read_from_a_sentence_transformers_config(tiny_bert, tiny_model, tmp_path):
    from transformers import AutoModelForSequenceClassification

    assert sentence_transformers_pooling(tmp_path) is None  # no modules.json
    _sentence_transformers_files(tmp_path, pooling_mode_mean_tokens=True, pooling_mode_cls_token=False)
    assert sentence_transformers_pooling(tmp_path) == "mean"
    _sentence_transformers_files(tmp_path, pooling_mode_cls_token=True)
    assert sentence_transformers_pooling(tmp_path) == "cls"
    _sentence_transformers_files(tmp_path, pooling_mode_max_tokens=True)  # no equivalent here: the model's default
    assert sentence_transformers_pooling(tmp_path) is None

    bert = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    _sentence_transformers_files(tmp_path, pooling_mode_mean_tokens=True)
    assert resolve_pooling("auto", tmp_path, bert)[0] == "mean"
    assert resolve_pooling("auto", tiny_bert, bert)[0] == "cls"  # an encoder without such a config
    assert resolve_pooling("last", tmp_path, bert)[0] == "last"  # an explicit choice wins
    llama = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    assert resolve_pooling("auto", tiny_model, llama)[0] == "last"
    with pytest.raises(ModelError, match="decoder, whose first token sees only itself"):
        resolve_pooling("cls", tiny_model, llama)


def test_mean_pooling_ignores_padding(tiny_bert):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()
    short, long = "the film was great", "the movie was a bad film the plot was poor the acting was awful"
    alone = tokenizer([short], return_tensors="pt")
    padded = tokenizer([short, long], return_tensors="pt", padding=True)
    assert padded["attention_mask"][0].sum() < padded["attention_mask"].shape[1]  # the short row really is padded
    with torch.no_grad():
        hidden_alone = model.bert(**alone).last_hidden_state
        hidden_padded = model.bert(**padded).last_hidden_state
        mean_alone = pool(hidden_alone, alone["attention_mask"], "mean")[0]
        mean_padded = pool(hidden_padded, padded["attention_mask"], "mean")[0]
        logits_alone = pooled_logits(model, dict(alone), "mean")[0]
        logits_padded = pooled_logits(model, dict(padded), "mean")[0]
    # float32 on LayerNorm-scaled values (order 1): the padded batch runs matmuls of another shape, whose reduction
    # order differs by a few ulps (1e-7 each) per layer; 1e-5 is far below what one padding position adds (below)
    assert torch.allclose(mean_alone, mean_padded, atol=1e-5)
    assert torch.allclose(logits_alone, logits_padded, atol=1e-5)
    unmasked = hidden_padded[0].mean(0)  # what a mean over the padding too would give: visibly different
    assert not torch.allclose(unmasked, mean_alone, atol=1e-2)


def test_last_token_pooling_finds_the_last_real_token_on_either_side():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool(hidden, right, "last").flatten().tolist() == [1.0, 7.0]
    assert pool(hidden, left, "last").flatten().tolist() == [3.0, 7.0]
    assert pool(hidden, right, "mean").flatten().tolist() == [0.5, 5.5]


def test_head_tail_truncation_token_for_token(tiny_bert):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    vocab = tokenizer.get_vocab()
    words = "the movie was good the plot was bad the acting was fine a film".split()  # 14 tokens
    text = " ".join(words)
    ids = [vocab[w] for w in words]
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    # cutoff 10: 8 tokens after [CLS] and [SEP]; the head keeps 8 // 4 = 2, the tail the other 6
    assert encode_text(tokenizer, text, 10, "head_tail")["input_ids"] == [cls, *ids[:2], *ids[-6:], sep]
    assert encode_text(tokenizer, text, 10, "head")["input_ids"] == [cls, *ids[:8], sep]
    # cutoff 7: 5 tokens, 1 from the head and 4 from the tail
    assert encode_text(tokenizer, text, 7, "head_tail")["input_ids"] == [cls, ids[0], *ids[-4:], sep]
    # a text that fits stays whole
    assert encode_text(tokenizer, text, 16, "head_tail")["input_ids"] == [cls, *ids, sep]


def test_mean_pooled_classifier_learns_and_predict_pools_the_same_way(tiny_bert, reviews, tmp_path, capsys):
    from tuneforge.cli import main

    out = tmp_path / "mean"
    results = run_training(_cls(tiny_bert, reviews, out, finetuning_type="lora", lora_target="query,value",
                                learning_rate=2e-2, cls_pooling="mean", cls_truncation="head_tail", cutoff_len=8,
                                do_predict=True))
    assert results["eval_accuracy"] >= 0.9, results
    saved = json.loads((out / "label_map.json").read_text())
    assert (saved["pooling"], saved["truncation"], saved["cutoff_len"]) == ("mean", "head_tail", 8)
    trained = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()][:6]
    file = tmp_path / "texts.txt"
    file.write_text("\n".join(r["text"] for r in trained) + "\n")
    assert main(["predict", f"model_name_or_path={tiny_bert}", f"adapter_name_or_path={out}", "--file", str(file)]) == 0
    predicted = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    # the same probabilities as training's own evaluation (both rounded to 4 decimals; float noise is ~1e-6):
    # pooling with the first token instead would give other numbers
    for p, t in zip(predicted, trained):
        assert p["probabilities"] == pytest.approx(t["probabilities"], abs=2e-4), (p, t)


def test_pooling_options_are_for_text_classifiers_only(tiny_model, tmp_path):
    from tuneforge.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="`cls_pooling` applies to stage cls only"):
        load_config(None, [f"model_name_or_path={tiny_model}", "stage=sft", "cls_pooling=mean",
                           f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="`cls_pooling` must be one of auto, cls, mean, last"):
        load_config(None, [f"model_name_or_path={tiny_model}", "stage=cls", "cls_pooling=max",
                           f"output_dir={tmp_path}"])
