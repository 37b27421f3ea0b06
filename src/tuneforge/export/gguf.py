"""Write a merged Hugging Face folder as one GGUF file (llama.cpp, Ollama, LM Studio) in pure Python with the `gguf`
package: its tensor-name map and quantisers, our own hyper-parameter and tokenizer metadata. Metadata key names and
llama's Q/K row order follow llama.cpp's convert_hf_to_gguf.py; no llama.cpp binary is built or needed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..models.load import ModelError

GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_0")
# transformers model_type -> llama.cpp architecture. Mistral (dense) is written as llama, as llama.cpp does.
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen2_moe": "qwen2moe",
         "qwen3_moe": "qwen3moe", "phi3": "phi3"}
RENORMALISED = {"qwen2moe": False, "qwen3moe": True}  # whether llama.cpp renormalises the chosen experts' weights
EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _qtype(name: str):
    from gguf import GGMLQuantizationType as Q, LlamaFileType as F

    return {"f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16), "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0),
            "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0)}[name]


def _permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary embedding pairs neighbouring rows of each head; Hugging Face pairs row i with i + d/2.
    Reorder Q and K rows so llama.cpp rotates the same pairs (transformers' GGUF loader undoes exactly this)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _rope(writer, config) -> None:
    """RoPE's base and, where llama.cpp has it, its scaling (linear; YaRN with the pretrained length), under the
    metadata names llama.cpp's convert_hf_to_gguf.py writes."""
    from gguf import RopeScalingType

    rope = getattr(config, "rope_parameters", None) or {}
    kind = rope.get("rope_type", "default")
    if kind not in ("default", "linear", "yarn"):
        raise ModelError(f"GGUF export of rope scaling `{kind}` is not built (llama.cpp reads linear and yarn); "
                         "export without export_gguf, or train with rope_scaling linear or yarn")
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    if kind != "default":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR if kind == "linear" else RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if kind == "yarn":
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))


def _hyper_parameters(writer, config, arch: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    _rope(writer, config)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))  # Phi-4-mini: 0.75
    writer.add_vocab_size(config.vocab_size)
    if arch in ("qwen3", "qwen3moe") or head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "phi3":  # llama.cpp tells Phi-4 (no sliding window) from Phi-3 by a window of 0
        writer.add_rope_scaling_orig_ctx_len(config.original_max_position_embeddings)
        writer.add_sliding_window(config.sliding_window or 0)
    if arch in RENORMALISED:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if arch == "qwen2moe":
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)


def _check_moe(config, arch: str) -> None:
    """llama.cpp's qwen2moe / qwen3moe route every layer through the experts, and renormalise the chosen experts'
    weights or not as RENORMALISED says, whatever the model's config."""
    want = RENORMALISED[arch]
    if config.norm_topk_prob != want or config.mlp_only_layers or config.decoder_sparse_step != 1:
        raise ModelError(f"GGUF export of {config.model_type} needs every layer sparse and norm_topk_prob "
                         f"{str(want).lower()}, as llama.cpp's {arch} computes it (this model: norm_topk_prob "
                         f"{config.norm_topk_prob}, mlp_only_layers {config.mlp_only_layers}, decoder_sparse_step "
                         f"{config.decoder_sparse_step}); export without export_gguf")


def _pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for how text is split before BPE, read from the tokenizer's own pre-tokenizer."""
    pre = json.dumps(tokenizer_json.get("pre_tokenizer"))
    if '"individual_digits": true' in pre and "ByteLevel" in pre:
        return "smollm"
    if "\\\\p{N}{1,3}" in pre:
        return "llama-bpe"
    if "\\\\p{N}|" in pre or "\\\\p{N}\"" in pre:
        return "qwen2"
    if '"type": "ByteLevel"' in pre and '"use_regex": true' in pre:
        return "gpt2"
    return "default"


def _tokenizer(writer, folder: Path, vocab_size: int, template) -> None:
    """Vocabulary, merges, token types, special ids and chat template of a byte-level BPE tokenizer."""
    from gguf import TokenType
    from transformers import AutoTokenizer, GenerationConfig

    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")) \
        if (folder / "tokenizer.json").is_file() else {}
    if data.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(data.get("decoder")):
        raise ModelError("GGUF export handles byte-level BPE tokenizers (Llama 3, SmolLM2, Qwen2/3); this model's "
                         "tokenizer is of another kind")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):  # the embedding matrix may have more rows than the tokenizer has tokens
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(TokenType.UNUSED if i not in by_id else
                     (TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED) if i in added
                     else TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(data))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eos = GenerationConfig.from_pretrained(folder).eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id, eos),
                          (writer.add_unk_token_id, tokenizer.unk_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            add(token_id)
    # llama.cpp adds BOS itself when told to; templates that open with {bos} expect it there
    writer.add_add_bos_token(bool(getattr(template, "prefix", "").startswith("{bos}")))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _tensors(folder: Path):
    from safetensors import safe_open

    for file in sorted(folder.glob("model*.safetensors")):  # the model's shards, not a value head beside them
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _experts_stacked(tensors, n_experts: int):
    """A MoE's per-expert matrices (as save_pretrained writes them) as one [experts, out, in] tensor per layer and
    projection, under the name llama.cpp's converter gives the stack; other tensors pass through."""
    pending: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, weight in tensors:
        match = EXPERT.match(name)
        if match is None:
            yield name, weight
            continue
        layer, expert, projection = match.groups()
        group = pending.setdefault((layer, projection), {})
        group[int(expert)] = weight
        if len(group) == n_experts:
            del pending[(layer, projection)]
            stacked = torch.stack([group[e] for e in range(n_experts)])
            yield f"model.layers.{layer}.mlp.experts.{projection}.weight", stacked
    if pending:
        raise ModelError(f"GGUF export: the experts of {sorted(pending)[:3]} are incomplete in the merged model")


def _encode(weight: torch.Tensor, choice: str, target: str):
    """(data, type) for the writer: 1-D tensors (norms, biases) stay F32 as llama.cpp keeps them; 2-D
    weights take the chosen type, or F16 when a row does not split into the quantiser's 32-value blocks. With q4_0
    the embedding and output matrices are kept at q8_0, as llama.cpp's quantiser keeps them above 4 bits: they
    decide every next token (on SmolLM2, top-1 agreement 0.56 -> 0.58 and 0/8 -> 2/8 same greedy answers)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, quants

    data = weight.float().numpy()
    if data.ndim == 1 or ".ffn_gate_inp." in target:  # a MoE's router stays F32, as llama.cpp keeps it
        return data, Q.F32
    qtype = _qtype(choice)[0]
    if qtype == Q.Q4_0 and target in ("token_embd.weight", "output.weight"):
        qtype = Q.Q8_0
    if data.shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        qtype = Q.F16
    return quants.quantize(data, qtype), qtype


def write_gguf(folder: Path, out: Path, choice: str, template=None) -> Path:
    """`folder` (a merged causal LM) as one GGUF file `out`, weights in `choice` (f16, bf16, q8_0 or q4_0)."""
    import gguf
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    arch = ARCHS.get(config.model_type)
    if arch is None:
        raise ModelError(f"GGUF export supports {', '.join(sorted(ARCHS))} models; this one is "
                         f"{config.model_type} (export_gguf needs one of those, or leave it unset)")
    if arch in RENORMALISED:
        _check_moe(config, arch)
    kind = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if arch == "phi3" and kind != "default":  # llama.cpp's phi3 takes long contexts as per-dimension factor tensors
        raise ModelError(f"GGUF export of a phi3 model with rope scaling `{kind}` is not built; export without "
                         "export_gguf")
    writer = gguf.GGUFWriter(out, arch)
    writer.add_name(folder.name)
    writer.add_file_type(_qtype(choice)[1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _hyper_parameters(writer, config, arch)
    _tokenizer(writer, folder, config.vocab_size, template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    tensors = _tensors(folder)
    for name, weight in _experts_stacked(tensors, config.num_experts) if arch in RENORMALISED else tensors:
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ModelError(f"GGUF export does not know where tensor {name} goes in a {arch} model")
        if target.endswith("ffn_gate_inp_shexp.weight"):  # llama.cpp holds the shared expert's gate as a vector
            weight = weight.reshape(-1)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            weight = _permute_rows(weight, heads)
        data, qtype = _encode(weight, choice, target)
        writer.add_tensor(target, data, raw_dtype=qtype)  # quantised data is bytes; the writer infers the shape
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
