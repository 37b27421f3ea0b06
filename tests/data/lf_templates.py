"""Writes lf_templates.json: LLaMA-Factory 0.9.5's rendering of one conversation under each of its text templates,
for tests/test_lf_templates.py. Run it with LLaMA-Factory's own Python (bench/README.md says how to install it):

    /work/lfvenv/bin/python tests/data/lf_templates.py /root/.cache/tuneforge/models/smollm2-135m-instruct-*

The argument is any tokenizer folder (the bundled SmolLM2's); its bos and eos are set to <s> and </s> first, so that
the rendering names them the same way for every template. Each entry holds the prompt and answer texts
Template.encode_multiturn gives (ids decoded, special tokens kept), with and without a system message, and for a
conversation with a tool call, its result and tool definitions; and the template's settings that the comparison
needs."""

import json
import sys
from pathlib import Path

from transformers import AutoTokenizer

from llamafactory.data.template import TEMPLATES, get_template_and_fix_tokenizer
from llamafactory.hparams import DataArguments

CONVERSATION = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]
# a tool call and its result: tools in the system text, the call in the template's tool format
TOOLS = json.dumps([{"name": "get_weather", "description": "The weather in a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "description": "The city."},
                                     "days": {"type": "integer", "description": "How many days."}},
    "required": ["city"]}}])
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "function", "content": json.dumps({"name": "get_weather", "arguments": {"city": "Paris", "days": 2}})},
    {"role": "observation", "content": '{"forecast": "sunny"}'}, {"role": "assistant", "content": "Sunny."}]


def named_tokens(template) -> list[str]:
    """The tokens a template's formats name by id ({"token": ...}), which the tokenizer must have."""
    formats = [getattr(template, key) for key in vars(template) if key.startswith("format_")]
    return sorted({slot["token"] for f in formats for slot in getattr(f, "slots", []) if isinstance(slot, dict)})


def render(name: str, folder: str, system: str | None, conversation=CONVERSATION, tools: str | None = None
           ) -> list[str] | str:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>",
                                  "additional_special_tokens": named_tokens(TEMPLATES[name])})
    template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template=name))
    try:
        pairs = template.encode_multiturn(tokenizer, conversation, system, tools)
    except ValueError as err:  # e.g. a tool format LLaMA-Factory names but has no writer for
        return f"ValueError: {err}"
    return [tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            for pair in pairs for ids in pair]


def main() -> None:
    folder, out = sys.argv[1], {}
    for name, template in TEMPLATES.items():
        if type(template.mm_plugin).__name__ != "BasePlugin":
            continue  # a vision / audio model's template
        out[name] = {"with_system": render(name, folder, "Be brief."), "without_system": render(name, folder, None),
                     "tools": render(name, folder, None, TOOL_CONVERSATION, TOOLS),
                     "tool_format": template.format_tools.tool_format if template.format_tools else None,
                     "class": type(template).__name__, "efficient_eos": template.efficient_eos,
                     "stop_words": template.stop_words, "thought_words": list(template.thought_words),
                     "default_system": template.default_system}
    path = Path(__file__).with_suffix(".json")
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(out)} templates -> {path}")


if __name__ == "__main__":
    main()
