"""The broken-input corpus (tests/broken/): each kind of bad data stops `tuneforge train` with its own one-line
error naming the place, and nothing is written to output_dir."""

import json
from pathlib import Path

import pytest

from tuneforge.cli import main

BROKEN = Path(__file__).parent / "broken"
CASES = json.loads((BROKEN / "cases.json").read_text())


@pytest.fixture
def offline(monkeypatch):
    """No network here either way; offline mode makes the Hub's failure immediate instead of retried."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_the_corpus_covers_at_least_15_kinds():
    assert len(CASES) >= 15 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("kind, dataset, overrides, error", CASES, ids=[c[0] for c in CASES])
def test_broken_input_gets_its_one_line_error(tiny_model, tmp_path, capsys, offline, kind, dataset, overrides, error):
    dataset = str(BROKEN / dataset) if (BROKEN / dataset).exists() else dataset
    out = tmp_path / "out"
    values = {"model_name_or_path": tiny_model, "dataset": dataset, "dataset_dir": str(BROKEN), "template": "chatml",
              "output_dir": str(out), "do_train": True, "cutoff_len": 64, "max_steps": 1, **overrides}
    config = tmp_path / "train.yaml"
    config.write_text(json.dumps(values))  # JSON is YAML
    assert main(["train", str(config)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tuneforge: error: "), lines
    assert __import__("re").search(error, lines[0]), lines[0]
    assert not out.exists()


def test_skip_bad_records_counts_and_keeps_the_good_ones(tmp_path, capsys):
    from tuneforge.config import DataArgs
    from tuneforge.data import DataError, load_examples

    good = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]
    lines = [json.dumps(r) for r in good] + ['{"instruction": "x", "output": ', '{"instruction": "y", "answer": "z"}',
                                             '{"instruction": "w", "output": 3}']
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="mixed.jsonl line 6 column"):
        load_examples(str(path), DataArgs(), "sft", 0)
    examples = load_examples(str(path), DataArgs(skip_bad_records=True), "sft", 0)
    assert [e.messages[0]["content"] for e in examples] == [f"q{i}" for i in range(5)]
    printed = capsys.readouterr().out
    assert "skipped 3 of 8 malformed records (skip_bad_records); the first: " in printed
    assert "line 6 column" in printed and "line 7: missing field `output`" in printed
    path.write_text('{"instruction": "y", "answer": "z"}\n')
    with pytest.raises(DataError, match="every record is malformed; the first: .*line 1: missing field `output`"):
        load_examples(str(path), DataArgs(skip_bad_records=True), "sft", 0)
