"""The API server's batcher without HTTP: tokens/s for 1 request alone and for 8 decoded together.

    .venv/bin/python bench/batcher_speed.py examples/quickstart.yaml adapter_name_or_path=saves/quickstart

Each request is the chat prompt "Who are you?", at most 32 new tokens, decoded as `tuneforge api` decodes a
request that sets nothing itself: with the config's generate keys (LLaMA-Factory's defaults sample at temperature
0.95, top_k 50, top_p 0.7; `do_sample=false` on the command line makes it greedy). Request i is seeded with i, so
that repeated runs draw the same tokens. Prints one JSON line per round.
"""

from __future__ import annotations

import json
import sys
import threading
import time

from tuneforge.config import load_config
from tuneforge.infer.batcher import Batcher, GenRequest
from tuneforge.infer.engine import Engine


def main() -> None:
    engine = Engine(load_config(sys.argv[1], sys.argv[2:], validate_for="chat"))
    prompt = engine.prompt_ids([{"role": "user", "content": "Who are you?"}])
    batcher = Batcher(engine.model, engine.tokenizer.pad_token_id, engine.stop_ids)
    gen = engine.cfg.generate
    settings = dict(temperature=gen.temperature if gen.do_sample else 0, top_p=gen.top_p, top_k=gen.top_k)
    for requests in (1, 1, 8):  # the first round warms up
        done, tokens = [threading.Event() for _ in range(requests)], []

        def emit_for(i):
            return lambda token, finish: done[i].set() if token is None else tokens.append(token)

        start = time.perf_counter()
        for i in range(requests):
            batcher.submit(GenRequest(prompt, 32, seed=i, emit=emit_for(i), **settings))
        for event in done:
            event.wait()
        seconds = time.perf_counter() - start
        print(json.dumps({**settings, "requests": requests, "tokens": len(tokens), "seconds": round(seconds, 2),
                          "tokens_per_s": round(len(tokens) / seconds, 1)}))
    batcher.close()


if __name__ == "__main__":
    main()
