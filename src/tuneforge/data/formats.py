"""Alpaca / ShareGPT / OpenAI-messages / plain-text records -> one canonical `Example` that every stage consumes."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from ..train.stages import data_kind, names
from .registry import DataError, DatasetAttr, RawRecord
from .tools import parse_calls, parse_tools

USER, ASSISTANT, OBSERVATION, FUNCTION = "user", "assistant", "observation", "function"
USER_SIDE, ASSISTANT_SIDE = (USER, OBSERVATION), (ASSISTANT, FUNCTION)


@dataclass
class Example:
    messages: list[dict] = field(default_factory=list)  # {"role": user|assistant|observation|function, "content"}
    system: str = ""
    tools: str = ""
    text: str | None = None  # pre-training text
    chosen: str | None = None  # preference data: the preferred and the dispreferred answer to `messages`
    rejected: str | None = None
    kto_tag: bool | None = None  # KTO: whether the final answer is desirable
    extra: dict = field(default_factory=dict)  # prompt data: the record's other columns, for reward functions
    where: str = ""
    dataset: str = ""  # the registry name (or file) it came from


SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system"}


def detect_formatting(record: dict, where: str) -> str:
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "openai"
    if "instruction" in record or "text" in record:
        return "alpaca"
    raise DataError(f"{where}: cannot tell the format from the keys {sorted(record)}; expected `instruction`/`output` "
                    "(alpaca), `conversations` (sharegpt), `messages` (openai) or `text` (pre-training). Register the "
                    "file in dataset_info.json with `columns` to map other names")


def to_examples(attr: DatasetAttr, records: list[RawRecord], stage: str, skip: bool = False) -> list[Example]:
    return list(iter_examples(attr, records, stage, skip))


def iter_examples(attr: DatasetAttr, records: Iterable[RawRecord], stage: str, skip: bool = False
                  ) -> Iterator[Example]:
    """Canonical examples, one at a time; a malformed record stops with its error, or with `skip` is dropped and
    counted (the count and the first reasons are printed once the records are used up)."""
    kind = data_kind(stage)
    records = iter(records)
    first = next(records, None)
    if first is None:
        raise DataError(f"dataset `{attr.name}`: {', '.join(map(str, attr.files)) or attr.hub} holds no records")
    formatting, ranking = attr.formatting, attr.ranking
    if formatting == "auto":  # a file given directly: tell the format from its first record
        formatting = detect_formatting(first.data, first.where)
        ranking = isinstance(first.data, dict) and {"chosen", "rejected"} <= set(first.data)
        if kind == "kto" and "kto_tag" in first.data:
            attr.columns.setdefault("kto_tag", "kto_tag")
    media = [key for key in ("images", "videos", "audios") if key in attr.columns]
    if media:
        raise DataError(f"dataset `{attr.name}` maps `{media[0]}`: multimodal fine-tuning of chat models is not built "
                        "yet; remove that column mapping (for image classification use stage cls with an image folder)")
    if ranking and kind != "preference":
        pair_stages = names(lambda s: s.data == "preference", "or")
        raise DataError(f"dataset `{attr.name}` is ranking (preference) data, which stage `{stage}` cannot use; "
                        f"use it with stage {pair_stages}, or pick a non-ranking dataset")
    if kind == "preference" and not ranking:
        raise DataError(f"stage `{stage}` needs ranking data with chosen and rejected answers, but dataset "
                        f"`{attr.name}` is not marked `ranking: true` in dataset_info.json")
    if kind == "kto" and "kto_tag" not in attr.columns:
        raise DataError(f"stage kto needs a desirable/undesirable flag per example: map it with "
                        f"`columns: {{\"kto_tag\": ...}}` for dataset `{attr.name}` in dataset_info.json")
    convert = {"alpaca": _alpaca, "sharegpt": _sharegpt, "openai": _sharegpt}[formatting]
    reasons, count = [], 0
    for record in itertools.chain([first], records):
        try:
            example = _with_preferences(attr, formatting, record, kind, convert(attr, formatting, record, kind))
        except DataError as err:
            if not skip:
                raise
            reasons.append(str(err))
            continue
        example.dataset = attr.name
        count += 1
        yield example
    reasons = attr.skipped + reasons  # unreadable lines, then unusable records
    if reasons:
        if not count:
            raise DataError(f"dataset `{attr.name}`: every record is malformed; the first: {reasons[0]}")
        print(f"[tuneforge] dataset `{attr.name}`: skipped {len(reasons)} of {count + len(reasons)} malformed records "
              "(skip_bad_records); the first: " + " | ".join(reasons[:3]))


def _with_preferences(attr: DatasetAttr, formatting: str, record: RawRecord, kind: str, example: Example):
    """Fill chosen/rejected (preference data) or kto_tag (kto) from the record's columns."""
    if kind == "preference":
        for side in ("chosen", "rejected"):
            value = _field(record, attr.columns.get(side, side), kind=object)
            if isinstance(value, dict):  # sharegpt: a message object
                tags = {**(OPENAI_TAGS if formatting == "openai" else SHAREGPT_TAGS), **attr.tags}
                value = value.get(tags["content_tag"])
            if not isinstance(value, str):
                raise DataError(f"{record.where}: `{side}` must be a string or a message with text, got "
                                f"{type(value).__name__}")
            setattr(example, side, value)
    if kind == "kto":
        tag = _field(record, attr.columns["kto_tag"], kind=object)
        if not isinstance(tag, bool):
            raise DataError(f"{record.where}: `{attr.columns['kto_tag']}` must be true or false, got {tag!r}")
        example.kto_tag = tag
    return example


def _field(record: RawRecord, column: str, kind=str, required=True, default=None):
    data = record.data
    if not isinstance(data, dict):
        raise DataError(f"{record.where}: expected a JSON object, got {type(data).__name__}")
    if column not in data or data[column] is None:
        if required:
            close = [k for k in data if k.lower() == column.lower() or k.rstrip("s") == column.rstrip("s")]
            hint = f" (found `{close[0]}`: map it with `columns` in dataset_info.json)" if close else (
                f"; the record has {sorted(data)}: map the right one with `columns` in dataset_info.json")
            raise DataError(f"{record.where}: missing field `{column}`{hint}")
        return default
    value = data[column]
    if kind is str and not isinstance(value, str):
        raise DataError(f"{record.where}: field `{column}` must be a string, got {type(value).__name__}")
    if kind is list and not isinstance(value, list):
        raise DataError(f"{record.where}: field `{column}` must be a list, got {type(value).__name__}")
    return value


def _alpaca(attr: DatasetAttr, formatting: str, record: RawRecord, kind: str) -> Example:
    cols = {"prompt": "instruction", "query": "input", "response": "output", "history": "history", "system": "system",
            **attr.columns}
    if kind == "pt":
        column = cols["prompt"] if cols["prompt"] in record.data or "text" not in record.data else "text"
        text = _field(record, column)
        return Example(text=text, where=record.where)
    prompt = _field(record, cols["prompt"])
    query = _field(record, cols["query"], required=False, default="")
    response = None if kind in ("preference", "prompt") else _field(record, cols["response"])
    messages = []
    for i, turn in enumerate(_field(record, cols["history"], kind=list, required=False, default=[])):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise DataError(f"{record.where}: `{cols['history']}[{i}]` must be a pair [user, assistant] of strings")
        messages += [{"role": USER, "content": turn[0]}, {"role": ASSISTANT, "content": turn[1]}]
    user = "\n".join(part for part in (prompt, query) if part)
    messages.append({"role": USER, "content": user})
    if response is not None:
        messages.append({"role": ASSISTANT, "content": response})
    system = _field(record, cols["system"], required=False, default="")
    used = (cols["prompt"], cols["query"], cols["history"], cols["system"])
    return Example(messages=messages, system=system, where=record.where, extra=_extra(record, kind, used))


def _extra(record: RawRecord, kind: str, used: tuple) -> dict:
    """The columns a prompt record holds besides its prompt (an answer, a test, ...): reward functions get them."""
    return {k: v for k, v in record.data.items() if k not in used} if kind == "prompt" else {}


def _sharegpt(attr: DatasetAttr, formatting: str, record: RawRecord, kind: str) -> Example:
    tags = {**(OPENAI_TAGS if formatting == "openai" else SHAREGPT_TAGS), **attr.tags}
    cols = {"messages": "messages" if formatting == "openai" else "conversations", "system": "system",
            "tools": "tools", **attr.columns}
    conversation = _field(record, cols["messages"], kind=list)
    roles = {tags["user_tag"]: USER, tags["assistant_tag"]: ASSISTANT, tags["observation_tag"]: OBSERVATION,
             tags["function_tag"]: FUNCTION}
    system = _field(record, cols["system"], required=False, default="")
    if conversation and isinstance(conversation[0], dict) and conversation[0].get(tags["role_tag"]) == tags["system_tag"]:
        system = conversation[0].get(tags["content_tag"], "")  # a leading system message wins over the column
        conversation = conversation[1:]
    messages = []
    for i, message in enumerate(conversation):
        where = f"{record.where}: `{cols['messages']}[{i}]`"
        if not isinstance(message, dict) or tags["role_tag"] not in message or tags["content_tag"] not in message:
            raise DataError(f"{where} must be an object with `{tags['role_tag']}` and `{tags['content_tag']}`")
        role = roles.get(message[tags["role_tag"]])
        if role is None:
            raise DataError(f"{where} has role `{message[tags['role_tag']]}`; expected one of {sorted(roles)} "
                            "(set `tags` in dataset_info.json if your data names roles differently)")
        expected = USER_SIDE if i % 2 == 0 else ASSISTANT_SIDE
        if role not in expected:
            raise DataError(f"{where} is a `{message[tags['role_tag']]}` turn where a "
                            f"{'user' if i % 2 == 0 else 'assistant'} turn was expected: turns must alternate "
                            "user, assistant, user, assistant, ...")
        if not isinstance(message[tags["content_tag"]], str):
            parts = " (a list of parts, as LLaMA-Factory v1's and OpenAI's multi-part messages hold, is not read: " \
                "put the text in one string)" if isinstance(message[tags["content_tag"]], list) else ""
            raise DataError(f"{where}: `{tags['content_tag']}` must be a string{parts}")
        if role == FUNCTION:
            try:
                parse_calls(message[tags["content_tag"]])
            except ValueError as err:
                raise DataError(f"{where}: {err}") from None
        messages.append({"role": role, "content": message[tags["content_tag"]]})
    if kind == "pt":
        return Example(text="\n".join(m["content"] for m in messages), where=record.where)
    if kind in ("preference", "prompt"):  # the answers are in chosen/rejected, or generated: it ends on a user turn
        if len(messages) % 2 == 0:
            answers = "in chosen/rejected" if kind == "preference" else "generated in training"
            raise DataError(f"{record.where}: a {kind} conversation must end on a user turn (the answers are "
                            f"{answers}); this one has {len(messages)} turn(s)")
    elif len(messages) < 2 or len(messages) % 2:
        raise DataError(f"{record.where}: a conversation needs user/assistant pairs ending with an assistant turn; "
                        f"this one has {len(messages)} turn(s)")
    tools = _field(record, cols["tools"], kind=object, required=False, default="")
    tools = tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)
    if tools:
        try:
            # an empty list (glaive-style data writes "[]" for rows without tools) is no tools: no tool prompt
            tools = tools if parse_tools(tools) else ""
        except ValueError as err:
            raise DataError(f"{record.where}: field `{cols['tools']}`: {err}") from None
    return Example(messages=messages, system=system, tools=tools, where=record.where,
                   extra=_extra(record, kind, (cols["messages"], cols["system"], cols["tools"])))
