"""`tuneforge chat`: a streaming multi-turn chat in the terminal, or one answer with --query."""

from __future__ import annotations

import sys

from ..models.load import decode_dtype_hint
from .engine import Engine

HELP = "Type a message. /clear starts a new conversation, /exit quits."


def one_shot(cfg, query: str, system: str | None = None) -> str:
    return Engine(cfg).chat([{"role": "user", "content": query}], system)


def repl(cfg, system: str | None = None) -> None:
    engine = Engine(cfg)
    history: list[dict] = []
    if hint := decode_dtype_hint(cfg.model):
        print(f"[tuneforge] {hint}")
    print(HELP)
    while True:
        try:
            query = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if query in ("/exit", "exit", "/quit"):
            return
        if query == "/clear":
            history = []
            print("(history cleared)")
            continue
        if not query:
            continue
        history.append({"role": "user", "content": query})
        print("Assistant: ", end="", flush=True)
        answer = ""
        for piece in engine.stream(history, system):
            answer += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
        history.append({"role": "assistant", "content": answer.strip()})
