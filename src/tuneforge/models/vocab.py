"""New tokens: LLaMA-Factory's `add_tokens`, `add_special_tokens`, `new_special_tokens_config`,
`init_special_tokens` and `resize_vocab`, and the embedding rows they need.

The tokenizer learns the tokens (load.load_tokenizer), the model gets a row per new token (load.load_base_model),
and with LoRA only the new rows train (adapter_settings). Three choices differ from LLaMA-Factory's, for the reasons
given where they are made: the embeddings grow by exactly the new tokens, not to a multiple of 64; new tokens that
land in a model's spare rows get those rows initialised too; and LoRA trains the new rows rather than whole copies
of the embedding and the output head.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

# New rows' noise comes from this seed, not the global generator: a policy and its reference model, or a run and
# its resumption, load the same base separately and must start from the same rows.
INIT_SEED = 0


@dataclass(frozen=True)
class NewTokens:
    plain: tuple[str, ...]  # add_tokens
    special: tuple[str, ...]  # add_special_tokens, or the keys of new_special_tokens_config
    descriptions: dict[str, str]  # new_special_tokens_config: token -> the text whose tokens initialise its row

    @property
    def listed(self) -> tuple[str, ...]:
        return self.plain + self.special


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def read_descriptions(path: str) -> dict[str, str]:
    """new_special_tokens_config: a YAML mapping of token to description. ValueError says what is wrong."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"`new_special_tokens_config` {path}: no such file (a YAML mapping such as "
                         "`<think>: the start of the reasoning`)")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"`new_special_tokens_config` {path}: not valid YAML ({' '.join(str(err).split())[:120]})") \
            from None
    if not isinstance(data, dict) or not data or not all(isinstance(k, str) and isinstance(v, str)
                                                         for k, v in data.items()):
        raise ValueError(f"`new_special_tokens_config` {path}: expected a mapping of each new token to a text "
                         "describing it, e.g. `<think>: the start of the reasoning`")
    return {k.strip(): v for k, v in data.items()}


def new_tokens(model_args) -> NewTokens:
    descriptions = read_descriptions(model_args.new_special_tokens_config) \
        if model_args.new_special_tokens_config else {}
    special = tuple(descriptions) or _split(model_args.add_special_tokens)
    return NewTokens(_split(model_args.add_tokens), special, descriptions)


def changes_vocabulary(model_args) -> bool:
    return bool(model_args.add_tokens or model_args.add_special_tokens or model_args.new_special_tokens_config
                or model_args.resize_vocab)


def check(cfg) -> list[str]:
    """Problems with the vocabulary keys (config._model_problems adds these)."""
    m, out = cfg.model, []
    if m.new_special_tokens_config:
        try:
            read_descriptions(m.new_special_tokens_config)
        except ValueError as err:
            out.append(str(err))
    if m.new_special_tokens_config and m.add_special_tokens:
        out.append("set one of `add_special_tokens` and `new_special_tokens_config`: the config's keys are the "
                   "special tokens it adds")
    if m.init_special_tokens != "noise_init" and not m.new_special_tokens_config:
        out.append(f"`init_special_tokens: {m.init_special_tokens}` initialises each token from its description: "
                   "it needs `new_special_tokens_config`")
    if changes_vocabulary(m) and m.quantization_bit:
        out.append("a quantised model's embeddings cannot grow: remove `quantization_bit` or the new tokens")
    if changes_vocabulary(m) and cfg.finetune.stage == "cls":
        out.append("new tokens are built for the language-model stages; stage cls uses the tokenizer's own tokens")
    return out


def notices(cfg) -> list[str]:
    """What new tokens train, where it is not what a LLaMA-Factory user would expect."""
    m, f = cfg.model, cfg.finetune
    if not changes_vocabulary(m) or not cfg.train.do_train or f.additional_target:
        return []
    if f.finetuning_type == "lora" and new_tokens(m).listed:
        return ["note: LoRA trains the new tokens' embedding rows and leaves the rest of the vocabulary as it was; "
                "LLaMA-Factory trains whole copies of the embeddings (`additional_target: embed_tokens,lm_head` "
                "does that here too)"]
    if f.finetuning_type == "freeze" and "embed_tokens" not in (f.freeze_extra_modules or ""):
        return ["note: with finetuning_type freeze, the new tokens' embedding rows keep their initial values unless "
                "`freeze_extra_modules` lists the embeddings (e.g. embed_tokens)"]
    return []


def saved_tokens(model_args, tokenizer) -> list:
    """The tokens the last adapter of `adapter_name_or_path` was trained with beyond `tokenizer`'s, in id order: an
    adapter folder holds the tokenizer its run used (tuneforge's and LLaMA-Factory's both), so chat, api and export
    need not be told its new tokens again."""
    folders = _split(model_args.adapter_name_or_path)
    config = Path(folders[-1]) / "tokenizer_config.json" if folders else None
    if config is None or not config.is_file():
        return []
    return [token for i, token in _added_tokens(str(config.parent), config.stat().st_mtime) if i >= len(tokenizer)]


@functools.lru_cache(maxsize=4)
def _added_tokens(folder: str, modified: float) -> tuple:
    """(id, AddedToken) of a saved tokenizer's added tokens. Cached: a command loads the tokenizer for its data and
    again for the model's rows, and a tokenizer takes 0.2-0.4 s to load."""
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(folder)
    return tuple(sorted(saved.added_tokens_decoder.items()))


def extend_tokenizer(tokenizer, model_args) -> None:
    """Add the adapter's new tokens (saved_tokens) and the listed ones that the tokenizer does not know yet."""
    tokenizer.add_tokens(saved_tokens(model_args, tokenizer))
    tokens = new_tokens(model_args)
    tokenizer.add_tokens(list(tokens.plain), special_tokens=False)
    tokenizer.add_tokens(list(tokens.special), special_tokens=True)


def _tied(model) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def grow_embeddings(model, model_args) -> list[int]:
    """Rows for the new tokens, initialised as `init_special_tokens` says; returns their ids.

    The embeddings (and an untied head) grow to the extended tokenizer's length, exactly, where LLaMA-Factory pads
    to a multiple of 64: a padding row has no token, never trains, and would still take probability when the model
    samples. Where the model already has rows past its tokenizer (Qwen2 pads its 151,665 tokens to 151,936 rows),
    new tokens take those rows, which are set here too (LLaMA-Factory leaves them as they were)."""
    from .load import ModelError, base_tokenizer

    tokenizer = base_tokenizer(model_args)
    known = len(tokenizer)
    extend_tokenizer(tokenizer, model_args)
    rows = model.get_input_embeddings().weight.shape[0]
    targets = sorted(set(range(known, len(tokenizer))) | set(range(rows, len(tokenizer))))
    if not targets:
        return []
    if len(tokenizer) > rows:
        if not isinstance(model.get_output_embeddings(), torch.nn.Linear):
            raise ModelError(f"{type(model).__name__}'s output head is not a plain linear layer, so its vocabulary "
                             "cannot grow; remove the new tokens")
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the rows are set below
    matrices = [model.get_input_embeddings().weight]
    if matrices[0].is_meta:  # an empty model (load_base_model's `empty`) gets its rows' values with the rest
        return targets
    if not _tied(model):
        matrices.append(model.get_output_embeddings().weight)
    old = min(known, rows)  # the rows of tokens the model was trained with
    descriptions = new_tokens(model_args).descriptions if model_args.init_special_tokens != "noise_init" else {}
    sources = [_description_ids(tokenizer, descriptions.get(token), old)
               for token in tokenizer.convert_ids_to_tokens(targets)]
    with torch.no_grad():
        for matrix in matrices:
            _initialise_rows(matrix, targets, sources, old, noise=model_args.init_special_tokens != "desc_init")
    return targets


def _description_ids(tokenizer, description: str | None, old: int) -> list[int]:
    """The old rows a new token's row starts as the mean of: its description's tokens, or every old row."""
    ids = [i for i in tokenizer(description, add_special_tokens=False)["input_ids"] if i < old] \
        if description else []
    return ids or list(range(old))


def _initialise_rows(matrix: torch.Tensor, targets: list[int], sources: list[list[int]], old: int,
                     noise: bool) -> None:
    """Each target row: the mean of its source rows (in fp32), plus N(0, 1/dim) noise when `noise`, as
    LLaMA-Factory's noise_init, desc_init and desc_init_w_noise do."""
    generator = torch.Generator().manual_seed(INIT_SEED)
    every = matrix[:old].float().mean(0)
    for target, ids in zip(targets, sources):
        row = every if len(ids) == old else matrix[ids].float().mean(0)
        if noise:
            row = row + torch.randn(matrix.shape[1], generator=generator) / math.sqrt(matrix.shape[1])
        matrix[target] = row.to(matrix.dtype)


def adapter_settings(model, tokenizer, model_args, finetune_args) -> dict:
    """What a new LoRA or OFT adapter trains of the embeddings when the vocabulary changes, as adapter config
    arguments; {} when it does not or `additional_target` says it itself.

    LoRA trains the listed tokens' rows (PEFT's trainable_token_indices): the adapter stores only those rows, and
    the rest of the vocabulary keeps the base's values. LLaMA-Factory trains whole copies of the embedding and the
    head instead (`additional_target: embed_tokens,lm_head` still does that here): 28M more trainable parameters
    on SmolLM2-135M, and a 228 MB adapter. OFT, and `resize_vocab` without listed tokens, do as LLaMA-Factory does.
    Tied embeddings stay tied."""
    if not changes_vocabulary(model_args) or finetune_args.additional_target:
        return {}
    names, tied = _embedding_names(model), _tied(model)
    listed = new_tokens(model_args).listed
    if finetune_args.finetuning_type == "lora" and listed:
        ids = sorted(set(tokenizer.convert_tokens_to_ids(list(listed))))
        # a tied head shares the embedding's trainable rows (PEFT ties them itself); an untied one trains its own
        return {"trainable_token_indices": {name: ids for name in (names[:1] if tied else names)}}
    if tied and finetune_args.finetuning_type != "lora":
        from .load import ModelError

        raise ModelError(f"finetuning_type {finetune_args.finetuning_type} would train the tied embeddings and "
                         "head as two copies (PEFT keeps them tied for LoRA only); use finetuning_type: lora with "
                         "the new tokens")
    return {"modules_to_save": names}  # lora_config keeps tied ones tied


def tied_embedding_names(model) -> set[str]:
    """Leaf names of the embedding and the head when they share one weight, else none."""
    return set(_embedding_names(model)) if _tied(model) else set()


def _embedding_names(model) -> list[str]:
    """Leaf names of the input embedding and, when it is a module of its own, the output head."""
    wanted = [model.get_input_embeddings(), model.get_output_embeddings()]
    return [name.split(".")[-1] for name, module in model.named_modules() if any(module is w for w in wanted)]


def save_settings(model) -> dict:
    """save_pretrained arguments for an adapter: without the embedding matrices when the adapter holds every new
    row itself (trainable_token_indices), so it stays megabytes, not the 228 MB of two embedding copies; a loader
    grows the base's embeddings first (`model.resize_token_embeddings(len(tokenizer))`), as load_base_model does."""
    configs = getattr(model, "peft_config", {})
    config = configs.get(getattr(model, "active_adapter", None)) if configs else None
    return {"save_embedding_layers": False} if getattr(config, "trainable_token_indices", None) else {}


def needs_tokenizer(model_args) -> bool:
    """Whether loading the base must consult the tokenizer for rows to add: new tokens, resize_vocab, or an adapter
    folder with the tokenizer it was trained with (saved_tokens)."""
    folders = _split(model_args.adapter_name_or_path)
    return changes_vocabulary(model_args) or bool(folders and (Path(folders[-1]) / "tokenizer_config.json").is_file())
