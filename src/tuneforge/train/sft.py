"""Recipe for the language-model stages `pt` and `sft` (they differ only in how data is encoded).

Reads top to bottom: data (validated before anything is written), model, what trains, loop, save, eval, predict.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data import prepare_lm_data
from ..data.collate import PadCollator
from ..infer.engine import Engine
from ..models.adapters import folded
from .asft import AnchoredLMLoss
from .common import guard_output_dir, prepare_model, reference_model, start, train_and_evaluate
from .logging import write_results
from .losses import CausalLMLoss, head_chunk_size
from .moe import RouterBalance
from .stages import unused_reference
from ..user_code import load_user_function
from .metrics import generation_scores


def _count(rows) -> str:
    return (" + ".join(f"{len(v)} ({k})" for k, v in rows.items()) or "0") if isinstance(rows, dict) else str(len(rows))


def check(cfg) -> list[str]:
    """Problems with the pt / sft options."""
    d, out = cfg.data, []
    if cfg.finetune.stage == "pt":
        if d.neat_packing:
            out.append("`neat_packing` is built for sft; stage pt concatenates documents (set `neat_packing: false`)")
        if d.packing is False:
            out.append("stage pt always concatenates and chunks text to cutoff_len; `packing: false` is not built")
    elif cfg.train.do_predict and not cfg.train.predict_with_generate:
        out.append("`do_predict` needs `predict_with_generate: true` (predictions are generated text)")
    elif cfg.train.predict_metric and not cfg.train.do_predict:
        out.append("`predict_metric` scores generated answers: it needs `do_predict: true`")
    weighted = [key for key in ("use_dft_loss", "use_eaft_loss", "use_asft_loss") if getattr(cfg.finetune, key)]
    if cfg.train.label_smoothing_factor and weighted:
        out.append(f"`label_smoothing_factor` with `{weighted[0]}` is not built (transformers, too, applies only "
                   "one of them); set one")
    if not cfg.finetune.use_asft_loss:
        out += unused_reference(cfg, f"stage {cfg.finetune.stage} uses a reference model only with `use_asft_loss`")
    return out


def run(cfg) -> dict:
    t, f = cfg.train, cfg.finetune
    # loaded first, so that a broken metric fails before training starts
    user_metric = load_user_function(t.predict_metric, "predict_metric") if t.predict_metric else None
    accelerator, tokenizer = start(cfg)
    data = prepare_lm_data(cfg, tokenizer, need_train=t.do_train)
    resume = guard_output_dir(cfg, accelerator)
    model = prepare_model(cfg, accelerator, packed=data.packed)
    if cfg.data.streaming:
        trained = f"training rows streamed from `{cfg.data.dataset}` (buffer of {cfg.data.buffer_size} examples)"
    else:
        packed = f" (packed into {len(data.train)} rows)" if len(data.train) != data.num_train_examples else ""
        trained = f"{data.num_train_examples} training examples{packed}"
    accelerator.print(f"[tuneforge] {trained}, {_count(data.eval)} evaluation examples")
    module = CausalLMLoss(model, head_chunk_size(t), compute_accuracy=f.compute_accuracy, dft=f.use_dft_loss,
                          eaft_alpha=f.eaft_alpha if f.use_eaft_loss else None,
                          router_balance=RouterBalance(model, f.moe_aux_loss_coef) if f.moe_aux_loss_coef else None,
                          label_smoothing=t.label_smoothing_factor)
    if f.use_asft_loss and t.do_train:
        module = AnchoredLMLoss(module, f.asft_alpha, reference_model(cfg, accelerator.device))
    results = train_and_evaluate(cfg, module, tokenizer, data.train, data.eval, accelerator, resume,
                                 PadCollator(tokenizer.pad_token_id))
    if t.do_predict and accelerator.is_main_process:
        if not t.do_train:  # an adapter only read, as chat reads it (after training, predict runs what was trained)
            model = folded(model, quantized=bool(cfg.model.quantization_bit))
        results.update(predict(cfg, model.to(accelerator.device), tokenizer, data, user_metric))
    return results


def predict(cfg, model, tokenizer, data, user_metric=None) -> dict:
    """generated_predictions.jsonl (prompt, predict, label) and BLEU-4 / ROUGE-L / exact match (+ the user's
    metric) on the evaluation examples."""
    engine = Engine(cfg, model=model, tokenizer=tokenizer)
    prompts = [engine.prompt_ids(e.messages[:-1], e.system) for e in data.eval_examples]
    labels = [e.messages[-1]["content"] for e in data.eval_examples]
    answers = engine.generate(prompts, batch_size=cfg.train.per_device_eval_batch_size)
    path = Path(cfg.train.output_dir) / "generated_predictions.jsonl"
    with path.open("w", encoding="utf-8") as out:
        for prompt, answer, label in zip(prompts, answers, labels):
            out.write(json.dumps({"prompt": tokenizer.decode(prompt), "predict": answer, "label": label},
                                 ensure_ascii=False) + "\n")
    scores = generation_scores(answers, labels, user_metric)
    write_results(cfg.train.output_dir, "predict", scores)
    print("[tuneforge] " + ", ".join(f"{k} = {v:.2f}" for k, v in scores.items()) + f"; predictions in {path}")
    return scores
