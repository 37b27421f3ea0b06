"""Every precision trains: fp32, bf16 and fp16 autocast, pure_bf16 weights; fp16 on a CPU without fp16 units runs
as bf16 autocast, and says so."""

import math

import pytest
import torch
from conftest import read_log, run_training, train_config

from tuneforge.config import build_config, notices
from tuneforge.machine import multiplies_fp16_natively
from tuneforge.train.loop import Precision, autocast_dtype


@pytest.mark.parametrize("kind, precision", [
    ("lora", {}), ("lora", {"bf16": True}), ("lora", {"fp16": True}), ("lora", {"pure_bf16": True}),
    ("full", {}), ("full", {"fp16": True}), ("full", {"pure_bf16": True}),
])
def test_each_precision_learns(tiny_model, alpaca_file, tmp_path, kind, precision):
    out = tmp_path / "out"
    lr = 2e-2 if kind == "lora" else 3e-3
    run_training(train_config(tiny_model, alpaca_file, out, finetuning_type=kind, learning_rate=lr, max_steps=20,
                              lr_scheduler_type="constant", **precision))
    losses = [r["loss"] for r in read_log(out)]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses), losses
    # the tiny model starts near ln(vocab) ~ 6 nats; these rates take it about 1 nat lower in 20 steps in every
    # precision. Means of 4 steps smooth the 4-example batches' noise (~0.4 nats step to step): 0.3 lower is learning
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses


def test_fp16_follows_the_cpu_fp16_units(monkeypatch):
    assert multiplies_fp16_natively({"avx512f", "amx_fp16"}) and multiplies_fp16_natively({"avx512_fp16"})
    assert not multiplies_fp16_natively({"avx512f", "avx512_bf16", "amx_bf16"})
    fp16 = build_config({"model_name_or_path": "m", "fp16": True}).train
    assert autocast_dtype(fp16, torch.device("cuda")) == torch.float16  # GPUs multiply fp16 natively
    monkeypatch.setattr("tuneforge.machine._cpuinfo", lambda: ("AMD EPYC", {"avx512f", "avx512_bf16"}))
    monkeypatch.setattr("tuneforge.config._cuda_available", lambda: False)
    precision = Precision(fp16, torch.device("cpu"))
    assert precision.dtype == torch.bfloat16 and not precision.scaler.is_enabled()  # bf16 needs no loss scaling
    [note] = [n for n in notices(build_config({"model_name_or_path": "m", "fp16": True})) if "fp16" in n]
    assert "trains in bf16 autocast" in note and "AMD EPYC" in note
    monkeypatch.setattr("tuneforge.machine._cpuinfo", lambda: ("Intel Xeon 6", {"amx_bf16", "amx_fp16"}))
    assert Precision(fp16, torch.device("cpu")).dtype == torch.float16


def test_bf16_on_a_cpu_without_bf16_units_says_what_it_costs(monkeypatch):
    from tuneforge.config import bf16_cost

    monkeypatch.setattr("tuneforge.config._cuda_available", lambda: False)
    fast = build_config({"model_name_or_path": "m", "bf16": True, "pure_bf16": True})
    monkeypatch.setattr("tuneforge.machine._cpuinfo", lambda: ("Intel Xeon Gold 6248", {"avx2", "avx512f"}))
    note = bf16_cost(fast)
    assert "Intel Xeon Gold 6248" in note and "about 2x slower" in note
    assert "`bf16: false`, `pure_bf16: false`" in note and "twice the memory" in note
    monkeypatch.setattr("tuneforge.machine._cpuinfo", lambda: ("Intel Core i5", {"avx2"}))
    note = bf16_cost(build_config({"model_name_or_path": "m", "fp16": True}))
    assert "about 35x slower" in note and "`fp16: false`" in note and "memory" not in note
    assert bf16_cost(build_config({"model_name_or_path": "m"})) is None  # fp32: nothing to say
    for flags in ({"avx512f", "avx512_bf16"}, {"amx_bf16"}, set()):  # bf16 units, or flags unknown (not Linux)
        monkeypatch.setattr("tuneforge.machine._cpuinfo", lambda: ("cpu", flags))
        assert bf16_cost(fast) is None
    monkeypatch.setattr("tuneforge.machine._cpuinfo", lambda: ("Intel Core i5", {"avx2"}))
    monkeypatch.setattr("tuneforge.config._cuda_available", lambda: True)
    assert bf16_cost(fast) is None  # GPUs have their own bf16 units


def test_upcast_layernorm_keeps_the_norms_small_updates_under_pure_bf16(tiny_model, alpaca_file, tmp_path):
    """In bf16 a norm weight near 1 moves only in steps of 2**-8: learning-rate-sized updates round away. With
    upcast_layernorm the norms are fp32 and keep them, as in LLaMA-Factory; everything else stays bf16. Packed, as
    the fast settings are: the packing check runs this model of mixed dtypes under autocast, as training does."""
    from safetensors.torch import load_file

    start = load_file(f"{tiny_model}/model.safetensors")
    norms = {}
    for upcast in (False, True):
        out = tmp_path / str(upcast)
        run_training(train_config(tiny_model, alpaca_file, out, finetuning_type="full", learning_rate=1e-4,
                                  max_steps=4, bf16=True, pure_bf16=True, upcast_layernorm=upcast, packing=True))
        saved = load_file(out / "model.safetensors")
        norms[upcast] = {k: v for k, v in saved.items() if "norm" in k}
        assert {v.dtype for k, v in saved.items() if "norm" not in k} == {torch.bfloat16}
        assert {v.dtype for v in norms[upcast].values()} == {torch.float32 if upcast else torch.bfloat16}
    # Adam moves each weight by about the rate per step: 4e-4 in all, a tenth of bf16's spacing at 1
    assert all(torch.equal(v.float(), start[k]) for k, v in norms[False].items())
    moved = torch.cat([(v - start[k]).abs().flatten() for k, v in norms[True].items()])
    assert 1e-5 < moved.median() < 1e-3


def test_upcast_settings_say_when_they_do_nothing_or_cannot_work(tiny_model, tmp_path):
    from tuneforge.config import problems

    def config(**values):
        return build_config(train_config(tiny_model, "x.jsonl", tmp_path, **values), source="test")

    assert any("weights are fp32 already" in n for n in notices(config(upcast_layernorm=True)))
    assert not any("upcast" in n for n in notices(config(upcast_layernorm=True, pure_bf16=True, bf16=True)))
    assert any("needs `bf16: true`" in p for p in problems(config(upcast_layernorm=True, pure_bf16=True)))
    assert any("head's logits in fp32" in n for n in notices(config(upcast_lmhead_output=True)))


@pytest.mark.parametrize("tf32", [True, False])
def test_tf32_holds_for_the_run_in_the_flags_inductor_reads(tf32):
    from tuneforge.train.common import float32_products

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with float32_products(tf32):
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (tf32, tf32)
        # inductor's GEMM autotuning asks this; torch raises instead once the newer fp32_precision API was mixed in
        assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with float32_products(None):
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
