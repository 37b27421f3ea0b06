import itertools
import json

import pytest
from conftest import learned_spans, write_jsonl

from tuneforge.config import DataArgs
from tuneforge.data import load_examples
from tuneforge.data.encode import IGNORE, encode_pretrain, encode_prompt, encode_supervised, split_budget
from tuneforge.data.formats import Example
from tuneforge.data.registry import DataError
from tuneforge.data.templates import TEMPLATES, TokenizerTemplate, get_template


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


CONVERSATION = {"conversations": [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "Who are you?"},
    {"from": "gpt", "value": "I am Tiny."},
    {"from": "human", "value": "What is two plus two?"},
    {"from": "gpt", "value": "Four."},
]}


def _sharegpt_example(tmp_path) -> Example:
    path = write_jsonl(tmp_path / "chat.jsonl", [CONVERSATION])
    return load_examples(str(path), DataArgs(dataset_dir=str(tmp_path)), "sft", seed=0)[0]


@pytest.mark.parametrize("template_name", ["chatml", None])
def test_labels_are_exactly_the_assistant_tokens(tmp_path, tokenizer, template_name):
    example = _sharegpt_example(tmp_path)
    assert example.system == "Be brief." and [m["role"] for m in example.messages] == ["user", "assistant"] * 2
    template = get_template(template_name, tokenizer)
    row = encode_supervised(example, tokenizer, template, cutoff_len=512)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected = []  # each answer's own tokens followed by the end-of-turn token, nothing else
    for answer in ("I am Tiny.", "Four."):
        expected.append(tokenizer.encode(answer, add_special_tokens=False) + [im_end])
    assert learned_spans(row) == expected


def test_chatml_matches_the_tokenizer_chat_template(tmp_path, tokenizer):
    example = _sharegpt_example(tmp_path)
    chat = [{"role": "system", "content": example.system}] + example.messages
    reference = tokenizer.apply_chat_template(chat, tokenize=False)
    for template in (TEMPLATES["chatml"], TokenizerTemplate(tokenizer)):
        row = encode_supervised(example, tokenizer, template, cutoff_len=512)
        # the reference ends with "<|im_end|>\n"; that last newline is never trained and not needed
        assert row["input_ids"] == tokenizer.encode(reference.rstrip("\n"), add_special_tokens=False)
    prompt = encode_prompt(example.messages[:1], tokenizer, TEMPLATES["chatml"], "Be brief.")
    expected = tokenizer.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == tokenizer.encode(expected, add_special_tokens=False)


def test_alpaca_history_system_and_masks(tmp_path, tokenizer):
    rows = [{"instruction": "Add", "input": "1 and 2", "output": "3", "system": "Math.", "history": [["Hi", "Hello"]]}]
    example = load_examples(str(write_jsonl(tmp_path / "a.jsonl", rows)), DataArgs(), "sft", 0)[0]
    assert example.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                {"role": "user", "content": "Add\n1 and 2"}, {"role": "assistant", "content": "3"}]
    template = TEMPLATES["chatml"]
    full = encode_supervised(example, tokenizer, template, 512)
    masked = encode_supervised(example, tokenizer, template, 512, mask_history=True)
    prompt_too = encode_supervised(example, tokenizer, template, 512, train_on_prompt=True)
    learned = lambda r: tokenizer.decode([t for t, l in zip(r["input_ids"], r["labels"]) if l != IGNORE])
    assert learned(full) == "Hello<|im_end|>3<|im_end|>"
    assert learned(masked) == "3<|im_end|>"
    assert prompt_too["labels"] == prompt_too["input_ids"]


def test_truncation_keeps_within_cutoff_and_drops_unlearnable(tokenizer):
    example = Example(messages=[{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok " * 50}])
    row = encode_supervised(example, tokenizer, TEMPLATES["default"], cutoff_len=64)
    assert len(row["input_ids"]) == 64 and any(l != IGNORE for l in row["labels"])
    assert split_budget(10, 100, 64) == (10, 54) and split_budget(100, 10, 64) == (54, 10)
    assert split_budget(100, 100, 64) == (32, 32) and split_budget(3, 4, 64) == (3, 4)


def test_pretrain_concatenates_and_chunks(tokenizer):
    docs = [Example(text="The quick brown fox jumps over the lazy dog.") for _ in range(10)]
    blocks = encode_pretrain(docs, tokenizer, cutoff_len=32)
    stream = sum((tokenizer.encode(d.text) + [tokenizer.eos_token_id] for d in docs), [])
    assert [t for b in blocks for t in b["input_ids"]] == stream
    assert all(len(b["input_ids"]) == 32 for b in blocks[:-1]) and blocks[0]["labels"] == blocks[0]["input_ids"]


def test_registry_and_txt(tmp_path):
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": "yo"}]}])
    (tmp_path / "corpus.txt").write_text("first document\n\nsecond document\n")
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "chat": {"file_name": "chat.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
                 "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                          "assistant_tag": "assistant"}},
        "corpus": {"file_name": "corpus.txt", "columns": {"prompt": "text"}}}))
    args = DataArgs(dataset_dir=str(tmp_path))
    assert load_examples("chat", args, "sft", 0)[0].messages[1] == {"role": "assistant", "content": "yo"}
    assert [e.text for e in load_examples("corpus", args, "pt", 0)] == ["first document", "second document"]


@pytest.mark.parametrize("content, dataset, message", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', "bad.jsonl",
     r"bad.jsonl line 2 column \d+: not valid JSON"),
    ('{"instruction": "a", "Output": "b"}\n', "bad.jsonl", r"bad.jsonl line 1: missing field `output` \(found `Output`"),
    ('{"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}\n', "bad.jsonl",
     r"bad.jsonl line 1: `conversations\[0\]` is a `gpt` turn where a user turn was expected"),
    ('{"conversations": [{"from": "human", "value": "x"}]}\n', "bad.jsonl", "needs user/assistant pairs"),
    ("", "bad.jsonl", "holds no records"),
    ('{"instruction": "a", "output": "b"}\n', "alpacca", "neither in .* nor an existing file"),
])
def test_bad_data_errors_name_the_place(tmp_path, content, dataset, message):
    (tmp_path / "bad.jsonl").write_text(content)
    path = str(tmp_path / dataset) if dataset.endswith("jsonl") else dataset
    with pytest.raises(DataError, match=message):
        load_examples(path, DataArgs(dataset_dir=str(tmp_path)), "sft", 0)


def test_non_utf8_and_unknown_registry_name(tmp_path):
    (tmp_path / "latin.jsonl").write_bytes(b'{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(DataError, match="latin.jsonl line 1: bytes that are not UTF-8"):
        load_examples(str(tmp_path / "latin.jsonl"), DataArgs(), "sft", 0)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"identity": {"file_name": "latin.jsonl"}}))
    with pytest.raises(DataError, match="did you mean identity"):
        load_examples("identiy", DataArgs(dataset_dir=str(tmp_path)), "sft", 0)


def test_packed_rows_cover_every_token_once(tokenizer):
    from tuneforge.data.collate import PadCollator, pack_rows

    rows = [{"input_ids": list(range(n)), "labels": list(range(n))} for n in (5, 9, 3, 7, 2, 8)]
    packed = pack_rows(rows, cutoff_len=10)
    assert all(len(r["input_ids"]) <= 10 for r in packed) and len(packed) == 4
    assert sorted(len(r["input_ids"]) for r in packed) == [5, 9, 10, 10]  # best fit: 9 | 8+2 | 7+3 | 5
    assert sum(r["position_ids"].count(0) for r in packed) == 6  # one restart per example
    for row in packed:  # each example's first label is masked so it is never predicted from its neighbour
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert all(row["labels"][i] == IGNORE for i in starts)
    batch = PadCollator(0)(packed[:2])
    assert "attention_mask" not in batch and batch["num_tokens"] == 19  # rows of 9 and 10 tokens
    assert batch["input_ids"].shape == (2, 16)  # padded to a multiple of 8: one kernel shape per 8 widths


@pytest.mark.parametrize("template", ["chatml", None], ids=["named-template", "tokenizer-template"])
def test_tokenised_data_is_cached(tiny_model, tmp_path, monkeypatch, template):
    from tuneforge import data as data_module
    from tuneforge.config import build_config

    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(6)])
    calls = []
    real = data_module.encode_supervised_batch
    monkeypatch.setattr(data_module, "encode_supervised_batch",
                        lambda batch, *a, **k: calls.extend([1] * len(batch)) or real(batch, *a, **k))

    def prepare(**extra):
        from transformers import AutoTokenizer

        cfg = build_config({"model_name_or_path": tiny_model, "dataset": str(path), "template": template,
                            "output_dir": str(tmp_path / "o"), "do_train": True, **extra})
        calls.clear()
        return data_module.prepare_lm_data(cfg, AutoTokenizer.from_pretrained(tiny_model))

    first = prepare()
    assert len(calls) == 6
    again = prepare()
    assert calls == [] and again.train == first.train and again.template is not None  # tokenisation skipped
    prepare(overwrite_cache=True)
    assert len(calls) == 6
    prepare(cutoff_len=128)  # a different setting is a different cache entry
    assert len(calls) == 6
    write_jsonl(path, [{"instruction": f"q{i}", "output": f"b{i}"} for i in range(6)])  # changed data
    assert prepare().train != first.train and len(calls) == 6
    saved = prepare(tokenized_path=str(tmp_path / "tok"))
    assert (tmp_path / "tok" / "tokenized.pkl").is_file() and len(calls) == 6
    assert prepare(tokenized_path=str(tmp_path / "tok")).train == saved.train and calls == []


def test_arrow_files_split_folders_and_hub_entries(tmp_path):
    import datasets

    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(4)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))  # a folder of .arrow + JSON metadata
    (tmp_path / "splits").mkdir()
    write_jsonl(tmp_path / "splits" / "train.jsonl", rows[:3])
    write_jsonl(tmp_path / "splits" / "test.jsonl", rows[3:])
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "saved": {"file_name": "saved"}, "train_part": {"file_name": "splits"},
        "test_part": {"file_name": "splits", "split": "test"},
        "hub": {"hf_hub_url": "org/data", "file_name": "splits"}}))
    args = DataArgs(dataset_dir=str(tmp_path))
    assert [e.messages[1]["content"] for e in load_examples("saved", args, "sft", 0)] == ["a0", "a1", "a2", "a3"]
    assert len(load_examples("train_part", args, "sft", 0)) == 3
    assert [e.messages[1]["content"] for e in load_examples("test_part", args, "sft", 0)] == ["a3"]
    from tuneforge.data.registry import resolve

    assert resolve("hub", str(tmp_path))[0].hub == "org/data"  # the first source present wins, as in LLaMA-Factory
    # the hub path is datasets.load_dataset, which takes a repository id or (here, offline) a local dataset folder
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "hub_test": {"hf_hub_url": str(tmp_path / "splits"), "split": "test"}}))
    examples = load_examples("hub_test", args, "sft", 0)
    assert [e.messages[1]["content"] for e in examples] == ["a3"] and "[test] record 0" in examples[0].where


def test_num_samples_picks_what_llamafactory_picks(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"question {i}", "output": "x"} for i in range(10)])
    write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"query {i}", "output": "x"} for i in range(3)])
    (tmp_path / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.jsonl", "num_samples": 4},
                                                            "b": {"file_name": "b.jsonl", "num_samples": 5}}))
    picked = load_examples("a,b", DataArgs(dataset_dir=str(tmp_path)), "sft", 42)
    # LLaMA-Factory 0.9.5 picked these from the same files with seed 42: the second dataset, asked for more than it
    # has, gives all of its records and then draws with replacement
    assert [e.messages[0]["content"] for e in picked] == ["question 8", "question 1", "question 5", "question 0",
                                                          "query 1", "query 0", "query 2", "query 2", "query 2"]
    # b as the evaluation dataset: LLaMA-Factory draws its samples after the training datasets', from one generator
    from tuneforge.config import build_config
    from tuneforge.data import load_splits

    train, held = load_splits(build_config({"dataset": "a", "eval_dataset": "b", "dataset_dir": str(tmp_path)}))
    assert [e.messages[0]["content"] for e in train + held] == [e.messages[0]["content"] for e in picked]


def test_mix_strategies(tmp_path):
    from tuneforge.config import ConfigError, build_config, validate
    from tuneforge.data import mix

    a, b = list("abc"), list("12345")
    assert mix([a, b], "concat", None, 0) == a + b
    assert mix([a, b], "interleave_under", None, 0) == ["a", "1", "b", "2", "c", "3"]  # whole rounds
    assert mix([a, b], "interleave_over", None, 0) == ["a", "1", "b", "2", "c", "3", "a", "4", "b", "5"]
    assert mix([a, b], "interleave_once", None, 0) == ["a", "1", "b", "2", "c", "3", "4", "5"]
    # taken in turn, as datasets' interleave_datasets mixes them (LLaMA-Factory's mixing), in every order
    from datasets import Dataset, interleave_datasets

    for parts in itertools.permutations([a, b, list("xy")]):
        for strategy, stopping in (("interleave_under", "first_exhausted"), ("interleave_over", "all_exhausted")):
            theirs = interleave_datasets([Dataset.from_dict({"x": part}) for part in parts], stopping_strategy=stopping)
            assert mix(list(parts), strategy, None, 0) == list(theirs["x"])
    # drawn at random, the same draws as datasets makes with the same seed (numpy's PCG64: the same on every machine)
    strategies = (("interleave_under", "first_exhausted"), ("interleave_over", "all_exhausted"),
                  ("interleave_once", "all_exhausted_without_replacement"))
    for (strategy, stopping), (probs, seed) in itertools.product(strategies, (("0.2,0.8", 42), ("0.5,0.3,0.2", 7))):
        parts = [a * 100, b * 100, list("xy")][: len(probs.split(","))]
        theirs = interleave_datasets([Dataset.from_dict({"x": part}) for part in parts], stopping_strategy=stopping,
                                     probabilities=[float(p) for p in probs.split(",")], seed=seed)
        assert mix(parts, strategy, probs, seed) == list(theirs["x"])
    assert mix([a, b], "interleave_over", "1,0", 0) == a  # a zero-probability dataset is never waited for
    for probs in (None, "0.5,0.5"):  # a dataset left empty (all its records skipped) is named, not waited for
        with pytest.raises(DataError, match="dataset number 1 of the 2 to interleave has no examples left"):
            mix([[], a], "interleave_once", probs, 0)
    write_jsonl(tmp_path / "x.jsonl", [{"instruction": "q", "output": "a"}] * 3)
    write_jsonl(tmp_path / "y.jsonl", [{"instruction": "r", "output": "b"}] * 2)
    names = f"{tmp_path / 'x.jsonl'},{tmp_path / 'y.jsonl'}"
    mixed = load_examples(names, DataArgs(mix_strategy="interleave_under"), "sft", 0)
    assert [e.messages[0]["content"] for e in mixed] == ["q", "r", "q", "r"]
    for bad, message in [({"interleave_probs": "0.5"}, "one non-negative number per dataset"),
                         ({"mix_strategy": "zip"}, "mix_strategy` must be one of concat, interleave_under"),
                         ({"interleave_probs": "0.5,0.5", "mix_strategy": "concat"}, "not concat")]:
        cfg = build_config({"model_name_or_path": "m", "dataset": names, "output_dir": "o", "do_train": True,
                            "mix_strategy": "interleave_over", **bad})
        with pytest.raises(ConfigError, match=message):
            validate(cfg, "train")


def test_val_size_splits_as_datasets_train_test_split_does():
    """val_size holds out the examples LLaMA-Factory's split (datasets' train_test_split with the run's seed) holds
    out, in its order: a fraction rounded up, so 0.1 of 25 examples is 3 and 0.2 of 7 is 2; a count as it is."""
    from datasets import Dataset

    from tuneforge.config import build_config
    from tuneforge.data import load_splits

    for n, share, seed in ((45, 0.1, 42), (25, 0.1, 42), (7, 0.2, 0), (200, 0.2, 3), (30, 4, 42)):
        config = build_config({"dataset": "d", "val_size": share, "seed": seed})
        train, held = load_splits(config, load=lambda names: list(range(n)))
        theirs = Dataset.from_dict({"x": list(range(n))}).train_test_split(test_size=share, seed=seed)
        assert (train, held) == (theirs["train"]["x"], theirs["test"]["x"])


def test_eval_on_each_dataset_reports_each_set(tiny_model, tmp_path):
    from conftest import read_log, run_training

    write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(8)])
    write_jsonl(tmp_path / "easy.jsonl", [{"instruction": "q1", "output": "a1"}] * 2)
    write_jsonl(tmp_path / "hard.jsonl", [{"instruction": "What is the weather?", "output": "Sunny and warm."}] * 3)
    out = tmp_path / "out"
    results = run_training(dict(
        model_name_or_path=tiny_model, dataset=str(tmp_path / "train.jsonl"), template="chatml",
        eval_dataset=f"{tmp_path / 'easy.jsonl'},{tmp_path / 'hard.jsonl'}", eval_on_each_dataset=True,
        output_dir=str(out), do_train=True, max_steps=2, eval_strategy="steps", eval_steps=1, do_eval=True,
        report_to="none"))
    assert {"eval_easy_loss", "eval_hard_loss", "eval_easy_perplexity"} <= set(results)
    assert results["eval_easy_loss"] != results["eval_hard_loss"] and "eval_loss" not in results
    assert any("eval_hard_loss" in entry for entry in read_log(out))


def test_batched_and_parallel_encoding_equal_one_by_one(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from tuneforge.config import build_config
    from tuneforge.data import _encode
    from tuneforge.data.encode import encode_supervised_batch

    from conftest import alpaca_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    template = get_template("chatml", tokenizer)
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(23))
    examples = load_examples(str(path), DataArgs(), "sft", 0)
    single = [encode_supervised(e, tokenizer, template, 40) for e in examples]
    assert encode_supervised_batch(examples, tokenizer, template, 40) == single
    texts = [Example(text=f"document {i} " * (i % 5 + 1)) for i in range(23)]
    for workers in (None, 3):
        cfg = build_config({"model_name_or_path": tiny_model, "dataset": str(path), "cutoff_len": 40, "do_train": True,
                            "preprocessing_batch_size": 5, "preprocessing_num_workers": workers, "output_dir": "o"})
        rows, kept = _encode(examples, "sft", tokenizer, template, cfg.data)
        assert rows == [r for r in single if r is not None] and len(kept) == len(rows)
        stream = [t for e in texts for t in tokenizer.encode(e.text) + [tokenizer.eos_token_id]]
        blocks = _encode(texts, "pt", tokenizer, None, cfg.data)[0]
        assert [t for b in blocks for t in b["input_ids"]] == stream and len(blocks[0]["input_ids"]) == 40


def test_preference_data_is_cached(tiny_model, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from tuneforge import data as data_module
    from tuneforge.config import build_config

    path = write_jsonl(tmp_path / "p.jsonl", [{"instruction": f"q{i}", "chosen": "yes", "rejected": "no"}
                                              for i in range(4)])
    calls = []
    real = data_module.encode_pair
    monkeypatch.setattr(data_module, "encode_pair", lambda *a, **k: calls.append(1) or real(*a, **k))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)

    def prepare(**extra):
        calls.clear()
        cfg = build_config({"model_name_or_path": tiny_model, "dataset": str(path), "stage": "dpo",
                            "template": "chatml", "output_dir": "o", "do_train": True, **extra})
        return data_module.prepare_preference_data(cfg, tokenizer)

    first = prepare()
    assert len(calls) == 4
    assert prepare() == first and calls == []  # the second run skips tokenisation
    prepare(overwrite_cache=True)
    assert len(calls) == 4
