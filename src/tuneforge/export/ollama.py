"""An Ollama Modelfile beside the GGUF: FROM, the chat template in Ollama's Go-template syntax, stop parameters and
the default system prompt. Built from our named templates (data/templates.py); a tokenizer's own Jinja template or a
thinking template has no faithful translation, so no Modelfile is written for them (the caller says so)."""

from __future__ import annotations

import json

from ..data.templates import Template


def _go(fmt: str, content: str, tokenizer) -> str:
    # llama.cpp adds BOS itself (the GGUF's add_bos_token says so), so {bos} is not written into the template
    fmt = fmt.replace("{bos}", "").replace("{eos}", tokenizer.eos_token or "")
    return fmt.replace("{content}", content)


def go_template(template: Template, tokenizer) -> str:
    """The template as Ollama renders a conversation: .System once, then .Messages with .Role and .Content."""
    system = _go(template.system, "{{ $.System }}", tokenizer)
    first_content = "{{ .Content }}"
    lines = []  # every line opens with "{{-", which trims the newline before it
    if template.system_in_user:
        first_content = "{{ if and (eq $i 0) $.System }}" + system + "{{ end }}{{ .Content }}"
    else:
        lines.append("{{- if .System }}" + system + "{{ end }}")
    user = _go(template.user, first_content, tokenizer)
    tool = _go(template.observation or template.user, first_content, tokenizer)
    lines += [
        "{{- range $i, $_ := .Messages }}",
        "{{- if or (eq .Role \"user\") (eq .Role \"tool\") }}{{ if gt $i 0 }}" + template.separator + "{{ end }}"
        "{{ if eq .Role \"tool\" }}" + tool + "{{ else }}" + user + "{{ end }}",
        "{{- else if eq .Role \"assistant\" }}" + _go(template.assistant, "{{ .Content }}", tokenizer) + "{{ end }}",
        "{{- end }}",
    ]
    return _go(template.prefix, "", tokenizer) + "\n".join(lines)


def modelfile(gguf_name: str, template, tokenizer, default_system: str | None) -> str | None:
    """The Modelfile text, or None when the template cannot be written in Ollama's syntax."""
    if not isinstance(template, Template) or template.thinking:
        return None
    text = go_template(template, tokenizer)
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{text}"""']
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in dict.fromkeys(template.stop_texts(tokenizer)) if stop]
    system = default_system or template.default_system
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"
