"""What a checkpoint may resume: complete ones only (marker written last), from this tuneforge version, with the same
settings that change training and the same data; the refusals name the reason."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import alpaca_rows, read_log, run_training, train_config, write_jsonl

from tuneforge.config import ConfigError
from tuneforge.train.checkpoint import MARKER


@pytest.fixture
def stopped(tiny_model, tmp_path):
    """An output_dir as a run stopped right after step 4 leaves it: checkpoint-2 and checkpoint-4, no final model."""
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(16))
    values = train_config(tiny_model, str(data), tmp_path / "out", max_steps=6, save_steps=2)
    run_training(values)
    out = tmp_path / "out"
    for name in ("checkpoint-6", "adapter_model.safetensors", "adapter_config.json", "train_results.json"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return values, out, data


def test_changed_settings_version_or_data_are_refused_with_the_reason(stopped):
    values, out, data = stopped
    # a logging key, recorded by checkpoints before it was declared resume-neutral, holds no resume back
    marker = out / "checkpoint-4" / MARKER
    recorded = json.loads(marker.read_text())
    marker.write_text(json.dumps({**recorded, "config": {**recorded["config"], "logging_first_step": True}}))
    with pytest.raises(ConfigError, match=r"other settings \(learning_rate: 0\.001 -> 0\.002\)"):
        run_training(dict(values, learning_rate=2e-3))
    write_jsonl(data, alpaca_rows(16)[::-1])  # the same number of examples, in another order
    with pytest.raises(ConfigError, match="data now has other examples"):
        run_training(values)
    write_jsonl(data, alpaca_rows(16))
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "tuneforge_version": "0.0.1"}))
    with pytest.raises(ConfigError, match="written by tuneforge 0.0.1"):
        run_training(values)


def test_incomplete_checkpoints_are_ignored_and_not_rotated(stopped, capsys):
    values, out, _ = stopped
    (out / "checkpoint-4" / MARKER).unlink()  # as if killed before its marker was written
    (out / "checkpoint-8.partial").mkdir()  # as if killed mid-write, just before the rename (its marker written)
    for name in ("trainer_state.json", MARKER):
        shutil.copy(out / "checkpoint-2" / name, out / "checkpoint-8.partial" / name)
    for incomplete in ("checkpoint-4", "checkpoint-8.partial"):
        with pytest.raises(FileNotFoundError, match="is incomplete"):
            run_training(dict(values, resume_from_checkpoint=str(out / incomplete)))
    # neutral keys may change: here how often it saves and keeps checkpoints, and how long it runs
    results = run_training(dict(values, max_steps=7, save_steps=3, save_total_limit=1))
    printed = capsys.readouterr().out
    assert "ignoring incomplete checkpoint folders (their save was interrupted): checkpoint-4, " \
           "checkpoint-8.partial" in printed and "resuming from" in printed and "checkpoint-2 at step 2" in printed
    assert results["global_step"] == 7 and [r["current_steps"] for r in read_log(out)] == list(range(1, 8))
    # save_total_limit kept one complete checkpoint (checkpoint-6; -3 was rotated away) and left the incomplete ones
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6", "checkpoint-8.partial"]


@pytest.mark.parametrize("streaming", [False, True])
def test_ignore_data_skip_reads_the_interrupted_epoch_again_from_its_start(tiny_model, tmp_path, streaming):
    """A rate of 1e-12 leaves the weights as they were (to the logged 4 decimals), so each step's loss tells which
    rows it trained on: resumed at step 2 of a 4-step epoch, steps 3-6 see the epoch's first four batches again."""
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(16))
    values = train_config(tiny_model, str(data), tmp_path / "out", max_steps=6, save_steps=2, learning_rate=1e-12,
                          lr_scheduler_type="constant", streaming=streaming, buffer_size=8)
    run_training(values)
    out = tmp_path / "out"
    straight = [r["loss"] for r in read_log(out)]
    for name in ("checkpoint-4", "checkpoint-6", "adapter_model.safetensors", "train_results.json"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    run_training(dict(values, ignore_data_skip=True))
    resumed = [r["loss"] for r in read_log(out)]
    assert len(set(straight[:4])) == 4  # four batches that tell apart
    assert resumed == straight[:2] + straight[:4]


def test_a_run_resumes_with_compile_switched_on(stopped):
    """Compiling runs the same operations (in fused kernels): a run may switch it on to go faster after a resume."""
    values, out, _ = stopped
    results = run_training(dict(values, torch_compile_backend="eager"))  # eager: no kernels to build, a quick test
    assert results["global_step"] == 6 and [r["current_steps"] for r in read_log(out)] == list(range(1, 7))


def test_resume_from_checkpoint_true_and_false_as_hugging_faces_trainer_reads_them(tmp_path):
    """LLaMA-Factory hands resume_from_checkpoint to HF's Trainer, where `true` is the latest checkpoint of
    output_dir (an error when there is none) and `false` names none. Before, `true` was read as a folder "True"."""
    from tuneforge.train.checkpoint import check_output_dir

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint: true resumes the latest checkpoint of "
                                                "output_dir, and .* holds no complete one"):
        check_output_dir(str(out), False, "True")
    assert check_output_dir(str(out), False, "false") is None
    for step in (2, 10):
        (out / f"checkpoint-{step}").mkdir()
        (out / f"checkpoint-{step}" / MARKER).write_text("{}")
    assert check_output_dir(str(out), False, "true") == str(out / "checkpoint-10")
    with pytest.raises(FileExistsError, match="and overwrite_output_dir: true trains from the start"):
        check_output_dir(str(out), True, "True")
