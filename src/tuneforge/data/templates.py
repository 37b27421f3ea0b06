"""Chat templates: how system / user / assistant / tool turns become text and tokens.

A conversation is rendered as pieces: prompt, response, prompt, response, ... Each piece is tokenised on its own, so
the boundary between what the model reads (prompt, label -100) and what it learns (response) is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from .formats import ASSISTANT, FUNCTION, OBSERVATION, USER
from .registry import DataError


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

    def pieces(self, tokenizer, messages: list[dict], system: str | None) -> list[str]:
        """Text pieces alternating prompt, response, ...; a conversation ending on a user turn ends on a prompt."""
        specials = {"{bos}": tokenizer.bos_token or "", "{eos}": tokenizer.eos_token or ""}
        system = system or self.default_system
        pieces, prompt = [], _fill(self.prefix, "", specials)
        if system:
            prompt += _fill(self.system, system, specials)
        for i, message in enumerate(messages):
            role, content = message["role"], message["content"]
            if role in (USER, OBSERVATION):
                fmt = self.observation if role == OBSERVATION and self.observation else self.user
                prompt += (self.separator if i > 0 else "") + _fill(fmt, content, specials)
                pieces.append(prompt)
                prompt = ""
            else:
                fmt = self.function if role == FUNCTION and self.function else self.assistant
                pieces.append(_fill(fmt, content, specials))
        return pieces

    def stop_texts(self, tokenizer) -> list[str]:
        return [tokenizer.eos_token] + list(self.stop_words) if tokenizer.eos_token else list(self.stop_words)


def _fill(fmt: str, content: str, specials: dict) -> str:
    for key, value in specials.items():
        fmt = fmt.replace(key, value)
    return fmt.replace("{content}", content)


TEMPLATES = {
    t.name: t
    for t in [
        Template("empty", user="{content}", assistant="{content}{eos}"),
        Template("default", system="System: {content}\n", user="Human: {content}\nAssistant:",
                 assistant="{content}{eos}", separator="\n"),
        Template("chatml", system="<|im_start|>system\n{content}<|im_end|>\n",
                 user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
                 assistant="{content}<|im_end|>", separator="\n",
                 observation="<|im_start|>tool\n{content}<|im_end|>\n<|im_start|>assistant\n",
                 stop_words=("<|im_end|>",)),
        Template("llama3", prefix="{bos}",
                 system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
                 user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n",
                 assistant="{content}<|eot_id|>",
                 observation="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>"
                             "<|start_header_id|>assistant<|end_header_id|>\n\n",
                 stop_words=("<|eot_id|>", "<|eom_id|>")),
    ]
}


class TokenizerTemplate:
    """The tokenizer's own `chat_template`, split into pieces by rendering growing prefixes of the conversation."""

    name = "tokenizer"
    stop_words: tuple[str, ...] = ()

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat_template; set `template` (e.g. default, chatml, llama3, empty)")

    def pieces(self, tokenizer, messages: list[dict], system: str | None) -> list[str]:
        hf_roles = {USER: "user", ASSISTANT: "assistant", OBSERVATION: "tool", FUNCTION: "assistant"}
        chat = ([{"role": "system", "content": system}] if system else []) + [
            {"role": hf_roles[m["role"]], "content": m["content"]} for m in messages]
        offset = len(chat) - len(messages)
        pieces, done = [], ""
        for i in range(len(messages)):
            rendered = tokenizer.apply_chat_template(chat[: offset + i + 1], tokenize=False,
                                                     add_generation_prompt=messages[i]["role"] in (USER, OBSERVATION))
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
        return pieces

    def stop_texts(self, tokenizer) -> list[str]:
        return [tokenizer.eos_token] if tokenizer.eos_token else []


def get_template(name: str | None, tokenizer):
    if not name:
        return TokenizerTemplate(tokenizer)
    if name not in TEMPLATES:
        import difflib

        close = difflib.get_close_matches(name, list(TEMPLATES), n=1)
        hint = f"did you mean {close[0]}?" if close else f"available: {', '.join(TEMPLATES)}"
        raise DataError(f"unknown template `{name}`; {hint} (or leave `template` unset to use the tokenizer's own)")
    return TEMPLATES[name]


def tokenize_pieces(tokenizer, pieces: list[str]) -> list[list[int]]:
    return [tokenizer.encode(piece, add_special_tokens=False) for piece in pieces]


def stop_token_ids(template, tokenizer) -> list[int]:
    ids = []
    for text in template.stop_texts(tokenizer):
        token = tokenizer.convert_tokens_to_ids(text)
        if isinstance(token, int) and token != tokenizer.unk_token_id and token not in ids:
            ids.append(token)
    return ids
