"""streaming: true: rows made as training reads them, the same rows (and training) as in memory, buffer shuffling,
exact resume from a stream position, val_size held out, lazy reading, and the options it refuses."""

from __future__ import annotations

import itertools
import json
import shutil

import pytest
from conftest import alpaca_rows, read_log, run_training, train_config, write_jsonl
from safetensors.torch import load_file

from tuneforge.config import ConfigError, build_config, validate
from tuneforge.data import DataError, mix, mix_streams, prepare_lm_data
from tuneforge.data.stream import shuffled
from tuneforge.models.load import load_tokenizer


def _data(cfg_values: dict):
    cfg = build_config(cfg_values, source="test")
    validate(cfg, "train")
    return prepare_lm_data(cfg, load_tokenizer(cfg.model))


def _epoch_rows(stream, epoch: int = 0) -> list[dict]:
    return [row for row, position in itertools.takewhile(lambda item: item[1][0] == epoch,
                                                         stream.rows((epoch, 0, 0)))]


@pytest.mark.parametrize("stage,extra", [("sft", {}), ("sft", {"packing": True}), ("pt", {})])
def test_streamed_rows_equal_the_in_memory_rows(tiny_model, tmp_path, stage, extra):
    data = str(write_jsonl(tmp_path / "d.jsonl", alpaca_rows(40)))
    common = dict(stage=stage, disable_shuffling=True, **extra)
    memory = _data(train_config(tiny_model, data, tmp_path / "a", **common))
    stream = _data(train_config(tiny_model, data, tmp_path / "b", streaming=True, **common)).train
    assert stream.first == memory.train[0]
    assert _epoch_rows(stream) == memory.train  # one batch of 1000 examples: the same packing and chunking
    # in batches of 7 examples, pt chunks (and sft packs) each batch on its own; no text is lost
    small = _data(train_config(tiny_model, data, tmp_path / "c", streaming=True, preprocessing_batch_size=7,
                               **common)).train
    rows = _epoch_rows(small)
    assert sorted(t for row in rows for t in row["input_ids"]) == sorted(t for row in memory.train
                                                                          for t in row["input_ids"])
    assert _epoch_rows(small, 1) == rows  # without shuffling every epoch is the same


def test_buffer_shuffle():
    items = list(range(100))
    once = list(shuffled(iter(items), 10, seed=3))
    assert sorted(once) == items and once != items
    assert list(shuffled(iter(items), 10, seed=3)) == once  # seeded: the same order on every run
    assert list(shuffled(iter(items), 10, seed=4)) != once
    assert list(shuffled(iter(items), 1, seed=3)) == items  # a buffer of one keeps the file order
    # an item leaves at most `size` places before it came in (a local shuffle, as datasets does)
    assert all(position >= item - 10 for position, item in enumerate(once))


def test_mixing_streams_equals_mixing_lists():
    a, b = list("abc"), list("12345")
    for strategy in ("concat", "interleave_under", "interleave_over", "interleave_once"):
        for probs in (None, "0.3,0.7") if strategy != "concat" else (None,):
            streamed = list(mix_streams([lambda: iter(a), lambda: (x for x in b)], strategy, probs, 0))
            assert streamed == mix([a, b], strategy, probs, 0)
    assert list(mix_streams([lambda: iter(a), lambda: iter(b)], "interleave_over", None, 0)) == \
        list("a1b2c3a4b5")  # `a` is opened again until `b` has been seen whole


def test_streaming_trains_like_in_memory(tiny_model, tmp_path):
    data = str(write_jsonl(tmp_path / "d.jsonl", alpaca_rows(16)))  # 16 rows, 4 a step: 2 epochs in 8 steps
    common = dict(max_steps=8, disable_shuffling=True)
    run_training(train_config(tiny_model, data, tmp_path / "memory", **common))
    results = run_training(train_config(tiny_model, data, tmp_path / "stream", streaming=True, **common))
    assert [r["loss"] for r in read_log(tmp_path / "stream")] == [r["loss"] for r in read_log(tmp_path / "memory")]
    assert results["global_step"] == 8 and results["epoch"] == 1  # the second pass is in progress


def _weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def test_streaming_resume_is_exact(tiny_model, tmp_path):
    data = str(write_jsonl(tmp_path / "d.jsonl", alpaca_rows(22)))
    # shuffled through a buffer of 5, encoded 3 examples at a time, val_size 2 held out: 20 rows an epoch, so
    # step 6 (24 rows in) is part-way through a batch of the second epoch
    common = dict(streaming=True, buffer_size=5, preprocessing_batch_size=3, val_size=2, max_steps=10, save_steps=2,
                  save_total_limit=2, lora_dropout=0.1, lr_scheduler_type="cosine", warmup_steps=2,
                  eval_strategy="steps", eval_steps=5)
    run_training(train_config(tiny_model, data, tmp_path / "straight", **common))
    interrupted = tmp_path / "interrupted"
    run_training(train_config(tiny_model, data, interrupted, **common))
    for name in ("checkpoint-8", "adapter_model.safetensors", "adapter_config.json", "train_results.json",
                 "all_results.json"):
        path = interrupted / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    state = json.loads((interrupted / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["stream_position"] == [1, 1, 1] and state["epoch"] == 1  # epoch 1, batch 1, after its first row
    run_training(train_config(tiny_model, data, interrupted, **common))  # resumes from checkpoint-6 by itself
    straight, resumed = _weights(tmp_path / "straight"), _weights(interrupted)
    # same operations in the same order on the same machine: bit-identical; a wrong row or RNG state shows as 1e-3
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) < 1e-6
    assert [r.get("eval_loss") for r in read_log(interrupted)] == [r.get("eval_loss")
                                                                   for r in read_log(tmp_path / "straight")]
    # other data under the same checkpoint is refused
    write_jsonl(tmp_path / "d.jsonl", alpaca_rows(30))
    shutil.rmtree(interrupted / "checkpoint-10", ignore_errors=True)
    for name in ("adapter_model.safetensors", "adapter_config.json", "train_results.json", "all_results.json"):
        (interrupted / name).unlink()
    with pytest.raises(ConfigError, match="was trained on streamed examples but the data now has other files"):
        run_training(train_config(tiny_model, data, interrupted, **common))


def test_val_size_examples_are_held_out_of_every_epoch(tiny_model, tmp_path):
    data = str(write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"question {i}", "output": f"answer {i}"}
                                                  for i in range(30)]))
    loaded = _data(train_config(tiny_model, data, tmp_path / "a", streaming=True, val_size=5, buffer_size=8))
    held = {e.messages[0]["content"] for e in loaded.eval_examples}
    assert len(held) == 5 and len(loaded.eval) == 5
    tokenizer = load_tokenizer(build_config({"model_name_or_path": tiny_model}).model)
    for epoch in (0, 1):
        seen = [tokenizer.decode(row["input_ids"]) for row in _epoch_rows(loaded.train, epoch)]
        assert len(seen) == 25 and not any(question + "<" in text for text in seen for question in held)
    assert _epoch_rows(loaded.train, 0) != _epoch_rows(loaded.train, 1)  # reshuffled each epoch
    with pytest.raises(DataError, match="val_size 30 takes every one of the 30 examples"):
        _data(train_config(tiny_model, data, tmp_path / "b", streaming=True, val_size=30))


def test_files_are_read_lazily(tiny_model, tmp_path):
    rows = alpaca_rows(300)
    path = tmp_path / "big.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines[250] = '{"instruction": "broken'
    path.write_text("\n".join(lines) + "\n")
    values = train_config(tiny_model, str(path), tmp_path / "out", streaming=True, preprocessing_batch_size=10,
                          buffer_size=1)
    stream = _data(values).train  # the first batch is fine: the data is accepted before line 251 is read
    with pytest.raises(DataError, match=r"big.jsonl line 251 column \d+: not valid JSON"):
        list(itertools.islice(stream.rows(), 400))
    stream = _data({**values, "skip_bad_records": True}).train
    assert len(_epoch_rows(stream)) == 299


@pytest.mark.parametrize("values,message", [
    ({"max_steps": -1, "num_train_epochs": 1}, "its length is unknown: set `max_steps`"),
    ({"val_size": 0.1}, "`val_size` is a count of examples"),
    ({"stage": "dpo"}, "`streaming` is built for stages pt and sft"),
    ({"tokenized_path": "x"}, "`tokenized_path` saves tokenised data"),
    ({"save_strategy": "epoch"}, "`save_strategy: epoch` needs epochs of known length"),
    ({"buffer_size": 0}, "`buffer_size` must be at least 1"),
])
def test_streaming_refuses_what_it_cannot_do(values, message):
    cfg = build_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "streaming": True,
                        "do_train": True, "max_steps": 5, **values})
    with pytest.raises(ConfigError, match=message):
        validate(cfg, "train")


def test_num_samples_is_refused_when_streaming(tiny_model, tmp_path):
    write_jsonl(tmp_path / "d.jsonl", alpaca_rows(4))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.jsonl", "num_samples": 10}}))
    with pytest.raises(DataError, match="dataset `d` sets num_samples"):
        _data(train_config(tiny_model, "d", tmp_path / "o", dataset_dir=str(tmp_path), streaming=True))


def test_data_command_describes_the_head_of_the_stream(tiny_model, tmp_path, capsys):
    from tuneforge.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(40))
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"model_name_or_path": tiny_model, "dataset": str(data), "template": "chatml",
                                  "output_dir": str(tmp_path / "out"), "streaming": True, "max_steps": 10,
                                  "do_train": True, "buffer_size": 16, "val_size": 4}))
    assert main(["data", str(config), "--plot", str(tmp_path / "h.png")]) == 0
    printed = capsys.readouterr().out
    assert "records per dataset: " + str(data) + " 40" in printed  # counted in one pass
    assert "the statistics below describe the first 16 training examples of the stream" in printed
    assert "split: 16 train, 4 evaluation" in printed and "<|im_end|>]]" in printed
    assert not (tmp_path / "out").exists()


def test_every_file_type_streams_as_it_loads(tiny_model, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": f"q{i}", "input": "", "output": str(i) if i < 3 else f"answer {i}"} for i in range(6)]
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "d.parquet")
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    (tmp_path / "d.csv").write_text("instruction,input,output\n" + "".join(
        f"{r['instruction']},,{i}\n" for i, r in enumerate(rows)))  # numeric answers are still text
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.txt").write_text("first line\n\nsecond line\n")
    for name, stage in [("d.parquet", "sft"), ("d.arrow", "sft"), ("d.csv", "sft"), ("d.json", "sft"),
                        ("d.txt", "pt")]:
        values = train_config(tiny_model, str(tmp_path / name), tmp_path / "o", stage=stage, disable_shuffling=True)
        memory = _data(values).train
        assert _epoch_rows(_data({**values, "streaming": True}).train) == memory, name
    from tuneforge.config import DataArgs
    from tuneforge.data import load_examples

    examples = load_examples(str(tmp_path / "d.csv"), DataArgs(), "sft", 0)
    assert [e.messages[1]["content"] for e in examples] == ["0", "1", "2", "3", "4", "5"]
    assert examples[0].where.endswith("d.csv row 2")


def test_hub_datasets_stream_through_datasets(tmp_path):
    from tuneforge.data.registry import iter_records, read_records, resolve

    (tmp_path / "splits").mkdir()
    write_jsonl(tmp_path / "splits" / "train.jsonl", [{"instruction": "q0", "output": "a0"}])
    write_jsonl(tmp_path / "splits" / "test.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in (1, 2)])
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "hub": {"hf_hub_url": str(tmp_path / "splits"), "split": "test"}}))  # load_dataset takes a local folder too
    attr = resolve("hub", str(tmp_path))[0]
    streamed = list(iter_records(attr, streaming=True))
    assert [r.data for r in streamed] == [r.data for r in read_records(attr)] == [
        {"instruction": "q1", "output": "a1"}, {"instruction": "q2", "output": "a2"}]
    assert streamed[0].where.endswith("splits [test] record 0")
