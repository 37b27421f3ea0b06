"""Tool use in conversations: tool definitions written into the system text, and tool calls (`function_call`
turns, JSON `{"name", "arguments"}` or a list of them) written the way each model family expects, as LLaMA-Factory
0.9.5 writes them (tests/test_lf_templates.py compares), except: Llama 3.1's date (LLAMA3_DATE), no blank line opening
a system turn that holds only tools (with_tools), and GLM-4.5's and MiniMax-M2's calls closed as their own tool
prompts show (format_calls). parse_answer_calls reads a generated answer's calls back, for the API server."""

from __future__ import annotations

import ast
import json
import re


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


# the formats format_calls writes: LLaMA-Factory 0.9.5's tool formats of the text templates tuneforge builds, and json
TOOL_FORMATS = ("default", "json", "qwen", "llama3", "glm4", "mistral", "ling", "glm4_moe", "lfm2", "minimax1",
                "minimax2", "phi4_mini")
# Llama 3.1's chat template dates its tool prompt; LLaMA-Factory writes the day it tokenises, which would make the
# same data tokenise differently every day: the model's own template's default date instead
LLAMA3_DATE = "26 Jul 2024"


def _dump(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _wrapped(tools: list[dict]) -> list[dict]:
    return [t if t.get("type") == "function" else {"type": "function", "function": t} for t in tools]


def _unwrapped(tools: list[dict]) -> list[dict]:
    return [t.get("function", {}) if t.get("type") == "function" else t for t in tools]


def _react_prompt(definitions: list[dict]) -> str:
    """LLaMA-Factory's ReAct-style tool prompt (its `default` tool format), word for word: one block per tool with
    its arguments, then the Action / Action Input answer format."""
    blocks, names = "", []
    for tool in _unwrapped(definitions):
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


def _xml_tools(tools: list[dict], answer_format: str) -> str:
    """Qwen2.5's tool prompt (Qwen3 and GLM-4.5 share its head): one JSON line per tool inside <tools>."""
    return ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
            "with function signatures within <tools></tools> XML tags:\n<tools>"
            + "".join("\n" + _dump(t) for t in _wrapped(tools)) + "\n</tools>\n\nFor each function call, "
            + answer_format)


QWEN_CALLS = ('return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n'
              '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
GLM4_MOE_CALLS = ("output the function name and arguments within the following XML format:\n<tool_call>"
                  "{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>\n<arg_key>"
                  "{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>\n")


def _prompt(fmt: str, tools: list[dict], raw: str) -> str:
    """The tool text of each format, as LLaMA-Factory 0.9.5 writes it (formats that open with a blank line are
    appended to a system text; the others follow it directly, as LLaMA-Factory does)."""
    if fmt == "default":
        return _react_prompt(tools)
    if fmt == "phi4_mini":  # the definitions as given, between Phi-4-mini's tool tokens
        return f"<|tool|>{raw}<|/tool|>"
    if fmt == "qwen":
        return _xml_tools(tools, QWEN_CALLS)
    if fmt == "ling":  # Ling 2's: Qwen's without the blank line, and thinking switched off
        return _xml_tools(tools, QWEN_CALLS).removeprefix("\n\n") + "\ndetailed thinking off"
    if fmt == "glm4_moe":
        return _xml_tools(tools, GLM4_MOE_CALLS)
    if fmt == "llama3":  # Llama 3.1's JSON tool calling, tools in the system message
        return (f"Cutting Knowledge Date: December 2023\nToday Date: {LLAMA3_DATE}\n\nYou have access to the "
                "following functions. To call a function, please respond with JSON for a function call. Respond in "
                'the format {"name": function name, "parameters": dictionary of argument name and its value}. Do not '
                "use variables.\n\n" + "".join(json.dumps(t, indent=4, ensure_ascii=False) + "\n\n"
                                              for t in _wrapped(tools)))
    if fmt == "glm4":
        return ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求"
                "提供适当的答复和支持。\n\n# 可用工具" + "".join(
                    f"\n\n## {t.get('name', '')}\n\n{json.dumps(t, indent=4, ensure_ascii=False)}\n在调用上述函数时，请使用 Json 格式表示"
                    "调用的参数。" for t in _unwrapped(tools)))
    if fmt == "mistral":
        return f"[AVAILABLE_TOOLS] {_dump(_wrapped(tools))}[/AVAILABLE_TOOLS]"
    if fmt == "lfm2":
        return f"List of tools: <|tool_list_start|>{_dump(_unwrapped(tools))}<|tool_list_end|>"
    if fmt == "minimax1":
        return ("You are provided with these tools:\n<tools>\n" + "".join(_dump(t) + "\n" for t in _unwrapped(tools))
                + "</tools>\n\nIf you need to call tools, please respond with <tool_calls></tool_calls> XML tags, and "
                "provide tool-name and json-object of arguments, following the format below:\n<tool_calls>\n"
                '{"name": <tool-name-1>, "arguments": <args-json-object-1>}\n...\n</tool_calls>')
    if fmt == "minimax2":
        return ("\n\n# Tools\n\nYou may call one or more tools to assist with the user query.\nHere are the tools "
                "available in JSONSchema format:\n\n<tools>\n" + "".join(f"<tool>{_dump(t)}</tool>\n"
                                                                       for t in _unwrapped(tools))
                + "</tools>\n\nWhen making tool calls, use XML format to invoke tools and pass parameters:\n\n"
                '<minimax:tool_call>\n<invoke name="tool-name-1">\n<parameter name="param-key-1">param-value-1'
                '</parameter>\n<parameter name="param-key-2">param-value-2</parameter>\n...\n</invoke>\n'
                "</minimax:tool_call>")
    return ("You can call these tools (JSON schema):\n" + "\n".join(_dump(t) for t in tools)
            + "\n\nTo call a tool, answer with a JSON object {\"name\": <tool name>, \"arguments\": {...}}.")


def with_tools(fmt: str, system: str, tools: str) -> str:
    """The system text with the tool definitions `tools` (a JSON list) in format `fmt`. As LLaMA-Factory joins
    them, except that with no system text a tool prompt opening with a blank line drops it, as the models' own
    templates (Qwen3, GLM-4.5) open the system turn with '# Tools'."""
    if not tools:
        return system
    text = _prompt(fmt, parse_tools(tools), tools)
    if fmt == "json":  # tuneforge's own format: a paragraph of its own
        return "\n\n".join(filter(None, [system, text]))
    return system + text if system else text.removeprefix("\n\n")


def _value_text(value) -> str:
    return value if isinstance(value, str) else _dump(value)


def _keywords(call: dict) -> dict:
    """The arguments of a call in a format that writes them one by one (glm4_moe, minimax2, lfm2)."""
    if not isinstance(call["arguments"], dict):
        raise ValueError(f'tool call `{call["name"]}`: "arguments" must be an object of named arguments')
    return call["arguments"]


def format_calls(fmt: str, content: str) -> str:
    """A function_call turn's calls (JSON) in format `fmt`, as the format's tool prompt asks for them."""
    calls = parse_calls(content)
    if fmt in ("default", "phi4_mini"):
        return "\n".join(f"Action: {c['name']}\nAction Input: {_dump(c['arguments'])}" for c in calls)
    if fmt in ("qwen", "ling"):
        return "\n".join("<tool_call>\n" + _dump({"name": c["name"], "arguments": c["arguments"]}) + "\n</tool_call>"
                         for c in calls)
    if fmt == "llama3":  # Llama 3.1's JSON tool call; several as a list
        values = [{"name": c["name"], "parameters": c["arguments"]} for c in calls]
        return _dump(values[0] if len(values) == 1 else values)
    if fmt == "glm4":
        if len(calls) > 1:
            raise ValueError("GLM-4 writes one tool call per answer; split the calls over several turns")
        return f"{calls[0]['name']}\n{_dump(calls[0]['arguments'])}"
    if fmt == "mistral":
        return _dump([{"name": c["name"], "arguments": c["arguments"]} for c in calls])
    if fmt == "glm4_moe":  # closed with </tool_call> as its prompt shows (LLaMA-Factory 0.9.5 leaves it out)
        return "\n".join(f"\n<tool_call>{c['name']}" + "".join(
            f"\n<arg_key>{k}</arg_key>\n<arg_value>{_value_text(v)}</arg_value>" for k, v in _keywords(c).items())
            + "\n</tool_call>" for c in calls)
    if fmt == "lfm2":  # Python call syntax; values as JSON writes them (LLaMA-Factory quotes strings without escaping)
        return "<|tool_call_start|>[" + ", ".join(f"{c['name']}(" + ", ".join(
            f"{k}={_dump(v)}" for k, v in _keywords(c).items()) + ")" for c in calls) + "]<|tool_call_end|>"
    if fmt == "minimax1":
        return "<tool_calls>\n" + "\n".join(_dump({"name": c["name"], "arguments": c["arguments"]})
                                           for c in calls) + "\n</tool_calls>"
    if fmt == "minimax2":  # inside <minimax:tool_call> as its prompt shows (LLaMA-Factory 0.9.5 leaves it out)
        return "<minimax:tool_call>\n" + "\n".join(f'<invoke name="{c["name"]}">' + "".join(
            f'\n<parameter name="{k}">{_value_text(v)}</parameter>' for k, v in _keywords(c).items())
            + "\n</invoke>" for c in calls) + "\n</minimax:tool_call>"
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
    if fmt is None:
        return next(filter(None, (parse_answer_calls(each, text) for each in OWN_TEMPLATE_FORMATS)), None)
    try:
        values = _answer_values(fmt, text.strip())
    except (json.JSONDecodeError, ValueError, SyntaxError):
        return None
    calls = [_call(v) for v in values]
    return calls if calls and all(calls) else None


def _answer_values(fmt: str, text: str) -> list:
    """The call objects written in `fmt` in `text` (JSONDecodeError, ValueError or SyntaxError when malformed)."""
    if fmt in ("default", "phi4_mini"):
        found = re.findall(r"Action:\s*([\w-]+)\s*Action Input:\s*(.+?)(?=\s*Action:|\s*$)", text, re.S)
        return [{"name": name, "arguments": json.loads(arguments.strip().strip('"').strip("`"))}
                for name, arguments in found]
    if fmt in ("qwen", "ling"):
        return [json.loads(body) for body in re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S)]
    if fmt == "glm4":
        name, _, arguments = text.partition("\n")
        return [{"name": name.strip(), "arguments": json.loads(arguments)}]
    if fmt == "llama3":  # one object, a list, or (older answers) one object per line
        try:
            value = json.loads(text)
            return value if isinstance(value, list) else [value]
        except json.JSONDecodeError:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
    if fmt == "glm4_moe":
        return [{"name": name.strip(), "arguments": _xml_arguments(body, r"<arg_key>(.*?)</arg_key>\s*"
                                                                          r"<arg_value>(.*?)</arg_value>")}
                for name, body in re.findall(r"<tool_call>([^\n<]+)(.*?)(?:</tool_call>|$)", text, re.S)]
    if fmt == "minimax2":
        return [{"name": name, "arguments": _xml_arguments(body, r'<parameter name="(.*?)">(.*?)</parameter>')}
                for name, body in re.findall(r'<invoke name="(.*?)">(.*?)</invoke>', text, re.S)]
    if fmt == "minimax1":
        found = re.search(r"<tool_calls>\s*(.+?)\s*</tool_calls>", text, re.S)
        return [json.loads(line) for line in found.group(1).splitlines() if line.strip()] if found else []
    if fmt == "lfm2":
        found = re.search(r"<\|tool_call_start\|>(.*?)<\|tool_call_end\|>", text, re.S)
        return _python_calls(found.group(1)) if found else []
    value = json.loads(text.removeprefix("[TOOL_CALLS]").strip())
    return value if isinstance(value, list) else [value]


def _xml_arguments(body: str, pattern: str) -> dict:
    """key/value pairs of an XML-ish call; a value that reads as JSON is that JSON value, else the string."""
    arguments = {}
    for key, raw in re.findall(pattern, body, re.S):
        try:
            arguments[key.strip()] = json.loads(raw.strip())
        except json.JSONDecodeError:
            arguments[key.strip()] = raw
    return arguments


def _python_calls(source: str) -> list[dict]:
    """LFM2's calls, `[name(key="value", n=2)]`: keyword arguments of literals (JSON's true/false/null too)."""
    tree = ast.parse(source.strip(), mode="eval").body
    calls = []
    for node in tree.elts if isinstance(tree, ast.List) else [tree]:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            raise ValueError("not a keyword call")
        json_names = {"true": True, "false": False, "null": None}
        calls.append({"name": node.func.id, "arguments": {
            k.arg: json_names[k.value.id] if isinstance(k.value, ast.Name) and k.value.id in json_names
            else ast.literal_eval(k.value) for k in node.keywords}})
    return calls
