"""Memory levers: selective activation checkpointing gives the gradients of no checkpointing while keeping fewer
bytes for backward; the bf16 copy of a converted model folder holds exactly the weights a bf16 load gave; large
freed tensors go back to the system; the checkpointing notices."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tuneforge.config import ConfigError, build_config, validate
from tuneforge.models.adapters import setup_trainable
from tuneforge.models.load import ModelError, load_base_model
from tuneforge.models.recompute import apply_gradient_checkpointing
from tuneforge.options import ModelArgs
from tuneforge.train.common import prepare_model
from tuneforge.train.loop import Precision
from tuneforge.train.losses import CausalLMLoss


def _config(tiny_model, tmp_path, **overrides):
    values = dict(model_name_or_path=tiny_model, stage="sft", do_train=True, dataset="unused",
                  output_dir=str(tmp_path / "out"), finetuning_type="lora", lora_target="all", flash_attn="eager")
    values.update(overrides)
    return build_config(values, source="test")


class _CountProjections(TorchDispatchMode):
    """Counts matrix products with a reduction of at least the tiny model's width (its projections and their
    gradients; not LoRA's rank-8 B)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and args[-1].shape[0] >= 64:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _gradients_and_saved_bytes(cfg):
    """LoRA gradients of one packed-style micro-batch, and the bytes of activations autograd kept for backward."""
    grads, saved, _ = _run(cfg)
    return grads, saved


def _run(cfg, as_training: bool = False):
    """_gradients_and_saved_bytes, and how many projection-sized matrix products backward ran. `as_training`: the
    model set up as a training run on a CPU sets it up (train.common.prepare_model: its norm, MLP and LoRA layers),
    else transformers' and PEFT's own layers."""
    torch.manual_seed(0)
    if as_training:
        model = prepare_model(cfg, SimpleNamespace(device=torch.device("cpu"), print=print))
    else:
        model = load_base_model(cfg.model, dtype=torch.bfloat16 if cfg.finetune.pure_bf16 else torch.float32)
        apply_gradient_checkpointing(model, cfg.train, cfg.model)
        model = setup_trainable(model, cfg.model, cfg.finetune)
    # checkpointing makes the embeddings' output require grad, and with it layer 0's input gradient: every run does,
    # so that each backward runs the same gradient products
    model.enable_input_require_grads()
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would leave A's gradient zero: make both matter
            torch.nn.init.normal_(param, std=0.02)
    module = CausalLMLoss(model).train()
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, model.config.vocab_size, (2, 48), generator=generator)
    position_ids = torch.cat([torch.arange(20), torch.arange(28)]).repeat(2, 1)  # two packed examples per row
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    precision = Precision(cfg.train, torch.device("cpu"))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), precision.autocast(model):
        loss, _ = module(input_ids=input_ids, labels=input_ids, position_ids=position_ids)
    with precision.lora_casts_off(model), _CountProjections() as products:  # lora_casts_off: as the training step
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return grads, sum(saved.values()), products.count


@pytest.mark.parametrize("bf16", [False, True])
def test_attention_scope_gives_the_same_gradients_and_keeps_less(tiny_model, tmp_path, bf16):
    plain, plain_bytes = _gradients_and_saved_bytes(_config(tiny_model, tmp_path, bf16=bf16))
    attention, attention_bytes = _gradients_and_saved_bytes(
        _config(tiny_model, tmp_path, bf16=bf16, gradient_checkpointing=True, gradient_checkpointing_scope="attention"))
    assert plain.keys() == attention.keys()
    for name in plain:
        # recomputation runs the same kernels on the same inputs in the same order: bit-identical, no tolerance
        assert torch.equal(plain[name], attention[name]), name
    # the tiny model's attention probabilities (2 x 4 heads x 48 x 48 per layer, kept once, in fp32) are a known
    # share of what a layer keeps; the scope must drop them in every one of the 4 layers, less what the recomputation
    # keeps as its inputs and plain backward does not: the additive mask (2 x 48 x 48 fp32, one for all layers) and,
    # under autocast, fp32 queries and keys (2 x 6 heads x 48 x 16 a layer) where plain keeps their bf16 casts
    kept_inputs = 2 * 48 * 48 * 4 + (4 * 2 * 6 * 48 * 16 * 2 if bf16 else 0)
    assert plain_bytes - attention_bytes >= 4 * 2 * 4 * 48 * 48 * 4 - kept_inputs


@pytest.mark.parametrize("bf16,finetuning_type,every", [(False, "lora", 1), (True, "lora", 2), (True, "full", 1)])
def test_selective_scope_gives_the_same_gradients_without_rerunning_projections(tiny_model, tmp_path, bf16,
                                                                                finetuning_type, every):
    def run(**overrides):
        return _run(_config(tiny_model, tmp_path, bf16=bf16, finetuning_type=finetuning_type, **overrides))

    plain, plain_bytes, plain_products = run()
    selective, selective_bytes, selective_products = run(
        gradient_checkpointing=True, gradient_checkpointing_scope="selective", gradient_checkpointing_every=every)
    _, _, layers_products = run(gradient_checkpointing=True, gradient_checkpointing_every=every)
    assert plain.keys() == selective.keys()
    for name in plain:
        # the kept projection outputs are the forward's own; the rest reruns the same kernels on the same inputs
        assert torch.equal(plain[name], selective[name]), name
    # backward runs only the projections' gradient products: none of the forward's is run again (whole-layer
    # checkpointing runs them again, which shows the count sees recomputation)
    assert selective_products == plain_products < layers_products
    # the projections' outputs are kept by torch's checkpoint storage, not through saved-tensor hooks, which see only
    # the checkpointed layers' inputs (with every 2, the layers left alone keep all they would)
    assert selective_bytes < plain_bytes * (3 / 4 if every == 2 else 1 / 2)


@pytest.fixture(scope="module")
def other_models(tmp_path_factory) -> dict[str, str]:
    """Tiny models whose layers differ from llama's where tuneforge replaces llama's: Qwen3 (norms on the queries
    and keys too), Gemma 2 (1 + weight norms, a GELU MLP, soft-capped attention)."""
    from conftest import build_tokenizer
    from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    folders = {}
    for name, config, kind in (("qwen3", Qwen3Config, Qwen3ForCausalLM), ("gemma2", Gemma2Config, Gemma2ForCausalLM)):
        folder = tmp_path_factory.mktemp(name)
        tokenizer = build_tokenizer(folder)
        torch.manual_seed(0)
        kind(config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)).save_pretrained(folder)
        folders[name] = str(folder)
    return folders


@pytest.mark.parametrize("architecture", ["llama", "qwen3", "gemma2"])
@pytest.mark.parametrize("precision", [{}, {"bf16": True}, {"bf16": True, "pure_bf16": True}])
def test_selective_scope_as_training_sets_it_up(tiny_model, other_models, tmp_path, architecture, precision):
    # training's own set-up (norms, MLPs and attention replaced where they compute llama's, the same bits; PEFT's
    # LoRA layers, as the fused LoRA function adds in place on the products selective checkpointing keeps): the
    # gradients and the products of no checkpointing on transformers' and PEFT's layers
    model = tiny_model if architecture == "llama" else other_models[architecture]
    plain, _, plain_products = _run(_config(model, tmp_path, **precision))
    selective, _, selective_products = _run(_config(
        model, tmp_path, **precision, gradient_checkpointing=True, gradient_checkpointing_scope="selective"),
        as_training=True)
    assert plain.keys() == selective.keys()
    for name in plain:
        assert torch.equal(plain[name], selective[name]), name
    assert selective_products == plain_products


def test_selective_policy_names_itself_to_the_compile_cache(monkeypatch):
    # torch_compile reuses its compiled graphs across runs only when the checkpoint policy carries a cache_hash;
    # the hash must follow the policy, or a changed policy would load graphs compiled for the old one
    from tuneforge.models import recompute

    first = recompute._selective_context().cache_hash
    assert first == recompute._selective_context().cache_hash and len(first) == 64
    monkeypatch.setattr(recompute, "_CHEAP_WIDENING", 4)
    assert recompute._selective_context().cache_hash != first


def test_every_other_layer_keeps_less_than_no_checkpointing(tiny_model, tmp_path):
    plain, plain_bytes = _gradients_and_saved_bytes(_config(tiny_model, tmp_path))
    half, half_bytes = _gradients_and_saved_bytes(
        _config(tiny_model, tmp_path, gradient_checkpointing=True, gradient_checkpointing_every=2))
    full, full_bytes = _gradients_and_saved_bytes(_config(tiny_model, tmp_path, gradient_checkpointing=True))
    assert full_bytes < half_bytes < plain_bytes
    for name in plain:
        assert torch.equal(plain[name], half[name]) and torch.equal(plain[name], full[name]), name  # as above


def test_attention_scope_refuses_other_attention_kinds(tiny_model, tmp_path):
    cfg = _config(tiny_model, tmp_path, gradient_checkpointing=True, gradient_checkpointing_scope="attention")
    cfg.model.flash_attn = "sdpa"
    with pytest.raises(ModelError, match="flash_attn: eager"):
        _gradients_and_saved_bytes(cfg)


def test_every_needs_layer_scope(tiny_model, tmp_path):
    cfg = _config(tiny_model, tmp_path, gradient_checkpointing=True, gradient_checkpointing_scope="attention",
                  gradient_checkpointing_every=2)
    with pytest.raises(ConfigError, match="gradient_checkpointing_every"):
        validate(cfg, "train")


def test_bf16_copy_of_a_converted_folder_holds_the_weights_a_bf16_load_gives(tiny_model):
    import shutil

    from tuneforge.models.load import cache_root

    converted = cache_root() / "models" / "tiny-converted"  # as _converted_gguf names its folders
    shutil.copytree(tiny_model, converted)
    direct = load_base_model(ModelArgs(model_name_or_path=tiny_model), dtype=torch.bfloat16).state_dict()
    via_copy = load_base_model(ModelArgs(model_name_or_path=str(converted)), dtype=torch.bfloat16)
    assert (converted.parent / "tiny-converted-bf16" / "config.json").is_file()  # the copy was made and used
    assert via_copy.name_or_path.endswith("-bf16")
    state = via_copy.state_dict()
    assert state.keys() == direct.keys()
    for name in direct:
        assert state[name].dtype == torch.bfloat16 and torch.equal(state[name], direct[name]), name  # bit for bit
    fp32 = load_base_model(ModelArgs(model_name_or_path=str(converted)), dtype=torch.float32)
    assert not fp32.name_or_path.endswith("-bf16")  # fp32 loads keep reading the fp32 folder


ALLOCATOR_PROBE = """
import sys, torch
from tuneforge.machine import map_large_allocations
if sys.argv[1] == "on":
    map_large_allocations()
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
first = torch.ones(20 << 18)  # 20 MB freed: glibc's own policy now serves blocks up to 20 MB from the heap
del first
hole = torch.ones(6 << 18)  # 6 MB
keep = torch.ones(1 << 10)  # a small block after it, so freeing the 6 MB leaves a hole rather than a heap top
before = rss()
del hole
print(before - rss())
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file() or sys.platform != "linux", reason="glibc, /proc")
def test_large_tensors_go_back_to_the_system_when_freed():
    import subprocess

    freed = {mode: int(subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE, mode], capture_output=True,
                                      text=True, check=True).stdout.split()[-1]) for mode in ("off", "on")}
    # glibc's default keeps the freed 6 MB resident; with the 4 MB threshold they go back to the system at once
    assert freed["off"] < 3 and freed["on"] >= 5, freed


def test_notices_for_checkpointing_choices(tiny_model, tmp_path):
    from tuneforge.config import notices

    unused = notices(_config(tiny_model, tmp_path, gradient_checkpointing_scope="attention"))
    assert any("no effect without `gradient_checkpointing: true`" in line for line in unused)
    whole = notices(_config(tiny_model, tmp_path, gradient_checkpointing=True))
    assert any("gradient_checkpointing_scope: attention" in line for line in whole)
    assert not any("gradient_checkpointing" in line for line in notices(_config(tiny_model, tmp_path)))
