"""`tuneforge api`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) on the model + adapter.

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, with and without `stream` (server-sent
events ending in `data: [DONE]`). Environment keys as LLaMA-Factory: API_HOST, API_PORT, API_KEY (bearer key on every
route), API_MODEL_NAME; ours: API_MAX_BODY_BYTES (the largest request body, see MAX_BODY). Generation goes through one
Batcher (infer/batcher.py), so concurrent clients share batches; a client that goes away cancels its request, which
frees its row in the batch.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from pydantic import BaseModel, ConfigDict, Field

from ..data.formats import ASSISTANT, FUNCTION, OBSERVATION, USER
from ..data.templates import tokenize_pieces
from ..data.tools import parse_answer_calls
from .batcher import Batcher, GenRequest

MAX_N = 8
# Largest request body read, in bytes (API_MAX_BODY_BYTES): a long chat with tools is tens of kilobytes; anything
# near this is abuse, refused with 413 before it is read (or as soon as a chunked body passes it).
MAX_BODY = 4 * 2**20
# OpenAI parameters this server does not implement: accepted at OpenAI's own defaults (clients often send those),
# refused otherwise, never silently ignored. `user` only names the end user and changes no answer.
OPENAI_DEFAULTS = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "top_logprobs": None,
                   "logit_bias": None, "parallel_tool_calls": True}
NAMES_ONLY = ("user",)


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # other parameters are checked by `unsupported`, not dropped
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class ChatRequest(Sampling):
    messages: list[Message]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class CompletionRequest(Sampling):
    prompt: str


def unsupported(body: Sampling) -> None:
    """Refuse a parameter this server would otherwise ignore (see OPENAI_DEFAULTS)."""
    for key, value in (body.model_extra or {}).items():
        if key in NAMES_ONLY or (key in OPENAI_DEFAULTS and value == OPENAI_DEFAULTS[key]):
            continue
        hint = f"leave it at its default ({json.dumps(OPENAI_DEFAULTS[key])})" if key in OPENAI_DEFAULTS else \
            "remove it"
        raise ApiError(400, f"`{key}` is not supported by this server; {hint}", key)


def _text(content) -> str:
    if isinstance(content, list):  # content parts: only text is understood by a text model
        if any(part.get("type") != "text" for part in content):
            raise ApiError(400, "only text content parts are supported", "messages")
        return "".join(part.get("text", "") for part in content)
    return content or ""


def chat_messages(request: ChatRequest) -> tuple[list[dict], str | None]:
    """OpenAI messages -> tuneforge's (messages, system); assistant tool calls become function_call turns."""
    if not request.messages:
        raise ApiError(400, "`messages` must hold at least one message", "messages")
    system, messages = None, []
    for i, message in enumerate(request.messages):
        if message.role in ("system", "developer"):
            if i != 0:
                raise ApiError(400, "a system message is only allowed first", f"messages[{i}]")
            system = _text(message.content)
        elif message.role == "assistant" and message.tool_calls:
            try:
                calls = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"] or "{}")}
                         for c in message.tool_calls]
            except (KeyError, TypeError, json.JSONDecodeError):
                raise ApiError(400, "each tool call needs function.name and function.arguments (a JSON string)",
                               f"messages[{i}].tool_calls") from None
            messages.append({"role": FUNCTION, "content": json.dumps(calls, ensure_ascii=False)})
        else:
            role = {"user": USER, "assistant": ASSISTANT, "tool": OBSERVATION}[message.role]
            messages.append({"role": role, "content": _text(message.content)})
    if messages[-1:] and messages[-1]["role"] not in (USER, OBSERVATION):
        raise ApiError(400, "the last message must be from the user (or a tool result)", "messages")
    if not messages:
        raise ApiError(400, "`messages` needs a user message", "messages")
    return messages, system


@dataclass
class Choice:
    """One answer being generated: its tokens, and how much of its text the client has already received."""

    index: int
    request: GenRequest | None = None
    tokens: list[int] = field(default_factory=list)
    sent: int = 0
    text: str = ""
    finish: str | None = None


class Server:
    def __init__(self, engine, model_name: str, api_key: str | None, max_batch: int = 8):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        tokenizer = engine.tokenizer
        self.context = getattr(engine.model.config, "max_position_embeddings", None) or tokenizer.model_max_length
        self.batcher = Batcher(engine.model, tokenizer.pad_token_id, engine.stop_ids, max_batch=max_batch)

    def check_key(self, authorization: str | None) -> None:
        if self.api_key and authorization != f"Bearer {self.api_key}":
            raise ApiError(401, "invalid or missing API key: send `Authorization: Bearer <API_KEY>`",
                           code="invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(404, f"the model `{name}` does not exist; this server serves `{self.model_name}`",
                           "model", "model_not_found")

    def chat_prompt(self, request: ChatRequest) -> tuple[list[int], bool]:
        """Prompt token ids, and whether the answer may be a tool call."""
        messages, system = chat_messages(request)
        choice = request.tool_choice
        if isinstance(choice, dict) or choice not in (None, "auto", "none"):
            raise ApiError(400, "tool_choice `required` or a named function is not supported; use auto or none",
                           "tool_choice")
        tools = json.dumps(request.tools) if request.tools and choice != "none" else ""
        template, tokenizer = self.engine.template, self.engine.tokenizer
        try:
            pieces = template.pieces(tokenizer, messages, system or self.engine.cfg.data.default_system, tools)
        except ValueError as err:  # malformed tools or tool calls
            raise ApiError(400, str(err), "tools") from None
        return [t for piece in tokenize_pieces(tokenizer, pieces) for t in piece], bool(tools)

    def requests(self, body: Sampling, prompt: list[int], emit_for) -> list[GenRequest]:
        unsupported(body)
        gen = self.engine.cfg.generate
        room = self.context - len(prompt)
        if room < 1:
            raise ApiError(400, f"the prompt is {len(prompt)} tokens; this model's context is {self.context}",
                           "messages", "context_length_exceeded")
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is not None and not 1 <= max_tokens <= room:
            raise ApiError(400, f"max_tokens must be between 1 and {room} (context {self.context} minus the "
                           f"{len(prompt)}-token prompt); got {max_tokens}", "max_tokens")
        temperature = body.temperature if body.temperature is not None else (gen.temperature if gen.do_sample else 0)
        return [GenRequest(prompt=prompt, max_tokens=max_tokens or min(gen.max_new_tokens, room),
                           temperature=temperature, top_p=body.top_p if body.top_p is not None else gen.top_p,
                           seed=None if body.seed is None else body.seed + i, emit=emit_for(i), top_k=gen.top_k,
                           repetition_penalty=gen.repetition_penalty)
                for i in range(body.n)]

    def _stops(self, body: Sampling) -> list[str]:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or not all(stops):
            raise ApiError(400, "`stop` takes up to 4 non-empty strings", "stop")
        return stops

    def advance(self, choice: Choice, stops: list[str]) -> str:
        """Decode the choice's tokens and return the new text that is safe to send: text that may still turn into
        a stop string, or an unfinished UTF-8 character, is held back."""
        text = self.engine.tokenizer.decode(choice.tokens, skip_special_tokens=True)
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            text = text[: min(hits)]
            choice.finish = "stop"
            choice.request.cancelled.set()
        elif choice.finish is None:
            hold = max((len(s) - 1 for s in stops), default=0)
            text = text[: len(text) - hold] if hold else text
            text = text.rstrip("\ufffd")
        delta = text[choice.sent:]
        choice.sent += len(delta)
        choice.text += delta
        return delta

    def generate(self, body: Sampling, prompt: list[int], http_request):
        """Check and queue the request now (so errors are 4xx answers before any byte is sent); returns an async
        iterator of (choice, text delta) as tokens arrive, and (choice, None) when a choice finishes."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit_for(index):
            return lambda token, finish: loop.call_soon_threadsafe(events.put_nowait, (index, token, finish))

        stops = self._stops(body)
        choices = [Choice(i) for i in range(body.n)]
        for choice, request in zip(choices, self.requests(body, prompt, emit_for)):
            choice.request = request
            self.batcher.submit(request)
        return self._events(choices, events, stops, http_request)

    async def _events(self, choices: list[Choice], events: asyncio.Queue, stops: list[str], http_request):
        open_choices = set(range(len(choices)))
        try:
            while open_choices:
                try:
                    index, token, finish = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http_request.is_disconnected():
                        return
                    continue
                choice = choices[index]
                if index not in open_choices:
                    continue  # tokens already in flight after a stop text was seen
                if finish and finish.startswith("error"):
                    raise RuntimeError(finish)
                if token is not None:
                    choice.tokens.append(token)
                else:
                    choice.finish = choice.finish or finish
                delta = self.advance(choice, stops)
                if delta:
                    yield choice, delta
                if choice.finish:
                    open_choices.discard(index)
                    yield choice, None
        finally:  # a finished, failed or abandoned response frees its rows in the batch
            for choice in choices:
                choice.request.cancelled.set()


def _calls_json(calls: list[dict]) -> list[dict]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


def _sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def chat_completion(server: Server, body: ChatRequest, http_request):
    prompt, tools = server.chat_prompt(body)
    tool_format = server.engine.template.tool_format
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_name}
    events = server.generate(body, prompt, http_request)

    def finished(choice: Choice) -> tuple[dict, str]:
        """The message of a finished choice: a tool call when the answer parses as one."""
        calls = parse_answer_calls(tool_format, choice.text) if tools else None
        if calls:
            return {"role": "assistant", "content": None, "tool_calls": _calls_json(calls)}, "tool_calls"
        return {"role": "assistant", "content": choice.text}, choice.finish

    def usage(choices) -> dict:
        done = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": len(prompt), "completion_tokens": done, "total_tokens": len(prompt) + done}

    if not body.stream:
        choices = {}
        async for choice, _ in events:
            choices[choice.index] = choice
        answers = []
        for choice in sorted(choices.values(), key=lambda c: c.index):
            message, reason = finished(choice)
            answers.append({"index": choice.index, "message": message, "finish_reason": reason, "logprobs": None})
        return {**head, "object": "chat.completion", "choices": answers, "usage": usage(choices.values())}

    async def stream():
        chunk = {**head, "object": "chat.completion.chunk"}
        seen = []
        for i in range(body.n):
            yield _sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None}]})
        async for choice, delta in events:
            if delta is not None and not tools:  # with tools the answer is held until it can be parsed
                yield _sse({**chunk, "choices": [{"index": choice.index, "delta": {"content": delta},
                                                  "finish_reason": None}]})
            elif delta is None:
                seen.append(choice)
                message, reason = finished(choice)
                if tools:
                    delta_msg = {"tool_calls": [{"index": k, **call} for k, call in
                                                enumerate(message["tool_calls"])]} if message.get("tool_calls") \
                        else {"content": message["content"]}
                    yield _sse({**chunk, "choices": [{"index": choice.index, "delta": delta_msg,
                                                      "finish_reason": None}]})
                yield _sse({**chunk, "choices": [{"index": choice.index, "delta": {}, "finish_reason": reason}]})
        if (body.stream_options or {}).get("include_usage"):
            yield _sse({**chunk, "choices": [], "usage": usage(seen)})
        yield "data: [DONE]\n\n"

    return stream()


async def text_completion(server: Server, body: CompletionRequest, http_request):
    prompt = server.engine.tokenizer.encode(body.prompt, add_special_tokens=True)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_name}
    events = server.generate(body, prompt, http_request)
    if not body.stream:
        choices = {}
        async for choice, _ in events:
            choices[choice.index] = choice
        done = sum(len(c.tokens) for c in choices.values())
        return {**head, "object": "text_completion",
                "choices": [{"index": c.index, "text": c.text, "finish_reason": c.finish, "logprobs": None}
                            for c in sorted(choices.values(), key=lambda c: c.index)],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": done,
                          "total_tokens": len(prompt) + done}}

    async def stream():
        async for choice, delta in events:
            yield _sse({**head, "object": "text_completion", "choices": [
                {"index": choice.index, "text": delta or "", "finish_reason": None if delta is not None
                 else choice.finish, "logprobs": None}]})
        yield "data: [DONE]\n\n"

    return stream()


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused with 413, by its Content-Length before any of
    it is read, or as soon as a body without one passes the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = HTTPException(413, f"the request body is larger than {self.limit} bytes (API_MAX_BODY_BYTES)")
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            error = ApiError(413 if length.isdigit() else 400, too_large.detail if length.isdigit() else
                             "Content-Length must be a number")
            return await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise too_large  # FastAPI passes HTTPExceptions raised while reading the body through
            return message

        await self.app(scope, limited, send)


def create_app(server: Server, max_body: int = MAX_BODY):
    async def authenticate(request: Request):
        server.check_key(request.headers.get("authorization"))

    app = FastAPI(title="tuneforge", docs_url=None, redoc_url=None, dependencies=[Depends(authenticate)])
    app.add_middleware(BodyLimit, limit=max_body)

    @app.exception_handler(ApiError)
    async def api_error(_, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):  # unknown routes, wrong methods, unreadable bodies
        message = str(err.detail)
        if message in ("Not Found", "Method Not Allowed"):  # (e.g. /v1/embeddings, which a client may try)
            message += (f": {request.method} {request.url.path}; this server answers GET /v1/models, "
                        "POST /v1/chat/completions and POST /v1/completions")
        return JSONResponse(ApiError(err.status_code, message).body(), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) if first.get("type") != "json_invalid" else None
        kind = "malformed JSON" if first.get("type") == "json_invalid" else "invalid request"
        return JSONResponse(ApiError(400, f"{kind}: {where or 'body'}: {first.get('msg', 'cannot be read')}",
                                     where).body(), status_code=400)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "tuneforge"}]}

    async def respond(result):
        result = await result
        if isinstance(result, dict):
            return result
        return StreamingResponse(result, media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        server.check_model(body.model)
        return await respond(chat_completion(server, body, request))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        server.check_model(body.model)
        return await respond(text_completion(server, body, request))

    return app


def serve(cfg) -> None:
    import uvicorn

    from ..config import ConfigError
    from ..models.load import decode_dtype_hint
    from .engine import Engine

    if cfg.generate.num_beams > 1:
        raise ConfigError(f"`num_beams: {cfg.generate.num_beams}`: the API server decodes each request greedily or "
                          "by sampling, one token per step for the whole batch; beam search is for `tuneforge chat` "
                          "and do_predict: remove it")
    engine = Engine(cfg)
    server = Server(engine, os.environ.get("API_MODEL_NAME", "gpt-3.5-turbo"), os.environ.get("API_KEY") or None)
    host, port = os.environ.get("API_HOST", "0.0.0.0"), int(os.environ.get("API_PORT", "8000"))
    print(f"[tuneforge] serving `{server.model_name}` at http://{host}:{port}/v1 "
          f"({'bearer key required' if server.api_key else 'no API_KEY set: open to anyone who can reach it'})",
          flush=True)
    if hint := decode_dtype_hint(cfg.model):
        print(f"[tuneforge] {hint}", flush=True)
    max_body = int(os.environ.get("API_MAX_BODY_BYTES", MAX_BODY))
    try:
        uvicorn.run(create_app(server, max_body), host=host, port=port, log_level="warning")
    finally:
        server.batcher.close()
