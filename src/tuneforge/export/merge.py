"""Merge adapters into their base and write a plain Hugging Face folder: safetensors shards of `export_size` GB
(or legacy .bin files), the tokenizer with the chat template, and a generation_config that stops where the
template's turns end. A reward model (value_head.safetensors beside it) exports as the merged causal LM plus its
value head; a classifier (label_map.json beside it) as the merged sequence-classification model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..config import ConfigError
from ..data.templates import Template, data_template, stop_token_ids
from ..infer.classify import LABELS_FILE, load_trained_classifier
from ..models.adapters import attach_adapters, folded
from ..models.load import load_base_model, load_tokenizer, resolve_model_path, save_tokenizer
from ..train.rm import VALUE_HEAD


def prepare_export_dir(path: str) -> Path:
    """The export folder, created; one that already holds files is never written over."""
    folder = Path(path).expanduser()
    if folder.is_file() or (folder.is_dir() and any(folder.iterdir())):
        raise ConfigError(f"export_dir {folder} already exists and is not empty; choose a new export_dir or "
                          "remove that folder first")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def source_folder(cfg) -> Path:
    """Where the trained run lives: the last adapter, else the model folder itself (full / freeze outputs)."""
    adapters = [a.strip() for a in (cfg.model.adapter_name_or_path or "").split(",") if a.strip()]
    return Path(adapters[-1] if adapters else resolve_model_path(cfg.model.model_name_or_path))


def _device(cfg) -> str:
    return "cuda" if cfg.model.export_device == "auto" and torch.cuda.is_available() else "cpu"


def jinja_template(template: Template, tokenizer) -> str:
    """A transformers chat_template (Jinja) that renders plain chats the way `template` does, so the exported
    tokenizer's apply_chat_template gives the prompts the model was trained on."""
    def text(fmt: str, content_expr: str) -> str:
        fmt = fmt.replace("{bos}", tokenizer.bos_token or "").replace("{eos}", tokenizer.eos_token or "")
        before, _, after = fmt.partition("{content}")
        return f"{json.dumps(before)} + {content_expr} + {json.dumps(after)}"

    observation = template.observation or template.user
    system = text(template.system, "system")
    lines = [
        "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else "
        f"{json.dumps(template.default_system)} %}}",
        "{%- set chat = messages[1:] if messages and messages[0]['role'] == 'system' else messages %}",
        "{{- " + text(template.prefix, "''") + " }}",
        "{%- if system and not " + ("true" if template.system_in_user else "false") + " %}{{ " + system + " }}"
        "{%- endif %}",
        "{%- for message in chat %}",
        "{%- set content = message['content'] %}",
        "{%- if loop.first and system and " + ("true" if template.system_in_user else "false") + " %}"
        "{%- set content = " + system + " + content %}{%- endif %}",
        "{%- if message['role'] in ('user', 'tool') %}",
        "{%- if not loop.first %}{{ " + json.dumps(template.separator) + " }}{%- endif %}",
        "{%- if message['role'] == 'tool' %}{{ " + text(observation, "content") + " }}"
        "{%- else %}{{ " + text(template.user, "content") + " }}{%- endif %}",
        "{%- else %}{{ " + text(template.assistant, "content") + " }}{%- endif %}",
        "{%- endfor %}",
    ]
    # the user format already ends with the assistant header, so add_generation_prompt needs nothing more
    return "\n".join(lines)


def _tokenizer_with_template(cfg):
    tokenizer = load_tokenizer(cfg.model)
    template = data_template(cfg.data, tokenizer)
    if isinstance(template, Template) and not template.thinking:
        tokenizer.chat_template = jinja_template(template, tokenizer)
    return tokenizer, template


def _save(model, tokenizer, folder: Path, cfg) -> None:
    model.save_pretrained(folder, max_shard_size=max(1, int(cfg.model.export_size * 1e9)))
    save_tokenizer(tokenizer, folder)
    if cfg.model.export_legacy_format:
        _to_legacy_bin(folder)


def _to_legacy_bin(folder: Path) -> None:
    """Rewrite the safetensors shards as PyTorch .bin shards (transformers 5 only writes safetensors)."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    shards = sorted(folder.glob("model*.safetensors"))
    names = {s.name: s.name.replace("model", "pytorch_model", 1).replace(".safetensors", ".bin") for s in shards}
    for shard in shards:
        torch.save(load_file(shard), folder / names[shard.name])
        shard.unlink()
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        data["weight_map"] = {k: names[v] for k, v in data["weight_map"].items()}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
        index.unlink()


def _published_dtype(cfg) -> torch.dtype:
    """The dtype the base model's folder declares (merging itself runs in float32; the result is saved like the
    base, so a bf16 model does not come back twice its size)."""
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(resolve_model_path(cfg.model.model_name_or_path)), "dtype", None)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def export_causal_lm(cfg, folder: Path):
    """Base + adapters merged in order (float32), saved in the base's dtype; returns (model, tokenizer, template)."""
    tokenizer, template = _tokenizer_with_template(cfg)
    model = load_base_model(cfg.model, dtype=torch.float32, cutoff_len=cfg.data.cutoff_len).to(_device(cfg))
    model = folded(attach_adapters(model, cfg.model, cfg.finetune, is_trainable=False)).eval()
    model = model.to(_published_dtype(cfg))
    stops = stop_token_ids(template, tokenizer)
    model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = stops[0]
    tokenizer.padding_side = "left"  # what generation with a batch of prompts needs
    _save(model.cpu(), tokenizer, folder, cfg)
    return model, tokenizer, template


def export_classifier(cfg, folder: Path) -> None:
    model, processor, *_ = load_trained_classifier(cfg)  # label_map.json, copied below, keeps the pooling
    _save(folded(model.to(_device(cfg))).cpu(), processor, folder, cfg)
    shutil.copy(source_folder(cfg) / LABELS_FILE, folder / LABELS_FILE)


def export_model(cfg, folder: Path) -> tuple[str, object | None, Template | None]:
    """Write the merged model into `folder`; returns its kind (causal_lm, reward_model or classifier) and, for the
    language models, the tokenizer and template the GGUF writer needs."""
    source = source_folder(cfg)
    if (source / LABELS_FILE).is_file():
        export_classifier(cfg, folder)
        return "classifier", None, None
    _, tokenizer, template = export_causal_lm(cfg, folder)
    if (source / VALUE_HEAD).is_file():
        shutil.copy(source / VALUE_HEAD, folder / VALUE_HEAD)
        return "reward_model", tokenizer, template
    return "causal_lm", tokenizer, template
