"""Classification data: text (and optional text pair) or an image, with a label.

Text and image paths come from CSV/TSV/JSON/JSONL/Parquet files, with columns from `columns` in dataset_info.json
(`text`, `text_pair`, `image`, `label`) or, for files given directly, from common names. A folder with one
sub-folder per class (the ImageFolder layout) is an image dataset whose labels are the sub-folder names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .registry import DataError, RawRecord, read_records, resolve, sampled

IMAGE_TYPES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGE_NAMES = ("image", "image_path", "path", "file", "filename")
TEXT_NAMES = ("text", "sentence", "review", "content", "sentence1")
PAIR_NAMES = ("text_pair", "sentence2")
LABEL_NAMES = ("label", "labels", "sentiment", "class")


@dataclass
class Labelled:
    text: str  # for images: the file path
    label: str  # labels are kept as strings: "1", "positive", ...
    text_pair: str | None = None
    where: str = ""
    image: bool = False


def _image_folder(root: Path) -> list[Labelled]:
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    examples = [Labelled(str(f), c.name, where=str(f), image=True)
                for c in classes for f in sorted(c.iterdir()) if f.suffix.lower() in IMAGE_TYPES]
    if not examples:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_TYPES)}) in its class sub-folders")
    return examples


def check_images(examples: list[Labelled]) -> None:
    """Open every image once, so a broken file fails before training with its path."""
    from PIL import Image, UnidentifiedImageError

    for e in examples:
        try:
            with Image.open(e.text) as image:
                image.verify()
        except (OSError, UnidentifiedImageError) as err:
            raise DataError(f"{e.where}: cannot open image {e.text} ({type(err).__name__}: {err}); fix or remove "
                            "the file") from None


def _pick(record: RawRecord, wanted: str | None, names: tuple[str, ...], role: str, required: bool = True):
    data = record.data
    if wanted:
        if wanted not in data:
            raise DataError(f"{record.where}: missing {role} column `{wanted}`; the record has {sorted(data)}")
        return wanted
    found = next((n for n in names if n in data), None)
    if found is None and required:
        raise DataError(f"{record.where}: no {role} column (looked for {', '.join(names)}); the record has "
                        f"{sorted(data)}: name it with `columns: {{\"{role}\": ...}}` in dataset_info.json")
    return found


def load_labelled(names: str, data_args, seed: int) -> list[Labelled]:
    examples = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        folder = Path(name) if Path(name).is_dir() else Path(data_args.dataset_dir) / name
        if folder.is_dir() and any(p.is_dir() for p in folder.iterdir()):
            part = _image_folder(folder)
            examples += part[: data_args.max_samples] if data_args.max_samples else part
            continue
        examples += _load_table(name, data_args, seed)
    if any(e.image for e in examples):
        check_images(examples)
    return examples


def _load_table(names: str, data_args, seed: int) -> list[Labelled]:
    examples, rng = [], np.random.RandomState(seed)
    for attr in resolve(names, data_args.dataset_dir):
        records = read_records(attr)
        first = records[0]
        image_col = _pick(first, attr.columns.get("image"), IMAGE_NAMES, "image", required=False) \
            if "text" not in attr.columns else None
        if image_col and not str(first.data[image_col]).lower().endswith(IMAGE_TYPES):
            image_col = None  # a column called e.g. "file" that does not hold image paths
        text_col = image_col or _pick(first, attr.columns.get("text"), TEXT_NAMES, "text")
        label_col = _pick(first, attr.columns.get("label"), LABEL_NAMES, "label")
        pair_col = _pick(first, attr.columns.get("text_pair"), PAIR_NAMES, "text_pair", required=False)
        part = []
        for record in records:
            text, label = record.data.get(text_col), record.data.get(label_col)
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{record.where}: `{text_col}` must be non-empty text, got {text!r}")
            if label is None or str(label).strip() == "":
                raise DataError(f"{record.where}: `{label_col}` is empty; every example needs a label")
            pair = record.data.get(pair_col) if pair_col else None
            if image_col:  # image paths are relative to the file that lists them
                text = str(attr.files[0].parent / text) if not Path(text).is_absolute() else text
            part.append(Labelled(text.strip(), str(label).strip(), pair, record.where, image=bool(image_col)))
        if attr.num_samples:
            part = sampled(part, attr.num_samples, rng)
        if data_args.max_samples:
            part = part[: data_args.max_samples]
        examples += part
    return examples


def label_maps(examples: list[Labelled], dataset: str) -> tuple[dict[str, int], dict[int, str]]:
    """label2id / id2label from the training labels: numbers in numeric order, names alphabetically."""
    labels = sorted({e.label for e in examples}, key=lambda x: (0, int(x)) if x.lstrip("-").isdigit() else (1, x))
    if len(labels) < 2:
        raise DataError(f"dataset `{dataset}` has only one class ({labels[0]!r}); a classifier needs at least two")
    label2id = {label: i for i, label in enumerate(labels)}
    return label2id, {i: label for label, i in label2id.items()}


def encode_text(tokenizer, text: str, cutoff_len: int, truncation: str = "head", pair: str | None = None) -> dict:
    """input_ids (and token_type_ids) of at most cutoff_len tokens. head_tail keeps the special tokens, the first
    quarter of the remaining budget and its last three quarters (128 + 382 of 510 in Sun et al. 2019, "How to
    Fine-Tune BERT for Text Classification", their best split for long reviews)."""
    if truncation == "head" or pair is not None:
        encoded = tokenizer(text, pair, truncation=True, max_length=cutoff_len)
        return {k: v for k, v in encoded.items() if k in ("input_ids", "token_type_ids")}
    encoded = tokenizer(text, return_special_tokens_mask=True, verbose=False)  # verbose: no too-long warning
    special = encoded["special_tokens_mask"]
    size = len(special)
    lead = next((i for i, s in enumerate(special) if not s), size)  # [CLS] ...
    trail = next((i for i, s in enumerate(reversed(special)) if not s), 0)  # ... [SEP]
    budget = cutoff_len - lead - trail
    keep = range(size) if size <= cutoff_len else \
        [*range(lead + budget // 4), *range(size - trail - (budget - budget // 4), size)]
    return {k: [encoded[k][i] for i in keep] for k in ("input_ids", "token_type_ids") if k in encoded}


def encode_labelled(examples: list[Labelled], tokenizer, label2id: dict[str, int], cutoff_len: int,
                    truncation: str = "head") -> list[dict]:
    rows = []
    for e in examples:
        if e.label not in label2id:
            raise DataError(f"{e.where}: label {e.label!r} did not occur in the training data "
                            f"(known: {', '.join(label2id)})")
        if e.image:  # images are loaded and processed batch by batch (ImageCollator)
            rows.append({"image": e.text, "label": label2id[e.label]})
            continue
        if e.text_pair is not None and truncation != "head":
            raise DataError(f"{e.where}: cls_truncation {truncation} is for single texts and this record has a "
                            "text pair; set cls_truncation: head")
        rows.append({**encode_text(tokenizer, e.text, cutoff_len, truncation, e.text_pair), "label": label2id[e.label]})
    return rows
