"""Stage grpo on the tiny random model: prompt data, a toy reward that rises, exact resume, and its config rules."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import read_log, run_training, train_config, write_jsonl
from tuneforge.config import ConfigError, DataArgs, build_config, validate
from tuneforge.data import DataError, load_examples

TOPICS = ["the sea", "a fox", "the weather", "two plus two", "French", "a poem", "the dog", "tools"]
# the toy reward: how many letters `e` a completion holds
REWARD = "def count_e(prompts, completions, **columns):\n    return [float(c.count('e')) for c in completions]\n"


def _prompt_files(tmp_path: Path) -> tuple[str, str]:
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"instruction": f"Tell me about {t}.", "answer": str(i)}
                                                    for i, t in enumerate(TOPICS)])
    (tmp_path / "reward.py").write_text(REWARD)
    return str(data), f"{tmp_path / 'reward.py'}:count_e"


def _grpo(model, data, reward, out, **overrides):
    values = dict(stage="grpo", reward_funcs=reward, num_generations=4, per_device_train_batch_size=8,
                  max_completion_length=12, temperature=1.0, top_p=1.0, top_k=0, learning_rate=3e-3,
                  finetuning_type="lora", lora_rank=8)
    values.update(overrides)
    return train_config(model, data, out, **values)


def test_prompt_data_in_every_format_keeps_its_extra_columns(tmp_path):
    write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "What is 2+2?", "answer": "4", "level": 1}])
    (tmp_path / "chat.json").write_text(json.dumps([{"conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "2+3?"}],
        "answer": "5"}]))
    args = DataArgs(dataset_dir=str(tmp_path))
    alpaca = load_examples(str(tmp_path / "alpaca.jsonl"), args, "grpo", 0)[0]
    assert alpaca.messages == [{"role": "user", "content": "What is 2+2?"}]
    assert alpaca.extra == {"answer": "4", "level": 1}
    chat = load_examples(str(tmp_path / "chat.json"), args, "grpo", 0)[0]
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user"] and chat.extra == {"answer": "5"}
    (tmp_path / "answered.json").write_text(json.dumps([{"conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]))
    with pytest.raises(DataError, match="answered.json record 0: a prompt conversation must end on a user turn"):
        load_examples(str(tmp_path / "answered.json"), args, "grpo", 0)


def test_grpo_options_are_checked_together():
    cfg = build_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "do_train": True, "stage": "grpo",
                        "num_generations": 3, "loss_type": "ppo", "do_sample": False}, source="g.yaml")
    with pytest.raises(ConfigError) as caught:
        validate(cfg, "train")
    message = str(caught.value)
    assert message.startswith("g.yaml: 4 problems:")
    for part in ("`loss_type` must be one of grpo, dr_grpo, dapo, bnpo; got 'ppo'", "needs `reward_funcs`",
                 "(8) must be a multiple of num_generations (3)", "set `do_sample: true`"):
        assert part in message
    sft = build_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "do_train": True, "beta": 0.1},
                       source="s.yaml")
    with pytest.raises(ConfigError, match="`beta` applies to stage grpo only"):
        validate(sft, "train")


def test_a_toy_reward_rises(tiny_model, tmp_path):
    data, reward = _prompt_files(tmp_path)
    out = tmp_path / "out"
    results = run_training(_grpo(tiny_model, data, reward, out, finetuning_type="full", learning_rate=1e-2,
                                 gradient_accumulation_steps=2, max_steps=20, loss_type="grpo", eval_dataset=data,
                                 do_eval=True, eval_strategy="steps", eval_steps=10, load_best_model_at_end=True))
    log = [r for r in read_log(out) if "reward" in r]
    rewards = [r["reward"] for r in log]
    assert len(rewards) == 20
    # a random model writes about one `e` in 12 tokens; the policy learns to write many more. Sampling makes single
    # steps noisy, so compare means of five steps with a wide margin (measured: about 1 -> 7)
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 1.5, rewards
    record = log[-1]
    # do_eval scores one greedy completion per evaluation prompt before and after training, eval_strategy during it
    assert {"eval_reward", "eval_before_reward", "eval_rewards/count_e"} <= set(results)
    evals = [r for r in read_log(out) if "eval_reward" in r]
    assert [r["current_steps"] for r in evals] == [10, 20] and "eval_rewards/count_e" in evals[0]
    # load_best_model_at_end keeps the step with the highest eval_reward (higher is better): the final scores
    assert results["eval_reward"] == pytest.approx(max(r["eval_reward"] for r in evals), abs=1e-4)
    for key in ("reward_std", "completion_length", "entropy", "rewards/count_e",
                "generation_tokens_per_second", "generation_time_share"):
        assert key in record, key


def test_eval_on_start_logs_the_evaluation_before_training_without_generating_again(tiny_model, tmp_path,
                                                                                   monkeypatch):
    from tuneforge.train.grpo import RewardEvaluation

    calls = []
    original = RewardEvaluation.__call__
    monkeypatch.setattr(RewardEvaluation, "__call__", lambda self: calls.append(1) or original(self))
    data, reward = _prompt_files(tmp_path)
    out = tmp_path / "out"
    results = run_training(_grpo(tiny_model, data, reward, out, max_steps=1, eval_dataset=data, do_eval=True,
                                 eval_on_start=True))
    start = next(r for r in read_log(out) if "eval_reward" in r)
    assert start["current_steps"] == 0 and start["eval_reward"] == pytest.approx(results["eval_before_reward"],
                                                                                 abs=1e-4)  # the log's rounding
    assert len(calls) == 2  # before and after training


def test_resume_mid_run_gives_the_same_weights(tiny_model, tmp_path):
    """The sampled completions depend on the global RNG, which checkpoints restore: a resumed run samples what the
    uninterrupted one sampled. LoRA with beta > 0 also runs the reference (the adapter switched off)."""
    data, reward = _prompt_files(tmp_path)
    common = dict(max_steps=4, save_steps=2, beta=0.05, lora_dropout=0.1)
    run_training(_grpo(tiny_model, data, reward, tmp_path / "straight", **common))
    interrupted = tmp_path / "interrupted"
    run_training(_grpo(tiny_model, data, reward, interrupted, **common))
    for name in ("adapter_model.safetensors", "adapter_config.json", "train_results.json", "all_results.json"):
        (interrupted / name).unlink()
    run_training(_grpo(tiny_model, data, reward, interrupted, **common))  # resumes from checkpoint-2 by itself
    straight = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    resumed = load_file(interrupted / "adapter_model.safetensors")
    # the same operations on the same numbers in the same process type: equal up to float32 rounding
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) < 1e-6
    assert [r["current_steps"] for r in read_log(interrupted)] == [1, 2, 3, 4]
    assert "kl" in read_log(interrupted)[-1]


def test_clip_range_that_cannot_bind_is_refused():
    cfg = build_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "do_train": True, "stage": "grpo",
                        "reward_funcs": "length", "epsilon_high": 0.28}, source="g.yaml")
    with pytest.raises(ConfigError, match="g.yaml: `epsilon` / `epsilon_high` would have no effect"):
        validate(cfg, "train")


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="needs torchrun")
def test_two_processes_share_the_evaluation_prompts(tiny_model, tmp_path):
    """torchrun with 2 processes (gloo on CPU): each completes its share of the 7 evaluation prompts (4 and 3), the
    main process scores all 7 at once, so the reward function runs once per completion, and every process gets the
    metrics (a collective that hangs or fails shows here)."""
    data, _ = _prompt_files(tmp_path)
    held_out = write_jsonl(tmp_path / "held_out.jsonl", [{"instruction": f"Describe {t}."} for t in TOPICS[:7]])
    calls = tmp_path / "calls.txt"
    (tmp_path / "logged.py").write_text(
        "import os\n"
        "def count_e(prompts, completions, **columns):\n"
        f"    with open({str(calls)!r}, 'a') as f:\n"
        "        f.write(f\"{os.getpid()} {len(completions)}\\n\")\n"
        "    return [float(c.count('e')) for c in completions]\n")
    values = _grpo(tiny_model, data, f"{tmp_path / 'logged.py'}:count_e", tmp_path / "ddp", per_device_train_batch_size=4,
                   max_steps=2, eval_dataset=str(held_out), do_eval=True, eval_strategy="steps", eval_steps=2)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    ddp = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "tuneforge.cli", "train",
                          *[f"{k}={v}" for k, v in values.items()]], capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    evaluations = [line.split() for line in calls.read_text().splitlines() if line.split()[1] == "7"]
    # before training and at step 2, the last: do_eval's evaluation after training reuses step 2's
    assert len(evaluations) == 2 and len({pid for pid, _ in evaluations}) == 1
    assert [r["current_steps"] for r in read_log(tmp_path / "ddp") if "eval_reward" in r] == [2]
    results = json.loads((tmp_path / "ddp" / "eval_results.json").read_text())
    assert {"eval_reward", "eval_before_reward", "eval_rewards/count_e"} <= set(results)
