"""Recipe for stage `rm`: a reward model, a scalar value head on a causal LM's last non-padding token, trained
with the pairwise loss -log sigmoid(r_chosen - r_rejected). The value head always trains and is saved beside the
model or adapter as value_head.safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data import prepare_preference_data
from ..data.collate import PairCollator
from .checkpoint import load_extra_weights
from .common import guard_output_dir, on_device, prepare_model, start, train_and_evaluate
from .losses import pairwise_reward_loss
from .stages import refuse_packing, unused_reference

VALUE_HEAD = "value_head.safetensors"


class ValueHead(torch.nn.Module):
    """A scalar head on the last hidden state, starting near 0 (also the PPO policy's value head). Its weights are
    named as TRL's value-head models name theirs (`v_head.summary.weight`, `.bias`), so value_head.safetensors is
    the file LLaMA-Factory's rm writes and its ppo reads, both ways; files of tuneforge before 2026-11-25 (`weight`,
    `bias`) still load."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.v_head = torch.nn.ModuleDict({"summary": torch.nn.Linear(hidden_size, 1)})
        torch.nn.init.normal_(self.weight, std=1 / (hidden_size + 1))
        torch.nn.init.zeros_(self.v_head.summary.bias)
        self.register_load_state_dict_pre_hook(_older_names)

    @property
    def weight(self) -> torch.Tensor:
        return self.v_head.summary.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.v_head.summary(hidden)


def _older_names(module, state_dict, prefix, *_) -> None:
    for name in ("weight", "bias"):
        if prefix + name in state_dict:
            state_dict[f"{prefix}v_head.summary.{name}"] = state_dict.pop(prefix + name)


class RewardLoss(torch.nn.Module):
    unit = "pair"

    def __init__(self, model):
        super().__init__()
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.decoder = [base.get_decoder()]  # a list: already a part of self.model
        head = base.get_output_embeddings()
        if head is not None and head.weight is not base.get_input_embeddings().weight:
            head.requires_grad_(False)  # unused by a reward model; DDP must not wait for its gradient
        self.value_head = ValueHead(base.config.hidden_size)
        self.extra = {VALUE_HEAD: self.value_head}

    @staticmethod
    def units(batch: dict) -> torch.Tensor:
        return torch.tensor(batch["input_ids"].shape[0] // 2)

    def scores(self, input_ids, attention_mask) -> torch.Tensor:
        """One reward per row, read at its last non-padding token (rows are right-padded)."""
        hidden = self.decoder[0](input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        last = attention_mask.sum(1) - 1
        return self.value_head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last]).squeeze(-1).float()

    def forward(self, input_ids, labels, attention_mask):
        chosen, rejected = self.scores(input_ids, attention_mask).chunk(2)
        losses = pairwise_reward_loss(chosen, rejected)
        metrics = {"accuracy": (chosen > rejected).float().sum(), "margin": (chosen - rejected).detach().sum(),
                   "chosen_reward": chosen.detach().sum(), "rejected_reward": rejected.detach().sum()}
        return losses.sum(), metrics


def check(cfg) -> list[str]:
    return refuse_packing(cfg) + unused_reference(cfg, "stage rm trains without a reference model")


def _head_folder(cfg) -> str:
    """Where a reward model's value head is: beside its last adapter, else beside the model."""
    m = cfg.model
    return m.adapter_name_or_path.split(",")[-1].strip() if m.adapter_name_or_path else m.model_name_or_path


def load_reward_model(cfg, accelerator) -> RewardLoss:
    """A trained reward model: base model + adapter, and the value head saved beside the adapter or model."""
    folder = _head_folder(cfg)
    if not (Path(folder) / VALUE_HEAD).is_file():
        raise FileNotFoundError(f"{folder} has no {VALUE_HEAD}: point adapter_name_or_path (LoRA) or "
                                "model_name_or_path (full/freeze) at the output_dir of a `stage: rm` run")
    module = RewardLoss(prepare_model(cfg, accelerator))
    load_extra_weights(module, folder)
    return module.eval()


@torch.no_grad()
def predict(cfg, module: RewardLoss, rows: list[dict], collator, device) -> dict:
    """generated_predictions.jsonl: the chosen and rejected score of every evaluation pair."""
    path = Path(cfg.train.output_dir) / "generated_predictions.jsonl"
    correct = 0
    with path.open("w", encoding="utf-8") as out:
        for first in range(0, len(rows), cfg.train.per_device_eval_batch_size):
            batch = collator(rows[first: first + cfg.train.per_device_eval_batch_size])
            scores = module.scores(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            for chosen, rejected in zip(*[part.tolist() for part in scores.chunk(2)]):
                out.write(json.dumps({"chosen": round(chosen, 4), "rejected": round(rejected, 4)}) + "\n")
                correct += chosen > rejected
    print(f"[tuneforge] pairwise accuracy {correct / max(len(rows), 1):.4f}; scores in {path}")
    return {"predict_accuracy": correct / max(len(rows), 1)}


def run(cfg) -> dict:
    t = cfg.train
    accelerator, tokenizer = start(cfg)
    train_rows, eval_rows, _ = prepare_preference_data(cfg, tokenizer)
    resume = guard_output_dir(cfg, accelerator)
    if t.do_train:
        module, start_head = RewardLoss(prepare_model(cfg, accelerator)), Path(_head_folder(cfg)) / VALUE_HEAD
        if start_head.is_file():  # training goes on from a reward model's head
            load_extra_weights(module, start_head.parent)
            accelerator.print(f"[tuneforge] value head from {start_head}")
        module = on_device(module, accelerator.device)
    else:
        module = load_reward_model(cfg, accelerator).to(accelerator.device)
    collator = PairCollator(tokenizer.pad_token_id)
    accelerator.print(f"[tuneforge] {len(train_rows)} training and {len(eval_rows)} evaluation pairs")
    results = train_and_evaluate(cfg, module, tokenizer, train_rows, eval_rows, accelerator, resume, collator)
    if t.do_predict and accelerator.is_main_process:
        results.update(predict(cfg, module.eval(), eval_rows, collator, accelerator.device))
    return results
