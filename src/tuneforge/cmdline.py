"""Config keys on the command line, in LLaMA-Factory's forms and ours, and did-you-mean hints for unknown keys.
The rule: the config file is read first, then the command line's keys override it; later ones win."""

from __future__ import annotations

import dataclasses
import difflib

import yaml

from .config import GROUPS, KEY_GROUP, ConfigError


def _bool_key(key: str) -> bool:
    group = KEY_GROUP.get(key)
    return group is not None and any(f.name == key and f.type.startswith("bool")
                                     for f in dataclasses.fields(GROUPS[group]))


def _value_follows(item: str, following: str | None) -> bool:
    """`--key VALUE`: the next argument is the key's value; after a boolean key only true/false (or yes/no/1/0) is,
    so `--do_train config.yaml` is a flag and a file."""
    return item.startswith("--") and "=" not in item and following is not None and not following.startswith("--") \
        and (not _bool_key(item[2:]) or following.lower() in ("true", "false", "yes", "no", "1", "0"))


def parse_overrides(items: list[str]) -> dict:
    """Config keys given on the command line, in LLaMA-Factory's forms as well as ours: `key=value`,
    `--key=value`, `--key value`, and bare `--flag` for boolean keys (`--fp16`, `--do_train`; a following
    true/false is read as its value). Values are read as YAML scalars, so 3e-4, True, null work. Later ones win."""
    out, i = {}, 0
    while i < len(items):
        item = items[i]
        i += 1
        if item.startswith("--") and "=" not in item:
            key = item[2:]
            following = items[i] if i < len(items) else None
            takes_next = _value_follows(item, following)
            if not takes_next and not _bool_key(key) and key in KEY_GROUP:
                raise ConfigError(f"command line: `--{key}` needs a value: --{key} VALUE or {key}=VALUE")
            value = following if takes_next else "true"
            i += takes_next
        elif "=" in item:
            key, value = item.split("=", 1)
        else:
            raise ConfigError(f"command-line argument {item!r} is not of the form key=value (or --key value)")
        out[key.strip().lstrip("-")] = yaml.safe_load(value) if value != "" else None
    return out


def split_command_line(args: list[str]) -> tuple[str | None, list[str]]:
    """(the config file, the key tokens): the file is the one argument that is neither a key nor a key's value,
    wherever it stands."""
    path, rest, i = None, [], 0
    while i < len(args):
        item = args[i]
        takes_next = _value_follows(item, args[i + 1] if i + 1 < len(args) else None)
        if not item.startswith("--") and "=" not in item:
            if path is not None:
                raise ConfigError(f"command line: two config files ({path} and {item}); give one, and the other "
                                  "keys as --key value or key=value")
            path = item
        else:
            rest += args[i:i + 1 + takes_next]
            i += takes_next
        i += 1
    return path, rest


def _is_close(key: str, candidate: str) -> bool:
    """A typo of `candidate`: nearly the same string, or every word of `key` nearly one of its words (so
    gradient_accumulation finds gradient_accumulation_steps, but use_galore does not find use_rslora)."""
    if difflib.SequenceMatcher(None, key, candidate).ratio() >= 0.85:
        return True
    words = candidate.split("_")
    return all(max(difflib.SequenceMatcher(None, w, c).ratio() for c in words) >= 0.75 for w in key.split("_"))


def suggest(key: str) -> str:
    close = [c for c in difflib.get_close_matches(key, list(KEY_GROUP), n=5, cutoff=0.6) if _is_close(key, c)]
    return f"; did you mean {close[0]}?" if close else "; run `tuneforge train --help` for the list of keys"
