"""Canonical examples -> token ids and labels (prompt tokens masked to -100), truncated to cutoff_len."""

from __future__ import annotations

from .formats import Example
from .registry import DataError
from .templates import tokenize_pieces

IGNORE = -100


def split_budget(prompt_len: int, answer_len: int, budget: int) -> tuple[int, int]:
    """How many prompt and answer tokens to keep when a turn does not fit in `budget`.

    A short side is kept whole and the long side takes the rest; when both are long they share the budget in
    proportion to their lengths.
    """
    if prompt_len + answer_len <= budget:
        return prompt_len, answer_len
    if 2 * answer_len < budget:
        return budget - answer_len, answer_len
    if 2 * prompt_len < budget:
        return prompt_len, budget - prompt_len
    answer = int(budget * answer_len / (prompt_len + answer_len))
    return budget - answer, answer


def render(example: Example, tokenizer, template, default_system: str | None = None,
           messages: list[dict] | None = None) -> list[str]:
    """The template's text pieces of a record (or of `messages` with the record's system and tools); a part the
    template cannot render is an error naming the dataset and the record."""
    try:
        return template.pieces(tokenizer, example.messages if messages is None else messages,
                               example.system or default_system, example.tools)
    except DataError as err:
        raise DataError(f"dataset `{example.dataset}`, {example.where}: {err}") from None


def encode_supervised(example: Example, tokenizer, template, cutoff_len: int, train_on_prompt: bool = False,
                      mask_history: bool = False, default_system: str | None = None) -> dict | None:
    """Returns {"input_ids", "labels"} or None when truncation leaves nothing to learn."""
    pieces = render(example, tokenizer, template, default_system)
    return assemble_supervised(tokenize_pieces(tokenizer, pieces), cutoff_len, train_on_prompt, mask_history)


def encode_supervised_batch(examples: list[Example], tokenizer, template, cutoff_len: int,
                            train_on_prompt: bool = False, mask_history: bool = False,
                            default_system: str | None = None) -> list[dict | None]:
    """encode_supervised for many examples, with one batched tokenizer call (parallel in the Rust tokenizer)."""
    pieces = [render(e, tokenizer, template, default_system) for e in examples]
    ids = tokenize_pieces(tokenizer, [piece for group in pieces for piece in group])
    rows, start = [], 0
    for group in pieces:
        rows.append(assemble_supervised(ids[start: start + len(group)], cutoff_len, train_on_prompt, mask_history))
        start += len(group)
    return rows


def assemble_supervised(piece_ids: list[list[int]], cutoff_len: int, train_on_prompt: bool = False,
                        mask_history: bool = False) -> dict | None:
    """Token ids of prompt, answer, prompt, answer, ... -> one truncated row with prompt tokens masked.

    When the conversation is longer than cutoff_len, the last turn's share is set aside first (its prompt keeps
    its end, where the assistant header is); earlier turns fill what is left, from the start.
    """
    turns = list(zip(piece_ids[0::2], piece_ids[1::2]))
    last_prompt, last_answer = turns[-1]
    keep_prompt, keep_answer = split_budget(len(last_prompt), len(last_answer), cutoff_len)
    last = (last_prompt[len(last_prompt) - keep_prompt:], last_answer[:keep_answer])
    budget = cutoff_len - keep_prompt - keep_answer
    kept = []
    for prompt, answer in turns[:-1]:
        if budget <= 0:
            break
        keep_prompt, keep_answer = split_budget(len(prompt), len(answer), budget)
        kept.append((prompt[:keep_prompt], answer[:keep_answer]))
        budget -= keep_prompt + keep_answer
    kept.append(last)
    input_ids, labels = [], []
    for number, (prompt, answer) in enumerate(kept):
        learn = not mask_history or number == len(kept) - 1
        input_ids += prompt + answer
        labels += (prompt if train_on_prompt else [IGNORE] * len(prompt)) + (answer if learn else [IGNORE] * len(answer))
    if all(label == IGNORE for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


def encode_prompt(messages: list[dict], tokenizer, template, system: str | None = None) -> list[int]:
    """Token ids for generation: the conversation so far (ending on a user turn) plus the assistant header."""
    return [token for piece in tokenize_pieces(tokenizer, template.pieces(tokenizer, messages, system))
            for token in piece]


def encode_pretrain(examples: list[Example], tokenizer, cutoff_len: int) -> list[dict]:
    """Concatenate documents (each closed by eos) and cut the stream into blocks of cutoff_len tokens."""
    return chunk_documents(tokenize_documents(examples, tokenizer), cutoff_len)


def tokenize_documents(examples: list[Example], tokenizer) -> list[list[int]]:
    """Each pre-training text's token ids (with the tokenizer's own special tokens), closed by eos; one batched call."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = tokenizer([e.text for e in examples], add_special_tokens=True)["input_ids"] if examples else []
    return [document + eos for document in ids]


def chunk_documents(documents: list[list[int]], cutoff_len: int) -> list[dict]:
    """One stream cut into blocks of cutoff_len; the last, shorter block is kept, so small corpora are not lost."""
    stream = [token for document in documents for token in document]
    blocks = [stream[i: i + cutoff_len] for i in range(0, len(stream), cutoff_len)]
    return [{"input_ids": block, "labels": list(block)} for block in blocks if len(block) > 1]


def encode_prompt_answer(example: Example, answer: str, tokenizer, template,
                         default_system: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the conversation so far (with the assistant header) and of one answer to it."""
    messages = example.messages + [{"role": "assistant", "content": answer}]
    ids = tokenize_pieces(tokenizer, render(example, tokenizer, template, default_system, messages))
    return [token for piece in ids[:-1] for token in piece], ids[-1]


def _fit(prompt: list[int], answers: list[list[int]], cutoff_len: int) -> tuple[list[int], list[list[int]]]:
    """Truncate to cutoff_len; a prompt keeps its end (the last turn and the assistant header matter most)."""
    keep_prompt, keep_answer = split_budget(len(prompt), max(map(len, answers)), cutoff_len)
    return prompt[len(prompt) - keep_prompt:], [a[:keep_answer] for a in answers]


def encode_pair(example: Example, tokenizer, template, cutoff_len: int, default_system: str | None = None) -> dict:
    """{"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}: one prompt, two answers."""
    prompt, chosen = encode_prompt_answer(example, example.chosen, tokenizer, template, default_system)
    _, rejected = encode_prompt_answer(example, example.rejected, tokenizer, template, default_system)
    prompt, (chosen, rejected) = _fit(prompt, [chosen, rejected], cutoff_len)
    masked = [IGNORE] * len(prompt)
    return {"chosen_input_ids": prompt + chosen, "chosen_labels": masked + chosen,
            "rejected_input_ids": prompt + rejected, "rejected_labels": masked + rejected}


def encode_kto(examples: list[Example], tokenizer, template, cutoff_len: int,
               default_system: str | None = None) -> list[dict]:
    """KTO rows: each example's own final answer, plus a mismatched answer (the one before it, as LLaMA-Factory
    pairs them; the first takes the last) to its prompt, from which the batch estimates the KL term."""
    split = []
    for example in examples:
        history = Example(messages=example.messages[:-1], system=example.system, tools=example.tools,
                          where=example.where, dataset=example.dataset)
        split.append(encode_prompt_answer(history, example.messages[-1]["content"], tokenizer, template,
                                          default_system))
    rows = []
    for i, (example, (prompt, answer)) in enumerate(zip(examples, split)):
        other = split[i - 1][1]
        prompt, (answer, other) = _fit(prompt, [answer, other], cutoff_len)
        masked = [IGNORE] * len(prompt)
        rows.append({"input_ids": prompt + answer, "labels": masked + answer, "kl_input_ids": prompt + other,
                     "kl_labels": masked + other, "kto_tag": bool(example.kto_tag)})
    return rows
