"""The table of training stages: what each one is called, which recipe runs it and what data it reads.

Code that behaves differently per stage asks this table (or the stage's recipe) instead of comparing stage names.
Each recipe `train/<recipe>.py` has `run(cfg) -> dict` and `check(cfg) -> list[str]` (every problem with its own
options, worded like config.validate's). Kept free of torch imports: config.py reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Literal

# What records a stage reads: pt raw text, lm conversations with answers, preference chosen/rejected pairs,
# kto answers flagged desirable or not, prompt conversations ending on a user turn (answers are generated),
# labelled texts or images for classifiers.
DataKind = Literal["pt", "lm", "preference", "kto", "prompt", "labelled"]


@dataclass(frozen=True)
class Stage:
    name: str
    recipe: str  # module train/<recipe>.py
    data: DataKind
    description: str
    predicts: str = ""  # what `do_predict` writes, when the stage predicts at all
    own_keys: tuple[str, ...] = ()  # keys no other stage reads: set with another stage, they are refused
    built: bool = True

    @property
    def language_modelling(self) -> bool:
        """Trains on token losses of text (pt, sft): packing, streaming and token accuracy are built for these."""
        return self.data in ("pt", "lm")

    def recipe_module(self):
        return import_module(f"{__package__}.{self.recipe}")


STAGES = {s.name: s for s in (
    Stage("pt", "sft", "pt", "continued pre-training on raw text"),
    Stage("sft", "sft", "lm", "supervised fine-tuning on conversations", predicts="generated answers"),
    Stage("rm", "rm", "preference", "a reward model (value head) on chosen/rejected pairs", predicts="scores"),
    Stage("dpo", "dpo", "preference", "direct preference optimisation (sigmoid, hinge, ipo, orpo, simpo)",
          own_keys=("pref_loss", "pref_ftx", "dpo_label_smoothing", "simpo_gamma", "ld_alpha", "pref_bco_weight",
                    "precompute_ref_log_probs")),
    Stage("kto", "kto", "kto", "KTO on answers flagged desirable or undesirable",
          own_keys=("kto_chosen_weight", "kto_rejected_weight")),
    Stage("cls", "cls", "labelled", "a text or image classifier", predicts="labels",
          own_keys=("cls_pooling", "cls_truncation")),
    Stage("ppo", "ppo", "prompt", "PPO against a reward model, with a value head and a KL penalty to the reference",
          own_keys=("reward_model", "reward_model_adapters", "reward_model_type", "reward_model_quantization_bit",
                    "ppo_buffer_size", "ppo_epochs", "ppo_score_norm", "ppo_target", "ppo_whiten_rewards")),
    Stage("grpo", "grpo", "prompt", "GRPO: group-relative policy optimisation with reward functions",
          own_keys=("num_generations", "beta", "epsilon", "epsilon_high", "loss_type", "scale_rewards",
                    "max_completion_length", "mask_truncated_completions", "reward_funcs", "reward_weights",
                    "reward_format_pattern")),
)}


def names(predicate, conjunction: str = "and") -> str:
    """The stages that satisfy `predicate`, as prose: "pt and sft", "rm or dpo", "pt, sft and rm"."""
    chosen = [s.name for s in STAGES.values() if predicate(s)]
    return ", ".join(chosen[:-1]) + f" {conjunction} " + chosen[-1] if len(chosen) > 1 else "".join(chosen)


def data_kind(stage: str) -> DataKind:
    if stage not in STAGES:
        from ..config import ConfigError

        raise ConfigError(f"unknown stage `{stage}`; choose one of {', '.join(STAGES)}")
    return STAGES[stage].data


def refuse_packing(cfg) -> list[str]:
    """The packing refusal of the stages that train on whole examples (rm, dpo, kto, cls)."""
    if cfg.data.packing or cfg.data.neat_packing:
        return [f"packing is not built for stage {cfg.finetune.stage}; remove `packing` / `neat_packing`"]
    return []


def unused_reference(cfg, why: str) -> list[str]:
    """The refusal of `ref_model` and its keys in a run that loads no reference model (`why` says so): they would
    be ignored."""
    f = cfg.finetune
    keys = [k for k in ("ref_model", "ref_model_adapters", "ref_model_quantization_bit") if getattr(f, k)]
    return [f"{' / '.join(f'`{k}`' for k in keys)}: {why}; remove it"] if keys else []


def rollout_problems(cfg) -> list[str]:
    """The rules of the stages that generate what they train on (grpo, ppo)."""
    stage, g, t = cfg.finetune.stage, cfg.generate, cfg.train
    out = refuse_packing(cfg)
    if not g.do_sample or g.num_beams != 1:
        out.append(f"stage {stage} samples its completions: set `do_sample: true` and `num_beams: 1`")
    if t.length_grouped:
        out.append(f"{t.length_grouping_key} groups rows of data by length; stage {stage} trains on completions it "
                   "generates, so remove it")
    return out
