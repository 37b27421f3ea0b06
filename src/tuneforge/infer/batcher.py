"""Batched decoding for the API server. One worker thread owns the model; requests wait in a queue; the worker
takes every request that is waiting (up to `max_batch`), decodes them together step by step over one KV cache
(prompts left-padded), hands each new token to its request, and drops a row as soon as its request finished, hit a
stop token, or was cancelled (a stop text was seen, or its client went away). Requests that arrive while a batch is
running start with the next batch."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..data.collate import left_pad
from .sampling import candidates, draw


@dataclass
class GenRequest:
    prompt: list[int]
    max_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    seed: int | None
    emit: Callable[[int | None, str | None], None]  # (token, None) per token; (None, finish reason) once at the end
    cancelled: threading.Event = field(default_factory=threading.Event)
    top_k: int = 0  # when sampling: only the k likeliest tokens (0: all)
    repetition_penalty: float = 1.0  # tokens of the prompt and answer so far: logits / this (x this below 0)


def pick_token(logits: torch.Tensor, request: GenRequest, generator: torch.Generator,
               seen: torch.Tensor | None = None) -> int:
    """The next token, as Hugging Face generate picks it: the `seen` tokens' logits penalised, then argmax at
    temperature 0, else a draw from the request's temperature, top_k and top_p (sampling.candidates)."""
    if request.repetition_penalty != 1.0 and seen is not None and len(seen):
        logits = penalised(logits, seen, request.repetition_penalty)
    if request.temperature <= 0:
        return int(logits.argmax())
    probs, tokens = candidates(logits[None], request.temperature, request.top_k, request.top_p)
    index = draw(probs[0], generator)
    return int(index if tokens is None else tokens[0, index])


def penalised(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """repetition_penalty on the tokens already in the text: a positive logit divided by it, a negative one
    multiplied, so either becomes less likely (CTRL's rule, as transformers applies it)."""
    logits = logits.clone()
    scores = logits[seen]
    logits[seen] = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits


class Batcher:
    def __init__(self, model, pad_id: int, stop_ids: list[int], max_batch: int = 8, gather_s: float = 0.02):
        self.model, self.pad_id, self.stop_ids = model, pad_id, set(stop_ids)
        self.max_batch, self.gather_s = max_batch, gather_s
        self.waiting: queue.Queue[GenRequest | None] = queue.Queue()  # None: close() asks the worker to stop
        self.device = next(model.parameters()).device
        self.closed = False
        self.worker = threading.Thread(target=self._work, name="tuneforge-batcher", daemon=True)
        self.worker.start()

    def submit(self, request: GenRequest) -> None:
        if self.closed:
            raise RuntimeError("the batcher is closed: the server is shutting down")
        self.waiting.put(request)

    def close(self) -> None:
        """Decode what was submitted, then stop the worker and wait for it. Call it before the process exits: a
        daemon thread still releasing a batch's tensors while the interpreter (and CUDA) shut down can abort it."""
        self.closed = True
        self.waiting.put(None)
        self.worker.join()
        while not self.waiting.empty():  # submitted as close() began, after the worker's last batch
            request = self.waiting.get()
            if request is not None:
                request.emit(None, "error: the server is shutting down")

    def _work(self) -> None:
        while True:
            batch = [self.waiting.get()]
            # a short wait lets requests sent at the same moment share the batch
            deadline = time.monotonic() + self.gather_s
            while len(batch) < self.max_batch and batch[-1] is not None:
                try:
                    batch.append(self.waiting.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            closing = batch[-1] is None
            batch = [r for r in batch if r is not None and not r.cancelled.is_set()]
            try:
                if batch:
                    self._decode(batch)
            except Exception as err:  # noqa: BLE001 - the server must outlive one failed batch; clients hear why
                for request in batch:
                    request.emit(None, f"error: {type(err).__name__}: {err}")
            if closing:
                return

    @torch.no_grad()
    def _decode(self, batch: list[GenRequest]) -> None:
        ids, mask, positions = left_pad([r.prompt for r in batch], self.pad_id)
        generators = [torch.Generator() for _ in batch]  # per request: a seed gives the same answer in any batch
        for request, generator in zip(batch, generators):
            generator.manual_seed(request.seed) if request.seed is not None else generator.seed()
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), use_cache=True)
        cache, rows, counts = out.past_key_values, list(range(len(batch))), [0] * len(batch)
        # the distinct tokens of each request's prompt and answer so far, for repetition_penalty
        seen = [torch.tensor(sorted(set(r.prompt)), dtype=torch.long) if r.repetition_penalty != 1.0 else None
                for r in batch]
        next_position = positions[:, -1] + 1
        while True:
            last = out.logits[:, -1].float().cpu()
            keep, tokens = [], []
            for i, row in enumerate(rows):
                request = batch[row]
                if request.cancelled.is_set():
                    continue
                token = pick_token(last[i], request, generators[row], seen[row])
                counts[row] += 1
                if seen[row] is not None and not (seen[row] == token).any():
                    seen[row] = torch.cat([seen[row], torch.tensor([token])])
                if token in self.stop_ids:
                    request.emit(None, "stop")
                    continue
                request.emit(token, None)
                if counts[row] >= request.max_tokens:
                    request.emit(None, "length")
                    continue
                keep.append(i)
                tokens.append(token)
            if not keep:
                return
            if len(keep) < len(rows):  # finished rows leave the batch and the cache
                index = torch.tensor(keep)
                cache.batch_select_indices(index.to(self.device))
                mask, next_position = mask[index], next_position[index]
                rows = [rows[i] for i in keep]
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], dim=1)
            out = self.model(input_ids=torch.tensor(tokens, device=self.device)[:, None],
                             attention_mask=mask.to(self.device), position_ids=next_position[:, None].to(self.device),
                             past_key_values=cache, use_cache=True)
            next_position = next_position + 1
