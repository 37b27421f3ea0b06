"""report_to: TensorBoard event files hold the scalars trainer_log.jsonl holds, read back with TensorBoard's own
reader; unknown trackers and missing packages are refused with what to do."""

import pytest

from conftest import read_log, run_training, train_config


def test_tensorboard_events_match_the_log(tiny_model, alpaca_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run_training(train_config(tiny_model, alpaca_file, out, max_steps=4, report_to="tensorboard",
                              val_size=0.25, eval_strategy="steps", eval_steps=2, do_eval=True))
    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/learning_rate", "train/tokens_per_second", "eval/loss"} <= set(tags)
    records = read_log(out)
    logged = [(r["current_steps"], r["loss"]) for r in records if "loss" in r]
    written = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in written] == [s for s, _ in logged] == [1, 2, 3, 4]
    # event files store float32: a 4-decimal loss comes back within float32's relative precision
    assert all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for (_, a), (_, b) in zip(written, logged))
    evals = [(r["current_steps"], r["eval_loss"]) for r in records if "eval_loss" in r]
    written = [(e.step, e.value) for e in events.Scalars("eval/loss")]
    assert [s for s, _ in written] == [s for s, _ in evals] == [2, 4]
    assert all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for (_, a), (_, b) in zip(written, evals))


@pytest.mark.parametrize("value, message", [
    ("comet_ml", "`report_to: comet_ml` is not supported; use tensorboard, wandb, mlflow"),
    ("tensorboard,swanlab", "`report_to: swanlab` is not supported"),
])
def test_unknown_trackers_are_refused(tiny_model, alpaca_file, tmp_path, value, message):
    from tuneforge.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        run_training(train_config(tiny_model, alpaca_file, tmp_path / "o", report_to=value))


def test_a_tracker_whose_package_is_missing_says_how_to_install_it(monkeypatch):
    from tuneforge.train import trackers

    monkeypatch.setattr(trackers, "_installed", lambda name: name == "tensorboard")
    assert trackers.problems("wandb") == ["`report_to: wandb` needs the `wandb` package: pip install wandb"]
    assert trackers.requested("all") == ["tensorboard"]
    assert trackers.requested("none") == [] and trackers.problems("tensorboard") == []
