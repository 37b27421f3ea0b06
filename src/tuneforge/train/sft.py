"""Recipe for the language-model stages `pt` and `sft` (they differ only in how data is encoded).

Reads top to bottom: data (validated before anything is written), model, what trains, loop, save, eval, predict.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import torch

from ..config import save_config
from ..data import prepare_lm_data
from ..data.collate import PadCollator
from ..infer.engine import Engine
from ..models.adapters import attach_adapters, describe_trainable, setup_trainable
from ..models.load import load_base_model, load_tokenizer
from . import checkpoint as ckpt
from .logging import plot_loss, write_results
from .loop import Precision, evaluate, train
from .metrics import generation_scores


def make_accelerator(t):
    """Devices and processes come from accelerate; precision is ours (see loop.py), so it stays what the YAML says
    and several runs can share one Python process."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # accelerate only treats a torchrun launch without GPUs as distributed (gloo) when told to use the CPU
    cpu_ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(mixed_precision="no", cpu=cpu_ddp,
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=t.ddp_timeout))])


def run(cfg) -> dict:
    from accelerate.utils import set_seed

    t, f = cfg.train, cfg.finetune
    set_seed(t.seed)
    accelerator = make_accelerator(t)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_lm_data(cfg, tokenizer, need_train=t.do_train)
    resume = ckpt.check_output_dir(t.output_dir, t.overwrite_output_dir, t.resume_from_checkpoint) if t.do_train \
        else None
    accelerator.wait_for_everyone()  # every process has decided before the main one clears old checkpoints
    model = load_base_model(cfg.model, dtype=torch.bfloat16 if f.pure_bf16 else torch.float32)
    output = Path(t.output_dir)
    results = {}
    if t.do_train:
        if t.gradient_checkpointing and not cfg.model.disable_gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.23's name
            if enable:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        model = setup_trainable(model, cfg.model, f)
        accelerator.print(f"[tuneforge] {describe_trainable(model)}")
        accelerator.print(f"[tuneforge] {len(data.train)} training and {len(data.eval)} evaluation examples")
        if accelerator.is_main_process:
            output.mkdir(parents=True, exist_ok=True)
            if t.overwrite_output_dir and not t.resume_from_checkpoint:
                ckpt.clear_old_checkpoints(t.output_dir)
            save_config(cfg, output / "tuneforge_config.yaml")
        results.update(train(cfg, model, tokenizer, data.train, data.eval, accelerator, resume))
        model = accelerator.unwrap_model(model)
        if accelerator.is_main_process:
            ckpt.save_model(model, tokenizer, output)
            write_results(t.output_dir, "train", results)
            if f.plot_loss:
                plot_loss(t.output_dir)
        accelerator.wait_for_everyone()
    else:
        model = attach_adapters(model, cfg.model, f, is_trainable=False)
        if accelerator.is_main_process:
            output.mkdir(parents=True, exist_ok=True)
    model = model.to(accelerator.device)
    if t.do_eval:
        metrics = evaluate(model, data.eval, PadCollator(tokenizer.pad_token_id), t.per_device_eval_batch_size,
                           accelerator, f.compute_accuracy, Precision(t, accelerator.device))
        accelerator.print("[tuneforge] " + ", ".join(f"{k} = {v:.4f}" for k, v in metrics.items()))
        if accelerator.is_main_process:
            write_results(t.output_dir, "eval", metrics)
        results.update(metrics)
    if t.do_predict and accelerator.is_main_process:
        results.update(predict(cfg, model, tokenizer, data))
    return results


def predict(cfg, model, tokenizer, data) -> dict:
    """generated_predictions.jsonl (prompt, predict, label) and BLEU-4 / ROUGE-L on the evaluation examples."""
    engine = Engine(cfg, model=model, tokenizer=tokenizer)
    prompts = [engine.prompt_ids(e.messages[:-1], e.system) for e in data.eval_examples]
    labels = [e.messages[-1]["content"] for e in data.eval_examples]
    answers = engine.generate(prompts, batch_size=cfg.train.per_device_eval_batch_size)
    path = Path(cfg.train.output_dir) / "generated_predictions.jsonl"
    with path.open("w", encoding="utf-8") as out:
        for prompt, answer, label in zip(prompts, answers, labels):
            out.write(json.dumps({"prompt": tokenizer.decode(prompt), "predict": answer, "label": label},
                                 ensure_ascii=False) + "\n")
    scores = generation_scores(answers, labels)
    write_results(cfg.train.output_dir, "predict", scores)
    print("[tuneforge] " + ", ".join(f"{k} = {v:.2f}" for k, v in scores.items()) + f"; predictions in {path}")
    return scores
