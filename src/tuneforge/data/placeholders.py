"""`{{name}}`-style placeholders left in training text (LLaMA-Factory's identity demo ships `{{name}}` and
`{{author}}`): filled from `fill_placeholders`, and any left over reported, since they would be trained literally."""

from __future__ import annotations

import re
import sys
from dataclasses import replace
from typing import Iterable, Iterator

from .formats import Example
from .registry import DataError

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}")


def parse_fill(spec: str | None) -> dict[str, str]:
    """`name=Forgewright,author=Anvil Labs` -> {"name": "Forgewright", "author": "Anvil Labs"}."""
    values = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DataError(f"fill_placeholders: entries look like name=value (e.g. name=Forgewright,author=Anvil); "
                            f"got {item.strip()!r}")
        values[key.strip()] = value.strip()
    return values


def _fill_text(text: str | None, values: dict[str, str]) -> str | None:
    if not text or "{{" not in text:
        return text
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def fill(example: Example, values: dict[str, str]) -> Example:
    if not values:
        return example
    return replace(example, messages=[{**m, "content": _fill_text(m["content"], values)} for m in example.messages],
                   system=_fill_text(example.system, values), text=_fill_text(example.text, values),
                   chosen=_fill_text(example.chosen, values), rejected=_fill_text(example.rejected, values))


def _left(example: Example) -> list[str]:
    texts = [m["content"] for m in example.messages] + [example.system, example.text, example.chosen, example.rejected]
    return list(dict.fromkeys(name for text in texts if text and "{{" in text for name in PLACEHOLDER.findall(text)))


def filled(examples: Iterable[Example], spec: str | None, warn: bool = True) -> Iterator[Example]:
    """The examples with placeholders filled; the first record that still holds some gets a one-line warning."""
    values, warned = parse_fill(spec), False
    for example in examples:
        example = fill(example, values)
        if warn and not warned and "{{" in str(example):
            names = _left(example)
            if names:
                warned = True
                pairs = ",".join(f"{n}=..." for n in names)
                print(f"[tuneforge] warning: dataset `{example.dataset}`, {example.where} (and maybe others) has "
                      f"placeholders {', '.join('{{' + n + '}}' for n in names)} that would be trained as written; "
                      f"fill them with `fill_placeholders: {pairs}` (tuneforge data: --fill {pairs})",
                      file=sys.stderr)
        yield example
