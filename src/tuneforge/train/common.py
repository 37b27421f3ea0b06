"""What every recipe does the same way: accelerator, model set-up, output_dir handling, final save, evaluation."""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch

from ..config import ConfigError, save_config, shuffles_rows
from ..data.collate import PadCollator
from ..models.adapters import (ADAPTER_TYPES, attach_adapters, continues_an_adapter, describe_trainable,
                               save_pissa_converted, save_pissa_init, setup_trainable)
from ..models.load import ModelError, keep_quantized_layers_differentiable, load_base_model, load_tokenizer
from ..models.neftune import add_noise_to_embeddings
from ..models.recompute import apply_gradient_checkpointing
from ..models.rms_norm import use_fast_rms_norms
from ..models.swiglu import use_fast_mlps
from . import checkpoint as ckpt
from . import sharding, zero
from .logging import plot_loss, write_results
from .evaluation import Evaluation, RowsEvaluation, full_eval_dtype
from .loop import Precision, autocast_dtype, train
from .steps import rows_source


def make_accelerator(t):
    """Devices and processes come from accelerate; precision is ours (see loop.py), so it stays what the YAML says
    and several runs can share one Python process."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    _check_gpus_per_process()
    # the config read an accelerate FSDP config into `fsdp` (sharding.adopt_accelerate_fsdp); left set, this would
    # have accelerate build a plugin of its own from the FSDP_* variables, which wants a GPU for FSDP1's state sync
    os.environ.pop("ACCELERATE_USE_FSDP", None)
    if processes > 1:
        # its functions default to `group=group.WORLD`, evaluated at import: imported once the process group has
        # started (FSDP's imports do), they would hold that group past destroy_process_group, and a rank could
        # abort at exit (cli._leave_process_group)
        import torch.distributed.nn  # noqa: F401
    # accelerate only treats a torchrun launch without GPUs as distributed (gloo) when told to use the CPU
    cpu_ddp = processes > 1 and not torch.cuda.is_available()
    # dynamo_backend "no": accelerate's own dynamo config became the run's torch_compile (launch.launcher_compile);
    # read again by accelerate, it would compile the whole model over the compiled layers
    return Accelerator(mixed_precision="no", cpu=cpu_ddp, dynamo_backend="no", **sharding.accelerator_kwargs(t),
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=t.ddp_timeout)),
                                        *sharding.ddp_handlers(t)])


def _check_gpus_per_process() -> None:
    """Each process of a node trains on its own GPU (cuda:LOCAL_RANK); more processes than GPUs would fail later,
    inside CUDA or NCCL, with no word of why."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and per_node > gpus:
        raise ConfigError(f"{per_node} processes were started on this machine and it has {gpus} GPU"
                          f"{'s' if gpus != 1 else ''}: each process trains on a GPU of its own, so start "
                          f"--nproc_per_node {gpus} (or hide the GPUs, CUDA_VISIBLE_DEVICES=, to train on CPU cores)")


def start(cfg):
    """(accelerator, tokenizer), with every random generator seeded."""
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    return make_accelerator(cfg.train), load_tokenizer(cfg.model)


@contextmanager
def float32_products(tf32: bool | None):
    """tf32: float32 matrix products and convolutions on NVIDIA GPUs in TF32 (true) or in full float32 (false) for
    the run, restored afterwards; unset leaves torch's defaults. Set through torch's allow_tf32 flags, not through
    transformers' enable_tf32: that sets torch's newer fp32_precision, after which torch.get_float32_matmul_precision
    (inductor's autotuning reads it) raises about mixing the two APIs; and it is cached, so a second run in the same
    process (the web UI) could not turn it back."""
    if tf32 is None:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# what transformers' enable_full_determinism sets for NVIDIA's libraries: cuBLAS's fixed workspace, flash-attention's
# deterministic backward
_DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":16:8", "FLASH_ATTENTION_DETERMINISTIC": "1"}


@contextmanager
def deterministic_kernels(enabled: bool):
    """full_determinism: torch's deterministic algorithms and cuDNN's deterministic mode for the run, as HF's Trainer
    sets them; an operation without a deterministic kernel then raises torch's error. Restored afterwards, so runs
    sharing a Python process (tests, the web UI) keep their own settings."""
    if not enabled:
        yield
        return
    algorithms = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    env = {key: os.environ.get(key) for key in _DETERMINISTIC_ENV}
    os.environ.update(_DETERMINISTIC_ENV)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(algorithms[0], warn_only=algorithms[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def guard_output_dir(cfg, accelerator) -> str | None:
    """The checkpoint to resume from, if any; refuses to overwrite a finished output_dir (see checkpoint.py).
    Each process looks for itself; when they do not agree (machines that do not share output_dir's disk, or a
    network file system that has not shown one of them the latest checkpoint yet), all stop here, where the
    others would wait forever for the steps a process resuming elsewhere never takes."""
    t = cfg.train
    try:
        resume = ckpt.check_output_dir(t.output_dir, t.overwrite_output_dir, t.resume_from_checkpoint,
                                       accelerator.print) if t.do_train else None
        seen, failure = f"resumes from {resume}" if resume else "starts from the beginning", None
    except (FileExistsError, FileNotFoundError) as error:
        seen, failure = f"stops: {error}", error
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        everyone = gather_object([seen])
        if len(set(everyone)) > 1:
            ranks = {what: [rank for rank, other in enumerate(everyone) if other == what] for what in everyone}
            raise ConfigError(f"the processes see different checkpoints in output_dir {t.output_dir}: "
                              + "; ".join(f"{_processes(group)} {what}" for what, group in ranks.items())
                              + ". Every machine must see output_dir at the same path (a shared file system)")
    if failure:
        raise failure
    accelerator.wait_for_everyone()  # every process has decided before the main one clears old checkpoints
    return resume


def _processes(ranks: list[int]) -> str:
    """"process 3", or "processes 0-7, 9" for ascending ranks."""
    runs: list[list[int]] = []
    for rank in ranks:
        if runs and rank == runs[-1][-1] + 1:
            runs[-1].append(rank)
        else:
            runs.append([rank])
    named = ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)
    return f"process{'es' * (len(ranks) > 1)} {named}"


def prepare_model(cfg, accelerator, packed: bool = False, reference: bool = False):
    """The base model with what trains set up (or, for inference and references, adapters merged in)."""
    t, f = cfg.train, cfg.finetune
    fsdp = sharding.fsdp_settings(t)
    empty = not reference and sharding.sent_by_main_process(fsdp, accelerator)
    model = load_base_model(cfg.model, dtype=torch.bfloat16 if f.pure_bf16 else torch.float32,
                            compute_dtype=compute_dtype(cfg, accelerator.device), cutoff_len=cfg.data.cutoff_len,
                            training=True, empty=empty)
    if not t.do_train or reference:
        return attach_adapters(model, cfg.model, f, is_trainable=False).eval()
    keep_quantized_layers_differentiable(model)
    if cfg.model.upcast_layernorm:
        upcast_layernorms(model)
    # fsdp_config's activation_checkpointing recomputes the same layers
    scope = apply_gradient_checkpointing(model, t, cfg.model, requested=bool(fsdp and fsdp.activation_checkpointing))
    if packed and not empty:  # (the main process checks the weights it sends)
        check_packing_support(full_precision_twin(model) if cfg.model.quantization_bit else model,
                              autocast_dtype(t, accelerator.device))
    if accelerator.device.type == "cpu" and not t.torch_compile:  # measured on CPUs; inductor fuses these itself
        use_fast_rms_norms(model)  # the same bits as the model's own norms, with a shorter backward
        use_fast_mlps(model)  # the same bits as the model's own MLPs, keeping less for backward
    # the fused LoRA function on CPUs, where it was measured (docs/benchmarks.md); not under DeepSpeed, whose ZeRO-3
    # gathers each module's weights when that module is called, and the function reads the base layer's weight
    # without calling it; nor under selective checkpointing, which keeps a projection's output by the product that
    # made it, where the function adds its low-rank term in place (or makes it in row blocks); nor compiled, where
    # inductor fuses the same work and dynamo breaks each layer's graph at the function (half the speed)
    fuse = accelerator.device.type == "cpu" and not (t.deepspeed or t.torch_compile) and scope != "selective"
    model = setup_trainable(model, cfg.model, f, fuse=fuse)
    if f.neftune_noise_alpha:
        add_noise_to_embeddings(model, f.neftune_noise_alpha)
    if t.torch_compile:
        compile_layers(model, t.torch_compile_backend or "inductor", t.torch_compile_mode)
    accelerator.print(f"[tuneforge] {describe_trainable(model, cfg.model.print_param_status)}")
    return model


def dropout_off(model, accelerator) -> None:
    """dpo, kto and ppo train with the model's dropout layers off, as TRL does by default (disable_dropout) and
    LLaMA-Factory's dpo and kto trainers do: their losses compare the policy's log-probabilities with another
    pass's (the reference's; ppo's rollout, taken with dropout off), and dropout would add noise to that
    difference. They become identities, so LoRA layers keep the fused product (lora_linear)."""
    dropped = set()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Dropout):
                dropped |= {child.p} - {0.0}
                setattr(parent, name, torch.nn.Identity())
    if dropped:
        accelerator.print(f"[tuneforge] note: dropout is off in this stage (TRL's default; LLaMA-Factory's for dpo "
                          f"and kto), so `lora_dropout` and the model's dropout of "
                          f"{', '.join(map(str, sorted(dropped)))} have no effect: it would make the policy's "
                          "log-probabilities noisy against the pass they are compared with")


def on_device(module, device: torch.device):
    """`module` moved to `device`, unless part of it is empty (cpu_ram_efficient_loading): sharding then places it
    and fills it with the main process's weights."""
    return module if any(p.is_meta for p in module.parameters()) else module.to(device)


def upcast_layernorms(model) -> None:
    """upcast_layernorm: the normalisation weights in fp32, chosen as LLaMA-Factory chooses them (1-D, with "norm"
    or "ln" in the name)."""
    for name, param in model.named_parameters():
        if param.ndim == 1 and ("norm" in name or "ln" in name):
            param.data = param.data.float()


def compute_dtype(cfg, device: torch.device) -> torch.dtype:
    """What a quantised base (quantization_bit) multiplies in: the precision's autocast dtype, bf16 with
    pure_bf16, fp32 otherwise. The LoRA adapters stay fp32 whatever it is."""
    return autocast_dtype(cfg.train, device) or (torch.bfloat16 if cfg.finetune.pure_bf16 else torch.float32)


def open_output_dir(cfg, accelerator) -> None:
    t = cfg.train
    if accelerator.is_main_process:
        Path(t.output_dir).mkdir(parents=True, exist_ok=True)
        if t.do_train:
            if t.overwrite_output_dir and not t.resume_from_checkpoint:
                ckpt.clear_old_checkpoints(t.output_dir)
            save_config(cfg, Path(t.output_dir) / ckpt.RUN_CONFIG)


def finish_training(cfg, module, tokenizer, results: dict, accelerator) -> None:
    """The trained model (and the stage's extra weights) into output_dir, with results and the loss plot."""
    weights = sharding.full_state(module, None, with_optimizer=False)[0] if sharding.is_sharded(module) else None
    with zero.gathered(module):
        if accelerator.is_main_process:
            ckpt.save_model(module, tokenizer, Path(cfg.train.output_dir), weights)
    if accelerator.is_main_process:
        if cfg.finetune.pissa_convert:
            save_pissa_converted(module.model, cfg.train.output_dir)
        write_results(cfg.train.output_dir, "train", results)
        if cfg.finetune.plot_loss:
            plot_loss(cfg.train.output_dir)
    accelerator.wait_for_everyone()


def train_and_evaluate(cfg, module, tokenizer, train_data, eval_rows: list[dict], accelerator,
                       resume: str | None, collator, evaluate_at_end: bool = True,
                       evaluation: Evaluation | None = None, before: dict | None = None) -> dict:
    """Open output_dir; train and save (do_train); evaluate (do_eval, unless the recipe evaluates itself).
    `train_data`: encoded rows, a RowStream, or a step source of the recipe's own (rollouts). A recipe that
    evaluates otherwise than by losses over `eval_rows` (the rollout stages) passes its `evaluation`, and may
    pass its metrics `before` training to be reported beside those after (as eval_before_*)."""
    open_output_dir(cfg, accelerator)
    results, final = {}, None
    collator = collator or PadCollator(tokenizer.pad_token_id)
    if evaluation is None and eval_rows:
        evaluation = RowsEvaluation(on_device(module, accelerator.device), eval_rows, collator,
                                    cfg.train.per_device_eval_batch_size, accelerator,
                                    Precision(cfg.train, accelerator.device))
    if cfg.train.do_train:
        # before a resume loads its checkpoint the adapter is still the initial one (the same seeded SVD), so a
        # resumed run whose output_dir lost pissa_init (only the checkpoint copied) writes it again
        initial = Path(cfg.train.output_dir) / "pissa_init" / "adapter_config.json"
        if cfg.finetune.pissa_convert and accelerator.is_main_process and not (resume and initial.is_file()):
            save_pissa_init(module.model, cfg.train.output_dir)
        source = rows_source(train_data, cfg.train, collator, shuffles_rows(cfg), accelerator)
        trained, final = train(cfg, module, tokenizer, source, evaluation, accelerator, resume, before)
        results.update(trained)
        finish_training(cfg, module, tokenizer, results, accelerator)
    dtype = full_eval_dtype(cfg.train, accelerator.device)
    if dtype and (cfg.train.do_eval or cfg.train.do_predict):
        module.to(dtype)  # the whole model, for the evaluation and prediction below and in the recipe
        final = None  # the loop's last evaluation ran in the training precision
    if cfg.train.do_eval and evaluate_at_end and evaluation:
        # the loop's own evaluation of the final weights, when it made one (eval_strategy), is not repeated
        metrics = final or evaluation()
        metrics = {**metrics, **{k.replace("eval_", "eval_before_", 1): v for k, v in (before or {}).items()}}
        accelerator.print("[tuneforge] " + ", ".join(f"{k} = {v:.4f}" for k, v in metrics.items()))
        if accelerator.is_main_process:
            write_results(cfg.train.output_dir, "eval", metrics)
        results.update(metrics)
    return results


def compile_layers(model, backend: str = "inductor", mode: str | None = None) -> None:
    """torch.compile each decoder layer with `backend` and `mode` (they share one graph, compiled once, with dynamic
    sequence length).

    Layers rather than the whole model: the loss selects target positions with data-dependent shapes, which
    would break the graph, and layer-level graphs fuse what costs time on CPUs (norms, activations, casts).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(base.get_decoder(), "layers", None) if hasattr(base, "get_decoder") else None
    if layers is None:
        raise ModelError(f"torch_compile: {type(base).__name__} has no decoder `.layers` to compile; "
                         "set torch_compile: false")
    for layer in layers:
        layer.compile(dynamic=True, backend=backend, mode=None if mode == "default" else mode)


@contextmanager
def compile_settings(enabled: bool):
    """torch_compile's tracing settings for the run: Python floats in a layer (norm epsilons, LoRA's scaling) are
    constants of its graph. With dynamic shapes dynamo would trace them as symbols first, fail to turn them into
    tensors and trace the layer again: 1.6-4.4 s of a run's first step with a warm compile cache (benchmarks.md).
    Every layer shares one code object, whose graphs vary with grad mode, whether the layer's input needs a
    gradient, and which adapter is on (ppo's value, reference and reward passes): up to 9 measured, over dynamo's
    limit of 8, past which the training step's own graph would fall back to eager. Each graph serves a pass that
    repeats every step; decoding, which would add one per layer and cache state, runs eager (infer.eager_decoding)."""
    if not enabled:
        yield
        return
    with torch._dynamo.config.patch(specialize_float=True, recompile_limit=32):
        yield


def full_precision_twin(model):
    """A one-layer random model of the same architecture and attention code, unquantised. The packing check asks
    whether the attention code keeps packed examples apart; a quantised model would answer with rounding that
    depends on the whole batch (8-bit's outlier columns), which the check would take for examples mixing."""
    from copy import deepcopy

    from transformers import AutoModelForCausalLM

    config = deepcopy(model.config)
    config.num_hidden_layers = 1
    if getattr(config, "layer_types", None):  # per-layer attention kinds (sliding, full, ...): keep the first's
        config.layer_types = config.layer_types[:1]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return AutoModelForCausalLM.from_config(config, attn_implementation=model.config._attn_implementation)


@torch.no_grad()
def check_packing_support(model, autocast: torch.dtype | None = None) -> None:
    """Packed rows rely on the model turning restarting position_ids into block-diagonal attention. Check it on
    this model, under training's `autocast` dtype (which a model of mixed dtypes, e.g. upcast_layernorm's fp32 norms
    among bf16 layers, needs to run): the second of two packed sequences must give the same logits as when run
    alone, up to rounding.
    Rounding is told from mixing by what mixing does: the same two sequences run as one (the second attending to
    the first) move the logits by ~20 on SmolLM2, while bf16 products on a CPU without bf16 units, which round a
    different row count differently, move them by 0.56 (5e-5 in fp32, 0 in bf16 with bf16 units)."""
    vocab = model.config.vocab_size
    first, second = torch.arange(3, 9) % vocab, torch.arange(20, 25) % vocab
    device = next(model.parameters()).device
    packed = torch.cat([first, second])[None].to(device)
    positions = torch.cat([torch.arange(6), torch.arange(5)])[None].to(device)
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        # use_cache=False as in training: with a cache, transformers does not look for packed sequences
        together = model(input_ids=packed, position_ids=positions, use_cache=False).logits[0, 6:].float()
        alone = model(input_ids=second[None].to(device), use_cache=False).logits[0].float()
        if torch.allclose(together, alone, atol=1e-2 * max(1.0, alone.abs().max().item() / 100)):
            return
        mixed = model(input_ids=packed, use_cache=False).logits[0, 6:].float()
    if (together - alone).abs().max() > 0.1 * (mixed - alone).abs().max():
        raise ModelError(f"{type(model).__name__} lets packed examples attend to each other, so `packing` / "
                         "`neat_packing` would mix examples; set both to false for this model")


def reference_model(cfg, device: torch.device, needed: bool = True):
    """The frozen reference for dpo / kto / asft / the RL stages, on `device` (the accelerator's), or None when the
    policy itself serves (LoRA: adapters switched off, when that is the starting model) or no reference is
    `needed` (e.g. pref_loss orpo and simpo).
    The losses hold it outside their submodules, so that it is never trained or saved: their own .to() leaves it
    where it is, and on a GPU it must be placed here (the policy's batches are on the GPU)."""
    f = cfg.finetune
    if not needed:
        return None
    if f.ref_model:
        from dataclasses import replace

        args = replace(cfg.model, model_name_or_path=f.ref_model, adapter_name_or_path=f.ref_model_adapters,
                       quantization_bit=f.ref_model_quantization_bit)
    elif f.finetuning_type in ADAPTER_TYPES and not (f.pissa_init or continues_an_adapter(cfg.model, f)):
        return None  # the policy with its adapter switched off
    else:  # full / freeze, or an adapter whose off state is not the starting model: a frozen copy of that model
        args = cfg.model
        if f.finetuning_type in ADAPTER_TYPES:
            from accelerate import PartialState

            why = ("PiSSA left its residual in the base" if f.pissa_init else "it would drop the adapter this run "
                   "goes on training (`create_new_adapter: true` merges that one into the base: no copy)")
            PartialState().print("[tuneforge] note: the reference is a frozen copy of the starting model, not the "
                                 f"base with the adapter off: {why}")
    model = load_base_model(args, dtype=torch.bfloat16 if f.pure_bf16 else torch.float32,
                            compute_dtype=compute_dtype(cfg, device), cutoff_len=cfg.data.cutoff_len, training=True)
    model = attach_adapters(model, args, f, is_trainable=False).eval().requires_grad_(False)
    # a quantised one was placed as it loaded (load_base_model); bitsandbytes' 8-bit models refuse .to()
    return model if args.quantization_bit else model.to(device)
