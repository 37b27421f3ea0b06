"""Command lines in LLaMA-Factory's forms (--key value, --key=value, bare --flag) mixed with a file and key=value,
where each key came from in messages, did-you-mean hints, and `tuneforge version` / `env`."""

import pytest
from conftest import read_log

from tuneforge.cli import main
from tuneforge.cmdline import parse_overrides, split_command_line, suggest
from tuneforge.config import ConfigError, load_config


def test_every_form_in_any_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: m\ndataset: d\noutput_dir: o\nlearning_rate: 1e-4\nplot_loss: true\n")
    args = ["--do_train", "--stage", "sft", "lora_rank=4", str(path), "--plot_loss", "False", "--fp16",
            "--learning_rate=3e-4", "--lora_target", "q_proj,v_proj", "--max_steps", "-1", "--lora_rank", "16"]
    file, keys = split_command_line(args)
    assert file == str(path)
    cfg = load_config(file, keys)
    # the command line overrides the file; of two command-line values the later wins
    assert cfg.train.learning_rate == pytest.approx(3e-4) and cfg.finetune.lora_rank == 16
    assert cfg.finetune.plot_loss is False and cfg.train.fp16 is True and cfg.train.do_train is True
    assert cfg.finetune.lora_target == "q_proj,v_proj" and cfg.train.max_steps == -1
    # a bare flag before the file is a flag, not the flag's value
    assert split_command_line(["--do_train", "c.yaml"]) == ("c.yaml", ["--do_train"])
    assert parse_overrides(["--do_train", "True", "--do_eval", "no"]) == {"do_train": True, "do_eval": False}
    with pytest.raises(ConfigError, match="`--learning_rate` needs a value"):
        parse_overrides(["--learning_rate"])
    with pytest.raises(ConfigError, match="two config files"):
        split_command_line(["a.yaml", "b.yaml"])


def test_messages_name_where_a_key_came_from(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model_name_or_path: m\ndataset: d\noutput_dir: o\n")
    with pytest.raises(ConfigError, match=r"^command line: unknown key `learnig_rate`; did you mean learning_rate\?$"):
        load_config(str(path), ["--learnig_rate", "1"])
    path.write_text("model_name_or_path: m\ndataset: d\noutput_dir: o\nlearnig_rate: 1\n")
    with pytest.raises(ConfigError) as both:
        load_config(str(path), ["lora_rnk=4"])
    assert f"- {path}: unknown key `learnig_rate`" in str(both.value)
    assert "- command line: unknown key `lora_rnk`; did you mean lora_rank?" in str(both.value)
    path.write_text("model_name_or_path: m\ndataset: d\noutput_dir: o\n")
    with pytest.raises(ConfigError, match=r"`lr_scheduler_type` must be one of .* \(set on the command line\)$"):
        load_config(str(path), ["--lr_scheduler_type", "polynomal"])


@pytest.mark.parametrize("typo, hint", [("learnig_rate", "learning_rate"), ("lora_rnk", "lora_rank"),
                                        ("gradient_accumulation", "gradient_accumulation_steps"),
                                        ("use_apolo", "use_apollo"), ("use_flora", None), ("use_magic", None),
                                        ("lr", None)])
def test_did_you_mean_points_only_at_real_typos(typo, hint):
    text = suggest(typo)
    if hint:
        assert text == f"; did you mean {hint}?"
    else:  # use_flora is not use_rslora / use_dora: no hint beats a wrong one
        assert "did you mean" not in text


def test_the_tutorials_command_line_trains_and_chat_takes_keys_after_query(tiny_model, tmp_path, capsys,
                                                                             monkeypatch):
    import shutil
    from pathlib import Path

    shutil.copytree(Path(__file__).parents[1] / "data", tmp_path / "data")  # identity lives in data/
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "saves" / "x"
    assert main(["train", "--stage", "sft", "--model_name_or_path", tiny_model, "--do_train", "--dataset", "identity",
                 "--template", "default", "--finetuning_type", "lora", "--lora_target", "q_proj,v_proj",
                 "--output_dir", str(out), "--fp16", "--max_steps", "2", "--cutoff_len", "48",
                 "--logging_steps", "1"]) == 0
    assert len(read_log(out)) == 2 and (out / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    assert main(["chat", f"model_name_or_path={tiny_model}", "--query", "Who are you?", f"adapter_name_or_path={out}",
                 "--do_sample", "false", "max_new_tokens=3", "--template", "default"]) == 0
    assert capsys.readouterr().out.strip()


def test_version_and_env(capsys):
    from tuneforge import __version__

    assert main(["version"]) == 0 and capsys.readouterr().out.strip() == f"tuneforge {__version__}"
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "cpu", "threads",
                 "cuda"):
        assert f"\n{name} " in "\n" + text
