"""Every named template that LLaMA-Factory 0.9.5 also has, against LLaMA-Factory's own rendering of the same
conversation (tests/data/lf_templates.json, written by tests/data/lf_templates.py running LLaMA-Factory's code), with
the differences data/template_table.py names and no others."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tuneforge.data.registry import DataError
from tuneforge.data.template_table import OTHER_THOUGHT_MARKERS
from tuneforge.data.templates import EMPTY_THOUGHT, TEMPLATES, get_template

LF = json.loads((Path(__file__).parent / "data" / "lf_templates.json").read_text(encoding="utf-8"))
MESSAGES = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]
EOS = "</s>"  # the fixture's tokenizer had <s> and </s> set as bos and eos
# where tuneforge writes the model family's published format (tests/test_templates.py) and LLaMA-Factory does not
PUBLISHED = {
    "alpaca": "a system prompt is followed by a blank line; LLaMA-Factory glues one to the instruction",
    "empty": "answers end with eos, so the model learns to stop; LLaMA-Factory's end with nothing",
    "llama2": "[/INST] {answer} </s>, with the spaces, as Llama 2's reference code writes it",
    "vicuna": "a space after the system prompt and before the answer (FastChat's vicuna_v1.1)",
    "zephyr": "a newline after each </s>, as Zephyr's chat_template writes it",
}


def expected(name: str, rendering: list[str]) -> list[str]:
    """LLaMA-Factory's prompt / answer texts turned into tuneforge's by the differences on purpose."""
    lf, out, carry = LF[name], [], ""
    for i, text in enumerate(rendering):
        text = carry + text
        carry = ""
        if i % 2:  # an answer
            if lf["efficient_eos"]:  # LLaMA-Factory appends eos once, after the last answer
                text += EOS
            if TEMPLATES[name].thinking and text.startswith(EMPTY_THOUGHT):
                text = text[len(EMPTY_THOUGHT):]
                if i == len(rendering) - 1:  # the last answer keeps it, after the answer format's opening text
                    opening = TEMPLATES[name].assistant.split("{content}")[0]
                    text = opening + EMPTY_THOUGHT + text.removeprefix(opening)
            stripped = text.rstrip()
            carry = text[len(stripped):]  # whitespace after the end of turn opens the next prompt
            text = stripped
        out.append(text)
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": EOS})
    return tokenizer


@pytest.mark.parametrize("name", sorted(set(LF) & set(TEMPLATES) - set(PUBLISHED)))
@pytest.mark.parametrize("system", ["Be brief.", None])
def test_template_renders_as_llamafactory_does(tokenizer, name, system):
    ours = get_template(name, tokenizer).pieces(tokenizer, MESSAGES, system)
    theirs = LF[name]["with_system" if system else "without_system"]
    assert ours == expected(name, theirs)


def test_every_llamafactory_text_template_is_built_or_refused(tokenizer):
    missing = set(LF) - set(TEMPLATES) - set(OTHER_THOUGHT_MARKERS)
    assert not missing
    for name in OTHER_THOUGHT_MARKERS:
        with pytest.raises(DataError, match=f"template `{name}` marks thinking with"):
            get_template(name, tokenizer)


def test_a_tool_format_that_is_not_built_is_refused_when_there_are_tools(tokenizer):
    template = get_template("lfm2", tokenizer)
    template.pieces(tokenizer, MESSAGES, None)  # no tools: fine
    with pytest.raises(DataError, match="template `lfm2` writes tools in LLaMA-Factory's `lfm2` format, which is "
                                        "not built yet: set `tool_format` to one of default, json, qwen"):
        template.pieces(tokenizer, MESSAGES, None, tools='[{"name": "f", "parameters": {}}]')
