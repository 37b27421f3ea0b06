"""Configs LLaMA-Factory's web UI (LlamaBoard) saves run unchanged, and include_num_input_tokens_seen, which every
one of its training configs sets, counts what transformers counts: every position of the token ids (all) or the
attended ones (non_padding), summed over processes (tests/test_distributed.py) and kept across a resume."""

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import alpaca_rows, read_log, run_training, train_config, train_here, write_jsonl

DATA = Path(__file__).parent / "data"


def _llamaboard_folder(tmp_path: Path, config: str) -> Path:
    """The saved config next to a `data` folder with LLaMA-Factory's alpaca_en_demo registered, as in its repo."""
    shutil.copy(DATA / config, tmp_path / config)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "alpaca_en_demo.json").write_text(json.dumps(alpaca_rows(64)))
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"alpaca_en_demo":
                                                                      {"file_name": "alpaca_en_demo.json"}}))
    return tmp_path


def _tuneforge(folder: Path, config: str, *keys: str) -> None:
    """`tuneforge train CONFIG KEYS` run in `folder`, where the config's relative paths lead."""
    with contextlib.chdir(folder):
        done = train_here([config, *keys])
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_llamaboard_training_config_runs(tiny_model, tmp_path):
    folder = _llamaboard_folder(tmp_path, "llamaboard_training_args.yaml")
    _tuneforge(folder, "llamaboard_training_args.yaml", f"model_name_or_path={tiny_model}", "output_dir=out",
               "cutoff_len=64", "max_steps=3", "logging_steps=1")
    records = read_log(folder / "out")
    totals = [r["total_tokens"] for r in records]
    assert len(totals) == 3 and 0 < totals[0] < totals[1] < totals[2] and all(r["throughput"] > 0 for r in records)
    assert (folder / "out" / "adapter_model.safetensors").is_file()


def test_a_llamaboard_predict_config_runs(tiny_model, tmp_path):
    folder = _llamaboard_folder(tmp_path, "llamaboard_eval_args.yaml")
    _tuneforge(folder, "llamaboard_eval_args.yaml", f"model_name_or_path={tiny_model}", "output_dir=out",
               "max_samples=3", "max_new_tokens=4")
    assert len((folder / "out" / "generated_predictions.jsonl").read_text().splitlines()) == 3


def test_counting_positions_or_attended_tokens():
    from tuneforge.train.loop import _input_tokens

    padded = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "num_tokens": 8,
              "attention_mask": torch.tensor([[1] * 5, [1] * 3 + [0] * 2])}
    packed = {"input_ids": torch.zeros(2, 6, dtype=torch.long), "position_ids": torch.zeros(2, 6), "num_tokens": 11}
    images = {"pixel_values": torch.zeros(3, 3, 8, 8), "num_tokens": 3}
    assert [_input_tokens(b, "all") for b in (padded, packed, images)] == [10, 12, 3]
    assert [_input_tokens(b, "non_padding") for b in (padded, packed, images)] == [8, 11, 3]


@pytest.mark.parametrize("value, counted", [(True, "all"), ("true", "all"), (False, "no"),
                                            ("non_padding", "non_padding")])
def test_true_means_all_as_in_transformers(value, counted):
    from tuneforge.config import build_config

    assert build_config({"include_num_input_tokens_seen": value}).train.include_num_input_tokens_seen == counted


def test_an_epoch_counts_every_token_once_whatever_the_batch_and_a_resume_goes_on_counting(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(16))

    def totals(name: str, **keys) -> list[int]:
        run_training(train_config(tiny_model, data, tmp_path / name, max_steps=-1, num_train_epochs=1, **keys))
        return [r["total_tokens"] for r in read_log(tmp_path / name)]

    # one row a step: non_padding's steps are the rows' lengths; all's, those lengths padded to a multiple of 8
    # (PadCollator's widths)
    one_by_one = totals("b1np", per_device_train_batch_size=1, include_num_input_tokens_seen="non_padding")
    lengths = [b - a for a, b in zip([0, *one_by_one], one_by_one)]
    widths = [-(-n // 8) * 8 for n in lengths]
    assert totals("b1", per_device_train_batch_size=1, include_num_input_tokens_seen="all") == \
        [sum(widths[:i + 1]) for i in range(len(widths))]
    # non_padding over an epoch: the rows' own lengths, however they are batched; all adds the padding of batches
    # of rows of different lengths (alpaca_rows' are)
    attended = totals("b4np", per_device_train_batch_size=4, include_num_input_tokens_seen="non_padding")
    assert attended[-1] == sum(lengths) and len(lengths) == 16
    assert totals("b4", per_device_train_batch_size=4, include_num_input_tokens_seen="all")[-1] > sum(widths)
    # a run stopped after its step-2 checkpoint and run again ends with the uninterrupted run's count
    out, keys = tmp_path / "resumed", dict(per_device_train_batch_size=4, include_num_input_tokens_seen="non_padding",
                                           save_steps=2, max_steps=4)
    run_training(train_config(tiny_model, data, out, **keys))
    for name in ("adapter_model.safetensors", "train_results.json", "all_results.json"):
        (out / name).unlink()  # as if stopped after the step-2 checkpoint
    run_training(train_config(tiny_model, data, out, **keys))
    assert [r["total_tokens"] for r in read_log(out)] == attended
