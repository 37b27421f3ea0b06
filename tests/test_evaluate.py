"""`tuneforge eval` (multiple-choice benchmarks, before/after) and the generation metrics of sft `do_predict`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tuneforge.cli import main
from tuneforge.config import ConfigError, build_config, validate
from tuneforge.evaluate import (Subject, choice_logits, choice_token_ids, evaluate, load_task, option_ids,
                                option_scores, question_ids, read_questions)
from tuneforge.infer.engine import Engine
from tuneforge.train.metrics import generation_scores
from tuneforge.user_code import load_user_function

BUNDLED = Path(__file__).resolve().parents[1] / "evaluation"

Q1 = {"question": "What is 2 + 2?", "A": "3", "B": "4", "C": "5", "D": "22", "answer": "B"}
Q2 = {"question": "Who are you?", "A": "a fox", "B": "a dog", "C": "an assistant", "D": "the sea", "answer": "C"}
Q3 = {"question": "Translate hello.", "A": "Bonjour", "B": "Hola", "C": "Ciao", "D": "Hallo", "answer": "A"}

# LLaMA-Factory's en / zh wording, written out here rather than taken from the code under test
HEAD = {"en": "The following are multiple choice questions (with answers) about arithmetic.\n\n",
        "zh": "以下是中国关于arithmetic考试的单项选择题，请选出其中的正确答案。\n\n"}
CUE = {"en": "\nAnswer:", "zh": "\n答案："}


def _cfg(model: str, **values):
    cfg = build_config({"model_name_or_path": model, "template": "chatml", "task": "basics_test",
                        "task_dir": str(BUNDLED), **values}, source="test")
    validate(cfg, "eval")
    return cfg


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(_cfg(tiny_model))


def _expected(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_zero_shot_prompt_token_for_token(engine, tiny_model, lang):
    cfg = _cfg(tiny_model, n_shot=0, lang=lang)
    subject = Subject("sums", "arithmetic", "STEM", [Q1], [])
    ids, cut = question_ids(engine, subject, 0, cfg, "test")
    head, cue = HEAD[lang], CUE[lang]
    text = (f"<|im_start|>user\n{head}What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22{cue}<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert ids == _expected(engine.tokenizer, text)
    assert not cut


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_few_shot_prompt_token_for_token(engine, tiny_model, lang):
    """Two dev examples become two earlier user/assistant turns; the subject line opens the first of them only."""
    cfg = _cfg(tiny_model, n_shot=2, lang=lang)
    subject = Subject("sums", "arithmetic", "STEM", [Q1], [Q2, Q3])
    ids, _ = question_ids(engine, subject, 0, cfg, "test")
    head, cue = HEAD[lang], CUE[lang]
    turns = {
        "Q2": f"Who are you?\nA. a fox\nB. a dog\nC. an assistant\nD. the sea{cue}<|im_end|>\n<|im_start|>assistant\n"
              "C<|im_end|>\n",
        "Q3": f"Translate hello.\nA. Bonjour\nB. Hola\nC. Ciao\nD. Hallo{cue}<|im_end|>\n<|im_start|>assistant\n"
              "A<|im_end|>\n",
    }
    last = f"<|im_start|>user\nWhat is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22{cue}<|im_end|>\n<|im_start|>assistant\n"
    renderings = [f"<|im_start|>user\n{head}{turns[a]}<|im_start|>user\n{turns[b]}{last}" for a, b in
                  (("Q2", "Q3"), ("Q3", "Q2"))]  # the seeded sample decides the order of the two examples
    assert ids in [_expected(engine.tokenizer, text) for text in renderings]
    again, _ = question_ids(engine, subject, 0, cfg, "test")
    assert again == ids  # the same seed shows the same examples


def test_examples_are_dropped_to_fit_cutoff_len(engine, tiny_model):
    subject = Subject("sums", "arithmetic", "STEM", [Q1], [Q2, Q3])
    zero, _ = question_ids(engine, subject, 0, _cfg(tiny_model, n_shot=0), "test")
    ids, cut = question_ids(engine, subject, 0, _cfg(tiny_model, n_shot=2, cutoff_len=len(zero) + 5), "test")
    assert cut and ids == zero


def test_choice_tokens_are_the_letters(engine):
    assert choice_token_ids(engine.tokenizer) == [_expected(engine.tokenizer, c)[-1] for c in "ABCD"]


def letter_model(folder: Path, tiny_model: str, letter: str) -> str:
    """A tiny Llama that answers `letter` after any prompt: every token has the same embedding, the layers add
    nothing to the residual stream, and the output head gives that letter's token a positive logit, every other
    token 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.encode(letter, add_special_tokens=False)[-1]] = 1.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _share(letter: str) -> dict:
    """Per subject: the share (percent) of the bundled task's test answers that are `letter`, read from the CSVs."""
    shares = {}
    for path in sorted((BUNDLED / "basics" / "test").glob("*.csv")):
        with path.open(encoding="utf-8") as handle:
            answers = [row["answer"] for row in csv.DictReader(handle)]
        shares[path.stem.removesuffix("_test")] = (100 * answers.count(letter) / len(answers), len(answers))
    return shares


@pytest.fixture(scope="module")
def letter_models(tiny_model, tmp_path_factory) -> dict:
    return {letter: letter_model(tmp_path_factory.mktemp(f"always-{letter}"), tiny_model, letter) for letter in "AC"}


def test_a_model_that_always_says_c_scores_the_share_of_c_answers(letter_models):
    cfg = _cfg(letter_models["C"], n_shot=3, batch_size=3)  # batches mix prompts of different lengths
    results = evaluate(cfg, Engine(cfg), load_task(str(BUNDLED), "basics_test", n_shot=3))
    shares = _share("C")
    for key, (share, count) in shares.items():
        got = results["subjects"][key]
        assert got["accuracy"] == pytest.approx(share) and got["count"] == count
        assert set(results["subjects"][key]["predictions"]) == {"C"}
    mapping = json.loads((BUNDLED / "basics" / "mapping.json").read_text())
    for category in {v["category"] for v in mapping.values()}:
        keys = [k for k, v in mapping.items() if v["category"] == category]
        hits = sum(shares[k][0] * shares[k][1] / 100 for k in keys)
        expected = 100 * hits / sum(shares[k][1] for k in keys)
        assert results["categories"][category]["accuracy"] == pytest.approx(expected)
    total = sum(c for _, c in shares.values())
    assert results["accuracy"] == pytest.approx(sum(s * c for s, c in shares.values()) / total)
    assert 0 < results["accuracy"] < 100  # the bundled task's answers are spread over the letters


def test_left_padding_does_not_change_the_scores(engine, tiny_model):
    """A random model's option logits are those after each prompt's last token, alone and in a padded batch."""
    cfg = _cfg(tiny_model, n_shot=1)
    subject = Subject("sums", "arithmetic", "STEM", [Q1, Q2, Q3], [Q2, Q3, Q1])
    prompts = [question_ids(engine, subject, i, cfg, "test")[0] for i in range(3)]
    assert len(set(map(len, prompts))) > 1
    choices = choice_token_ids(engine.tokenizer)
    alone = choice_logits(engine.model, prompts, choices, engine.tokenizer.pad_token_id, batch_size=1)
    batched = choice_logits(engine.model, prompts, choices, engine.tokenizer.pad_token_id, batch_size=3)
    with torch.no_grad():
        direct = torch.stack([engine.model(input_ids=torch.tensor([p])).logits[0, -1, choices] for p in prompts])
    # float32 matmuls of a different batch shape sum in a different order: ~1e-6 relative on logits of size ~1
    torch.testing.assert_close(alone, direct, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)
    assert alone.std() > 1e-3  # a random model, not a constant one: the comparison can fail


def test_option_scoring_answers_examples_with_the_text(engine, tiny_model):
    cfg = _cfg(tiny_model, n_shot=1, scoring="option")
    ids, _ = question_ids(engine, Subject("sums", "arithmetic", "STEM", [Q1], [Q2]), 0, cfg, "test")
    text = ("<|im_start|>user\nThe following are multiple choice questions (with answers) about arithmetic.\n\n"
            "Who are you?\nA. a fox\nB. a dog\nC. an assistant\nD. the sea\nAnswer:<|im_end|>\n<|im_start|>assistant\n"
            "an assistant<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert ids == _expected(engine.tokenizer, text)
    assert option_ids(engine, Q1)[3] == _expected(engine.tokenizer, "22<|im_end|>")


def test_cloze_scoring_asks_the_bare_question(engine, tiny_model):
    """No subject line and no listed options: the dev example and the question are asked as in a chat."""
    cfg = _cfg(tiny_model, n_shot=1, scoring="cloze")
    ids, _ = question_ids(engine, Subject("sums", "arithmetic", "STEM", [Q1], [Q2]), 0, cfg, "test")
    text = ("<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\nan assistant<|im_end|>\n"
            "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")
    assert ids == _expected(engine.tokenizer, text)


def test_bundled_quickstart_task_tests_the_name_and_the_forgetting():
    """Identity questions are right only with the new name; every general question offers the identity answer as a
    wrong option, so a model that forgot (answering everything with its name) scores 0 there."""
    identity, general = load_task(str(BUNDLED), "quickstart_test", 0)
    assert [s.key for s in (identity, general)] == ["identity", "general"]
    for row in identity.questions:
        assert "Forgewright" in row[row["answer"]]
        assert not any("Forgewright" in row[c] for c in "ABCD" if c != row["answer"])
    for row in general.questions:
        assert "Forgewright" not in row[row["answer"]]
        assert any("Forgewright" in row[c] for c in "ABCD")
    assert len(identity.questions) == len(general.questions) == 12
    # no option is a training answer: an answer the adapter memorised verbatim would win by memory, not by meaning
    data = Path(__file__).resolve().parents[1] / "data"
    trained = {r["output"] for name in ("identity.json", "general.json")
               for r in json.loads((data / name).read_text(encoding="utf-8"))}
    assert not {row[c] for s in (identity, general) for row in s.questions for c in "ABCD"} & trained


def test_option_scores_are_log_probabilities_of_the_option_tokens(engine, tiny_model):
    cfg = _cfg(tiny_model, n_shot=0, scoring="option")
    subject = Subject("sums", "arithmetic", "STEM", [Q1, Q2, Q3], [])
    prompts = [question_ids(engine, subject, i, cfg, "test")[0] for i in range(3)]
    options = [option_ids(engine, row) for row in subject.questions]
    expected = []
    with torch.no_grad():
        for prompt, answers in zip(prompts, options):
            for answer in answers:
                logits = engine.model(input_ids=torch.tensor([prompt + answer])).logits[0].log_softmax(-1)
                expected.append(sum(logits[len(prompt) - 1 + k, token] for k, token in enumerate(answer)))
    expected = torch.stack(expected).view(3, 4)
    pad = engine.tokenizer.pad_token_id
    for batch_size in (1, 2):  # 2 questions: 8 rows of different lengths, left-padded together
        # float32 sums in a different order for another batch shape: ~1e-6 relative on log-probs of size ~20
        torch.testing.assert_close(option_scores(engine.model, prompts, options, pad, batch_size), expected,
                                   rtol=1e-4, atol=1e-4)
    assert expected.std() > 1e-3  # a random model's options differ, so a wrong position would show


def test_before_after_prints_both_and_the_change(letter_models, tmp_path, capsys):
    save = tmp_path / "results"
    rc = main(["eval", f"model_name_or_path={letter_models['A']}", "template=chatml", f"task_dir={BUNDLED}",
               "task=basics_test", "n_shot=0", f"save_dir={save}",
               "--compare", f"model_name_or_path={letter_models['C']}"])
    assert rc == 0
    out = capsys.readouterr().out
    a, c = _share("A"), _share("C")
    total = sum(n for _, n in a.values())
    before = sum(s * n for s, n in a.values()) / total
    after = sum(s * n for s, n in c.values()) / total
    lines = out.splitlines()
    header = max(i for i, line in enumerate(lines) if line.split() == ["before", "after", "change"])
    table = {line.split()[0]: line.split()[1:] for line in lines[header + 1:] if line.strip()}
    assert table["Average"] == [f"{before:.2f}", f"{after:.2f}", f"{after - before:+.2f}"]
    a_arith, c_arith = a["arithmetic"][0], c["arithmetic"][0]
    assert table["arithmetic"] == [f"{a_arith:.2f}", f"{c_arith:.2f}", f"{c_arith - a_arith:+.2f}"]
    assert "STEM" in table and "Humanities" in table
    saved = json.loads((save / "comparison.json").read_text())
    assert saved["change"]["accuracy"] == pytest.approx(after - before)
    assert saved["change"]["categories"]["STEM"] == pytest.approx(
        saved["after"]["categories"]["STEM"]["accuracy"] - saved["before"]["categories"]["STEM"]["accuracy"])
    assert (save / "before" / "results.json").is_file() and (save / "after" / "results.log").is_file()


def test_compare_refuses_save_dir_after_it_and_a_missing_adapter_before_any_run(tiny_model, tmp_path, capsys):
    common = ["eval", f"model_name_or_path={tiny_model}", f"task_dir={BUNDLED}", "task=basics_test", "n_shot=0"]
    rc = main([*common, "--compare", f"save_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "save_dir" in err and "before --compare" in err and not (tmp_path / "r").exists()
    (tmp_path / "run").mkdir()  # an output_dir whose training never finished: no adapter in it
    rc = main([*common, "--compare", f"adapter_name_or_path={tmp_path / 'run'}"])
    captured = capsys.readouterr()
    assert rc == 2 and len(captured.err.strip().splitlines()) == 1 and "adapter_config.json" in captured.err
    assert "before:" not in captured.out  # refused before the first run


def test_save_dir_is_never_overwritten(tiny_model, tmp_path, capsys):
    save = tmp_path / "results"
    save.mkdir()
    (save / "results.json").write_text("earlier run")
    rc = main(["eval", f"model_name_or_path={tiny_model}", f"task_dir={BUNDLED}", "task=basics_test",
               f"save_dir={save}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "already exists" in err and str(save) in err and len(err.splitlines()) == 1
    assert (save / "results.json").read_text() == "earlier run"


def test_hub_task_without_a_local_copy_says_how_to_point_task_dir(tiny_model, tmp_path, capsys):
    rc = main(["eval", f"model_name_or_path={tiny_model}", f"task_dir={tmp_path}", "task=mmlu_test"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "task_dir" in err and "evaluation/mmlu" in err and "mmlu.zip" in err
    rc = main(["eval", f"model_name_or_path={tiny_model}", f"task_dir={BUNDLED}", "task=basic_test"])
    err = capsys.readouterr().err
    assert rc == 2 and f"task folders in {BUNDLED}: basics, quickstart)" in err


def test_task_files_are_checked_with_file_and_row(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("question,A,B,C,D,answer\nWhat?,1,2,3,4,E\n")
    with pytest.raises(Exception, match=r"bad\.csv row 2: answer 'E' is not one of A, B, C, D"):
        read_questions(bad)
    headerless = tmp_path / "mmlu_style.csv"
    headerless.write_text('"What, exactly?",1,2,3,4,b\n')
    assert read_questions(headerless) == [{"question": "What, exactly?", "A": "1", "B": "2", "C": "3", "D": "4",
                                           "answer": "B"}]


# ---------------------------------------------------------------- item 4: generation metrics of do_predict


@pytest.mark.parametrize("path", ["hidden states, the head in chunks", "the model's logits"])
def test_eval_accuracy_is_a_mean_over_examples(tiny_model, path):
    """compute_accuracy's eval_accuracy as LLaMA-Factory reports it: each example's share of its target tokens
    predicted right, averaged over examples; a long example counts as much as a short one. On 16 alpaca_en_demo
    records LLaMA-Factory 0.9.5 gave 0.559459 and tuneforge 0.559459; over all tokens it would be 0.607."""
    from transformers import AutoModelForCausalLM

    from tuneforge.train.losses import CausalLMLoss
    from tuneforge.train.steps import metric_means

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    module = CausalLMLoss(model, chunk_size=3, compute_accuracy=True).eval()
    if path == "the model's logits":
        module.split = None
    torch.manual_seed(0)
    with torch.no_grad():  # the model's own greedy continuations, a few tokens changed: some right, some wrong
        input_ids = model.generate(torch.randint(3, 300, (3, 4)), attention_mask=torch.ones(3, 4, dtype=torch.long),
                                   max_new_tokens=8, do_sample=False, pad_token_id=0)
    input_ids[0, 6], input_ids[1, 10], input_ids[1, 11] = 5, 6, 7
    labels = input_ids.clone()
    labels[0, :4], labels[1, :9], labels[2, :] = -100, -100, -100  # 8 and 3 target tokens; none in the third row
    attention_mask = torch.ones_like(input_ids)
    _, sums = module(input_ids=input_ids, labels=labels, attention_mask=attention_mask)
    with torch.no_grad():
        right = model(input_ids=input_ids).logits[:, :-1].argmax(-1) == input_ids[:, 1:]
    targets = labels[:, 1:] != -100
    shares = [((right[i] & targets[i]).sum() / targets[i].sum()).item() for i in range(2)]
    assert 0 < shares[1] < shares[0] < 1  # unequal, so that a mean over tokens would differ
    expected = sum(shares) / 2
    assert metric_means({k: v.item() for k, v in sums.items()}, 1)["accuracy"] == pytest.approx(expected)


def test_generation_scores_are_llamafactorys():
    """BLEU-4 on characters and ROUGE on jieba's words: the figures LLaMA-Factory 0.9.5's ComputeSimilarity gave for
    these pairs (run on their token ids in its own venv), to its 4 decimals: pure Python arithmetic (nltk,
    rouge_chinese), the same on every machine."""
    lf = {("The cat sat on the mat.", "The cat sits on the mat!"): (71.4286, 50.0, 71.4286, 76.0681),
          ("Paris is the capital of France.", "Paris"): (25.0, 0.0, 25.0, 11.2276),
          ("", "Oslo"): (0.0, 0.0, 0.0, 0.0),
          ("巴黎是法国的首都。", "法国的首都是巴黎。"): (100.0, 40.0, 66.6667, 54.6633)}
    for (prediction, label), figures in lf.items():
        scores = generation_scores([prediction], [label])
        assert tuple(scores[f"predict_{k}"] for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")) == figures


def test_exact_match_ignores_surrounding_whitespace_only():
    scores = generation_scores(["Paris ", "paris", "Rome"], ["Paris", "Paris", "Oslo"])
    assert scores["predict_exact_match"] == pytest.approx(100 / 3)


def test_user_metric_function(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("mine.py").write_text("def first_word(preds, refs):\n"
                               "    return {'first_word': 100 * sum(p.split()[:1] == r.split()[:1] "
                               "for p, r in zip(preds, refs)) / len(refs), 'count': len(refs)}\n"
                               "def length(preds, refs):\n    return sum(map(len, preds))\n")
    scores = generation_scores(["Paris is", "Rome"], ["Paris", "Oslo"], load_user_function("mine.py:first_word", "predict_metric"))
    assert scores["predict_first_word"] == 50.0 and scores["predict_count"] == 2.0
    assert generation_scores(["ab", "c"], ["x", "y"], load_user_function("mine.py:length", "predict_metric"))["predict_length"] == 3.0
    with pytest.raises(ConfigError, match="returned 'high'; expected a number or a dict"):
        generation_scores(["a"], ["b"], lambda preds, refs: "high")


@pytest.mark.parametrize("spec, message", [
    ("mine.py", "expected path.py:function"),
    ("missing.py:f", "missing.py not found"),
    ("mine.py:nope", "mine.py has no function 'nope' (it defines: length)"),
    ("broken.py:f", "importing broken.py failed: NameError"),
])
def test_bad_user_metric_is_one_line(tmp_path, monkeypatch, spec, message):
    monkeypatch.chdir(tmp_path)
    Path("mine.py").write_text("def length(preds, refs):\n    return 1\n")
    Path("broken.py").write_text("undefined_name\n")
    with pytest.raises(ConfigError, match="predict_metric") as info:
        load_user_function(spec, "predict_metric")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_sft_predict_reports_exact_match_and_the_user_metric(tiny_model, alpaca_file, tmp_path, monkeypatch):
    from conftest import run_training

    monkeypatch.chdir(tmp_path)
    Path("metric.py").write_text("def answered(preds, refs):\n"
                                 "    return 100 * sum(bool(p) for p in preds) / len(preds)\n")
    results = run_training(dict(model_name_or_path=tiny_model, dataset=alpaca_file, template="chatml",
                                output_dir=str(tmp_path / "out"), cutoff_len=64, per_device_train_batch_size=4,
                                do_train=True, max_steps=1, val_size=4, do_predict=True, predict_with_generate=True,
                                max_new_tokens=4, do_sample=False, predict_metric="metric.py:answered",
                                report_to="none"))
    assert {"predict_bleu-4", "predict_rouge-l", "predict_exact_match", "predict_answered"} <= set(results)
    saved = [json.loads(line) for line in (tmp_path / "out" / "generated_predictions.jsonl").read_text().splitlines()]
    assert results["predict_answered"] == pytest.approx(100 * sum(bool(r["predict"]) for r in saved) / len(saved))


def test_predict_metric_needs_do_predict(tiny_model, alpaca_file, tmp_path):
    cfg = build_config(dict(model_name_or_path=tiny_model, dataset=alpaca_file, output_dir=str(tmp_path), do_train=True,
                            predict_metric="metric.py:f"), source="test")
    with pytest.raises(ConfigError, match="needs `do_predict: true`"):
        validate(cfg, "train")
