"""`tuneforge export`: merge what was trained into a plain Hugging Face folder, and optionally write a GGUF file
with an Ollama Modelfile beside it."""

from __future__ import annotations

import time
from pathlib import Path

from ..infer.engine import settings_from_adapter
from ..models.load import ModelError
from ..train.rm import VALUE_HEAD
from .merge import LABELS_FILE, export_model, prepare_export_dir, source_folder


def check(cfg) -> list[str]:
    """Problems with the export options (config.validate adds them to the generic ones)."""
    m, out = cfg.model, []
    if not m.export_dir:
        out.append("`export_dir` is required: the new folder the merged model is written to")
    if m.export_size <= 0:
        out.append(f"`export_size` is GB per shard and must be > 0; got {m.export_size}")
    if m.quantization_bit:
        out.append("`quantization_bit`: export merges adapters into the full-precision base, not a quantised one; "
                   "remove it (for a quantised file use export_gguf: q8_0 or q4_0)")
    if m.export_device not in ("cpu", "auto"):
        out.append(f"`export_device` must be cpu or auto (a GPU when there is one); got {m.export_device!r}")
    return out


def run_export(cfg) -> Path:
    folder = prepare_export_dir(cfg.model.export_dir)
    settings_from_adapter(cfg)
    if cfg.model.export_gguf and (source_folder(cfg) / LABELS_FILE).is_file():
        raise ModelError("export_gguf is for causal language models; a classifier exports as a Hugging Face folder "
                         "(remove export_gguf)")
    start = time.perf_counter()
    kind, tokenizer, template = export_model(cfg, folder)
    if cfg.data.preserve_thinking:  # thinking templates are not translated (merge.py): the model's own is kept
        print("[tuneforge] note: the exported chat_template is the model's own, which drops earlier answers' "
              "thoughts; preserve_thinking applies to tuneforge chat, api and training only")
    if not cfg.model.export_gguf:
        print(f"[tuneforge] exported the merged {kind.replace('_', ' ')} to {folder} "
              f"({time.perf_counter() - start:.1f} s)")
        return folder
    from .gguf import write_gguf
    from .ollama import modelfile

    merged = time.perf_counter()
    gguf_file = folder / f"{folder.name}.{cfg.model.export_gguf}.gguf"
    write_gguf(folder, gguf_file, cfg.model.export_gguf, template)
    size = gguf_file.stat().st_size / 2**20
    print(f"[tuneforge] exported {folder} (merge {merged - start:.1f} s) and {gguf_file.name} ({size:.1f} MiB, "
          f"{time.perf_counter() - merged:.1f} s)")
    if kind == "reward_model":  # GGUF has no place for a value head; the Hugging Face folder keeps it
        print(f"[tuneforge] note: {gguf_file.name} holds the language model only; the reward model's value head is "
              f"{folder / VALUE_HEAD}")
    text = modelfile(gguf_file.name, template, tokenizer, cfg.data.default_system)
    if text is None:
        print(f"[tuneforge] note: no Ollama Modelfile written: template `{template.name}` has no Ollama translation "
              "(set `template` to one of tuneforge's named templates, e.g. chatml or llama3)")
    else:
        (folder / "Modelfile").write_text(text, encoding="utf-8")
        print(f"[tuneforge] Ollama: cd {folder} && ollama create {folder.name} -f Modelfile")
    return folder
