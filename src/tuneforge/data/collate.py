"""Batches: right-padded rows, or packed rows (several examples per row, no attention across them)."""

from __future__ import annotations

import bisect

import torch

from .encode import IGNORE


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, position ids) of token rows padded on the left, so every row ends in the last column,
    where generation continues and next-token scores are read; positions count from each row's first real token,
    so padding changes nothing but the shapes."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def pack_rows(rows: list[dict], cutoff_len: int) -> list[dict]:
    """Best-fit-decreasing packing of encoded examples into rows of at most `cutoff_len` tokens.

    Each packed row carries `position_ids` that restart at 0 for every example; the model turns that into
    block-diagonal causal attention. The first label of each example is masked, so no token is ever predicted
    from the previous example: a packed row's loss is exactly the sum of its examples' losses.
    """
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        size = len(rows[i]["input_ids"])
        slot = bisect.bisect_left(free, (size, -1))
        if slot == len(free):
            bins.append([i])
            bisect.insort(free, (cutoff_len - size, len(bins) - 1))
        else:
            room, b = free.pop(slot)
            bins[b].append(i)
            bisect.insort(free, (room - size, b))
    packed = []
    for members in bins:
        input_ids, labels, positions = [], [], []
        for i in members:
            row = rows[i]
            input_ids += row["input_ids"]
            labels += [IGNORE] + row["labels"][1:]
            positions += list(range(len(row["input_ids"])))
        packed.append({"input_ids": input_ids, "labels": labels, "position_ids": positions})
    return packed


class PadCollator:
    """Right-pads rows to the longest in the batch, rounded up to a multiple of `pad_to_multiple_of` (8, as
    LLaMA-Factory's training collators): oneDNN builds and keeps a kernel per matrix shape (about 0.6 MB each, 30
    or so per width), so every new batch width cost memory until the run ended (docs/benchmarks.md). Packed rows
    get no attention_mask (the model derives the block-diagonal mask from position_ids); their padding forms one
    more short sequence with no targets."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8):
        self.pad_token_id, self.multiple = pad_token_id, pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict:
        width = -(-max(len(row["input_ids"]) for row in rows) // self.multiple) * self.multiple
        packed = "position_ids" in rows[0]
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        positions = torch.arange(width).repeat(len(rows), 1)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            mask[i, :n] = 1
            if packed:
                positions[i, :n] = torch.tensor(row["position_ids"])
                positions[i, n:] = torch.arange(width - n)
        batch = {"input_ids": input_ids, "labels": labels}
        if packed:
            batch["position_ids"] = positions
        else:
            batch["attention_mask"] = mask
        batch["num_tokens"] = int(mask.sum())  # real tokens, counted here so the training step needs no sync
        return batch


class PairCollator:
    """Preference pairs as one batch of 2B rows, chosen answers first, so both go through the model in one
    forward; reference log-probabilities travel along when they were computed beforehand."""

    def __init__(self, pad_token_id: int):
        self.pad = PadCollator(pad_token_id)

    def __call__(self, rows: list[dict]) -> dict:
        sides = [{"input_ids": r[f"{side}_input_ids"], "labels": r[f"{side}_labels"]}
                 for side in ("chosen", "rejected") for r in rows]
        batch = self.pad(sides)
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in rows[0]:
                batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.float32)
        return batch


class KTOCollator:
    """KTO examples plus their mismatched (prompt, other answer) rows for the KL estimate: 2B rows in one batch."""

    def __init__(self, pad_token_id: int):
        self.pad = PadCollator(pad_token_id)

    def __call__(self, rows: list[dict]) -> dict:
        own = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
        mismatched = [{"input_ids": r["kl_input_ids"], "labels": r["kl_labels"]} for r in rows]
        batch = self.pad(own + mismatched)
        batch["num_tokens"] = sum(len(r["input_ids"]) for r in rows)  # the KL rows are not training tokens
        batch["kto_tag"] = torch.tensor([r["kto_tag"] for r in rows], dtype=torch.bool)
        return batch


class ClassCollator:
    """Classification rows: padded token ids (and segment ids) with one label per row."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict:
        width = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
            mask[i, : len(row["input_ids"])] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if "label" in rows[0]:  # prediction rows have none
            batch["labels"] = torch.tensor([row["label"] for row in rows], dtype=torch.long)
        if "token_type_ids" in rows[0]:
            types = torch.zeros_like(input_ids)
            for i, row in enumerate(rows):
                types[i, : len(row["token_type_ids"])] = torch.tensor(row["token_type_ids"])
            batch["token_type_ids"] = types
        batch["num_tokens"] = int(mask.sum())
        return batch


class ImageCollator:
    """Images opened and run through the model's image processor one batch at a time, with their labels."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, rows: list[dict]) -> dict:
        from PIL import Image

        images = []
        for row in rows:
            with Image.open(row["image"]) as image:
                images.append(image.convert("RGB"))
        batch = {"pixel_values": self.processor(images=images, return_tensors="pt")["pixel_values"],
                 "labels": torch.tensor([row["label"] for row in rows], dtype=torch.long)}
        batch["num_tokens"] = len(rows)  # images, for the throughput shown while training
        return batch
