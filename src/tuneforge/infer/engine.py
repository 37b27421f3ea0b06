"""Inference: load a model (plus adapters) with its template, generate in batches or stream tokens."""

from __future__ import annotations

from pathlib import Path
from threading import Thread

import torch
import yaml
from transformers import LogitsProcessorList

from ..data.collate import left_pad
from ..data.encode import encode_prompt
from ..data.templates import data_template, stop_token_ids
from ..models.adapters import attach_adapters, folded
from ..models.load import inference_dtype, load_base_model, load_tokenizer
from ..train.checkpoint import RUN_CONFIG
from .sampling import Sample


def generation_kwargs(gen, stop_ids: list[int], pad_id: int) -> dict:
    """transformers' generate arguments for the `generate` settings. The sampling settings are always given, so
    that none of the model's generation_config leaks in."""
    kwargs = dict(max_new_tokens=gen.max_new_tokens, num_beams=gen.num_beams, do_sample=gen.do_sample,
                  repetition_penalty=gen.repetition_penalty, length_penalty=gen.length_penalty,
                  eos_token_id=stop_ids, pad_token_id=pad_id, temperature=None, top_p=None, top_k=None)
    if gen.do_sample and gen.num_beams == 1:  # drawn by Sample, with one random number per row (sampling.py)
        kwargs.update(do_sample=False, logits_processor=LogitsProcessorList([Sample(gen.temperature, gen.top_k,
                                                                                    gen.top_p)]))
    elif gen.do_sample:  # beam sampling stays transformers' own
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
    return kwargs


def settings_from_adapter(cfg) -> None:
    """Settings the adapter was trained with (its tuneforge_config.yaml) that inference must share: the `template`
    when none is given, `split_special_tokens`, and `rope_scaling` with the cutoff_len it scaled positions for
    (models/rope.py)."""
    if not cfg.model.adapter_name_or_path:
        return
    saved = Path(cfg.model.adapter_name_or_path.split(",")[-1].strip()) / RUN_CONFIG
    values = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}) if saved.is_file() else {}
    if not cfg.data.template:
        cfg.data.template = values.get("template")
    if values.get("split_special_tokens"):
        cfg.model.split_special_tokens = True
    if not cfg.model.rope_scaling and values.get("rope_scaling"):
        cfg.model.rope_scaling, cfg.data.cutoff_len = values["rope_scaling"], values.get("cutoff_len", 0)


def eager_decoding():
    """Decode with the layers' eager code even where torch_compile wrapped them (training's rollouts, do_predict):
    the KV cache's state and each layer's index are guards of a compiled graph, so decoding would recompile every
    layer until dynamo's recompile limit, after which training's own forward would run uncompiled too."""
    return torch.compiler.set_stance("force_eager")


class Engine:
    def __init__(self, cfg, model=None, tokenizer=None):
        self.cfg = cfg
        settings_from_adapter(cfg)
        self.tokenizer = tokenizer or load_tokenizer(cfg.model)
        if model is None:
            dtype = inference_dtype(cfg.model)
            model = load_base_model(cfg.model, dtype=dtype, compute_dtype=dtype,  # quantised with quantization_bit
                                    cutoff_len=cfg.data.cutoff_len)
            model = folded(attach_adapters(model, cfg.model, cfg.finetune, is_trainable=False),
                           quantized=bool(cfg.model.quantization_bit))
        self.model = model.eval()
        self.template = data_template(cfg.data, self.tokenizer)
        self.stop_ids = stop_token_ids(self.template, self.tokenizer)

    def prompt_ids(self, messages: list[dict], system: str | None = None) -> list[int]:
        return encode_prompt(messages, self.tokenizer, self.template, system or self.cfg.data.default_system)

    def _kwargs(self) -> dict:
        return generation_kwargs(self.cfg.generate, self.stop_ids, self.tokenizer.pad_token_id)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], batch_size: int = 8) -> list[str]:
        """Answers for token-id prompts, left-padded in batches."""
        device = next(self.model.parameters()).device
        answers = []
        for start in range(0, len(prompts), batch_size):
            ids, mask, _ = left_pad(prompts[start: start + batch_size], self.tokenizer.pad_token_id)
            with eager_decoding():
                out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **self._kwargs())
            answers += [self._decode(row[ids.shape[1]:]) for row in out]
        return answers

    def _decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=self.cfg.generate.skip_special_tokens).strip()

    def chat(self, messages: list[dict], system: str | None = None) -> str:
        return self.generate([self.prompt_ids(messages, system)])[0]

    def stream(self, messages: list[dict], system: str | None = None):
        """Yield pieces of the answer as they are generated."""
        from transformers import TextIteratorStreamer

        device = next(self.model.parameters()).device
        ids = torch.tensor([self.prompt_ids(messages, system)], device=device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True,
                                        skip_special_tokens=self.cfg.generate.skip_special_tokens)
        worker = Thread(target=self.model.generate, kwargs=dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                               streamer=streamer, **self._kwargs()))
        worker.start()
        yield from streamer
        worker.join()
