"""`tuneforge api`: the batching decoder in-process, and a real server process driven by the official `openai`
client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import build_llama, build_tokenizer

from tuneforge.data.tools import TOOL_FORMATS, format_calls, parse_answer_calls
from tuneforge.infer.batcher import Batcher, GenRequest

KEY = "sk-tuneforge-test"
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
# the rigged model's answer, one added token per piece: a tool call in the chatml template's tool format
# (LLaMA-Factory's ReAct-style default)
PIECES = ["Action: get_weather\n", "Action Input: ", '{"city": "Paris"}']
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


def rigged_model(folder: Path) -> str:
    """A tiny Llama whose one layer adds nothing (o_proj and down_proj are zero), so each next token depends on the
    current token alone; its embeddings and head are set so that the assistant header's last token leads to the
    three PIECES and then <|im_end|>. Every chat is answered with the same tool call, deterministically, without
    training; other text gets the random model's tokens."""
    tokenizer = build_tokenizer(folder)
    tokenizer.add_tokens(PIECES)
    tokenizer.save_pretrained(folder)
    model = build_llama(folder, len(tokenizer))
    header = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                           tokenize=True)["input_ids"][-1]
    chain = [header, *tokenizer.convert_tokens_to_ids(PIECES), tokenizer.convert_tokens_to_ids("<|im_end|>")]
    with torch.no_grad():
        layers = model.model.layers
        for layer in layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        for k, (token, following) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[token] = 0
            model.model.embed_tokens.weight[token, k] = 1.0
            model.lm_head.weight[following, k] = 10.0  # after the norm the input is 8 in that unit: logit 80
    model.save_pretrained(folder)
    return str(folder)


def post(url: str, body: bytes, key: str = KEY) -> tuple[int, dict]:
    """A raw request (the openai client would refuse to send malformed bodies): (status, JSON answer)."""
    from urllib.error import HTTPError
    from urllib.request import Request, urlopen

    request = Request(url, data=body, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except HTTPError as err:
        return err.code, json.loads(err.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """A `tuneforge api` server process on a free local port; yields an openai client with the right key."""
    from urllib.request import Request, urlopen

    from openai import OpenAI

    model = rigged_model(tmp_path_factory.mktemp("rigged"))
    port = free_port()
    env = dict(os.environ, API_HOST="127.0.0.1", API_PORT=str(port), API_KEY=KEY, API_MODEL_NAME="tiny")
    log = tmp_path_factory.mktemp("api-log") / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "api", f"model_name_or_path={model}",
                                    "template=chatml", "do_sample=false", "max_new_tokens=24"],
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log.read_text()
            try:
                with urlopen(Request(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}), timeout=5):
                    break
            except OSError:  # not listening yet
                pass
            assert time.monotonic() < deadline, "server did not start: " + log.read_text()
            time.sleep(0.3)
        yield OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60), url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_models_chat_and_stream_equal_greedy(api):
    client, _ = api
    assert [m.id for m in client.models.list().data] == ["tiny"]
    chat = [{"role": "user", "content": "Tell me about the weather today."}]
    answer = client.chat.completions.create(model="tiny", messages=chat, temperature=0)
    assert answer.choices[0].message.content == "".join(PIECES) and answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens == 3 and answer.usage.prompt_tokens > 5  # the closing <|im_end|> not counted
    chunks = list(client.chat.completions.create(model="tiny", messages=chat, temperature=0, stream=True))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) == 3 and "".join(deltas) == answer.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    cut = client.chat.completions.create(model="tiny", messages=chat, temperature=0, stop=["Action Input"])
    assert cut.choices[0].message.content == PIECES[0] and cut.choices[0].finish_reason == "stop"
    cut = list(client.chat.completions.create(model="tiny", messages=chat, temperature=0, stop=["Paris"],
                                              stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in cut) == "".join(PIECES).split("Paris")[0]
    # free text from the random part of the model: streamed pieces assemble to the one-shot greedy text
    plain = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=12, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The quick brown", max_tokens=12, temperature=0, stream=True))
    assert plain.choices[0].text and streamed == plain.choices[0].text


def test_sampling_with_seed_repeats(api):
    client, _ = api
    runs = [client.completions.create(model="tiny", prompt="Who are you?", max_tokens=10, temperature=1.0,
                                      top_p=0.9, seed=7, n=2) for _ in range(2)]
    assert [c.text for c in runs[0].choices] == [c.text for c in runs[1].choices]


def test_tool_call(api):
    client, _ = api
    chat = [{"role": "user", "content": "What is the weather in Paris?"}]
    answer = client.chat.completions.create(model="tiny", messages=chat, tools=TOOLS, temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    streamed = list(client.chat.completions.create(model="tiny", messages=chat, tools=TOOLS, temperature=0,
                                                   stream=True))
    calls = [tc for c in streamed if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    # the answer to the call goes back as a tool message, as OpenAI clients send it
    follow = chat + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    assert client.chat.completions.create(model="tiny", messages=follow, tools=TOOLS, temperature=0).choices


def test_errors_in_openai_shape(api):
    import openai

    client, url = api
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()
    chat = [{"role": "user", "content": "hi"}]
    cases = [({"model": "tiny", "messages": "hi"}, 400, "messages"),
             ({"model": "tiny", "messages": []}, 400, "messages"),
             ({"model": "tiny", "messages": chat, "temperature": "hot"}, 400, "temperature"),
             ({"model": "tiny", "messages": chat, "max_tokens": 0}, 400, "max_tokens"),
             ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages"),
             ({"model": "tiny", "messages": chat, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
             ({"model": "tiny", "messages": chat, "best_of": 2}, 400, "best_of"),
             ({"model": "other", "messages": chat}, 404, "model")]
    for body, status, param in cases:
        code, answer = post(f"{url}/v1/chat/completions", json.dumps(body).encode())
        assert code == status and answer["error"]["param"] == param and answer["error"]["message"], (body, answer)
    code, answer = post(f"{url}/v1/chat/completions", b'{"model": "tiny", "messages": [')
    assert code == 400 and "malformed JSON" in answer["error"]["message"]
    code, answer = post(f"{url}/v1/embeddings", json.dumps({"model": "tiny", "input": "hi"}).encode())
    assert code == 404 and answer["error"]["message"] == (
        "Not Found: POST /v1/embeddings; this server answers GET /v1/models, POST /v1/chat/completions and POST "
        "/v1/completions")
    assert post(f"{url}/v1/chat/completions", json.dumps({"model": "tiny", "messages": chat}).encode(),
                key="wrong")[0] == 401
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[])
    # OpenAI's own defaults change nothing, so clients that always send them are served
    assert client.chat.completions.create(model="tiny", messages=chat, max_tokens=2, frequency_penalty=0,
                                          logprobs=False, user="me").choices


def test_eight_concurrent_streams_complete(api):
    client, _ = api

    def one(i: int) -> str:
        stream = client.chat.completions.create(model="tiny", stream=True, temperature=0,
                                                messages=[{"role": "user", "content": f"Question number {i}?"}])
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(8))) == ["".join(PIECES)] * 8


def test_parse_answer_calls_inverts_format_calls():
    two = [CALL, {"name": "now", "arguments": {}}]
    for fmt in TOOL_FORMATS:
        assert parse_answer_calls(fmt, format_calls(fmt, json.dumps(CALL))) == [CALL], fmt
        if fmt != "glm4":  # GLM-4 writes one call per answer
            assert parse_answer_calls(fmt, format_calls(fmt, json.dumps(two))) == two, fmt
    with pytest.raises(ValueError, match="GLM-4 writes one tool call per answer"):
        format_calls("glm4", json.dumps(two))
    # values of every JSON type through the formats that write arguments one by one (strings bare, the rest JSON)
    typed = {"name": "f", "arguments": {"s": 'say "hi" \\o/', "n": 2.5, "b": True, "z": None, "l": [1, "x"],
                                        "o": {"k": 1}}}
    for fmt in ("glm4_moe", "minimax2", "lfm2"):
        assert parse_answer_calls(fmt, format_calls(fmt, json.dumps(typed))) == [typed], fmt
        with pytest.raises(ValueError, match='tool call `f`: "arguments" must be an object'):
            format_calls(fmt, json.dumps({"name": "f", "arguments": "a string"}))
    assert parse_answer_calls("qwen", "It is sunny.") is None and parse_answer_calls("json", "{}") is None
    assert parse_answer_calls("default", "It is sunny.") is None
    # the tokenizer's own chat template (tool_format None): whichever family's format the answer is in
    for fmt in ("qwen", "mistral", "llama3", "default", "json"):
        assert parse_answer_calls(None, "<think>\nok\n</think>\n\n" * (fmt == "qwen")
                                  + format_calls(fmt, json.dumps(CALL))) == [CALL], fmt
    assert parse_answer_calls(None, 'It is sunny.\n{"a": 1}') is None
    # LLaMA-Factory's parser takes an argument object quoted or fenced too
    assert parse_answer_calls("default", 'Action: get_weather\nAction Input: ```{"city": "Paris"}```') == [CALL]


def _collect(batcher: Batcher, prompts: list[list[int]], max_tokens: int, cancel_after: int | None = None):
    """Each prompt's tokens, decoded greedily together in one batch."""
    results, finished = [[] for _ in prompts], [threading.Event() for _ in prompts]
    requests = []

    def emit_for(i):
        def emit(token, finish):
            if token is None:
                finished[i].set()
                return
            results[i].append(token)
            if len(results[i]) == cancel_after:
                requests[i].cancelled.set()  # as when the client goes away
                finished[i].set()
        return emit

    requests += [GenRequest(prompt=p, max_tokens=max_tokens, temperature=0, top_p=1, seed=None, emit=emit_for(i))
                 for i, p in enumerate(prompts)]
    for request in requests:
        batcher.submit(request)
    assert all(event.wait(timeout=60) for event in finished)
    return results


def test_batched_greedy_equals_one_at_a_time_and_cancel_frees_row(tmp_path):
    """Left-padded prompts of different lengths decoded together give each prompt's own greedy tokens; a
    cancelled request stops receiving tokens."""
    tokenizer = build_tokenizer(tmp_path)
    model = build_llama(tmp_path, len(tokenizer)).eval()
    with torch.no_grad():  # random weights give near-flat logits; a sharper final norm gives a clear top token
        model.model.norm.weight.mul_(8)
    batcher = Batcher(model, tokenizer.pad_token_id, stop_ids=[], max_batch=4, gather_s=0.2)
    prompts = [tokenizer.encode(t) for t in ("The quick brown fox", "Who", "Tell me about the weather today.")]
    together = _collect(batcher, prompts, max_tokens=8)
    alone = [_collect(batcher, [p], max_tokens=8)[0] for p in prompts]
    assert together == alone and all(len(r) == 8 for r in together)
    cancelled = _collect(batcher, [prompts[0], prompts[1]], max_tokens=20, cancel_after=3)
    time.sleep(0.5)  # any token decoded for the cancelled row after this would have been appended
    assert len(cancelled[0]) == 3 and len(cancelled[1]) == 3


def test_close_decodes_what_was_submitted_then_stops_the_worker(tmp_path):
    """close() lets every submitted request finish, then joins the worker, so nothing of it runs while the
    process exits (bench/batcher_speed.py aborted at exit on CUDA with the worker left running)."""
    tokenizer = build_tokenizer(tmp_path)
    batcher = Batcher(build_llama(tmp_path, len(tokenizer)).eval(), tokenizer.pad_token_id, stop_ids=[],
                      max_batch=2, gather_s=0)
    counts, ended = [0, 0, 0], []
    for i in range(3):  # 3 requests for batches of 2: the third waits in the queue when close() is called
        def emit(token, finish, i=i):
            counts[i] += token is not None
            ended.append(finish) if finish else None
        batcher.submit(GenRequest(prompt=tokenizer.encode("Who"), max_tokens=6, temperature=0, top_p=1, seed=None,
                                  emit=emit))
    batcher.close()
    assert not batcher.worker.is_alive() and counts == [6, 6, 6] and ended == ["length"] * 3
    with pytest.raises(RuntimeError, match="the batcher is closed"):
        batcher.submit(GenRequest(prompt=[1], max_tokens=1, temperature=0, top_p=1, seed=None, emit=print))


def test_decoding_settings_match_transformers():
    """repetition_penalty, temperature, top_k and top_p filter the logits as Hugging Face generate's processors do,
    so the API server decodes as `tuneforge chat` does with the same config."""
    from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    from tuneforge.infer.batcher import penalised
    from tuneforge.infer.sampling import candidates

    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    seen = torch.tensor([0, 3, 7, 11, 20, 33])
    request = GenRequest(prompt=[], max_tokens=1, temperature=1.5, top_p=0.9, seed=None, emit=print, top_k=8,
                         repetition_penalty=1.3)
    probs, tokens = candidates(penalised(logits, seen, 1.3)[None], request.temperature, request.top_k, request.top_p)
    ours = torch.zeros(1, 50).scatter(-1, tokens, probs)[0]
    scores = RepetitionPenaltyLogitsProcessor(1.3)(seen[None], logits[None].clone())
    for warper in (TemperatureLogitsWarper(1.5), TopKLogitsWarper(8), TopPLogitsWarper(0.9)):
        scores = warper(seen[None], scores)
    theirs = torch.softmax(scores[0], dim=-1)
    assert 1 < int((ours > 0).sum()) < 8  # both filters cut something here
    # float32 softmax over the same surviving logits; 1e-6 is rounding
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_api_refuses_beam_search(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tuneforge.cli", "api", "model_name_or_path=smollm2-135m-instruct",
                           "num_beams=4"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "beam search is for `tuneforge chat`" in done.stderr
