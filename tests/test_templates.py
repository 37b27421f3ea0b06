"""Every named template against its model family's published conversation format, token for token.

Each family gets the tiny test tokenizer plus its own special tokens, so markers such as <|im_start|> are single
tokens as in the real tokenizers. The expected strings are the published renderings of one two-turn conversation
with a system message; the trailing newline some formats put after the final end-of-turn is not part of a training
sequence (the model stops at the end-of-turn token), so it is left out.
"""

import re

import pytest
from conftest import learned_spans

from tuneforge.data.encode import IGNORE, encode_prompt, encode_supervised
from tuneforge.data.formats import Example
from tuneforge.data.template_table import TABLE
from tuneforge.data.templates import TEMPLATES, TokenizerTemplate, get_template

SYSTEM, Q1, A1, Q2, A2 = "Be brief.", "Hi there", "Hello! How can I help?", "What is 2+2?", "4."
CHATML = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
          "Hello! How can I help?<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>")
GEMMA = ("<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\nHello! How can I help?"
         "<end_of_turn>\n<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4.<end_of_turn>")

# name: (bos, eos, published rendering, the learned text of each answer)
CASES = {
    "empty": ("<s>", "</s>", "Be brief.Hi thereHello! How can I help?</s>What is 2+2?4.</s>",
              ["Hello! How can I help?</s>", "4.</s>"]),
    "default": ("<s>", "</s>", "System: Be brief.</s>\nHuman: Hi there</s>\nAssistant:Hello! How can I help?</s>\n"
                "Human: What is 2+2?</s>\nAssistant:4.</s>", ["Hello! How can I help?</s>", "4.</s>"]),
    "alpaca": ("<s>", "</s>", "Be brief.\n\n### Instruction:\nHi there\n\n### Response:\nHello! How can I help?</s>\n\n"
               "### Instruction:\nWhat is 2+2?\n\n### Response:\n4.</s>", ["Hello! How can I help?</s>", "4.</s>"]),
    "vicuna": ("<s>", "</s>", "Be brief. USER: Hi there ASSISTANT: Hello! How can I help?</s>USER: What is 2+2? "
               "ASSISTANT: 4.</s>", [" Hello! How can I help?</s>", " 4.</s>"]),
    "chatml": ("<|im_start|>", "<|im_end|>", CHATML, ["Hello! How can I help?<|im_end|>", "4.<|im_end|>"]),
    "qwen": ("", "<|im_end|>", CHATML, ["Hello! How can I help?<|im_end|>", "4.<|im_end|>"]),
    "qwen3_nothink": ("", "<|im_end|>", CHATML, ["Hello! How can I help?<|im_end|>", "4.<|im_end|>"]),
    "qwen3": ("", "<|im_end|>", CHATML.replace("assistant\n4.", "assistant\n<think>\n\n</think>\n\n4."),
              ["Hello! How can I help?<|im_end|>", "<think>\n\n</think>\n\n4.<|im_end|>"]),
    "yi": ("", "<|im_end|>", CHATML, ["Hello! How can I help?<|im_end|>", "4.<|im_end|>"]),
    "llama2": ("<s>", "</s>", "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! How can I help? </s>"
               "<s>[INST] What is 2+2? [/INST] 4. </s>", [" Hello! How can I help? </s>", " 4. </s>"]),
    "mistral": ("<s>", "</s>", "<s>[INST] Be brief.\n\nHi there[/INST] Hello! How can I help?</s>[INST] What is 2+2?"
                "[/INST] 4.</s>", [" Hello! How can I help?</s>", " 4.</s>"]),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>",
               "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>"
               "user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
               "Hello! How can I help?<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>",
               ["Hello! How can I help?<|eot_id|>", "4.<|eot_id|>"]),
    "gemma": ("<bos>", "<eos>", GEMMA, ["Hello! How can I help?<end_of_turn>", "4.<end_of_turn>"]),
    "gemma3": ("<bos>", "<eos>", GEMMA, ["Hello! How can I help?<end_of_turn>", "4.<end_of_turn>"]),
    "phi4": ("", "<|im_end|>", "<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>user<|im_sep|>Hi there"
             "<|im_end|><|im_start|>assistant<|im_sep|>Hello! How can I help?<|im_end|><|im_start|>user<|im_sep|>"
             "What is 2+2?<|im_end|><|im_start|>assistant<|im_sep|>4.<|im_end|>",
             ["Hello! How can I help?<|im_end|>", "4.<|im_end|>"]),
    "deepseek3": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                  "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi there<｜Assistant｜>Hello! How can I help?"
                  "<｜end▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜>4.<｜end▁of▁sentence｜>",
                  ["Hello! How can I help?<｜end▁of▁sentence｜>", "4.<｜end▁of▁sentence｜>"]),
    "zephyr": ("<s>", "</s>", "<|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\nHello! How can I help?"
               "</s>\n<|user|>\nWhat is 2+2?</s>\n<|assistant|>\n4.</s>", ["Hello! How can I help?</s>", "4.</s>"]),
    # GLM-4 as published has no end token after an answer; like LLaMA-Factory we close each answer with eos
    "glm4": ("", "<|endoftext|>", "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi there<|assistant|>\nHello! How can I "
             "help?<|endoftext|><|user|>\nWhat is 2+2?<|assistant|>\n4.<|endoftext|>",
             ["\nHello! How can I help?<|endoftext|>", "\n4.<|endoftext|>"]),
}
SPECIAL = re.compile(r"<\|[a-z_]+\|>|<｜[^｜]+｜>|</?s>|<(?:bos|eos|start_of_turn|end_of_turn|sop)>|\[gMASK\]")


def family_tokenizer(folder, bos: str, eos: str, text: str):
    """The tiny tokenizer with this family's markers added as special tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    markers = sorted(set(SPECIAL.findall(text)) | {eos} | ({bos} if bos else set()))
    tokenizer.add_special_tokens({"additional_special_tokens": markers, "eos_token": eos,
                                  **({"bos_token": bos} if bos else {})})
    return tokenizer


def conversation(system: str = SYSTEM) -> Example:
    return Example(messages=[{"role": "user", "content": Q1}, {"role": "assistant", "content": A1},
                             {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}], system=system)


def test_every_listed_name_is_built():
    """The templates written here from published formats; LLaMA-Factory's others (template_table.py) are checked
    against its own renderings in test_lf_templates.py."""
    listed = ("default empty alpaca vicuna chatml qwen qwen3 qwen3_nothink llama2 llama3 mistral gemma gemma3 phi4 "
              "deepseek3 zephyr yi glm4").split()
    assert set(listed) <= set(TEMPLATES) and set(CASES) | {entry["name"] for entry in TABLE} == set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_template_matches_the_published_format(tiny_model, name):
    bos, eos, expected, learned = CASES[name]
    tokenizer = family_tokenizer(tiny_model, bos, eos, expected)
    template = get_template(name, tokenizer)
    row = encode_supervised(conversation(), tokenizer, template, cutoff_len=4096)
    assert row["input_ids"] == tokenizer.encode(expected, add_special_tokens=False)
    assert [tokenizer.decode(span) for span in learned_spans(row)] == learned
    # the generation prompt is the conversation up to the second question, ending on the assistant header
    prompt = encode_prompt(conversation().messages[:3], tokenizer, template, SYSTEM)
    assert prompt == row["input_ids"][: len(prompt)] and row["labels"][len(prompt)] != IGNORE


@pytest.mark.parametrize("name", ["chatml", "qwen3_nothink", "yi", None])
def test_chatml_family_matches_apply_chat_template(tiny_model, name):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)  # carries a ChatML chat_template
    template = TokenizerTemplate(tokenizer) if name is None else get_template(name, tokenizer)
    example = conversation()
    chat = [{"role": "system", "content": SYSTEM}] + example.messages
    row = encode_supervised(example, tokenizer, template, cutoff_len=4096)
    reference = tokenizer.apply_chat_template(chat, tokenize=False)
    assert row["input_ids"] == tokenizer.encode(reference.rstrip("\n"), add_special_tokens=False)
    prompt = tokenizer.apply_chat_template(chat[:4], tokenize=False, add_generation_prompt=True)
    assert encode_prompt(example.messages[:3], tokenizer, template, SYSTEM) == tokenizer.encode(
        prompt, add_special_tokens=False)


def test_default_systems(tiny_model):
    bos, eos, expected, _ = CASES["qwen"]
    tokenizer = family_tokenizer(tiny_model, bos, eos, expected)
    text = tokenizer.decode(encode_supervised(conversation(system=""), tokenizer, get_template("qwen", tokenizer),
                                              4096)["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                           "assistant.<|im_end|>\n<|im_start|>user\n")
    tokenizer = family_tokenizer(tiny_model, "<s>", "</s>", "")
    text = tokenizer.decode(encode_supervised(conversation(system=""), tokenizer, get_template("alpaca", tokenizer),
                                              4096)["input_ids"])
    assert text.startswith("Below is an instruction that describes a task. Write a response that appropriately "
                           "completes the request.\n\n### Instruction:\nHi there")


def test_qwen3_thoughts(tiny_model):
    bos, eos, expected, _ = CASES["qwen3"]
    tokenizer = family_tokenizer(tiny_model, bos, eos, expected)
    example = conversation()
    example.messages[1]["content"] = "<think>\nGreet back.\n</think>\n\n" + A1  # an earlier turn's thought
    example.messages[3]["content"] = "<think>Add.</think>" + A2
    row = encode_supervised(example, tokenizer, get_template("qwen3", tokenizer), 4096)
    # as Qwen3's own template: earlier thoughts dropped, the final one kept in its canonical layout
    assert [tokenizer.decode(span) for span in learned_spans(row)] == [A1 + "<|im_end|>", "<think>\nAdd.\n</think>\n\n4.<|im_end|>"]
    off = get_template("qwen3", tokenizer, enable_thinking=False)
    row = encode_supervised(conversation(), tokenizer, off, 4096)
    assert tokenizer.decode(row["input_ids"]) == expected  # same text, but the empty thought is given, not learned
    assert [tokenizer.decode(span) for span in learned_spans(row)][-1] == "4.<|im_end|>"
    prompt = tokenizer.decode(encode_prompt(conversation().messages[:3], tokenizer, off, SYSTEM))
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_qwen3_preserve_thinking(tiny_model):
    """preserve_thinking keeps an earlier answer's thought, in its canonical layout, and trains on it; it is refused
    where no template drops thoughts."""
    from tuneforge.config import build_config
    from tuneforge.data.registry import DataError
    from tuneforge.data.templates import data_template

    bos, eos, expected, _ = CASES["qwen3"]
    tokenizer = family_tokenizer(tiny_model, bos, eos, expected)
    example = conversation()
    example.messages[1]["content"] = "<think>Greet back.</think>" + A1
    keep = get_template("qwen3", tokenizer, preserve_thinking=True)
    spans = [tokenizer.decode(span) for span in learned_spans(encode_supervised(example, tokenizer, keep, 4096))]
    assert spans == ["<think>\nGreet back.\n</think>\n\n" + A1 + "<|im_end|>", "<think>\n\n</think>\n\n4.<|im_end|>"]
    prompt = tokenizer.decode(encode_prompt(example.messages[:3], tokenizer, keep, SYSTEM))
    assert "<think>\nGreet back.\n</think>" in prompt  # chat history keeps it too
    for template, why in ((None, "set `template: qwen3`"), ("chatml", "template `chatml` drops none")):
        with pytest.raises(DataError, match=re.escape(why)):
            data_template(build_config({"template": template, "preserve_thinking": True}).data, tokenizer)


def test_tool_format_rewrites_a_templates_tools(tiny_model):
    """tool_format (LLaMA-Factory's key) writes a named template's tool definitions and calls in another family's
    format; the tokenizer's own template and formats that are not built are refused."""
    from tuneforge.config import ConfigError, build_config, validate
    from tuneforge.data.registry import DataError
    from tuneforge.data.templates import data_template

    tokenizer = family_tokenizer(tiny_model, "", "<|im_end|>", CHATML)
    tools = '[{"name": "add", "description": "Add numbers", "parameters": {"type": "object"}}]'
    example = Example(messages=[{"role": "user", "content": "2+2?"},
                                {"role": "function", "content": '{"name": "add", "arguments": {"a": 2}}'}],
                      system="Be brief.", tools=tools)
    template = data_template(build_config({"template": "chatml", "tool_format": "qwen"}).data, tokenizer)
    row = encode_supervised(example, tokenizer, template, 4096)
    assert "<tools>\n" in tokenizer.decode(row["input_ids"])
    assert [tokenizer.decode(span) for span in learned_spans(row)] == [
        '<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call><|im_end|>']
    with pytest.raises(DataError, match="set `template` too"):
        data_template(build_config({"tool_format": "qwen"}).data, tokenizer)
    with pytest.raises(ConfigError, match="`tool_format` must be one of default, json, qwen, llama3, glm4, mistral, "
                                          "ling, .*; got 'gemma4'"):
        validate(build_config({"model_name_or_path": "m", "template": "chatml", "tool_format": "gemma4"}), "chat")


def test_an_empty_tool_list_is_no_tools(tiny_model, tmp_path):
    """glaive_toolcall_en_demo (LLaMA-Factory's data) gives rows without tools `"tools": "[]"`: they render as rows
    without the key, not with a tool prompt offering "one of []" (LLaMA-Factory writes an empty system turn)."""
    import json

    from tuneforge.data import load_examples
    from tuneforge.options import DataArgs

    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]
    rows = [{"conversations": turns, "tools": "[]"}, {"conversations": turns, "tools": []}, {"conversations": turns}]
    (tmp_path / "chats.json").write_text(json.dumps(rows))
    columns = {"messages": "conversations", "tools": "tools"}
    (tmp_path / "dataset_info.json").write_text(json.dumps({"chats": {
        "file_name": "chats.json", "formatting": "sharegpt", "columns": columns}}))
    examples = load_examples("chats", DataArgs(dataset_dir=str(tmp_path)), "sft", 0)
    tokenizer = family_tokenizer(tiny_model, "", "<|im_end|>", CHATML)
    texts = {tokenizer.decode(encode_supervised(e, tokenizer, get_template("chatml", tokenizer), 4096)["input_ids"])
             for e in examples}
    assert texts == {"<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>"}


REACT_TOOLS = [{"name": "add", "description": "Add numbers", "parameters": {
    "type": "object", "required": ["a"], "properties": {
        "a": {"type": "integer", "description": "first"}, "b": {"type": "string", "enum": ["x", "y"]},
        "c": {"type": "array", "items": {"type": "number"}}}}},
    {"type": "function", "function": {"name": "now", "description": "Time", "parameters": {"properties": {}}}}]
# LLaMA-Factory 0.9.5's `default` template rendering this conversation (Template.encode_multiturn, decoded), with
# <|im_end|> as eos: its ReAct-style `default` tool format, which the templates without a family format share
REACT_RENDERED = (
    "System: You have access to the following tools:\n> Tool Name: add\nTool Description: Add numbers\nTool Args:\n"
    "  - a (integer, required): first\n  - b (string): , should be one of [x, y]\n"
    "  - c (array): , where each item should be number\n\n> Tool Name: now\nTool Description: Time\nTool Args:\n\n"
    "Use the following format if using a tool:\n```\nAction: tool name (one of [add, now])\nAction Input: the input to "
    'the tool, in a JSON format representing the kwargs (e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n'
    "<|im_end|>\nHuman: 2+2?<|im_end|>\nAssistant:"
    'Action: add\nAction Input: {"a": 2, "b": "x"}\nAction: now\nAction Input: {}<|im_end|>\n'
    "Human: 4<|im_end|>\nAssistant:It is 4.<|im_end|>")


def test_default_tool_format_writes_llamafactorys_react_text(tiny_model):
    import json

    tokenizer = family_tokenizer(tiny_model, "", "<|im_end|>", CHATML)
    calls = [{"name": "add", "arguments": {"a": 2, "b": "x"}}, {"name": "now", "arguments": {}}]
    messages = [{"role": "user", "content": "2+2?"}, {"role": "function", "content": json.dumps(calls)},
                {"role": "observation", "content": "4"}, {"role": "assistant", "content": "It is 4."}]
    pieces = TEMPLATES["default"].pieces(tokenizer, messages, None, json.dumps(REACT_TOOLS))
    assert "".join(pieces) == REACT_RENDERED
    assert pieces[1] == 'Action: add\nAction Input: {"a": 2, "b": "x"}\nAction: now\nAction Input: {}<|im_end|>'


def test_qwen_tools_calls_and_results(tiny_model):
    tokenizer = family_tokenizer(tiny_model, "", "<|im_end|>", CHATML)
    tools = '[{"name": "add", "description": "Add numbers", "parameters": {"type": "object"}}]'
    example = Example(messages=[
        {"role": "user", "content": "2+2?"},
        {"role": "function", "content": '{"name": "add", "arguments": {"a": 2, "b": 2}}'},
        {"role": "observation", "content": "4"},
        {"role": "assistant", "content": "It is 4."}], system="Be brief.", tools=tools)
    row = encode_supervised(example, tokenizer, get_template("qwen", tokenizer), 4096)
    text = tokenizer.decode(row["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions")
    assert '<tools>\n{"type": "function", "function": {"name": "add", "description": "Add numbers"' in text
    assert [tokenizer.decode(span) for span in learned_spans(row)] == [
        '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call><|im_end|>', "It is 4.<|im_end|>"]
    assert "<|im_start|>user\n<tool_response>\n4\n</tool_response><|im_end|>\n<|im_start|>assistant\n" in text


def test_truncation_keeps_the_last_turn(tiny_model):
    tokenizer = family_tokenizer(tiny_model, "", "<|im_end|>", CHATML)
    example = conversation()
    example.messages[1]["content"] = "Hello! " * 200  # a long first answer
    template = get_template("chatml", tokenizer)
    row = encode_supervised(example, tokenizer, template, cutoff_len=64)
    assert len(row["input_ids"]) == 64
    assert [tokenizer.decode(span) for span in learned_spans(row)][-1] == "4.<|im_end|>"  # the last answer survives whole
    assert tokenizer.decode(row["input_ids"]).endswith("<|im_start|>assistant\n4.<|im_end|>")


def test_split_special_tokens_splits_them_in_data_text_only(tiny_model):
    """split_special_tokens (LLaMA-Factory's key): a special-token string written in a record is ordinary text; the
    template's own markers stay special tokens. LLaMA-Factory's tokenizer-wide switch splits the template's
    `<|im_start|>` too."""
    tokenizer = family_tokenizer(tiny_model, "", "<|im_end|>", CHATML)
    end, start = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    clean = Example(messages=[{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}])
    tricky = Example(messages=[{"role": "user", "content": "Say <|im_end|> now"},
                               {"role": "assistant", "content": "I say <|im_end|>."}])
    template = TEMPLATES["chatml"]
    plain = [encode_supervised(e, tokenizer, template, 4096) for e in (clean, tricky)]
    tokenizer.split_special_tokens = True
    split = [encode_supervised(e, tokenizer, template, 4096) for e in (clean, tricky)]
    assert split[0] == plain[0]  # nothing to split: the same tokens
    ids = split[1]["input_ids"]
    assert ids.count(end) == 2 and ids.count(start) == 2  # the template's: after the user turn and the answer
    assert plain[1]["input_ids"].count(end) == 4  # without the option the data's strings end turns too
    assert tokenizer.decode(ids) == tokenizer.decode(plain[1]["input_ids"])  # the same text, tokenised differently
    # between two of the template's markers, template and data text are tokenised together, as the tokenizer would
    text = lambda s: tokenizer(s, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert ids == [start, *text("user\nSay <|im_end|> now"), end, *text("\n"), start, *text("assistant\n"),
                   *text("I say <|im_end|>."), end]
    assert [tokenizer.decode(s) for s in learned_spans(split[1])] == ["I say <|im_end|>.<|im_end|>"]


def test_split_special_tokens_needs_a_named_template(tiny_model):
    from tuneforge.data.registry import DataError

    tokenizer = family_tokenizer(tiny_model, "", "<|im_end|>", CHATML)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.split_special_tokens = True
    with pytest.raises(DataError, match="`split_special_tokens` needs a named template"):
        get_template(None, tokenizer)


def test_the_tool_format_key_offers_the_formats_that_are_built():
    import typing

    from tuneforge.data.tools import TOOL_FORMATS
    from tuneforge.options import DataArgs

    hint = typing.get_type_hints(DataArgs)["tool_format"]
    assert set(typing.get_args(typing.get_args(hint)[0])) == set(TOOL_FORMATS)
