"""Faults inflicted on real `tuneforge train` processes (tiny random models): kill -9 at seeded moments (mid-step,
mid-checkpoint-write, during evaluation), SIGTERM, two signals, a diverging learning rate, a full disk. Every
interrupted run, run again until it finishes, must end with the weights of a run that was never interrupted.

Equality rule (as tests/test_train.py's resume test): the resumed run repeats the same operations in the same order
on the same machine, so its weights are bit-identical (measured 0.0); a wrong batch, RNG or optimizer state shows
as a learning-rate-sized (1e-3) difference. 1e-6 sits far between.
"""

from __future__ import annotations

import json
import random
import re
import signal
import time

import pytest
from conftest import alpaca_rows, read_log, run_training, train_config, write_jsonl
from runs import Run, after_step, logged_steps, max_diff, trained_weights, writing_checkpoint
from test_cls import reviews, tiny_bert  # noqa: F401 - fixtures
from test_preference import preference_rows

from tuneforge.train.checkpoint import MARKER
from tuneforge.train.steps import epoch_batches

SAME = 1e-6  # see the module docstring
SEED = 1616  # the seed of the "random moments": another seed picks other steps, the same seed the same ones


def finish(values: dict, name: str) -> Run:
    """Run to the end (resuming from whatever output_dir holds) and check it ended well."""
    run = Run(values, name)
    assert run.wait() == 0, run.output
    return run


def assert_same_as_straight(values: dict, tmp_path, name: str) -> None:
    """The uninterrupted run trains in this process (same code, threads and kernels as the children; it saves a
    process start)."""
    run_training(dict(values, output_dir=str(tmp_path / "straight")))
    out = tmp_path / name
    assert max_diff(trained_weights(tmp_path / "straight"), trained_weights(out)) < SAME
    steps = logged_steps(out)
    assert steps == list(range(1, values["max_steps"] + 1)), steps  # each step logged once, in order


def test_sft_killed_mid_eval_mid_step_and_mid_checkpoint_resumes_exactly(tiny_model, tmp_path):
    rng = random.Random(SEED)
    data = str(write_jsonl(tmp_path / "d.jsonl", alpaca_rows(64)))
    # 32 training rows -> 8 steps per epoch; 32 evaluation rows one at a time make an evaluation last long enough
    # to be killed in (tens of milliseconds, against well under one of polling)
    values = train_config(tiny_model, data, tmp_path / "out", max_steps=15, save_steps=3, val_size=0.5,
                          eval_strategy="steps", eval_steps=4, per_device_eval_batch_size=1, lora_dropout=0.1,
                          lr_scheduler_type="cosine", warmup_steps=2)
    out = tmp_path / "out"
    # 1. during the evaluation that follows step 4's log line
    run = Run(values, "kill-eval")
    run.wait_for(after_step(4))
    run.kill()
    assert 4 not in logged_steps(out, "eval_loss")  # killed before step 4's evaluation was logged
    # 2. mid-step: a few milliseconds after a step's log line, inside the next step
    run = Run(values, "kill-step")
    run.wait_for(after_step(rng.choice([5, 7, 8])))
    time.sleep(rng.uniform(0, 0.02))
    run.kill()
    # 3. mid-checkpoint-write: while checkpoint-9.partial exists (if the kill came only after the rename, which a
    # busy machine can cause, the same is tried with checkpoint-12)
    for step in (9, 12):
        run = Run(values, f"kill-write-{step}")
        run.wait_for(writing_checkpoint(step))
        run.kill()
        if (out / f"checkpoint-{step}.partial").is_dir():
            break
    else:
        pytest.fail("no kill landed while a checkpoint was being written")
    assert not (out / f"checkpoint-{step}").exists()
    run = finish(values, "final")
    assert f"checkpoint-{step}.partial" in run.output and "ignoring incomplete checkpoint folders" in run.output
    assert_same_as_straight(values, tmp_path, "out")
    assert logged_steps(out, "eval_loss") == [4, 8, 12, 15]


def test_dpo_two_signals_then_kill_9_resume_exactly(tiny_model, tmp_path):
    rng = random.Random(SEED + 1)
    write_jsonl(tmp_path / "train.jsonl", preference_rows(0, 24))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"pairs": {"file_name": "train.jsonl", "ranking": True}}))
    values = train_config(tiny_model, "pairs", tmp_path / "out", stage="dpo", dataset_dir=str(tmp_path),
                          max_steps=8, save_steps=2, per_device_train_batch_size=4, lora_dropout=0.1)
    # SIGINT and SIGTERM together: the first asks for a checkpoint at the step's end, the second exits at once
    run = Run(values, "signals")
    run.wait_for(after_step(rng.choice([1, 2, 3])))
    run.send(signal.SIGINT)
    run.send(signal.SIGTERM)
    assert run.wait() in (128 + signal.SIGINT, 128 + signal.SIGTERM), run.output
    assert "second signal" in run.output and "stopped by" not in run.output  # it ended without saving
    # then kill -9 mid-step, a few milliseconds after a later step's log line
    run = Run(values, "kill-step")
    run.wait_for(after_step(rng.choice([4, 5, 6])))
    time.sleep(rng.uniform(0, 0.02))
    run.kill()
    finish(values, "final")
    assert_same_as_straight(values, tmp_path, "out")


def test_cls_killed_during_evaluation_resumes_exactly(tiny_bert, reviews, tmp_path):  # noqa: F811 - fixtures
    values = dict(model_name_or_path=tiny_bert, stage="cls", do_train=True, dataset=reviews, val_size=0.5,
                  output_dir=str(tmp_path / "out"), learning_rate=5e-3, max_steps=8, per_device_train_batch_size=8,
                  logging_steps=1,
                  eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=1, save_steps=2,
                  finetuning_type="full", seed=0, report_to="none")
    run = Run(values, "kill")
    run.wait_for(after_step(random.Random(SEED + 2).choice([3, 6])))
    run.kill()
    finish(values, "final")
    assert_same_as_straight(values, tmp_path, "out")


def test_sigterm_saves_then_a_full_disk_keeps_that_checkpoint_then_rerun_is_exact(tiny_model, tmp_path):
    data = str(write_jsonl(tmp_path / "d.jsonl", alpaca_rows(16)))
    values = train_config(tiny_model, data, tmp_path / "out", max_steps=10, save_steps=4, lora_dropout=0.1)
    out = tmp_path / "out"
    run = Run(values, "sigterm")
    run.wait_for(after_step(1))
    run.send(signal.SIGTERM)
    assert run.wait() == 75, run.output  # faults.Preempted.exit_code
    stopped = re.search(r"stopped by SIGTERM after step (\d+); saved \S+checkpoint-(\d+); run the same command "
                        "again to resume", run.output)
    assert stopped and stopped[1] == stopped[2], run.output
    saved = int(stopped[1])
    assert (out / f"checkpoint-{saved}" / MARKER).is_file() and not (out / "train_results.json").exists()
    # The next save (checkpoint-4, or -8) needs files larger than 64 KiB (the adapter is ~130 KiB): the child may
    # write no file past that size, so that save fails as on a full disk, while logs and configs still fit.
    assert (out / f"checkpoint-{saved}" / "adapter_model.safetensors").stat().st_size > 64 * 1024
    before = trained_weights(out / f"checkpoint-{saved}")
    run = Run(values, "full-disk", limit_file_bytes=64 * 1024)
    assert run.wait() == 74, run.output  # faults.SaveFailed.exit_code
    failed = next(s for s in (4, 8) if s > saved)
    assert f"checkpoint-{failed}.partial" in run.output and "MiB and" in run.output and "is intact" in run.output
    assert not list(out.glob("*.partial")) and not (out / f"checkpoint-{failed}").exists()
    assert max_diff(before, trained_weights(out / f"checkpoint-{saved}")) == 0
    finish(values, "rerun")
    assert_same_as_straight(values, tmp_path, "out")


def test_diverging_learning_rate_stops_naming_step_rows_and_checkpoint(tiny_model, tmp_path):
    data = str(write_jsonl(tmp_path / "d.jsonl", alpaca_rows(16)))
    # SGD at 1e30: step 1 moves the weights to ~1e30, so the next forward pass overflows float32 to inf / NaN
    values = train_config(tiny_model, data, tmp_path / "out", max_steps=6, save_steps=1, optim="sgd",
                          learning_rate=1e30, max_grad_norm=0)
    out = tmp_path / "out"
    run = Run(values, "nan")
    assert run.wait() == 3, run.output  # faults.NonFinite.exit_code
    message = run.output.split("tuneforge: stopped: ")[1]
    step = int(message.split("step ")[1].split(":")[0])
    rows = epoch_batches(16, 4, seed=1, epoch=0, shuffle=True)[step - 1]
    assert f"micro-batch 1: {', '.join(map(str, rows))}" in message, message
    last = out / f"checkpoint-{step - 1}"
    assert f"the last good checkpoint is {last}" in message
    assert (last / MARKER).is_file() and not (out / "adapter_model.safetensors").exists()
    assert all(t.isfinite().all() for t in trained_weights(last).values())
    assert not (out / f"checkpoint-{step}").exists()


def test_skip_nonfinite_steps_counts_and_logs_them(tiny_model, tmp_path, capsys):
    data = str(write_jsonl(tmp_path / "d.jsonl", alpaca_rows(16)))
    out = tmp_path / "out"
    results = run_training(train_config(tiny_model, data, out, max_steps=4, optim="sgd", learning_rate=1e30,
                                        max_grad_norm=0, skip_nonfinite_steps=True))
    skipped = [line for line in capsys.readouterr().out.splitlines() if "its update was skipped" in line]
    assert results["skipped_steps"] == len(skipped) >= 1 and results["global_step"] == 4
    assert read_log(out)[-1]["skipped_steps"] == len(skipped)
    assert all(t.isfinite().all() for t in trained_weights(out).values())
