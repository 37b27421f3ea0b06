"""`tuneforge predict`: label texts or images with a classifier trained by stage cls."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data.classify import IMAGE_NAMES, IMAGE_TYPES, LABEL_NAMES, TEXT_NAMES, _pick, encode_text
from ..data.collate import ClassCollator
from ..data.registry import DataError, DatasetAttr, read_records
from ..models.load import ModelError, resolve_model_path
from ..models.pooling import native_pooling, pooled_logits

LABELS_FILE = "label_map.json"


def load_trained_classifier(cfg):
    """(model, tokenizer or image processor, id2label, images?, label_map.json) from a cls output_dir: a full model
    in model_name_or_path, or a base model plus the adapter in adapter_name_or_path."""
    from transformers import (AutoImageProcessor, AutoModelForImageClassification,
                              AutoModelForSequenceClassification, AutoTokenizer)

    adapter = (cfg.model.adapter_name_or_path or "").split(",")[-1].strip()
    folder = Path(adapter or resolve_model_path(cfg.model.model_name_or_path))
    if not (folder / LABELS_FILE).is_file():
        raise ModelError(f"{folder} has no {LABELS_FILE}: point model_name_or_path (full/freeze) or "
                         "adapter_name_or_path (lora) at the output_dir of a `stage: cls` run")
    saved = json.loads((folder / LABELS_FILE).read_text(encoding="utf-8"))
    label2id = saved["label2id"]
    id2label = {i: label for label, i in label2id.items()}
    images = (folder / "preprocessor_config.json").is_file()
    auto = AutoModelForImageClassification if images else AutoModelForSequenceClassification
    base = resolve_model_path(cfg.model.model_name_or_path)
    # float32 also for a classifier trained in bf16 (pure_bf16): its weights widen exactly, and inputs stay fp32
    model = auto.from_pretrained(base, num_labels=len(label2id), label2id=label2id, id2label=id2label,
                                 ignore_mismatched_sizes=True, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    processor = AutoImageProcessor.from_pretrained(folder) if images else AutoTokenizer.from_pretrained(folder)
    return model.eval(), processor, id2label, images, saved


def read_inputs(path: str) -> tuple[list[str], list[str | None]]:
    """(texts or image paths, labels or None) from a .txt file (one input per line) or a table / JSON lines."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"--file {path} does not exist")
    if file.suffix == ".txt":
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        return lines, [None] * len(lines)
    records = read_records(DatasetAttr(name=path, files=[file]))
    first = records[0]
    column = _pick(first, None, IMAGE_NAMES, "image", required=False)
    if column is None or not str(first.data[column]).lower().endswith(IMAGE_TYPES):
        column = _pick(first, None, TEXT_NAMES, "text")
    label = _pick(first, None, LABEL_NAMES, "label", required=False)
    inputs = [str(r.data[column]) for r in records]
    if column in IMAGE_NAMES:
        inputs = [p if Path(p).is_absolute() else str(file.parent / p) for p in inputs]
    return inputs, [str(r.data[label]).strip() if label else None for r in records]


@torch.no_grad()
def classify(model, processor, id2label: dict[int, str], images: bool, inputs: list[str], batch_size: int = 32,
             saved: dict | None = None) -> list[dict]:
    """Label `inputs`; texts are cut and pooled as in training (`saved`: label_map.json; a classifier trained
    before pooling was saved there used the model's own)."""
    saved = saved or {}
    pooling = saved.get("pooling") or native_pooling(model)
    out = []
    for first in range(0, len(inputs), batch_size):
        chunk = inputs[first: first + batch_size]
        if images:
            from PIL import Image, UnidentifiedImageError

            pictures = []
            for path in chunk:
                try:
                    with Image.open(path) as picture:
                        pictures.append(picture.convert("RGB"))
                except (OSError, UnidentifiedImageError) as err:
                    raise DataError(f"cannot open image {path} ({type(err).__name__}: {err})") from None
            batch = processor(images=pictures, return_tensors="pt")
            logits = model(**batch).logits
        else:
            cutoff = saved.get("cutoff_len") or processor.model_max_length
            rows = [encode_text(processor, text, cutoff, saved.get("truncation", "head")) for text in chunk]
            batch = ClassCollator(processor.pad_token_id)(rows)
            batch.pop("num_tokens")
            logits = pooled_logits(model, batch, pooling)
        probabilities = logits.float().softmax(-1)
        for text, p in zip(chunk, probabilities):
            out.append({"input": text, "predict": id2label[int(p.argmax())],
                        "probabilities": {id2label[i]: round(float(v), 4) for i, v in enumerate(p)}})
    return out


def run_predict(cfg, texts: list[str], file: str | None, out_path: str | None) -> list[dict]:
    if cfg.model.quantization_bit:
        raise ModelError("`quantization_bit` is for causal language models (QLoRA); classifiers load in full "
                         "precision: remove it")
    model, processor, id2label, images, saved = load_trained_classifier(cfg)
    labels: list[str | None] = [None] * len(texts)
    if file:
        texts, labels = read_inputs(file)
    known = set(id2label.values())
    unknown = sorted({label for label in labels if label is not None and label not in known})
    if unknown:
        raise DataError(f"{file}: labels {unknown} are not among the classifier's labels {sorted(known)}")
    results = classify(model, processor, id2label, images, texts, cfg.train.per_device_eval_batch_size, saved)
    for result, label in zip(results, labels):
        if label is not None:
            result["label"] = label
    lines = [json.dumps(r, ensure_ascii=False) for r in results]
    if out_path:
        Path(out_path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        print("\n".join(lines))
    if labels and all(label is not None for label in labels):
        accuracy = sum(r["predict"] == r["label"] for r in results) / len(results)
        print(f"[tuneforge] accuracy {accuracy:.4f} on {len(results)} labelled inputs")
    return results
