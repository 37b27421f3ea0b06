"""API server throughput: generated tokens per second with 1 and with 8 concurrent streaming clients.

    tuneforge api examples/quickstart.yaml adapter_name_or_path=saves/quickstart &   # in another shell
    .venv/bin/python bench/api_speed.py [--url http://127.0.0.1:8000/v1] [--max-tokens 64]

Each client asks for a chat answer (greedy, max_tokens fixed) to a different identity question; tokens/s is the sum
of the answers' completion tokens (from `usage`) over the wall time of the round. Prints one JSON line per round.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

from tuneforge.machine import cpu_description

QUESTIONS = ["Who are you?", "What is your name?", "Who made you?", "What can you do?", "Are you ChatGPT?",
             "Introduce yourself.", "What should I call you?", "Which company built you?"]


def main() -> None:
    from openai import OpenAI

    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    client = OpenAI(base_url=args.url, api_key=os.environ.get("API_KEY", "none"), timeout=600)
    model = client.models.list().data[0].id

    def ask(question: str) -> int:
        answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                temperature=0, max_tokens=args.max_tokens)
        return answer.usage.completion_tokens

    ask(QUESTIONS[0])  # warm-up
    for clients in (1, 8):
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            tokens = sum(pool.map(ask, QUESTIONS[:clients]))
        seconds = time.perf_counter() - start
        print(json.dumps({"clients": clients, "completion_tokens": tokens, "seconds": round(seconds, 2),
                          "tokens_per_s": round(tokens / seconds, 1), "cpu": cpu_description(),
                          "threads": os.cpu_count()}))


if __name__ == "__main__":
    main()
