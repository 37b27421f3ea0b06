"""Nothing in the data is dropped silently: a template that cannot render a record's tools, tool calls, tool
results or system prompt stops with the record named; `{{name}}` placeholders are filled or warned about."""

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import run_training, train_config, write_jsonl

from tuneforge.cli import main
from tuneforge.data import DataError

TOOLS = json.dumps([{"name": "add_numbers", "description": "Add two numbers", "parameters": {"type": "object"}}])
TOOL_RECORD = {"conversations": [
    {"from": "human", "value": "What is 2 plus 2?"},
    {"from": "function_call", "value": json.dumps({"name": "add_numbers", "arguments": {"a": 2, "b": 2}})},
    {"from": "observation", "value": "{\"sum\": 4}"},
    {"from": "gpt", "value": "It is 4."}], "tools": TOOLS, "system": "Answer with numbers."}


def _tool_data(tmp_path: Path, records: list[dict]) -> Path:
    write_jsonl(tmp_path / "calls.jsonl", records)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"toolcalls": {
        "file_name": "calls.jsonl", "formatting": "sharegpt",
        "columns": {"messages": "conversations", "tools": "tools", "system": "system"}}}))
    return tmp_path


def _with_chat_template(tiny_model: str, tmp_path: Path, template: str) -> str:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text(template)
    return str(folder)


def test_a_template_that_drops_tool_calls_stops_with_the_record(tiny_model, tmp_path):
    data = _tool_data(tmp_path, [{**TOOL_RECORD, "system": ""}, TOOL_RECORD])
    values = train_config(tiny_model, "toolcalls", tmp_path / "out", dataset_dir=str(data), template=None,
                          max_steps=1)
    # the tiny tokenizer's own ChatML template writes only `content`: no tools, an empty turn for the call
    with pytest.raises(DataError) as err:
        run_training(values)
    message = str(err.value)
    assert message.startswith(f"dataset `toolcalls`, {data / 'calls.jsonl'} line 1: the tokenizer's own "
                              "chat_template (`template` unset) drops the tool definitions, a tool call of this record")
    assert message.endswith("set `template: chatml`, which renders them")
    assert "\n" not in message
    # the named template it suggests renders every part, and training runs
    run_training({**values, "template": "chatml"})


@pytest.mark.parametrize("template, lost", [
    # a system prompt silently left out
    ("{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
     "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
     "drops the system prompt"),
    # a template that refuses system turns itself
    ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
     "{% endif %}{{ m['content'] }}{% endfor %}", "cannot render this conversation (System role not supported)"),
])
def test_a_dropped_or_refused_system_prompt_is_an_error(tiny_model, tmp_path, template, lost):
    model = _with_chat_template(tiny_model, tmp_path, template)
    rows = [{"instruction": "2+2?", "output": "4", "system": "Be brief."}]
    write_jsonl(tmp_path / "s.jsonl", rows)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"s": {"file_name": "s.jsonl",
                                                                  "columns": {"system": "system"}}}))
    values = train_config(model, "s", tmp_path / "out", dataset_dir=str(tmp_path), template=None, max_steps=1)
    with pytest.raises(DataError, match=r"dataset `s`, .*s.jsonl line 1: .*" + re.escape(lost)):
        run_training(values)


IDENTITY = [{"instruction": "Who are you?", "input": "", "output": "I am {{name}}, made by {{author}}."},
            {"instruction": "Hello", "input": "", "output": "Hello! I am {{ name }}."}]


def test_placeholders_are_warned_about_and_filled(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "identity.jsonl", IDENTITY)
    common = ["data", f"model_name_or_path={tiny_model}", f"dataset={data}", "template=chatml", "--show", "2",
              "--plot", str(tmp_path / "p.png")]
    assert main(common) == 0
    out = capsys.readouterr()
    assert out.err.count("warning") == 1 and "placeholders {{name}}, {{author}}" in out.err
    assert "--fill name=...,author=..." in out.err and "identity.jsonl line 1" in out.err
    assert main([*common, "--fill", "name=Forgewright,author=Anvil Labs"]) == 0
    out = capsys.readouterr()
    assert "warning" not in out.err and "I am Forgewright, made by Anvil Labs." in out.out
    assert "Hello! I am Forgewright." in out.out  # `{{ name }}` with spaces too
    run_training(train_config(tiny_model, str(data), tmp_path / "out", max_steps=1))  # train warns the same way
    assert "placeholders {{name}}, {{author}}" in capsys.readouterr().err
    with pytest.raises(DataError, match="entries look like name=value"):
        run_training(train_config(tiny_model, str(data), tmp_path / "o2", max_steps=1, fill_placeholders="name"))
