import json
import subprocess
import sys

import pytest
from conftest import read_log, write_jsonl, alpaca_rows

from tuneforge.machine import tcmalloc_library

TUNEFORGE = [sys.executable, "-m", "tuneforge.cli"]


def _run(*args, stdin=None):
    return subprocess.run([*TUNEFORGE, *args], capture_output=True, text=True, input=stdin, timeout=300)


def test_help_lists_commands_and_keys():
    top = _run("--help")
    assert top.returncode == 0 and "train" in top.stdout and "chat" in top.stdout
    train = _run("train", "--help")
    assert train.returncode == 0
    for key in ("model_name_or_path", "learning_rate", "lora_target", "cutoff_len", "gradient_accumulation_steps"):
        assert key in train.stdout


def test_train_with_overrides_then_chat(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(8))
    config = tmp_path / "c.yaml"
    config.write_text(f"model_name_or_path: {tiny_model}\ndataset: {data}\ntemplate: chatml\noutput_dir: {tmp_path/'o'}\n"
                      "do_train: true\nmax_steps: 2\nlogging_steps: 1\ncutoff_len: 64\n")
    done = _run("train", str(config), "learning_rate=3e-4", "per_device_train_batch_size=2")
    assert done.returncode == 0, done.stderr
    # our progress bar, without transformers' bars for loading and saving weights around it
    assert "train: 100%" in done.stderr and "Loading weights" not in done.stderr + done.stdout
    # the command trains on tcmalloc when the system has it (the Makefile installs it): the line is printed by the
    # process that runs again with it preloaded, once it finds the library mapped into itself
    assert ("memory allocator: tcmalloc" in done.stdout) == (tcmalloc_library() is not None), done.stdout
    assert [r["lr"] for r in read_log(tmp_path / "o")] == [3e-4, 1.5e-4]  # linear decay over 2 steps
    saved = (tmp_path / "o" / "tuneforge_config.yaml").read_text()
    assert "learning_rate: 0.0003" in saved and "per_device_train_batch_size: 2" in saved
    chat = [f"model_name_or_path={tiny_model}", f"adapter_name_or_path={tmp_path/'o'}", "do_sample=false",
            "max_new_tokens=4"]
    one = _run("chat", *chat, "--query", "What is 1 plus 2?")
    assert one.returncode == 0 and one.stdout.strip(), one.stderr
    assert "[tuneforge]" not in one.stdout and "Loading weights" not in one.stderr  # stdout is the answer alone
    session = _run("chat", *chat, stdin="hello\n/clear\nWhat is 3 plus 4?\n/exit\n")
    assert session.returncode == 0, session.stderr
    assert session.stdout.count("Assistant:") == 2 and "(history cleared)" in session.stdout


def test_errors_are_one_line_and_exit_2(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model_name_or_path: m\nlearnig_rate: 1\n")
    result = _run("train", str(config))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"tuneforge: error: {config}: unknown key `learnig_rate`; did you mean learning_rate?"]
    missing = _run("train", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "config file not found" in missing.stderr


def test_data_command_previews_and_fails_like_train(tiny_model, tmp_path):
    rows = alpaca_rows(8) + [{"instruction": "word " * 80, "input": "", "output": "long answer " * 20}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    config = tmp_path / "c.yaml"
    config.write_text(f"model_name_or_path: {tiny_model}\ndataset: {data}\ntemplate: chatml\ncutoff_len: 64\n"
                      "output_dir: never-written\n")
    done = _run("data", str(config), "--show", "1", "--plot", str(tmp_path / "lengths.png"))
    assert done.returncode == 0, done.stderr
    assert "split: 9 train, 0 evaluation" in done.stdout
    assert "cutoff_len 64: 3 of 9 records truncated, 0 left with nothing to learn" in done.stdout
    assert "[[0 plus 0 is 0.<|im_end|>]]" in done.stdout  # the trained answer, bracketed; the prompt is not
    assert (tmp_path / "lengths.png").is_file() and not (tmp_path / "never-written").exists()
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": \n')
    bad = _run("data", str(config), f"dataset={tmp_path / 'bad.jsonl'}")
    assert bad.returncode == 2 and "bad.jsonl line 1 column" in bad.stderr


DATA_FORMATS = {  # stage, registry entry, records
    "alpaca": ("sft", {"file_name": "f.jsonl"}, [{"instruction": "2+2?", "input": "", "output": "four"}]),
    "sharegpt": ("sft", {"file_name": "f.jsonl", "formatting": "sharegpt"},
                 [{"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "four"}]}]),
    "openai": ("sft", {"file_name": "f.jsonl", "formatting": "openai"},
               [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "four"}]}]),
    "text": ("pt", {"file_name": "f.jsonl", "columns": {"prompt": "text"}}, [{"text": "two plus two is four"}]),
    "alpaca_pairs": ("dpo", {"file_name": "f.jsonl", "ranking": True},
                     [{"instruction": "2+2?", "chosen": "four", "rejected": "five"}]),
    "sharegpt_pairs": ("rm", {"file_name": "f.jsonl", "formatting": "sharegpt", "ranking": True},
                       [{"conversations": [{"from": "human", "value": "2+2?"}],
                         "chosen": {"from": "gpt", "value": "four"}, "rejected": {"from": "gpt", "value": "five"}}]),
    "kto": ("kto", {"file_name": "f.jsonl", "columns": {"kto_tag": "label"}},
            [{"instruction": "2+2?", "output": "four", "label": True},
             {"instruction": "3+3?", "output": "seven", "label": False}]),
    "text_label": ("cls", {"file_name": "f.jsonl"}, [{"text": "great film", "label": "pos"},
                                                     {"text": "dull film", "label": "neg"}]),
}
SHOWN = {"alpaca": "[[four<|im_end|>]]", "sharegpt": "[[four<|im_end|>]]", "openai": "[[four<|im_end|>]]",
         "text": "[[two plus two is four", "alpaca_pairs": "[rejected] <|im_start|>user\n2+2?",
         "sharegpt_pairs": "[chosen] <|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n[[four<|im_end|>]]",
         "kto": "[kto_tag False] <|im_start|>user\n3+3?", "text_label": "label [[pos]] ---\ngreat film"}


@pytest.mark.parametrize("kind", sorted(DATA_FORMATS))
def test_data_command_on_every_format(tiny_model, tmp_path, capsys, kind):
    from tuneforge.cli import main

    stage, entry, rows = DATA_FORMATS[kind]
    write_jsonl(tmp_path / "f.jsonl", rows)
    (tmp_path / "dataset_info.json").write_text(json.dumps({kind: entry}))
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"model_name_or_path": tiny_model, "dataset": kind, "dataset_dir": str(tmp_path),
                                  "stage": stage, "template": "chatml", "output_dir": str(tmp_path / "out"),
                                  "do_train": True}))
    assert main(["data", str(config), "--plot", str(tmp_path / "h.png")]) == 0
    printed = capsys.readouterr().out
    assert f"split: {len(rows)} train, 0 evaluation" in printed
    assert SHOWN[kind] in printed, printed
    assert not (tmp_path / "out").exists()
