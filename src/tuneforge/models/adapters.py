"""What trains: `full` (everything), `freeze` (chosen layers/modules), `lora` and `oft` (PEFT adapters)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from . import vocab
from .load import ModelError, load_tokenizer


def _output_head_names(model) -> set[str]:
    head = model.get_output_embeddings()
    return {name for name, module in model.named_modules() if module is head and head is not None}


def all_linear_names(model) -> list[str]:
    """Leaf names of every nn.Linear except the output head: what `lora_target: all` means."""
    heads = _output_head_names(model)
    names = {name.split(".")[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and name not in heads}
    return sorted(names)


def expert_weight_names(model) -> list[str]:
    """Names (`experts.gate_up_proj`) of mixture-of-experts weights that transformers 5 fuses into one 3-D parameter
    per layer instead of one nn.Linear per expert: `lora_target: all` reaches them through PEFT's
    target_parameters, as it reached each expert's linear layers under transformers 4. Routers stay out, as they
    are no nn.Linear either (`additional_target: gate` trains a router whole)."""
    return sorted({f"{name.split('.')[-1]}.{param_name}" for name, module in model.named_modules()
                   if name.split(".")[-1] == "experts" or type(module).__name__.endswith("Experts")
                   for param_name, param in module.named_parameters(recurse=False) if param.ndim == 3})


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def trainable_layer_ids(n_layers: int, args) -> range:
    """The layers freeze (and LLaMA Pro's LoRA) trains: the last N (first -N), or with `use_llama_pro` every
    (n_layers / N)-th, the blocks an expansion such as LLaMA-Factory's scripts/llama_pro.py inserts."""
    n = args.freeze_trainable_layers
    if args.use_llama_pro:
        if n <= 0 or n_layers % n:
            raise ModelError(f"use_llama_pro trains every (layers / freeze_trainable_layers)-th block: "
                             f"freeze_trainable_layers must divide the model's {n_layers} layers; got {n}. Expand "
                             "the model first (tuneforge expand model_name_or_path=... --num_expand N --out "
                             "FOLDER) and set freeze_trainable_layers: N")
        stride = n_layers // n
        return range(stride - 1, n_layers + stride - 1, stride)
    return range(n_layers - n, n_layers) if n > 0 else range(-n)


def apply_freeze(model, args) -> None:
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if not n_layers:
        raise ModelError("finetuning_type freeze needs config.num_hidden_layers to find the layers")
    n = args.freeze_trainable_layers
    if n == 0 or abs(n) > n_layers:
        raise ModelError(f"freeze_trainable_layers must be between -{n_layers} and {n_layers} (not 0); got {n}")
    layer_ids = trainable_layer_ids(n_layers, args)
    modules = _split(args.freeze_trainable_modules)
    extra = _split(args.freeze_extra_modules)
    layer_pattern = re.compile(r"\.(\d+)\.")
    matched_modules, matched_extra = set(), set()
    for name, param in model.named_parameters():
        found = layer_pattern.search(name)
        in_layer = found is not None and int(found.group(1)) in layer_ids
        module_ok = modules == ["all"] or any(f".{m}." in f".{name}" for m in modules)
        matched_modules.update(m for m in modules if in_layer and f".{m}." in f".{name}")
        extra_hit = [e for e in extra if f".{e}." in f".{name}"]
        matched_extra.update(extra_hit)
        param.requires_grad_(bool((in_layer and module_ok) or extra_hit))
    missing = [m for m in modules if m != "all" and m not in matched_modules] + \
              [e for e in extra if e not in matched_extra]
    if missing:
        raise ModelError(f"freeze: no parameters match {missing}; module names in this model include "
                         f"{sorted({n.split('.')[-2] for n, _ in model.named_parameters()})[:12]}")


def _targets(model, value: str, key: str, args) -> tuple[list[str], list[str]]:
    """`lora_target` / `oft_target` as PEFT (target_modules, target_parameters): linear layers by leaf name, and
    fused expert weights (expert_weight_names) by their leaf name or `experts.<name>`. With `use_llama_pro`, only
    those inside the layers LLaMA Pro trains (full names)."""
    experts = expert_weight_names(model)
    known = {name.split(".")[-1] for name, _ in model.named_modules()}
    if value.strip() == "all":
        modules, params = all_linear_names(model), experts
    else:
        # a name can be both: a dense layer's down_proj module and the experts' down_proj weight in the MoE layers
        named = _split(value)
        params = [e for e in experts if e in named or e.split(".")[-1] in named]
        modules = [t for t in named if t in known or not any(t in (e, e.split(".")[-1]) for e in experts)]
    unknown = [t for t in modules if t not in known]
    if unknown:
        raise ModelError(f"{key} {unknown} not found in the model; its linear layers are "
                         f"{', '.join(all_linear_names(model) + experts)} (or use `all`)")
    if not args.use_llama_pro:
        return modules, params
    layer_ids = trainable_layer_ids(model.config.num_hidden_layers, args)
    pattern = re.compile(r"\.(\d+)\.")

    def in_trained_layer(name: str) -> bool:
        return (found := pattern.search(name)) is not None and int(found.group(1)) in layer_ids

    return ([name for name, _ in model.named_modules() if name.split(".")[-1] in modules and in_trained_layer(name)],
            [name for name, _ in model.named_parameters() if any(name.endswith("." + e) for e in params)
             and in_trained_layer(name)])


def lora_config(model, args, embeddings: dict | None = None, fuse: bool = False):
    """`embeddings`: what trains of the embeddings when the vocabulary grew (vocab.adapter_settings). `fuse`: plain
    LoRA on linear layers runs as one autograd function (lora_linear.py), unless the model has nn.Linear subclasses
    (bitsandbytes' quantised layers are some), which PEFT adapts with its own classes."""
    from peft import LoraConfig, TaskType

    from .lora_linear import fuse_lora_products

    # PiSSA: the adapter starts as the principal singular part of each weight (removed from the base), computed by
    # PEFT with `pissa_iter` fast-SVD iterations, or exactly with -1
    init = True if not args.pissa_init else "pissa" if args.pissa_iter == -1 else f"pissa_niter_{args.pissa_iter}"
    saved = {"modules_to_save": _split(args.additional_target) or None, **(embeddings or {})}
    if vocab.tied_embedding_names(model) & set(saved["modules_to_save"] or []):
        saved["ensure_weight_tying"] = True  # else PEFT trains the tied embedding and head as two copies
    modules, params = _targets(model, args.lora_target, "lora_target", args)
    unsupported = [key for key, on in (("lora_dropout", args.lora_dropout), ("use_dora", args.use_dora),
                                       ("pissa_init", args.pissa_init)) if on]
    if params and unsupported:
        raise ModelError(f"lora_target reaches this mixture-of-experts model's fused expert weights "
                         f"({', '.join(sorted(set(p.split('.')[-1] for p in params)))}), and PEFT cannot adapt those "
                         f"with {' / '.join(unsupported)}: turn {'it' if len(unsupported) == 1 else 'them'} off, or "
                         f"name only linear layers in lora_target ({', '.join(all_linear_names(model))})")
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=args.lora_rank,
                        lora_alpha=args.lora_alpha or 2 * args.lora_rank, lora_dropout=args.lora_dropout,
                        target_modules=modules, target_parameters=params or None, use_rslora=args.use_rslora,
                        use_dora=args.use_dora, init_lora_weights=init, **saved)
    linear = torch.nn.Linear
    if fuse and all(type(m) is linear for m in model.modules() if isinstance(m, linear)):
        fuse_lora_products(config)
    return config


def oft_config(model, args, embeddings: dict | None = None):
    from peft import OFTConfig, TaskType

    saved = {"modules_to_save": _split(args.additional_target) or None, **(embeddings or {})}
    modules, params = _targets(model, args.oft_target, "oft_target", args)
    if params:
        raise ModelError(f"oft_target reaches this mixture-of-experts model's fused expert weights, which PEFT's OFT "
                         f"cannot adapt (only LoRA can): name only linear layers in oft_target "
                         f"({', '.join(all_linear_names(model))}), or use finetuning_type: lora")
    return OFTConfig(task_type=TaskType.CAUSAL_LM, r=args.oft_rank, oft_block_size=args.oft_block_size,
                     target_modules=modules, module_dropout=args.module_dropout, **saved)


def check_adapter_paths(value: str | None) -> None:
    """Each local path of `adapter_name_or_path` must hold an adapter; a name that is no local path is left to PEFT
    (a hub id). Called before loading, and by commands that would otherwise find out only after a first run."""
    for path in _split(value):
        _check_adapter_folder(path)


def _check_adapter_folder(path: str) -> None:
    folder = Path(path)
    if folder.is_dir() and not (folder / "adapter_config.json").is_file():
        inside = sorted(p.parent.name for p in folder.glob("*/adapter_config.json"))
        hint = (f"; adapters inside it: {', '.join(inside)}" if inside else
                "; if it is the output_dir of an unfinished run, finish the run (re-running it resumes) or point "
                "at one of its checkpoint-N folders")
        raise ModelError(f"adapter_name_or_path {path}: the folder holds no adapter_config.json{hint}")
    init = pissa_init_of(path)
    if init and init != "pissa":  # the exact SVD ("pissa", pissa_iter -1) subtracts the same product every time
        converted = folder / "pissa_converted"
        fix = (f"load {converted}, the plain LoRA adapter that `pissa_convert: true` wrote beside it"
               if (converted / "adapter_config.json").is_file() else
               "train with `pissa_convert: true` and load its pissa_converted folder, or with `pissa_iter: -1`")
        raise ModelError(f"adapter_name_or_path {path}: a PiSSA adapter ({init}) applies to the base minus a random "
                         f"fast SVD, which PEFT draws again at every load, so each load would be another model; {fix}")
    if not folder.exists() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
        raise ModelError(f"adapter_name_or_path {path}: no such folder (a local adapter folder, or a hub id "
                         "owner/name)")


def pissa_init_of(path: str) -> str | None:
    """The PiSSA initialisation an adapter folder records, or None for any other adapter. PEFT runs it again at
    every load: it subtracts the adapter's starting product from the base weights the adapter is loaded on."""
    config = Path(path) / "adapter_config.json"
    init = json.loads(config.read_text(encoding="utf-8")).get("init_lora_weights") if config.is_file() else None
    return init if isinstance(init, str) and init.startswith("pissa") else None


def _load_adapter(model, path: str, is_trainable: bool):
    from peft import PeftModel

    _check_adapter_folder(path)
    try:
        with warnings.catch_warnings():
            if next(model.parameters()).is_meta:  # an empty model (FSDP's cpu_ram_efficient_loading) reads no
                # weights: its values, the adapter's included, come from the main process when it is sharded
                warnings.filterwarnings("ignore", message="for .*: copying from a non-meta parameter")
            return PeftModel.from_pretrained(model, path, is_trainable=is_trainable)
    except (OSError, ValueError) as err:
        if Path(path).exists():
            raise
        raise ModelError(f"adapter_name_or_path {path}: no such local folder, and no hub adapter of that name could "
                         f"be fetched ({type(err).__name__}); check the path") from None


def continues_an_adapter(model_args, finetune_args) -> bool:
    """Whether training goes on with the last of `adapter_name_or_path` (the others merged into the base) rather
    than a new adapter on top of them all (`create_new_adapter`)."""
    return bool(model_args.adapter_name_or_path) and not finetune_args.create_new_adapter


def attach_adapters(model, model_args, finetune_args, is_trainable: bool, fuse: bool = False):
    """Load `adapter_name_or_path` (all but the last merged in) and, when training LoRA, the adapter to train
    (`fuse`: see lora_config)."""
    from peft import get_peft_model

    adapters = _split(model_args.adapter_name_or_path)
    if adapters:
        resume_last = is_trainable and continues_an_adapter(model_args, finetune_args)
        to_merge = adapters[:-1] if (resume_last or not is_trainable) else adapters
        if to_merge and model_args.quantization_bit:
            keep = ", or leave out create_new_adapter to train it" if not resume_last and len(adapters) == 1 else ""
            raise ModelError(f"adapter_name_or_path: merging {', '.join(to_merge)} into weights that "
                             "`quantization_bit` quantises would round them again, losing much of the adapter "
                             "(LLaMA-Factory refuses this too); merge it into the unquantised model first (tuneforge "
                             f"export){keep}")
        for path in to_merge:
            model = _load_adapter(model, path, False).merge_and_unload()
        if resume_last or not is_trainable:
            return _load_adapter(model, adapters[-1], is_trainable)
    if is_trainable and finetune_args.finetuning_type in ADAPTER_TYPES:
        embeddings = vocab.adapter_settings(model, load_tokenizer(model_args), model_args, finetune_args) \
            if vocab.changes_vocabulary(model_args) else {}
        config = lora_config(model, finetune_args, embeddings, fuse) if finetune_args.finetuning_type == "lora" \
            else oft_config(model, finetune_args, embeddings)
        model = get_peft_model(model, config)
    return model


def folded(model, quantized: bool = False):
    """The model to generate with or export: its adapters folded into the base weights (PEFT's merge_and_unload), as
    LLaMA-Factory loads adapters for inference; decoding with LoRA on every linear layer runs 19% faster folded
    (docs/benchmarks.md). A model without adapters, or on a `quantized` base (the sum would
    be quantised again, losing most of the adapter), is returned as it is."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") and not quantized else model


def setup_trainable(model, model_args, finetune_args, fuse: bool = False):
    """Mark what trains for full / freeze / lora; returns the (possibly PEFT-wrapped) model (`fuse`: see
    lora_config)."""
    kind = finetune_args.finetuning_type
    if kind == "full":
        model.requires_grad_(True)
        return model
    if kind == "freeze":
        apply_freeze(model, finetune_args)
        return model
    return attach_adapters(model, model_args, finetune_args, is_trainable=True, fuse=fuse)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def describe_trainable(model, per_tensor: bool = False) -> str:
    """The count of trainable parameters; with per_tensor (print_param_status), first one line per parameter."""
    trainable, total = count_parameters(model)
    lines = [f"  {name}: shape {tuple(p.shape)}, {p.dtype}, {p.device}, trainable: {p.requires_grad}"
             for name, p in model.named_parameters()] if per_tensor else []
    return "\n".join(["parameters:"] * bool(lines) + lines + [
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"])


ADAPTER_TYPES = ("lora", "oft")  # finetuning types that train a PEFT adapter on a frozen base


def check(cfg) -> list[str]:
    """Problems with the adapter extras (PiSSA, OFT, LoRA+ embeddings, LLaMA Pro)."""
    f, out = cfg.finetune, []
    if f.pissa_init and f.finetuning_type != "lora":
        out.append("`pissa_init` initialises LoRA adapters: it needs `finetuning_type: lora`")
    if f.pissa_init and cfg.model.quantization_bit:
        out.append("`pissa_init` with `quantization_bit` is not supported: PEFT computes PiSSA's SVD on unquantised "
                   "weights only (LLaMA-Factory refuses it too); remove one of them")
    if f.pissa_convert and not f.pissa_init:
        out.append("`pissa_convert` converts a PiSSA adapter: it needs `pissa_init: true`")
    if f.pissa_iter < -1 or f.pissa_iter == 0:
        out.append(f"`pissa_iter` is the number of fast-SVD iterations (>= 1), or -1 for the exact SVD; got "
                   f"{f.pissa_iter}")
    if f.finetuning_type == "oft" and (f.oft_rank > 0) == (f.oft_block_size > 0):
        out.append("OFT needs exactly one of `oft_rank` and `oft_block_size` above 0 (LLaMA-Factory's default: "
                   "oft_block_size 32 with oft_rank 0)")
    if f.finetuning_type == "oft" and (f.use_dora or f.use_rslora or f.loraplus_lr_ratio):
        out.append("`use_dora`, `use_rslora` and `loraplus_lr_ratio` are LoRA options; remove them for "
                   "finetuning_type oft")
    if f.use_llama_pro and f.finetuning_type not in ("freeze", "lora", "oft"):
        out.append("`use_llama_pro` chooses which blocks train: it needs finetuning_type freeze, lora or oft")
    if f.stage == "cls" and (f.finetuning_type == "oft" or f.pissa_init or f.use_llama_pro):
        out.append("stage cls builds its own LoRA classifier; oft, pissa_init and use_llama_pro are built for the "
                   "language-model stages")
    if f.loraplus_lr_embedding != type(f)().loraplus_lr_embedding and not f.loraplus_lr_ratio:
        out.append("`loraplus_lr_embedding` is part of LoRA+: it needs `loraplus_lr_ratio`")
    return out


def notices(cfg) -> list[str]:
    """What an adapter setting costs in combination with another."""
    if cfg.finetune.use_dora and cfg.finetune.finetuning_type == "lora" and cfg.train.torch_compile:
        # measured with bench/train_speed.py --set use_dora=true (docs/benchmarks.md)
        return ["note: `use_dora` with `torch_compile`: PEFT's DoRA layers break each compiled decoder layer's graph "
                "(dynamo cannot trace their weight-norm code); compiled steps ran at 0.87-0.91x eager's speed with "
                "7-8% more memory (SmolLM2-135M, bf16, Intel Xeon with AMX), so leave torch_compile off for DoRA"]
    return []


def save_pissa_init(model, output_dir) -> None:
    """pissa_convert, before training: the initial PiSSA adapter (output_dir/pissa_init), which the conversion
    subtracts. It is saved as a plain LoRA (init_lora_weights True) so that PEFT loads it without another SVD."""
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    model.save_pretrained(f"{output_dir}/pissa_init", safe_serialization=True)
    config.init_lora_weights = init


def save_pissa_converted(model, output_dir) -> None:
    """pissa_convert, after training: output_dir/pissa_converted, a plain LoRA adapter (of twice the rank) that
    applies to the original base model, unlike the PiSSA adapter, which applies to the residual base. PEFT's
    conversion changes the adapter in memory, so the trained one is saved first and loaded back."""
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    model.save_pretrained(f"{output_dir}/pissa_backup", safe_serialization=True)
    config.init_lora_weights = init
    model.save_pretrained(f"{output_dir}/pissa_converted", safe_serialization=True,
                          path_initial_model_for_weight_conversion=f"{output_dir}/pissa_init")
    model.load_adapter(f"{output_dir}/pissa_backup", "default", is_trainable=True)
    model.set_adapter("default")
    config.init_lora_weights = init
