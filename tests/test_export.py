"""`tuneforge export`: merged folders, shards, legacy .bin, GGUF round trips and the Ollama Modelfile, on a tiny
random Llama and a tiny Qwen2 / Qwen3 / Qwen2-MoE / Qwen3-MoE / Phi-3 built from configs (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_llama, build_tokenizer

from tuneforge.cli import main
from tuneforge.config import ConfigError, build_config, validate
from tuneforge.data.templates import get_template
from tuneforge.export import run_export
from tuneforge.export.gguf import ARCHS, GGUF_TYPES, write_gguf
from tuneforge.export.ollama import modelfile
from tuneforge.models.load import ModelError

PROMPTS = ["What is two plus two?", "Tell me about the weather today.", "Who are you?", "Translate hello into French.",
           "Write a short poem about the sea.", "The quick brown fox"]


def build_qwen(folder: Path, vocab_size: int, kind: str = "qwen2"):
    from transformers import (Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig,
                              Qwen2MoeForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

    torch.manual_seed(0)
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
                             "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM),
                             "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
                             "phi3": (Phi3Config, Phi3ForCausalLM)}[kind]
    # MoEs as Qwen3-30B-A3B and Qwen1.5-MoE-A2.7B are configured: every layer sparse, the chosen experts' weights
    # renormalised (Qwen3) or not (Qwen2, with a shared expert), experts as wide as transformers' defaults (its GGUF
    # loader does not read the expert widths back); Phi-4 (phi3: fused q/k/v and gate/up projections) keeps a head
    # of its own
    extra = {"qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=768, norm_topk_prob=True,
                               head_dim=16, tie_word_embeddings=False),
             "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                               tie_word_embeddings=False)}.get(kind, dict(tie_word_embeddings=kind != "phi3"))
    config = config_cls(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    model = model_cls(config)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def base_and_adapter(request, tmp_path_factory) -> tuple[str, str]:
    """A tiny base model and a LoRA adapter on all its linear layers with random (non-zero) A and B, so merging
    changes every projection."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp(f"export-{request.param}")
    tokenizer = build_tokenizer(root / "base")
    (build_llama if request.param == "llama" else build_qwen)(root / "base", len(tokenizer))
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(root / "base")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False)).save_pretrained(
        root / "adapter")
    return str(root / "base"), str(root / "adapter")


def export_cfg(base: str, adapter: str | None, out: Path, **extra):
    values = dict(model_name_or_path=base, template="chatml", export_dir=str(out))
    values.update(extra)
    if adapter:
        values["adapter_name_or_path"] = adapter
    cfg = build_config(values, source="test")
    validate(cfg, "export")
    return cfg


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def test_merged_folder_equals_adapter_on_base_and_loads_offline(base_and_adapter, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter = base_and_adapter
    out = run_export(export_cfg(base, adapter, tmp_path / "merged"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[0]}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"]
    template = get_template("chatml", tokenizer)
    # the exported chat template renders exactly the prompt tuneforge trained on
    assert ids == tokenizer.encode("".join(template.pieces(tokenizer, chat[1:], "Be brief.")),
                                   add_special_tokens=False)
    # (W + BA)x against Wx + B(Ax): the same float32 sums in another order; logits of size ~1 differ by ~1e-7
    torch.testing.assert_close(logits(merged, ids), logits(on_base, ids), atol=1e-5, rtol=0)
    assert merged.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_shards_by_export_size_and_legacy_format(base_and_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    base, adapter = base_and_adapter
    sharded = run_export(export_cfg(base, adapter, tmp_path / "sharded", export_size=0.0002))  # 200 kB shards
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").is_file()
    # a shard holds whole tensors: it reaches past 200 kB only when one tensor alone does
    assert all(s.stat().st_size <= 200_000 + 4 * 400 * 64 + 2_000 for s in shards)
    legacy = run_export(export_cfg(base, adapter, tmp_path / "legacy", export_size=0.0002,
                                   export_legacy_format=True))
    assert not list(legacy.glob("*.safetensors")) and (legacy / "pytorch_model.bin.index.json").is_file()
    ids = list(range(3, 20))
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(legacy), ids),
                               logits(AutoModelForCausalLM.from_pretrained(sharded), ids), atol=0, rtol=0)


def _prompt_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=True)["input_ids"]


def _rounded(model, dtype: torch.dtype):
    """A copy of `model` whose matrices went through `dtype` and back, except a MoE's routers (its `mlp.gate` and
    shared expert's gate), which GGUF keeps in float32."""
    import copy

    copied = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in copied.named_parameters():
            if param.dim() > 1 and not name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                param.copy_(param.to(dtype).float())
    return copied


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "phi3"])
def test_gguf_round_trip_every_type(kind, tmp_path):
    """Each GGUF type reads back with gguf's reader and loads in transformers' GGUF loader; f16/bf16 give the
    merged model's logits within half precision, q8_0/q4_0 agree on the next token for most prompt positions."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = build_tokenizer(tmp_path / "base")
    model = (build_llama if kind == "llama" else build_qwen)(tmp_path / "base", len(tokenizer),
                                                            **({} if kind == "llama" else {"kind": kind}))
    with torch.no_grad():  # random weights give near-flat logits; a sharper final norm gives a clear top token
        model.model.norm.weight.mul_(8)
    model.save_pretrained(tmp_path / "base")
    out = run_export(export_cfg(str(tmp_path / "base"), None, tmp_path / "out", export_gguf="f16"))
    assert (out / "Modelfile").read_text().startswith("FROM ./out.f16.gguf\nTEMPLATE")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    prompts = [_prompt_ids(tokenizer, p) for p in PROMPTS]
    reference = [logits(merged, ids) for ids in prompts]
    agreement = {}
    for choice in GGUF_TYPES:
        file = out / f"out.{choice}.gguf"
        if not file.is_file():
            write_gguf(out, file, choice, get_template("chatml", tokenizer))
        reader = GGUFReader(file)
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
        assert arch == ARCHS[kind] and len(reader.fields["tokenizer.ggml.tokens"].data) == len(tokenizer)
        assert "tokenizer.chat_template" in reader.fields
        read = {key: reader.fields[f"{arch}.{key}"].parts[-1][0] for key in ("rope.dimension_count",
                "expert_feed_forward_length", "attention.sliding_window") if f"{arch}.{key}" in reader.fields}
        # what transformers' loader does not read back, but llama.cpp does
        head_dim = getattr(merged.config, "head_dim", None) or 64 // 4
        assert read == {"rope.dimension_count": head_dim, **{"qwen3_moe": {"expert_feed_forward_length": 768},
                                                             "qwen2_moe": {"expert_feed_forward_length": 1408},
                                                             "phi3": {"attention.sliding_window": 0}}.get(kind, {})}
        loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=file.name, dtype=torch.float32).eval()
        if choice == "f16":  # the tokenizer is the same in every type; rebuilding it from the file is slow
            gguf_tokens = AutoTokenizer.from_pretrained(out, gguf_file=file.name)
            assert gguf_tokens.encode(tokenizer.decode(prompts[0]), add_special_tokens=False) == prompts[0]
        got = [logits(loaded, ids) for ids in prompts]
        if choice in ("f16", "bf16") and kind.endswith("_moe"):
            # a weight rounded to half precision can change which 2 of the 4 experts a token's router picks, and
            # with it that token's logits by far more than the rounding: the file must instead give the merged
            # model with its matrices rounded as the file stores them (the routers stay float32), up to float32
            # sums in another order (measured equal)
            rounded = _rounded(merged, {"f16": torch.float16, "bf16": torch.bfloat16}[choice])
            for ids, g in zip(prompts, got):
                torch.testing.assert_close(g, logits(rounded, ids), atol=1e-5, rtol=0)
        elif choice in ("f16", "bf16"):
            # weights rounded to 11 (f16) or 8 (bf16) significant bits: relative error 2^-11 / 2^-8 per weight,
            # growing through 2-4 layers to ~1% (f16) / ~5% (bf16) of the largest logit
            tolerance = {"f16": 0.01, "bf16": 0.05}[choice] * max(r.abs().max().item() for r in reference)
            for r, g in zip(reference, got):
                torch.testing.assert_close(g, r, atol=tolerance, rtol=0)
        # every weight within its block's rounding step (q4_0: 16 levels over [-max, max] of a 32-value block, so
        # an error of at most max/8; q8_0: max/128), which a wrong tensor name or row order would break
        step = {"f16": 2 ** -10, "bf16": 2 ** -7, "q8_0": 1 / 128, "q4_0": 1 / 8}[choice]
        weights = loaded.state_dict()
        for name, w in merged.state_dict().items():
            assert (w - weights[name]).abs().max() <= step * w.abs().max() + 1e-7, name
        top1 = torch.cat([(r.argmax(-1) == g.argmax(-1)).float() for r, g in zip(reference, got)])
        agreement[choice] = top1.mean().item()
    print(f"top-1 agreement with the merged model over {len(top1)} positions: {agreement}")
    # 8-bit blocks keep the top token nearly always; with 4-bit blocks a random tiny model (logits a few units
    # apart) flips about a third of its close calls (0.70 measured); smollm2's figure is in docs/deploy.md
    assert agreement["f16"] == 1.0 and agreement["q8_0"] >= 0.95 and agreement["q4_0"] >= 0.5


def test_export_refusals(base_and_adapter, tmp_path, capsys):
    base, adapter = base_and_adapter
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    code = main(["export", f"model_name_or_path={base}", f"adapter_name_or_path={adapter}", "template=chatml",
                 f"export_dir={tmp_path / 'taken'}"])
    assert code == 2 and "not empty" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="export_dir` is required"):
        validate(build_config({"model_name_or_path": base}), "export")
    with pytest.raises(ConfigError, match="export_gguf: q8_0"):
        validate(build_config({"model_name_or_path": base, "export_dir": "x", "export_quantization_bit": 4}),
                 "export")
    with pytest.raises(ConfigError, match="`export_gguf` must be one of f16, bf16, q8_0, q4_0; got 'q5_k'"):
        validate(build_config({"model_name_or_path": base, "export_dir": "x", "export_gguf": "q5_k"}), "export")
    with pytest.raises(ConfigError, match="`export_device` must be cpu or auto"):
        validate(build_config({"model_name_or_path": base, "export_dir": "x", "export_device": "gpu0"}), "export")


def test_gguf_refuses_other_architectures(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="supports llama, mistral, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe models; "
                                         "this one is gpt2"):
        write_gguf(tmp_path, tmp_path / "x.gguf", "f16")
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    moe = tmp_path / "moe"  # llama.cpp's qwen3moe always renormalises the chosen experts' weights
    Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=1, num_experts=2, moe_intermediate_size=16,
                                       norm_topk_prob=False)).save_pretrained(moe)
    with pytest.raises(ModelError, match="needs every layer sparse and norm_topk_prob true, as llama.cpp's qwen3moe"):
        write_gguf(moe, tmp_path / "y.gguf", "f16")
    from transformers import Phi3Config, Phi3ForCausalLM

    phi = tmp_path / "phi"  # Phi-3's 128k-context rope scaling: factor tensors in llama.cpp, not written here
    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.0] * 8, "short_factor": [1.0] * 8,
                "factor": 2.0, "original_max_position_embeddings": 4096}
    Phi3ForCausalLM(Phi3Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192,
                               original_max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                               rope_parameters=longrope)).save_pretrained(phi)
    with pytest.raises(ModelError, match="phi3 model with rope scaling `longrope` is not built"):
        write_gguf(phi, tmp_path / "z.gguf", "f16")


def test_reward_model_exports_with_its_value_head(base_and_adapter, tmp_path):
    from safetensors.torch import save_file

    base, adapter = base_and_adapter
    run = tmp_path / "rm-run"
    run.mkdir()
    for file in Path(adapter).iterdir():
        (run / file.name).write_bytes(file.read_bytes())
    save_file({"weight": torch.ones(1, 64), "bias": torch.zeros(1)}, str(run / "value_head.safetensors"))
    for name, extra in (("rm", {}), ("rm-gguf", {"export_gguf": "f16"})):  # a GGUF export keeps the head too
        out = run_export(export_cfg(base, str(run), tmp_path / name, **extra))
        assert (out / "value_head.safetensors").read_bytes() == (run / "value_head.safetensors").read_bytes()
        assert json.loads((out / "config.json").read_text())["architectures"][0].endswith("ForCausalLM")
    assert (tmp_path / "rm-gguf" / "rm-gguf.f16.gguf").is_file()


def test_modelfile_per_template(tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    llama3 = modelfile("m.gguf", get_template("llama3", tokenizer), tokenizer, "Be kind.")
    assert 'PARAMETER stop "<|eot_id|>"' in llama3 and 'SYSTEM """Be kind."""' in llama3
    assert "<|start_header_id|>user<|end_header_id|>\n\n{{ .Content }}<|eot_id|>" in llama3
    mistral = modelfile("m.gguf", get_template("mistral", tokenizer), tokenizer, None)
    assert "[INST] {{ if and (eq $i 0) $.System }}{{ $.System }}\n\n{{ end }}{{ .Content }}[/INST]" in mistral
    assert modelfile("m.gguf", get_template("qwen3", tokenizer), tokenizer, None) is None  # thinking: no faithful form
    assert modelfile("m.gguf", get_template(None, tokenizer), tokenizer, None) is None  # a Jinja template


def test_preserve_thinking_export_says_the_template_differs(base_and_adapter, tmp_path, capsys):
    """The merged folder keeps the model's own chat_template for a thinking template; with preserve_thinking the
    export says that template drops what training kept."""
    base, adapter = base_and_adapter
    run_export(export_cfg(base, adapter, tmp_path / "kept", template="qwen3", preserve_thinking=True))
    assert "drops earlier answers' thoughts; preserve_thinking applies to" in capsys.readouterr().out
