"""Chat templates: how system / user / assistant / tool turns become text and tokens.

A conversation is rendered as pieces: prompt, response, prompt, response, ... Each piece is tokenised on its own, so
the boundary between what the model reads (prompt, label -100) and what it learns (response) is exact.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace

from .formats import ASSISTANT, FUNCTION, OBSERVATION, USER
from .registry import DataError
from .template_table import CHATML, CHATML_TOOL, OTHER_THOUGHT_MARKERS, TABLE
from .tools import format_calls, parse_calls, parse_tools, with_tools


@dataclass(frozen=True)
class Template:
    name: str
    user: str  # the user turn, followed by the header that opens the assistant's answer
    assistant: str  # the answer, closed by the template's end-of-turn text
    system: str = "{content}"
    separator: str = ""  # between an answer and the next user turn; part of the prompt, never trained
    prefix: str = ""  # once, at the start
    observation: str | None = None  # tool results; the user format when unset
    function: str | None = None  # tool calls; the assistant format when unset
    default_system: str = ""
    stop_words: tuple[str, ...] = ()
    system_in_user: bool = False  # no system turn: the formatted system text opens the first user message
    # how tool definitions and calls are written (see tools.py); LLaMA-Factory's ReAct-style `default` unless the
    # model family publishes its own
    tool_format: str = "default"
    thinking: bool = False  # Qwen3-style <think> blocks: stripped from earlier answers, empty one added when absent
    enable_thinking: bool = True  # with `thinking`: whether an answer without thoughts still learns the empty block
    preserve_thinking: bool = False  # with `thinking`: keep the thoughts of answers before the last user turn

    def pieces(self, tokenizer, messages: list[dict], system: str | None, tools: str = "") -> list[str]:
        """Text pieces alternating prompt, response, ...; a conversation ending on a user turn ends on a prompt."""
        specials = {"{bos}": tokenizer.bos_token or "", "{eos}": tokenizer.eos_token or ""}
        mark = _content_marker(tokenizer)
        system = with_tools(self.tool_format, system or self.default_system, tools)
        pieces, prompt = [], _fill(self.prefix, "", specials)
        system_text = _fill(self.system, mark(system), specials) if system else ""
        if not self.system_in_user:
            prompt += system_text
        last_user = max((i for i, m in enumerate(messages) if m["role"] in (USER, OBSERVATION)), default=-1)
        for i, message in enumerate(messages):
            role, content = message["role"], message["content"]
            if role in (USER, OBSERVATION):
                content = mark(content)
                if i == 0 and self.system_in_user:
                    content = system_text + content
                fmt = self.observation if role == OBSERVATION and self.observation else self.user
                prompt += (self.separator if i > 0 else "") + _fill(fmt, content, specials)
                if self.thinking and not self.enable_thinking and i == len(messages) - 1:
                    prompt += EMPTY_THOUGHT  # generation without thinking, as the model's own template does
                pieces.append(prompt)
                prompt = ""
                continue
            if role == FUNCTION:
                content = format_calls(self.tool_format, content)
            if self.thinking:
                content = _with_thought(content, keep=self.preserve_thinking or i > last_user)
                if i > last_user and not self.enable_thinking and content.startswith(EMPTY_THOUGHT):
                    pieces[-1] += EMPTY_THOUGHT  # thinking off: the empty block is given, not learned
                    content = content[len(EMPTY_THOUGHT):]
            fmt = self.function if role == FUNCTION and self.function else self.assistant
            pieces.append(_fill(fmt, mark(content), specials))
        return require_rendered(pieces, messages, system, tools, self.name, tokenizer)

    def stop_texts(self, tokenizer) -> list[str]:
        return [tokenizer.eos_token] + list(self.stop_words) if tokenizer.eos_token else list(self.stop_words)


EMPTY_THOUGHT = "<think>\n\n</think>\n\n"


def _with_thought(content: str, keep: bool) -> str:
    """Qwen3's rendering of an answer: thoughts of answers before the last user turn are dropped; the final answer
    always carries a <think> block (an empty one when it has none)."""
    if "</think>" in content:
        thought, answer = content.split("</think>", 1)
        thought, answer = thought.split("<think>")[-1].strip("\n"), answer.lstrip("\n")
    else:
        thought, answer = "", content
    return f"<think>\n{thought}\n</think>\n\n{answer}" if keep else answer


def _fill(fmt: str, content: str, specials: dict) -> str:
    for key, value in specials.items():
        fmt = fmt.replace(key, value)
    return fmt.replace("{content}", content)


QWEN = dict(CHATML, tool_format="qwen",
            observation="<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n"
                        "<|im_start|>assistant\n")
GEMMA = dict(prefix="{bos}", system="{content}\n\n", system_in_user=True,
             user="<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n",
             assistant="{content}<end_of_turn>", separator="\n",
             observation="<start_of_turn>tool\n{content}<end_of_turn>\n<start_of_turn>model\n",
             stop_words=("<end_of_turn>",))

TEMPLATES = {
    t.name: t
    for t in [
        Template("empty", user="{content}", assistant="{content}{eos}"),
        Template("default", system="System: {content}{eos}\n", user="Human: {content}{eos}\nAssistant:",
                 assistant="{content}{eos}", separator="\n"),
        Template("alpaca", system="{content}\n\n", user="### Instruction:\n{content}\n\n### Response:\n",
                 assistant="{content}{eos}", separator="\n\n", default_system="Below is an instruction that describes "
                 "a task. Write a response that appropriately completes the request."),
        Template("vicuna", system="{content} ", user="USER: {content} ASSISTANT:", assistant=" {content}{eos}",
                 default_system="A chat between a curious user and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the user's questions."),
        Template("chatml", **CHATML, observation=CHATML_TOOL),
        Template("qwen", **QWEN, default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
        Template("qwen3", **QWEN, thinking=True),
        Template("qwen3_nothink", **QWEN),
        Template("yi", **CHATML),
        Template("llama2", user="{bos}[INST] {content} [/INST]", assistant=" {content} {eos}",
                 system="<<SYS>>\n{content}\n<</SYS>>\n\n", system_in_user=True),
        Template("mistral", prefix="{bos}", user="[INST] {content}[/INST]", assistant=" {content}{eos}",
                 system="{content}\n\n", system_in_user=True, tool_format="mistral",
                 function="[TOOL_CALLS] {content}{eos}", observation='[TOOL_RESULTS] {"content": {content}}[/TOOL_RESULTS]'),
        Template("llama3", prefix="{bos}", tool_format="llama3",
                 system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
                 user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n",
                 assistant="{content}<|eot_id|>",
                 observation="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>"
                             "<|start_header_id|>assistant<|end_header_id|>\n\n",
                 stop_words=("<|eot_id|>", "<|eom_id|>")),
        Template("gemma", **GEMMA),
        Template("gemma3", **GEMMA),
        Template("phi4", system="<|im_start|>system<|im_sep|>{content}<|im_end|>",
                 user="<|im_start|>user<|im_sep|>{content}<|im_end|><|im_start|>assistant<|im_sep|>",
                 assistant="{content}<|im_end|>", stop_words=("<|im_end|>",)),
        Template("deepseek3", prefix="{bos}", user="<｜User｜>{content}<｜Assistant｜>", assistant="{content}{eos}"),
        Template("zephyr", system="<|system|>\n{content}{eos}\n", user="<|user|>\n{content}{eos}\n<|assistant|>\n",
                 assistant="{content}{eos}", separator="\n"),
        # GLM-4 closes an answer with nothing but the next turn's header; like LLaMA-Factory, each answer here ends
        # with eos so the model learns to stop (and <|user|> / <|observation|> stop generation too); a tool call
        # follows the header directly
        Template("glm4", prefix="[gMASK]<sop>", system="<|system|>\n{content}", user="<|user|>\n{content}<|assistant|>",
                 assistant="\n{content}{eos}", observation="<|observation|>\n{content}<|assistant|>", tool_format="glm4",
                 function="{content}{eos}", stop_words=("<|user|>", "<|observation|>")),
    ] + [Template(**entry) for entry in TABLE]
}


class TokenizerTemplate:
    """The tokenizer's own `chat_template`, split into pieces by rendering growing prefixes of the conversation."""

    name = "tokenizer"
    stop_words: tuple[str, ...] = ()
    tool_format = None  # the model's own: the API reads tool calls in whichever family's format an answer uses

    def __init__(self, tokenizer, enable_thinking: bool = True):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat_template; set `template` (e.g. default, chatml, llama3, qwen)")
        if getattr(tokenizer, "split_special_tokens", False):
            # the rendered text no longer says which markers are the template's and which came from the data
            raise DataError("`split_special_tokens` needs a named template, which keeps its own markers special: set "
                            f"`template: {template_for(tokenizer)}`")
        self.enable_thinking = enable_thinking

    def __repr__(self) -> str:
        # part of the tokenised-data cache key (cache.fingerprint, which holds the chat_template itself): the same
        # in every process, where the default repr's object address is not
        return f"TokenizerTemplate(enable_thinking={self.enable_thinking})"

    def pieces(self, tokenizer, messages: list[dict], system: str | None, tools: str = "") -> list[str]:
        hf_roles = {USER: "user", ASSISTANT: "assistant", OBSERVATION: "tool", FUNCTION: "assistant"}
        chat = [{"role": "system", "content": system}] if system else []
        for m in messages:
            if m["role"] == FUNCTION:  # tool calls as the transformers chat format writes them
                calls = [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                         for c in parse_calls(m["content"])]
                chat.append({"role": "assistant", "content": "", "tool_calls": calls})
            else:
                chat.append({"role": hf_roles[m["role"]], "content": m["content"]})
        offset = len(chat) - len(messages)
        extra = {"tools": parse_tools(tools)} if tools else {}
        from jinja2 import TemplateError

        pieces, done = [], ""
        for i in range(len(messages)):
            try:
                rendered = tokenizer.apply_chat_template(
                    chat[: offset + i + 1], tokenize=False, enable_thinking=self.enable_thinking,
                    add_generation_prompt=messages[i]["role"] in (USER, OBSERVATION), **extra)
            except TemplateError as err:  # the template's own raise_exception, e.g. "system role not supported"
                raise DataError(f"the tokenizer's chat_template cannot render this conversation ({err}); set "
                                f"`template: {template_for(tokenizer)}`, which can") from None
            if not rendered.startswith(done):
                raise DataError("the tokenizer's chat_template renders a conversation differently from its own "
                                "prefix, so prompt and answer cannot be told apart; set `template` explicitly")
            piece, done = rendered[len(done):], rendered
            if messages[i]["role"] in (ASSISTANT, FUNCTION):
                # whitespace after the end-of-turn token belongs to the next prompt, not to what the model learns
                stripped = piece.rstrip()
                done = done[: len(done) - (len(piece) - len(stripped))]
                piece = stripped
            pieces.append(piece)
        return require_rendered(pieces, messages, system, tools, "", tokenizer)

    def stop_texts(self, tokenizer) -> list[str]:
        return [tokenizer.eos_token] if tokenizer.eos_token else []


def require_rendered(pieces: list[str], messages: list[dict], system: str | None, tools: str, template: str,
                     tokenizer) -> list[str]:
    """`pieces`, after checking that every part of the conversation survived the template: the system text, each
    tool's name, each tool call's name, each tool result. A template that drops one (as some models' own chat
    templates drop tools, or render a tool call as an empty answer that would then be trained on) is an error."""
    prompts, text = "".join(pieces[0::2]), "".join(pieces)
    lost = []
    if system and system.strip() not in text:
        lost.append("the system prompt")
    names = [t.get("function", t).get("name", "") for t in parse_tools(tools)] if tools else []
    if any(name not in prompts for name in names):
        lost.append("the tool definitions")
    for message, piece in zip(messages, pieces):
        content = message["content"].strip()
        if message["role"] == FUNCTION and any(c["name"] not in piece for c in parse_calls(content)):
            lost.append("a tool call")
        elif message["role"] == OBSERVATION and content not in piece and json.dumps(content)[1:-1] not in piece:
            lost.append("a tool result")
    if lost:
        which = f"template `{template}`" if template else "the tokenizer's own chat_template (`template` unset)"
        raise DataError(f"{which} drops {', '.join(dict.fromkeys(lost))} of this record; set "
                        f"`template: {template_for(tokenizer)}`, which renders them")
    return pieces


def template_for(tokenizer) -> str:
    """A named template in this tokenizer's own format (its turn markers are tokens of its vocabulary); every named
    template writes system prompts, tool definitions, calls and results."""
    vocab = tokenizer.get_vocab()
    for marker, name in (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"), ("[INST]", "mistral"),
                         ("<start_of_turn>", "gemma"), ("<|im_sep|>", "phi4"), ("<|observation|>", "glm4")):
        if marker in vocab:
            return name
    return "default"


# LLaMA-Factory 0.9.5's templates that carry a multimodal plugin (and have no text-only twin here)
MULTIMODAL_TEMPLATES = set("""dots_ocr ernie_vl gemma3n glm4_5v glm4v glm_ocr granite3_vision intern_s1 intern_vl
    keye_vl kimi_vl lfm2_vl llama4 llava llava_next llava_next_mistral llava_next_qwen llava_next_video llava_next_video_mistral
    llava_next_video_yi llava_next_yi mimo_vl minicpm_o minicpm_v minicpm_v_4_6 ministral3 mistral_small mllama
    paligemma paligemma_chat pixtral qwen2_audio qwen2_omni qwen2_vl qwen3_5 qwen3_5_nothink qwen3_6 qwen3_omni
    qwen3_omni_nothink qwen3_vl qwen3_vl_nothink video_llava yi_vl youtu_vl""".split())


def data_template(d, tokenizer):
    """The template the data options `d` choose (for inference, after the adapter's saved template filled in an
    unset `template`)."""
    template = get_template(d.template, tokenizer, d.enable_thinking, d.preserve_thinking)
    if d.preserve_thinking and not getattr(template, "thinking", False):
        raise DataError("`preserve_thinking` keeps the earlier thoughts that templates with thinking blocks (qwen3) "
                        "drop; " + (f"template `{d.template}` drops none: remove it" if d.template else
                                    "the tokenizer's own chat_template (`template` unset) decides that itself: set "
                                    "`template: qwen3`"))
    if d.tool_format:
        if not d.template:
            raise DataError("`tool_format` rewrites a named template's tool definitions and calls; the tokenizer's "
                            "own chat_template (`template` unset) writes its own: set `template` too")
        template = replace(template, tool_format=d.tool_format)
    return template


def get_template(name: str | None, tokenizer, enable_thinking: bool = True, preserve_thinking: bool = False):
    """A named template, or (no name) the tokenizer's own chat_template."""
    if not name:
        return TokenizerTemplate(tokenizer, enable_thinking)
    if name not in TEMPLATES and name in MULTIMODAL_TEMPLATES:
        raise DataError(f"template `{name}` is LLaMA-Factory's for a vision/audio model: multimodal training is not "
                        "built yet; use a text model and its template")
    if name in OTHER_THOUGHT_MARKERS:
        raise DataError(f"template `{name}` marks thinking with {OTHER_THOUGHT_MARKERS[name]!r}, which is not built "
                        "yet (only <think> blocks are); leave `template` unset to use the tokenizer's own "
                        "chat_template")
    if name not in TEMPLATES:
        import difflib

        close = difflib.get_close_matches(name, list(TEMPLATES), n=1)
        hint = f"did you mean {close[0]}?" if close else f"available: {', '.join(TEMPLATES)}"
        raise DataError(f"unknown template `{name}`; {hint} (or leave `template` unset to use the tokenizer's own)")
    return replace(TEMPLATES[name], enable_thinking=enable_thinking, preserve_thinking=preserve_thinking)


# With `split_special_tokens`, Template.pieces wraps the text that comes from records and users in these
# private-use characters, so that tokenize_pieces keeps the template's markers special and splits the same strings
# when they appear in that text.
OPEN, CLOSE = "\ue000", "\ue001"


def _content_marker(tokenizer):
    if not getattr(tokenizer, "split_special_tokens", False):
        return lambda text: text

    def mark(text: str) -> str:
        if OPEN in text or CLOSE in text:
            raise DataError("the text holds U+E000 / U+E001, which tuneforge uses to mark data text under "
                            "`split_special_tokens`; remove those characters")
        return OPEN + text + CLOSE
    return mark


def tokenize_pieces(tokenizer, pieces: list[str]) -> list[list[int]]:
    if not getattr(tokenizer, "split_special_tokens", False):
        return tokenizer(pieces, add_special_tokens=False)["input_ids"] if pieces else []
    specials = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    return [_tokenize_marked(tokenizer, piece, specials) for piece in pieces]


def _tokenize_marked(tokenizer, piece: str, specials: list[str]) -> list[int]:
    """A piece with its data text marked: special-token strings are tokens in the template's text and ordinary text
    in the data's."""
    parts = re.split(f"({OPEN}.*?{CLOSE})", piece, flags=re.S)
    data = [part[1:-1] for part in parts if part.startswith(OPEN)]
    if not any(s in text for text in data for s in specials):  # nothing to split: the plain tokenisation
        text = "".join(part[1:-1] if part.startswith(OPEN) else part for part in parts)
        return tokenizer(text, add_special_tokens=False, split_special_tokens=False)["input_ids"]
    # the template's special tokens are cut out; the text between two of them (template and data text together,
    # as the tokenizer itself cuts text at special tokens) is tokenised with special-token strings split
    found = re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True))))
    ids, text = [], ""
    for part in parts:
        if part.startswith(OPEN):
            text += part[1:-1]
            continue
        start = 0
        for match in found.finditer(part):
            text += part[start: match.start()]
            ids += tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if text else []
            ids.append(tokenizer.convert_tokens_to_ids(match.group()))
            text, start = "", match.end()
        text += part[start:]
    return ids + (tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if text else [])


def stop_token_ids(template, tokenizer) -> list[int]:
    ids = []
    for text in template.stop_texts(tokenizer):
        token = tokenizer.convert_tokens_to_ids(text)
        if isinstance(token, int) and token != tokenizer.unk_token_id and token not in ids:
            ids.append(token)
    return ids
