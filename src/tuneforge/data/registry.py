"""Find datasets: names in `dataset_dir/dataset_info.json` (LLaMA-Factory's registry format) or plain file paths,
and read their files into raw records that remember where they came from."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np


class DataError(ValueError):
    """A data problem, worded for the person who owns the data: file, record, field, expectation, fix."""


FILE_TYPES = {".json": "json", ".jsonl": "json", ".txt": "text", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
              ".arrow": "arrow"}


@dataclass
class DatasetAttr:
    """One registry entry (or one file given directly)."""

    name: str
    files: list[Path]
    formatting: str = "alpaca"  # alpaca | sharegpt | openai
    hub: str | None = None  # hf_hub_url: a Hugging Face Hub dataset, read with `datasets`
    subset: str | None = None
    ranking: bool = False
    split: str = "train"
    num_samples: int | None = None
    columns: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # reasons for lines dropped while reading (skip_bad_records)


@dataclass
class RawRecord:
    data: dict
    where: str  # "file.jsonl line 7" or "file.json record 3"


def _registry(dataset_dir: str) -> tuple[dict, Path]:
    path = Path(dataset_dir) / "dataset_info.json"
    if not path.is_file():
        return {}, path
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {err.lineno}: not valid JSON ({err.msg}); fix the registry file") from None
    if not isinstance(info, dict):
        raise DataError(f"{path}: expected a JSON object of dataset name -> entry")
    return info, path


def resolve(names: str, dataset_dir: str) -> list[DatasetAttr]:
    """Turn a comma list of registry names or file paths into dataset attributes."""
    info, info_path = _registry(dataset_dir)
    attrs = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name in info:
            attrs.append(_from_entry(name, info[name], Path(dataset_dir), info_path))
        elif Path(name).exists():
            attrs.append(DatasetAttr(name=name, files=_files_of(Path(name), name), formatting="auto"))
        else:
            close = difflib.get_close_matches(name, list(info), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}?" if close else (
                f"add it to {info_path} or give a file path" if info else f"{info_path} does not exist; give a file path "
                "or set dataset_dir to the folder holding dataset_info.json")
            raise DataError(f"dataset `{name}` is neither in {info_path} nor an existing file; {hint}")
    return attrs


def _from_entry(name: str, entry: dict, dataset_dir: Path, info_path: Path) -> DatasetAttr:
    if not isinstance(entry, dict):
        raise DataError(f"{info_path}: entry `{name}` must be an object with at least `file_name`")
    source = next((key for key in ("hf_hub_url", "ms_hub_url", "script_url", "cloud_file_name", "file_name")
                   if key in entry), None)  # the first present wins, as in LLaMA-Factory
    if source is None:
        raise DataError(f"{info_path}: dataset `{name}` has no `file_name`; set it to a file or folder under "
                        f"{dataset_dir}")
    if source in ("ms_hub_url", "script_url", "cloud_file_name"):
        raise DataError(f"{info_path}: dataset `{name}` uses `{source}`, which tuneforge does not read; download the "
                        "data and set `file_name` to a local file (or use `hf_hub_url`)")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise DataError(f"{info_path}: dataset `{name}` has formatting `{formatting}`; expected alpaca, sharegpt "
                        "or openai")
    split = entry.get("split", "train")
    if source == "hf_hub_url":
        files, hub = [], entry["hf_hub_url"]
    else:
        path = dataset_dir / entry["file_name"]
        files, hub = _split_files(_files_of(path, f"{info_path} entry `{name}`"), split, path), None
    return DatasetAttr(name=name, files=files, formatting=formatting, hub=hub, subset=entry.get("subset"),
                       ranking=bool(entry.get("ranking", False)), split=split,
                       num_samples=entry.get("num_samples"), columns=dict(entry.get("columns") or {}),
                       tags=dict(entry.get("tags") or {}))


def _split_files(files: list[Path], split: str, path: Path) -> list[Path]:
    """A folder holding one file set per split (train.jsonl, test.jsonl, ...): the files of `split`. A single
    file, or a folder without split names, is the train split."""
    def split_of(file: Path) -> str:  # train.jsonl, train-00000-of-00002.parquet, test.part1.json -> the split
        return file.stem.split("-")[0].split(".")[0]

    named = [f for f in files if split_of(f) in ("train", "test", "validation", "dev")]
    if not named or not path.is_dir():
        if split != "train":
            raise DataError(f"{path}: split `{split}` asked for, but only folders with files named by split "
                            "(train.jsonl, test.jsonl, ...) hold other splits; remove `split` or point at the file")
        return files
    chosen = [f for f in named if split_of(f) == split]
    if not chosen:
        found = sorted({split_of(f) for f in named})
        raise DataError(f"{path}: no file for split `{split}`; the folder holds {', '.join(found)}")
    return chosen


def _files_of(path: Path, owner: str) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in FILE_TYPES)
        if any(p.suffix == ".arrow" for p in files):  # a `save_to_disk` folder: its JSON files are metadata
            files = [p for p in files if p.suffix == ".arrow"]
        if not files:
            raise DataError(f"{owner}: folder {path} holds no data files ({', '.join(FILE_TYPES)})")
        return files
    if not path.is_file():
        raise DataError(f"{owner}: file {path} does not exist")
    if path.suffix not in FILE_TYPES:
        raise DataError(f"{path}: unsupported file type `{path.suffix}`; use one of {', '.join(FILE_TYPES)}")
    return [path]


def read_records(attr: DatasetAttr, skip: bool = False) -> list[RawRecord]:
    records = list(iter_records(attr, skip))
    if not records:
        raise DataError(f"dataset `{attr.name}`: {', '.join(map(str, attr.files)) or attr.hub} holds no records")
    return records


def iter_records(attr: DatasetAttr, skip: bool = False, streaming: bool = False) -> Iterator[RawRecord]:
    """A dataset's records one at a time, in file order, never holding a whole file (but a JSON array) in memory.
    With `skip`, malformed JSON lines are dropped and their reasons kept in attr.skipped."""
    attr.skipped.clear()  # a stream is read once per epoch
    if attr.hub:
        yield from _read_hub(attr, streaming)
        return
    for path in attr.files:
        kind = FILE_TYPES[path.suffix]
        if kind == "text":
            yield from (RawRecord({"text": line}, f"{path} line {number}")
                        for number, line in _text_lines(path) if line.strip())
        elif kind == "json":
            yield from _read_json(path, attr.skipped if skip else None)
        elif kind == "arrow":
            yield from _read_arrow(path)
        else:
            yield from _read_table(path)


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its end) of a UTF-8 file, read line by line."""
    offset = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                raise DataError(f"{path} line {number}: bytes that are not UTF-8 (at byte {offset + err.start}); "
                                "re-save the file as UTF-8") from None
            offset += len(raw)


def _read_json(path: Path, skipped: list | None = None) -> Iterator[RawRecord]:
    """A JSON array (read whole), or one JSON object per line (read line by line)."""
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip()
    if head.startswith(b"["):  # a JSON array, whatever the extension
        text = "\n".join(line for _, line in _text_lines(path))
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {err.lineno} column {err.colno}: not valid JSON ({err.msg}); fix the file "
                            "or save one JSON object per line as .jsonl") from None
        yield from (RawRecord(row, f"{path} record {i}") for i, row in enumerate(rows))
        return
    for number, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            record = RawRecord(json.loads(line), f"{path} line {number}")
        except json.JSONDecodeError as err:
            message = (f"{path} line {number} column {err.colno}: not valid JSON ({err.msg}); each line must be one "
                       "JSON object")
            if skipped is None:
                raise DataError(message) from None
            skipped.append(message)
            continue
        yield record


def _read_table(path: Path) -> Iterator[RawRecord]:
    """CSV / TSV (a header line, then one row per line) or Parquet, a batch of rows at a time."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    number = 0 if path.suffix == ".parquet" else 2  # CSV: line 1 is the header
    try:
        if path.suffix == ".parquet":
            batches = pq.ParquetFile(path).iter_batches()
        else:
            parse = pacsv.ParseOptions(delimiter="\t" if path.suffix == ".tsv" else ",")
            # text stays text: only true/false columns keep a type, so "42" is not an int and a column that looks
            # numeric in the first block cannot fail to convert further down
            header = pacsv.open_csv(path, parse_options=parse).schema
            text = {f.name: pa.string() for f in header if not pa.types.is_boolean(f.type)}
            batches = pacsv.open_csv(path, parse_options=parse,
                                     convert_options=pacsv.ConvertOptions(column_types=text))
        for batch in batches:
            for row in batch.to_pylist():
                yield RawRecord(row, f"{path} row {number}")
                number += 1
    except pa.ArrowInvalid as err:
        raise DataError(f"{path} near row {number}: cannot read the table ({str(err).splitlines()[0]}); "
                        "check that every row has the header's columns (and true/false columns only true or false)") \
            from None


def _read_arrow(path: Path) -> Iterator[RawRecord]:
    """An Arrow IPC file: the stream format `datasets` saves (save_to_disk), or the random-access file format."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:
            try:
                reader = pa.ipc.open_stream(source)
                batches = iter(reader)
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid as err:
            raise DataError(f"{path}: not an Arrow file ({err}); save it with datasets' save_to_disk or pyarrow.ipc") \
                from None
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield RawRecord(row, f"{path} record {number}")
                number += 1


def _read_hub(attr: DatasetAttr, streaming: bool = False) -> Iterator[RawRecord]:
    """A Hugging Face Hub dataset through `datasets` (its local cache first; with `streaming`, read as it
    downloads); a clear error when it cannot be had."""
    import datasets

    try:
        data = datasets.load_dataset(attr.hub, attr.subset, split=attr.split, streaming=streaming)
        yield from (RawRecord(row, f"{attr.hub} [{attr.split}] record {i}") for i, row in enumerate(data))
    except Exception as err:  # offline, unknown repository, missing split: all end the same way for the user
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise DataError(f"dataset `{attr.name}`: cannot load `{attr.hub}` (split {attr.split}) from the Hugging Face "
                        f"Hub ({reason}); on an offline machine download it elsewhere and register it with "
                        "`file_name` pointing at a local file") from None


def sampled(part: list, num_samples: int, rng: np.random.RandomState) -> list:
    """A dataset's `num_samples` examples, picked as LLaMA-Factory picks them: a random order cut to num_samples, and
    where that asks for more than there are, all of them followed by draws with replacement. `rng`: one
    RandomState(seed) per load, drawn in dataset order, as LLaMA-Factory draws from numpy's global generator just
    after seeding it, so the same seed picks the same examples."""
    order = rng.permutation(len(part))[:num_samples]
    if num_samples > len(order):
        order = np.concatenate([order, rng.choice(len(part), num_samples - len(order))])
    return [part[i] for i in order]
