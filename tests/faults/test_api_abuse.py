"""`tuneforge api` under abuse and load, as a real server process on 127.0.0.1: bad requests get a 4xx in OpenAI's
error shape naming the problem, and the server keeps serving; concurrent streaming clients that hang up at random
leave no memory behind and every stream read to its end is well-formed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_api import PIECES, rigged_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import api_load  # noqa: E402 - bench/ is not a package

CHAT, TEXT, MODELS = "/v1/chat/completions", "/v1/completions", "/v1/models"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = rigged_model(tmp_path_factory.mktemp("rigged"))
    log = tmp_path_factory.mktemp("api-log") / "server.log"
    process, url = api_load.start_server([f"model_name_or_path={model}", "template=chatml", "do_sample=false",
                                          "max_new_tokens=24"], log)
    try:
        yield process, url
    finally:
        process.terminate()
        process.wait(timeout=30)


def chat(**fields) -> bytes:
    return json.dumps({"model": "tiny", "messages": HI, **fields}).encode()


def chunks(total: int, size: int = 2**20):
    """A body sent without Content-Length (chunked), `total` bytes of it."""
    for _ in range(total // size):
        yield b" " * size


# (method, route, body, headers, status, words the error message must hold)
AUTH = [(method, route, body, headers, 401, "API key")
        for method, route, body in (("GET", MODELS, None), ("POST", CHAT, chat()),
                                    ("POST", TEXT, json.dumps({"model": "tiny", "prompt": "hi"}).encode()))
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": api_load.KEY})]
BAD = [
    ("POST", CHAT, b'{"model": "tiny", "messages": [', None, 400, "malformed JSON"),
    ("POST", CHAT, b"", None, 400, "body"),
    ("POST", CHAT, b"[1, 2]", None, 400, "invalid request"),
    ("POST", CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}', None, 400, "body"),
    ("POST", CHAT, b"x" * (10 * 2**20), None, 413, "larger than"),
    ("POST", CHAT, chunks(10 * 2**20), None, 413, "larger than"),
    ("POST", CHAT, json.dumps({"model": "tiny", "messages": "hi"}).encode(), None, 400, "messages"),
    ("POST", CHAT, chat(temperature="hot"), None, 400, "temperature"),
    ("POST", CHAT, chat(temperature=5), None, 400, "temperature"),
    ("POST", CHAT, chat(stream=[1]), None, 400, "stream"),
    ("POST", CHAT, chat(max_tokens=10**9), None, 400, "max_tokens must be between"),
    ("POST", CHAT, chat(max_tokens=-5), None, 400, "max_tokens must be between"),
    ("POST", CHAT, chat(n=100), None, 400, "n"),
    ("POST", CHAT, chat(stop=["a", "b", "c", "d", "e"]), None, 400, "up to 4"),
    ("POST", CHAT, chat(best_of=2), None, 400, "not supported"),
    ("POST", CHAT, chat(messages=[{"role": "user", "content": "word " * 600}]), None, 400, "context"),
    ("POST", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), None, 400, "role"),
    ("POST", CHAT, chat(messages=[{"content": "hi"}]), None, 400, "role"),
    ("POST", CHAT, chat(messages=[*HI, {"role": "system", "content": "late"}, *HI]), None, 400, "only allowed first"),
    ("POST", CHAT, chat(messages=[*HI, {"role": "assistant", "content": "yes"}]), None, 400, "last message"),
    ("POST", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     None, 400, "only text"),
    ("POST", CHAT, chat(messages=[*HI, {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}, *HI]),
     None, 400, "each tool call"),
    ("POST", CHAT, chat(model="../../etc/passwd"), None, 404, "does not exist"),
    ("POST", CHAT, chat(model="tiny/../../secret"), None, 404, "does not exist"),
    ("POST", TEXT, json.dumps({"model": "tiny", "prompt": "word " * 600}).encode(), None, 400, "context"),
    ("POST", TEXT, json.dumps({"model": "tiny", "prompt": [1, 2, 3]}).encode(), None, 400, "prompt"),
    ("POST", TEXT, json.dumps({"model": "tiny"}).encode(), None, 400, "prompt"),
    ("GET", CHAT, None, None, 405, "Method Not Allowed"),
    ("POST", "/v1/engines/../../models", chat(), None, 404, "Not Found"),
]


def test_bad_requests_get_4xx_with_a_reason_and_the_server_keeps_serving(server):
    _, url = server
    assert len(AUTH) + len(BAD) >= 20
    key = api_load.HEADERS
    for method, route, body, headers, status, words in AUTH + BAD:
        connection, answer = api_load.request(url, method, route, body, key if headers is None else headers, 60)
        text = answer.read().decode()
        connection.close()
        shown = (method, route, body[:80] if isinstance(body, bytes) else body, text[:300])
        assert answer.status == status, shown
        error = json.loads(text)["error"]
        assert words in error["message"] and error["type"], shown
    connection, good = api_load.request(url, "POST", CHAT, chat(temperature=0), key, 60)
    assert good.status == 200 and json.loads(good.read())["choices"][0]["message"]["content"] == "".join(PIECES)
    connection.close()


def test_short_load_with_random_disconnects_leaves_memory_and_streams_intact(server):
    process, url = server
    figures = api_load.measure(process, url, clients=8, seconds=5, seed=3)
    assert figures["completed"] > 0 and figures["disconnected"] > 0, figures
    assert not figures["n_malformed"] and not figures["n_client_errors"], figures
    assert figures["rss_ok"] and figures["answers_after"], figures  # margin: api_load.RSS_MARGIN_MIB, why there
