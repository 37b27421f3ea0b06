"""Tool use in conversations: tool definitions written into the system text, and tool calls (`function_call`
turns, JSON `{"name", "arguments"}` or a list of them) written the way each model family expects."""

from __future__ import annotations

import json


def parse_calls(content: str) -> list[dict]:
    """The calls in a function_call turn; ValueError with the reason when it is not one or more name/arguments."""
    try:
        calls = json.loads(content)
    except json.JSONDecodeError as err:
        raise ValueError(f"a function_call turn must be JSON {{\"name\": ..., \"arguments\": {{...}}}} ({err.msg})") \
            from None
    calls = calls if isinstance(calls, list) else [calls]
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or "arguments" not in call:
            raise ValueError('each tool call needs a string "name" and "arguments"')
    return calls


def parse_tools(tools: str) -> list[dict]:
    try:
        value = json.loads(tools)
    except json.JSONDecodeError as err:
        raise ValueError(f"`tools` must be a JSON list of function definitions ({err.msg})") from None
    value = value if isinstance(value, list) else [value]
    if not all(isinstance(tool, dict) for tool in value):
        raise ValueError("`tools` must be a JSON list of function definitions (objects)")
    return value


TOOL_FORMATS = ("default", "json", "qwen", "llama3", "glm4", "mistral")  # the formats format_calls writes


def _dump(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _react_prompt(definitions: list[dict]) -> str:
    """LLaMA-Factory's ReAct-style tool prompt (its `default` tool format), word for word: one block per tool with
    its arguments, then the Action / Action Input answer format."""
    blocks, names = "", []
    for tool in definitions:
        tool = tool.get("function", {}) if tool.get("type") == "function" else tool
        parameters = tool.get("parameters") or {}
        required = parameters.get("required", [])
        arguments = ""
        for name, spec in (parameters.get("properties") or {}).items():
            arguments += (f"  - {name} ({spec.get('type', '')}{', required' if name in required else ''}): "
                          f"{spec.get('description', '')}")
            if spec.get("enum"):
                arguments += ", should be one of [" + ", ".join(map(str, spec["enum"])) + "]"
            if spec.get("items"):
                arguments += f", where each item should be {spec['items'].get('type', '')}"
            arguments += "\n"
        blocks += f"> Tool Name: {tool.get('name', '')}\nTool Description: {tool.get('description', '')}\n" \
                  f"Tool Args:\n{arguments}\n"
        names.append(tool.get("name", ""))
    return ("You have access to the following tools:\n" + blocks + "Use the following format if using a tool:\n"
            "```\nAction: tool name (one of [" + ", ".join(names) + "])\nAction Input: the input to the tool, in a "
            'JSON format representing the kwargs (e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n')


def tool_prompt(fmt: str, tools: str) -> str:
    """The text that tells the model which tools it has; it follows the system text."""
    definitions = parse_tools(tools)
    if fmt == "default":
        return _react_prompt(definitions)
    if fmt == "qwen":  # Qwen2.5 / Qwen3's published tool prompt
        wrapped = [t if t.get("type") == "function" else {"type": "function", "function": t} for t in definitions]
        return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
                "with function signatures within <tools></tools> XML tags:\n<tools>"
                + "".join("\n" + _dump(t) for t in wrapped)
                + "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                "<args-json-object>}\n</tool_call>")
    return ("You can call these tools (JSON schema):\n" + "\n".join(_dump(t) for t in definitions)
            + "\n\nTo call a tool, answer with a JSON object {\"name\": <tool name>, \"arguments\": {...}}.")


def format_calls(fmt: str, content: str) -> str:
    calls = parse_calls(content)
    if fmt == "default":
        return "\n".join(f"Action: {c['name']}\nAction Input: {_dump(c['arguments'])}" for c in calls)
    if fmt == "qwen":
        return "\n".join("<tool_call>\n" + _dump({"name": c["name"], "arguments": c["arguments"]}) + "\n</tool_call>"
                         for c in calls)
    if fmt == "llama3":  # Llama 3.1's JSON tool call
        return "\n".join(_dump({"name": c["name"], "parameters": c["arguments"]}) for c in calls)
    if fmt == "glm4":
        return "\n".join(f"{c['name']}\n{_dump(c['arguments'])}" for c in calls)
    if fmt == "mistral":
        return _dump([{"name": c["name"], "arguments": c["arguments"]} for c in calls])
    return _dump(calls[0] if len(calls) == 1 else calls)


def _call(value) -> dict | None:
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        arguments = value.get("arguments", value.get("parameters", {}))
        return {"name": value["name"], "arguments": arguments}
    return None


# what an answer under a model's own chat template may be written in (glm4's `name` newline `arguments` is left
# out: a line of prose followed by a JSON object would read as a call)
OWN_TEMPLATE_FORMATS = ("qwen", "mistral", "llama3", "default", "json")


def parse_answer_calls(fmt: str | None, text: str) -> list[dict] | None:
    """The tool calls in a generated answer written in `fmt` (the inverse of format_calls), or None when the answer
    is not a tool call. `fmt` None (the tokenizer's own chat template, whose format tuneforge does not know): the
    first of the model families' formats the answer parses in."""
    import re

    if fmt is None:
        return next(filter(None, (parse_answer_calls(each, text) for each in OWN_TEMPLATE_FORMATS)), None)
    text = text.strip()
    try:
        if fmt == "default":
            found = re.findall(r"Action:\s*([\w-]+)\s*Action Input:\s*(.+?)(?=\s*Action:|\s*$)", text, re.S)
            values = [{"name": name, "arguments": json.loads(arguments.strip().strip('"').strip("`"))}
                      for name, arguments in found]
        elif fmt == "qwen":
            values = [json.loads(body) for body in re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S)]
        elif fmt == "glm4":
            name, _, arguments = text.partition("\n")
            values = [{"name": name.strip(), "arguments": json.loads(arguments)}]
        elif fmt == "llama3":
            values = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            value = json.loads(text.removeprefix("[TOOL_CALLS]").strip())
            values = value if isinstance(value, list) else [value]
    except json.JSONDecodeError:
        return None
    calls = [_call(v) for v in values]
    return calls if calls and all(calls) else None
