"""Recipe for stage `cls`: a text or image classifier. A new classification head goes on a pretrained encoder
(BERT, MiniLM, ViT, ResNet, ...) or decoder; what else trains depends on finetuning_type:
- freeze: only the head, plus the last `freeze_trainable_layers` layers (0 = head only);
- lora: LoRA on `lora_target` (e.g. query,value); the head always trains and is saved with the adapter;
- full: everything.
Metrics: accuracy, macro-F1, per-class precision and recall, and a confusion-matrix PNG.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import load_splits
from ..data.classify import encode_labelled, label_maps, load_labelled
from ..data.collate import ClassCollator, ImageCollator
from ..data.registry import DataError
from ..models.adapters import all_linear_names, describe_trainable
from ..models.load import ModelError, attn_implementation, load_tokenizer, resolve_model_path
from ..models.pooling import pooled_logits, resolve_pooling
from ..models.recompute import apply_gradient_checkpointing
from .common import guard_output_dir, make_accelerator, train_and_evaluate
from .logging import write_results
from .stages import refuse_packing, unused_reference

from ..infer.classify import LABELS_FILE
HEAD_NAMES = ("classifier", "score")


class ClassifierLoss(torch.nn.Module):
    unit = "example"
    extra: dict = {}  # nothing trains besides the model (see steps.LossModule)

    def __init__(self, model, pooling: str | None = None):  # pooling None: an image model's own head
        super().__init__()
        self.model = model
        self.pooling = pooling

    def logits(self, inputs: dict) -> torch.Tensor:
        if "pixel_values" in inputs:  # fp32 from the image processor; a ResNet held in bf16 does not cast them itself
            inputs = {**inputs, "pixel_values": inputs["pixel_values"].to(self.model.dtype)}
        logits = pooled_logits(self.model, inputs, self.pooling) if self.pooling else self.model(**inputs).logits
        return logits.float()

    @staticmethod
    def units(batch: dict) -> torch.Tensor:
        return torch.tensor(batch["labels"].shape[0])

    def forward(self, labels, **inputs):  # input_ids / attention_mask / token_type_ids, or pixel_values
        logits = self.logits(inputs)
        loss = F.cross_entropy(logits, labels, reduction="sum")
        return loss, {"accuracy": (logits.argmax(-1) == labels).float().sum()}


def load_classifier(cfg, label2id: dict[str, int], id2label: dict[int, str], images: bool):
    """A pretrained model with a new classification head sized for these labels."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    m = cfg.model
    path = resolve_model_path(m.model_name_or_path)
    auto = AutoModelForImageClassification if images else AutoModelForSequenceClassification
    attention = attn_implementation(m.flash_attn)
    try:
        model = auto.from_pretrained(
            path, num_labels=len(label2id), label2id=label2id, id2label=id2label, ignore_mismatched_sizes=True,
            trust_remote_code=m.trust_remote_code, cache_dir=m.cache_dir, revision=m.model_revision,
            token=m.hf_hub_token, dtype=torch.bfloat16 if cfg.finetune.pure_bf16 else torch.float32,
            **({"attn_implementation": attention} if attention else {}))
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load `{cfg.model.model_name_or_path}` as an {'image' if images else 'text'} "
                         f"classifier: "
                         f"{' '.join(str(err).split())[:200]}") from None
    if not images and getattr(model.config, "pad_token_id", None) is None:  # decoders classify at the last real token
        model.config.pad_token_id = model.config.eos_token_id
    return model


def load_image_processor(cfg):
    from transformers import AutoImageProcessor

    m = cfg.model
    try:
        return AutoImageProcessor.from_pretrained(resolve_model_path(m.model_name_or_path), cache_dir=m.cache_dir,
                                                  revision=m.model_revision, token=m.hf_hub_token,
                                                  trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"`{cfg.model.model_name_or_path}` has no image processor (preprocessor_config.json): "
                         f"{' '.join(str(err).split())[:160]}") from None


def head_names(model) -> list[str]:
    names = {name.split(".")[0] if name.split(".")[0] in HEAD_NAMES else name.split(".")[-2]
             for name, _ in model.named_parameters()}
    return [n for n in HEAD_NAMES if n in names]


def setup_strategy(model, cfg):
    """Mark what trains; returns the model (PEFT-wrapped for LoRA)."""
    f = cfg.finetune
    heads = head_names(model)
    if not heads:
        raise ModelError(f"{type(model).__name__} has no `classifier` or `score` head to train")
    if f.finetuning_type == "full":
        return model.requires_grad_(True)
    if f.finetuning_type == "freeze":
        # transformer layers, or a ResNet's stages
        n_layers = getattr(model.config, "num_hidden_layers", None) or len(getattr(model.config, "depths", []))
        keep = f.freeze_trainable_layers
        if not 0 <= keep <= n_layers:
            raise ModelError(f"freeze_trainable_layers must be between 0 (head only) and {n_layers} for stage cls; "
                             f"got {keep}")
        for name, param in model.named_parameters():
            layer = re.search(r"\.(\d+)\.", name)
            in_top = layer is not None and int(layer.group(1)) >= n_layers - keep
            param.requires_grad_(name.split(".")[0] in heads or in_top)
        return model
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model

    if cfg.model.adapter_name_or_path:  # continued with the adapter's own LoRA settings, as LLaMA-Factory does
        return PeftModel.from_pretrained(model, cfg.model.adapter_name_or_path, is_trainable=True)
    if f.lora_target.strip() == "all":  # every linear layer outside the head
        targets = sorted({name.split(".")[-1] for name, module in model.named_modules()
                          if isinstance(module, torch.nn.Linear) and name.split(".")[0] not in heads})
        if not targets:
            raise ModelError(f"{type(model).__name__} has no linear layers outside its head for LoRA; use "
                             "finetuning_type freeze or full, or name modules in lora_target")
    else:
        targets = [t.strip() for t in f.lora_target.split(",") if t.strip()]
    known = {name.split(".")[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in known]
    if missing:
        raise ModelError(f"lora_target {missing} not found in the model; its linear layers are "
                         f"{', '.join(all_linear_names(model))}")
    images = "pixel_values" in model.main_input_name
    config = LoraConfig(task_type=None if images else TaskType.SEQ_CLS, r=f.lora_rank,
                        lora_alpha=f.lora_alpha or 2 * f.lora_rank, lora_dropout=f.lora_dropout,
                        target_modules=targets, modules_to_save=heads, use_rslora=f.use_rslora, use_dora=f.use_dora)
    return get_peft_model(model, config)


def _check_same_labels(adapter: str, label2id: dict[str, int]) -> None:
    """A classifier adapter continues only on the labels its head was trained for, in the same order."""
    file = Path(adapter) / LABELS_FILE
    if not file.is_file():
        raise ModelError(f"adapter_name_or_path {adapter} has no {LABELS_FILE}: point it at the output_dir of a "
                         "`stage: cls` LoRA run")
    saved = json.loads(file.read_text(encoding="utf-8"))["label2id"]
    if saved != label2id:
        raise DataError(f"the data's labels {list(label2id)} are not the {list(saved)} that adapter {adapter} was "
                        "trained on; continue it on data with those labels, or train a new classifier")


@torch.no_grad()
def predict_rows(module, rows: list[dict], collator, batch_size: int, device) -> torch.Tensor:
    """Class probabilities for every row."""
    module.eval()
    out = []
    for first in range(0, len(rows), batch_size):
        batch = collator(rows[first: first + batch_size])
        batch.pop("num_tokens")
        batch.pop("labels")
        logits = module.logits({k: v.to(device) for k, v in batch.items()})
        out.append(logits.softmax(-1).cpu())
    module.train()
    return torch.cat(out)


def classification_metrics(predicted: list[int], gold: list[int], id2label: dict[int, str]) -> dict:
    n = len(id2label)
    matrix = [[0] * n for _ in range(n)]
    for p, g in zip(predicted, gold):
        matrix[g][p] += 1
    per_class, f1s = {}, []
    for i in range(n):
        true_pos = matrix[i][i]
        predicted_i = sum(matrix[g][i] for g in range(n))
        actual_i = sum(matrix[i])
        precision = true_pos / predicted_i if predicted_i else 0.0
        recall = true_pos / actual_i if actual_i else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        per_class[id2label[i]] = {"precision": round(precision, 4), "recall": round(recall, 4), "support": actual_i}
    accuracy = sum(matrix[i][i] for i in range(n)) / max(len(gold), 1)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / n, "per_class": per_class, "confusion_matrix": matrix}


def plot_confusion(matrix: list[list[int]], id2label: dict[int, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [id2label[i] for i in range(len(matrix))]
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.2 * len(labels) + 2))
    ax.imshow(matrix, cmap="Blues")
    for g, row in enumerate(matrix):
        for p, count in enumerate(row):
            ax.text(p, g, str(count), ha="center", va="center")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def check(cfg) -> list[str]:
    """The classifier recipe loads its own model: options of the causal-LM set-up are not wired into it."""
    m, f, t, d = cfg.model, cfg.finetune, cfg.train, cfg.data
    out = []
    if d.skip_bad_records:
        out.append("`skip_bad_records` is built for the chat and text stages; stage cls stops at the first bad record")
    unsupported = {"torch_compile": t.torch_compile, "train_from_scratch": m.train_from_scratch,
                   "quantization_bit": m.quantization_bit, "neftune_noise_alpha": f.neftune_noise_alpha,
                   "upcast_layernorm": m.upcast_layernorm}
    out += [f"`{key}` is not supported for stage cls yet; remove it" for key, value in unsupported.items() if value]
    out += [f"`{key}` masks the turns of a conversation; stage cls trains on labels, remove it"
            for key, value in (("train_on_prompt", d.train_on_prompt), ("mask_history", d.mask_history)) if value]
    out += [f"`{key}` is not supported for stage cls yet (it trains its head, plus lora_target's adapters or the "
            "last freeze_trainable_layers layers); remove it"
            for key, value in (("additional_target", f.additional_target),
                               ("freeze_extra_modules", f.freeze_extra_modules)) if value]
    if "," in (m.adapter_name_or_path or ""):
        out.append("`adapter_name_or_path` in stage cls continues one LoRA classifier: name the one folder a "
                   "`stage: cls` LoRA run saved")
    if t.gradient_checkpointing and t.gradient_checkpointing_scope == "attention":
        out.append("gradient_checkpointing_scope: attention recomputes a causal LM's eager attention; stage cls takes "
                   "`layers` or `selective`")
    return out + refuse_packing(cfg) + unused_reference(cfg, "stage cls trains without a reference model")


def run(cfg) -> dict:
    from accelerate.utils import set_seed

    t, d = cfg.train, cfg.data
    set_seed(t.seed)
    accelerator = make_accelerator(t)
    train_examples, eval_examples = load_splits(cfg, lambda names: load_labelled(names, d, t.seed))
    if not train_examples:
        raise DataError("stage cls needs training data: set `dataset`")
    label2id, id2label = label_maps(train_examples, d.dataset)
    if cfg.model.adapter_name_or_path:
        _check_same_labels(cfg.model.adapter_name_or_path, label2id)
    images = train_examples[0].image
    # images go through the model's image processor; it is saved in place of a tokenizer
    tokenizer = load_image_processor(cfg) if images else load_tokenizer(cfg.model)
    train_rows = encode_labelled(train_examples, tokenizer, label2id, d.cutoff_len, d.cls_truncation)
    eval_rows = encode_labelled(eval_examples, tokenizer, label2id, d.cutoff_len, d.cls_truncation)
    resume = guard_output_dir(cfg, accelerator)
    model = load_classifier(cfg, label2id, id2label, images)
    pooling = None
    if images and (cfg.finetune.cls_pooling != "auto" or d.cls_truncation != "head"):
        raise DataError(f"dataset `{d.dataset}` holds images: cls_pooling and cls_truncation are for text "
                        "classifiers; remove them")
    if not images:
        pooling, why = resolve_pooling(cfg.finetune.cls_pooling, resolve_model_path(cfg.model.model_name_or_path),
                                       model)
        accelerator.print(f"[tuneforge] {pooling} pooling (from {why})")
    if apply_gradient_checkpointing(model, t, cfg.model):
        accelerator.print(f"[tuneforge] gradient checkpointing ({t.gradient_checkpointing_scope}): activations "
                          "recomputed in backward")
    model = setup_strategy(model, cfg)
    accelerator.print(f"[tuneforge] {describe_trainable(model, cfg.model.print_param_status)}")
    accelerator.print(f"[tuneforge] {len(train_rows)} training and {len(eval_rows)} evaluation examples, "
                      f"labels {list(label2id)}")
    module = ClassifierLoss(model, pooling).to(accelerator.device)
    collator = ImageCollator(tokenizer) if images else ClassCollator(tokenizer.pad_token_id)
    sample = eval_examples[:5]
    before = predict_rows(module, eval_rows[:5], collator, 5, accelerator.device) if sample else None
    # the evaluation below gives loss, accuracy, F1 and the confusion matrix from one pass over the data
    results = train_and_evaluate(cfg, module, tokenizer, train_rows, eval_rows, accelerator, resume, collator,
                                 evaluate_at_end=False)
    if accelerator.is_main_process and t.do_train:
        # predict and export encode and pool texts the way the head was trained (infer/classify.py)
        saved = {"label2id": label2id} if images else \
            {"label2id": label2id, "pooling": pooling, "truncation": d.cls_truncation, "cutoff_len": d.cutoff_len}
        (Path(t.output_dir) / LABELS_FILE).write_text(json.dumps(saved, indent=2), encoding="utf-8")
    if eval_rows and accelerator.is_main_process and (t.do_eval or t.do_predict):
        probabilities = predict_rows(module, eval_rows, collator, t.per_device_eval_batch_size, accelerator.device)
        gold = [r["label"] for r in eval_rows]
        metrics = classification_metrics(probabilities.argmax(-1).tolist(), gold, id2label)
        picked = probabilities[torch.arange(len(gold)), torch.tensor(gold)]
        metrics = {"loss": float(-picked.clamp(min=1e-12).log().mean()), **metrics}
        plot_confusion(metrics["confusion_matrix"], id2label, Path(t.output_dir) / "confusion_matrix.png")
        write_results(t.output_dir, "eval", {f"eval_{k}": v for k, v in metrics.items()})
        results.update({f"eval_{k}": metrics[k] for k in ("loss", "accuracy", "macro_f1")})
        print(f"[tuneforge] accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} on "
              f"{len(eval_rows)} examples; confusion_matrix.png in {t.output_dir}")
        if before is not None:
            print(before_after_table(sample, before, probabilities[: len(sample)], id2label))
        if t.do_predict:
            write_predictions(Path(t.output_dir) / "predictions.jsonl", eval_examples, probabilities, id2label)
    return results


def before_after_table(examples, before, after, id2label) -> str:
    lines = ["| text | label | before training | after training |", "|---|---|---|---|"]
    for e, b, a in zip(examples, before, after):
        show = lambda p: f"{id2label[int(p.argmax())]} ({float(p.max()):.2f})"
        shown = Path(e.text).name if e.image else e.text[:60]
        lines.append(f"| {shown} | {e.label} | {show(b)} | {show(a)} |")
    return "\n".join(lines)


def write_predictions(path: Path, examples, probabilities, id2label) -> None:
    with path.open("w", encoding="utf-8") as out:
        for e, p in zip(examples, probabilities):
            out.write(json.dumps({"text": e.text, "label": e.label, "predict": id2label[int(p.argmax())],
                                  "probabilities": {id2label[i]: round(float(v), 4) for i, v in enumerate(p)}},
                                 ensure_ascii=False) + "\n")
