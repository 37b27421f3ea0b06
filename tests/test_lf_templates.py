"""Every named template that LLaMA-Factory 0.9.5 also has, against LLaMA-Factory's own rendering of the same
conversation (tests/data/lf_templates.json, written by tests/data/lf_templates.py running LLaMA-Factory's code), with
the differences data/template_table.py names and no others."""

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tuneforge.data.registry import DataError
from tuneforge.data.template_table import OTHER_THOUGHT_MARKERS
from tuneforge.data.templates import EMPTY_THOUGHT, TEMPLATES, get_template
from tuneforge.data.tools import LLAMA3_DATE, parse_answer_calls

LF = json.loads((Path(__file__).parent / "data" / "lf_templates.json").read_text(encoding="utf-8"))
MESSAGES = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]
CALL = {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}
TOOL_MESSAGES = [{"role": "user", "content": "Weather in Paris?"}, {"role": "function", "content": json.dumps(CALL)},
                 {"role": "observation", "content": '{"forecast": "sunny"}'},
                 {"role": "assistant", "content": "Sunny."}]
TOOLS = json.dumps([{"name": "get_weather", "description": "The weather in a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "description": "The city."},
                                     "days": {"type": "integer", "description": "How many days."}},
    "required": ["city"]}}])  # as tests/data/lf_templates.py writes them
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


def test_every_template_writes_tools_in_a_format_that_is_built():
    from tuneforge.data.tools import TOOL_FORMATS

    assert {template.tool_format for template in TEMPLATES.values()} <= set(TOOL_FORMATS)


def expected_with_tools(name: str) -> list[str]:
    """LLaMA-Factory's rendering of the tool conversation turned into tuneforge's by the differences data/tools.py
    names: Llama 3.1's template's date, not the day of tokenising; no blank line opening a system turn that holds
    only tools (as Qwen3's and GLM-4.5's templates write it); GLM-4.5's and MiniMax-M2's calls closed as their tool
    prompts show."""
    out, fmt = expected(name, LF[name]["tools"]), TEMPLATES[name].tool_format
    out[0] = re.sub(r"Today Date: \d+ \w+ \d+", f"Today Date: {LLAMA3_DATE}", out[0])
    if not TEMPLATES[name].default_system:
        out[0] = out[0].replace("\n\n# Tools", "# Tools", 1)
    if fmt == "glm4_moe":
        out[1] = out[1].replace("</arg_value>" + EOS, "</arg_value>\n</tool_call>" + EOS)
    if fmt == "minimax2":
        out[1] = re.sub(r"(<invoke .*</invoke>)", r"<minimax:tool_call>\n\1\n</minimax:tool_call>", out[1], flags=re.S)
    return out


WITH_TOOLS = sorted(name for name in set(LF) & set(TEMPLATES) - set(PUBLISHED) if isinstance(LF[name]["tools"], list))


@pytest.mark.parametrize("name", WITH_TOOLS)
def test_tools_render_as_llamafactory_writes_them(tokenizer, name):
    assert get_template(name, tokenizer).pieces(tokenizer, TOOL_MESSAGES, None, tools=TOOLS) == \
        expected_with_tools(name)


@pytest.mark.parametrize("name", WITH_TOOLS)
def test_the_call_llamafactory_trains_on_parses_back(tokenizer, name):
    """What the API server reads a generated answer with takes the call as LLaMA-Factory trained it (GLM-4.5's and
    MiniMax-M2's unclosed ones too)."""
    template = TEMPLATES[name]
    end_of_turn = (template.function or template.assistant).split("{content}")[-1].replace("{eos}", "").strip()
    answer = LF[name]["tools"][1].strip().removesuffix(EOS).strip().removesuffix(end_of_turn).strip()
    answer = answer.removeprefix(EMPTY_THOUGHT.strip()).strip()
    assert parse_answer_calls(TEMPLATES[name].tool_format, answer) == [CALL]


def test_the_fixture_has_the_tool_formats_built(tokenizer):
    assert {TEMPLATES[name].tool_format for name in WITH_TOOLS} >= {
        "default", "qwen", "llama3", "glm4", "mistral", "ling", "glm4_moe", "lfm2", "minimax1", "minimax2", "phi4_mini"}
