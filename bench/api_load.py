"""Load on `tuneforge api`: N concurrent streaming clients for T seconds against 127.0.0.1, each disconnecting at
random part-way through some of its streams. Afterwards: the server's memory (RSS) must be back at its baseline
within a stated margin, every stream that was read to its end must be well-formed, and a fresh request must still
be answered. Prints one JSON line of figures (docs/benchmarks.md); exits 1 when a check fails.

    python bench/api_load.py --clients 32 --seconds 60 -- model_name_or_path=smollm2-135m-instruct template=chatml

The arguments after `--` are those of `tuneforge api`. tests/faults/test_api_abuse.py runs a short version.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

KEY = "sk-load"
HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
# Memory may settle a little above where it started (the allocator keeps some freed pages, batches of other
# sizes were compiled into caches): allowed up to this many MiB above the baseline; a leak of every abandoned
# stream's state would grow with the number of requests instead.
RSS_MARGIN_MIB = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 120):
    """(connection, response) of one HTTP request; a body that is an iterator of bytes goes chunked."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    connection.request(method, path, body=body, headers=headers or {},
                       encode_chunked=body is not None and not isinstance(body, (bytes, str)))
    return connection, connection.getresponse()


def start_server(args: list[str], log: Path, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`tuneforge api ARGS` on a free local port with bearer key KEY; returns (process, base url) once it answers."""
    port = free_port()
    env = dict(os.environ, API_HOST="127.0.0.1", API_PORT=str(port), API_KEY=KEY, API_MODEL_NAME="tiny",
               **(env or {}))
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "api", *args], env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"tuneforge api ended: {log.read_text()}")
        try:
            connection, _ = request(url, "GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
            connection.close()
            return process, url
        except OSError:  # not listening yet
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"tuneforge api did not start: {log.read_text()}") from None
            time.sleep(0.3)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def stream_problem(lines: list[str], route: str) -> str | None:
    """What is wrong with a stream that was read to its end, or None: every event a JSON chunk of one response,
    the last chunk finishing its choice, then `data: [DONE]` and nothing after it."""
    events = [line for line in lines if line]
    if not events or events[-1] != "data: [DONE]":
        return "does not end with data: [DONE]"
    if not all(e.startswith("data: ") for e in events):
        return "a line that is not a data event"
    try:
        chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    except json.JSONDecodeError as err:
        return f"an event that is not JSON: {err}"
    kind = "chat.completion.chunk" if route == "chat" else "text_completion"
    if not chunks or {c.get("object") for c in chunks} != {kind} or len({c.get("id") for c in chunks}) != 1:
        return "chunks of another kind or of several responses"
    if chunks[-1]["choices"][0].get("finish_reason") not in ("stop", "length"):
        return f"the last chunk does not finish the choice: {chunks[-1]}"
    return None


def one_stream(url: str, rng: random.Random, stats: dict, lock: threading.Lock) -> None:
    route = rng.choice(["chat", "text"])
    words = " ".join(rng.choice(["sea", "cat", "moon", "bread", "rain"]) for _ in range(rng.randint(1, 40)))
    body = {"model": "tiny", "stream": True, "max_tokens": rng.randint(1, 24), "temperature": rng.choice([0, 0.8])}
    if route == "chat":
        body["messages"] = [{"role": "user", "content": words}]
    else:
        body["prompt"] = words
    leave_after = rng.randint(1, 6) if rng.random() < 0.3 else None  # this client hangs up after that many events
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    connection, response = request(url, "POST", path, json.dumps(body).encode(),
                                   HEADERS)
    lines, outcome = [], "completed"
    try:
        if response.status != 200 or not response.getheader("content-type", "").startswith("text/event-stream"):
            outcome = f"status {response.status}: {response.read()[:200]!r}"
        while outcome == "completed":
            line = response.readline()
            if not line:
                break
            lines.append(line.decode().rstrip("\n"))
            if leave_after and sum(1 for x in lines if x) >= leave_after:
                outcome = "disconnected"  # closing the connection below hangs up mid-stream
    finally:
        connection.close()
    if outcome == "completed":
        outcome = stream_problem(lines, route) or outcome
    with lock:
        if outcome in ("completed", "disconnected"):
            stats[outcome] += 1
        else:
            stats["bad"].append(outcome)


def load(url: str, clients: int, seconds: float, seed: int) -> dict:
    stats, lock = {"completed": 0, "disconnected": 0, "bad": [], "errors": []}, threading.Lock()
    stop_at = time.monotonic() + seconds

    def client_loop(index: int):
        rng = random.Random(seed * 1000 + index)
        while time.monotonic() < stop_at:
            try:
                one_stream(url, rng, stats, lock)
            except OSError as err:  # includes http.client's errors about the connection
                with lock:
                    stats["errors"].append(f"{type(err).__name__}: {err}")

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    return stats


def measure(process: subprocess.Popen, url: str, clients: int, seconds: float, seed: int = 0) -> dict:
    """Warm the server up, take its baseline RSS, load it, let it settle, and report the figures and checks."""
    # a warm-up at the same concurrency: the first full batches allocate what every later one reuses
    load(url, clients, 2.0, seed + 1)
    time.sleep(1.0)
    baseline = rss_mib(process.pid)
    started = time.monotonic()
    stats = load(url, clients, seconds, seed)
    elapsed = time.monotonic() - started
    peak = rss_mib(process.pid)
    time.sleep(2.0)  # abandoned streams are noticed within 0.5 s (api.py's disconnect check)
    after = rss_mib(process.pid)
    connection, answer = request(url, "POST", "/v1/completions", json.dumps(
        {"model": "tiny", "prompt": "The quick brown", "max_tokens": 4}).encode(), HEADERS)
    answered = answer.status == 200 and bool(json.loads(answer.read())["choices"])
    connection.close()
    from tuneforge.machine import cpu_description

    return {"cpu": cpu_description(), "clients": clients, "seconds": round(elapsed, 1), "completed": stats["completed"],
            "disconnected": stats["disconnected"], "malformed": stats["bad"][:5], "n_malformed": len(stats["bad"]),
            "client_errors": stats["errors"][:5], "n_client_errors": len(stats["errors"]),
            "rss_baseline_mib": round(baseline, 1), "rss_peak_mib": round(peak, 1), "rss_after_mib": round(after, 1),
            "rss_margin_mib": RSS_MARGIN_MIB, "rss_ok": after <= baseline + RSS_MARGIN_MIB,
            "answers_after": answered}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("api_args", nargs="*", help="arguments of `tuneforge api` (after --)")
    ns = parser.parse_args()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"api_load_{os.getpid()}.log"
    process, url = start_server(ns.api_args, log)
    try:
        figures = measure(process, url, ns.clients, ns.seconds, ns.seed)
    finally:
        process.terminate()
        process.wait(timeout=30)
    print(json.dumps(figures))
    ok = figures["rss_ok"] and figures["answers_after"] and not figures["n_malformed"] and \
        not figures["n_client_errors"] and figures["completed"] > 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
