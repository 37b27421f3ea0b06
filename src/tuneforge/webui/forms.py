"""The web UI's forms as config values: which keys each form shows, their defaults and choices, and the checks.

A form is turned into the same flat key/value mapping a YAML file holds and goes through the same gate
(`config.build_config` + `config.problems`), so a form gets exactly the CLI's messages, each placed next to the
field it names.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import yaml

from ..config import GROUPS, KEY_GROUP, SCHEDULERS, Config, ConfigError, build_config, problems

# The train form, in the order it is shown; any other key goes in its "more keys" box as YAML lines.
TRAIN_KEYS = ("model_name_or_path", "do_train", "stage", "finetuning_type", "template", "dataset_dir", "dataset", "cutoff_len",
              "packing", "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
              "gradient_accumulation_steps", "lr_scheduler_type", "warmup_ratio", "lora_rank", "lora_alpha",
              "lora_target", "bf16", "pure_bf16", "logging_steps", "save_steps", "output_dir", "plot_loss")
CHAT_KEYS = ("model_name_or_path", "adapter_name_or_path", "template")
GENERATE_KEYS = ("do_sample", "temperature", "top_p", "max_new_tokens")
EXPORT_KEYS = ("model_name_or_path", "adapter_name_or_path", "template", "export_dir", "export_size", "export_gguf")
REQUIRED = {"train": ("model_name_or_path", "do_train", "dataset", "output_dir"), "chat": ("model_name_or_path",),
            "export": ("model_name_or_path", "export_dir")}
EXTRA = "extra"  # the form field holding more `key: value` lines
BLANK = {"template": "(the tokenizer's own)", "export_gguf": "(none: the Hugging Face folder only)",
         "packing": "(the stage decides)"}  # what an empty choice means
FORM_DEFAULTS = {"do_train": True}  # the train form trains unless told not to (the config's default is false)


def _field(key: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(GROUPS[KEY_GROUP[key]]) if f.name == key)


def _default(key: str):
    return getattr(GROUPS[KEY_GROUP[key]](), key)


def choices(key: str) -> list[str] | None:
    from ..data.templates import TEMPLATES
    from ..train.stages import STAGES

    fixed = {"stage": [s.name for s in STAGES.values() if s.built], "finetuning_type": ["lora", "freeze", "full"],
             "template": ["", *TEMPLATES], "lr_scheduler_type": list(SCHEDULERS),
             "export_gguf": ["", "f16", "bf16", "q8_0", "q4_0"]}
    if key in fixed:
        return fixed[key]
    hint = typing.get_type_hints(GROUPS[KEY_GROUP[key]]).get(key)
    return [str(c) for c in typing.get_args(hint)] if typing.get_origin(hint) is typing.Literal else None


def describe(keys: tuple[str, ...]) -> list[dict]:
    """What the page needs to draw a form: each key's kind, default and choices."""
    out = []
    for key in keys:
        annotation = str(_field(key).type)
        base = annotation.split(" |")[0]
        kind = "bool" if base == "bool" else "number" if base in ("int", "float") else "text"
        options = choices(key)
        if annotation == "bool | None":  # unset means "the stage decides" (packing): a checkbox cannot say that
            kind, options = "select", ["", "true", "false"]
        default = FORM_DEFAULTS.get(key, _default(key))
        out.append({"key": key, "kind": "select" if options else kind, "choices": options,
                    "default": "" if default is None else default, "blank": BLANK.get(key, "(default)")})
    return out


def recipe_values(path: Path) -> dict:
    """A YAML recipe as form values (the keys the form shows; the rest as `extra` lines)."""
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    shown = {k: v for k, v in values.items() if k in TRAIN_KEYS}
    rest = {k: v for k, v in values.items() if k not in TRAIN_KEYS}
    if isinstance(shown.get("dataset"), list):
        shown["dataset"] = ",".join(shown["dataset"])
    return {**shown, EXTRA: yaml.safe_dump(rest, sort_keys=False) if rest else ""}


@dataclasses.dataclass
class Checked:
    values: dict  # the config's keys and values, only those set to other than their defaults (and required ones)
    errors: dict  # field -> the gate's message about it
    general: list  # messages that name no field of the form

    @property
    def yaml(self) -> str:
        return yaml.safe_dump(self.values, sort_keys=False)

    @property
    def ok(self) -> bool:
        return not self.errors and not self.general


def _form_values(form: dict, keys: tuple[str, ...], errors: dict) -> dict:
    """The form's fields as config values: blanks and defaults left out, `extra` YAML lines added."""
    values = {}
    for key in keys:
        raw = form.get(key, FORM_DEFAULTS.get(key))
        if raw is None or raw == "":
            continue
        try:  # one key at a time, so a bad value is blamed on its own field
            value = getattr(getattr(build_config({key: raw}, source="form"), KEY_GROUP[key]), key)
        except ConfigError as err:
            errors[key] = str(err).removeprefix("form: ")
            continue
        if value != _default(key) or key in REQUIRED.get(form.get("_command", ""), ()):
            values[key] = value
    text = form.get(EXTRA) or ""
    if text.strip():
        try:
            extra = yaml.safe_load(text)
            if not isinstance(extra, dict):
                raise ValueError("expected `key: value` lines")
            values.update(extra)
        except (yaml.YAMLError, ValueError) as err:
            errors[EXTRA] = f"not `key: value` YAML lines: {getattr(err, 'problem', None) or err}"
    return values


def _place(message: str, fields: tuple[str, ...]) -> str | None:
    """The form field a gate message is about: the first `key` it names that the form shows."""
    for name in re.findall(r"`([a-z_0-9]+)", message):
        if name in fields:
            return name
    return None


def check(form: dict, keys: tuple[str, ...], command: str) -> Checked:
    """A form's values through the config gate of `command` (train, chat or export)."""
    errors: dict = {}
    values = _form_values({**form, "_command": command}, keys, errors)
    for key in REQUIRED.get(command, ()):
        if key in keys and key not in values and key not in errors:
            errors[key] = f"`{key}` is required"
    general: list = []
    try:
        cfg: Config = build_config(values, source="form")
    except ConfigError as err:  # an unknown key or bad value in the `extra` lines
        errors.setdefault(EXTRA, str(err).removeprefix("form: "))
        return Checked(values, errors, general)
    for message in problems(cfg, command):
        field = _place(message, keys)
        if field and field not in errors:
            errors[field] = message
        elif not field:
            general.append(message)
    return Checked(values, errors, general)
