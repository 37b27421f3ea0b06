"""How a text classifier turns its encoder's hidden states into the one vector its head reads (`cls_pooling`).

- cls: the first token ([CLS]), through the model's own head as Transformers builds it (BERT's pooler, ...);
- mean: the average of the real tokens' hidden states, padding left out: what sentence-transformers models such as
  all-MiniLM-L6-v2 were trained with, so their embeddings already separate meanings before any training;
- last: the last real token: what a decoder's causal attention lets see the whole text.
`auto` takes the pooling from a sentence-transformers config in the model folder, else cls for encoders and last
for decoders. The pooling a head was trained with is saved in label_map.json, and predict / export read it there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .load import ModelError

# sentence-transformers' Pooling config keys for the modes that have an equivalent here
_SENTENCE_TRANSFORMERS_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                                "pooling_mode_lasttoken": "last"}


def sentence_transformers_pooling(folder: str | Path) -> str | None:
    """The pooling a sentence-transformers model folder declares (modules.json -> its Pooling module's config), or
    None when there is none or it is a mode without an equivalent here (max, weighted mean, several at once)."""
    try:
        modules = json.loads((Path(folder) / "modules.json").read_text(encoding="utf-8"))
        entry = next(m for m in modules if str(m.get("type", "")).endswith(".Pooling"))
        config = json.loads((Path(folder) / entry.get("path", "") / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, StopIteration, AttributeError):
        return None
    chosen = [key for key, on in config.items() if key.startswith("pooling_mode") and on]
    return _SENTENCE_TRANSFORMERS_MODES.get(chosen[0]) if len(chosen) == 1 else None


def head_of(model):
    """The Transformers sequence-classification model inside a PEFT wrapper, and its head's attribute name."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hf, ("score" if hasattr(hf, "score") else "classifier")


def native_pooling(model) -> str:
    """What the model's own forward pools: Transformers gives decoders a `score` head on the last real token and
    encoders a `classifier` on the first."""
    return "last" if head_of(model)[1] == "score" else "cls"


def resolve_pooling(choice: str, folder: str | Path, model) -> tuple[str, str]:
    """(pooling, where it came from) for `cls_pooling`, refusing what this model cannot do."""
    native = native_pooling(model)
    if choice != "auto":
        pooling, why = choice, "cls_pooling"
    elif found := sentence_transformers_pooling(folder):
        pooling, why = found, "the model's sentence-transformers pooling config"
    else:
        pooling, why = native, "the default for " + ("decoders" if native == "last" else "encoders")
    if pooling == "cls" and native == "last":
        raise ModelError(f"cls_pooling cls: {type(model).__name__} is a decoder, whose first token sees only itself; "
                         "use cls_pooling last or mean")
    hf, name = head_of(model)
    if pooling != native and not isinstance(getattr(hf, name, None), torch.nn.Linear):
        raise ModelError(f"cls_pooling {pooling} needs a head that is one linear layer; {type(hf).__name__}'s "
                         f"`{name}` is {type(getattr(hf, name, None)).__name__}: use cls_pooling {native}")
    return pooling, why


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(batch, seq, dim) hidden states -> (batch, dim); `mask` is 1 on real tokens, 0 on padding."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    last = mask.shape[1] - 1 - mask.long().flip(1).argmax(1)  # the last real token, on either padding side
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def pooled_logits(model, inputs: dict, pooling: str) -> torch.Tensor:
    """Class logits of a (PEFT-wrapped) sequence classifier under `pooling`. The model's own pooling runs its own
    forward; another one runs the backbone (LoRA layers included: PEFT injects them in place), pools, then the head
    (PEFT's trainable copy of it, through modules_to_save)."""
    if pooling == native_pooling(model):
        return model(**inputs).logits
    hf, name = head_of(model)
    hidden = hf.base_model(**inputs).last_hidden_state
    mask = inputs.get("attention_mask")
    pooled = pool(hidden, torch.ones(hidden.shape[:2], device=hidden.device) if mask is None else mask, pooling)
    dropout = getattr(hf, "dropout", None)  # BERT-like heads drop out their input while training
    return getattr(hf, name)(dropout(pooled) if dropout is not None else pooled)
