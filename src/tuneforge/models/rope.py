"""rope_scaling: inputs longer than the positions a model was pretrained on, by LLaMA-Factory's rule.

Training scales RoPE by ceil(cutoff_len / the model's positions) when cutoff_len exceeds them, and not at all
otherwise. Inference (chat, api, export, eval) scales by the same rule when cutoff_len exceeds the positions, and
else by 2, LLaMA-Factory's inference factor. An adapter trained with rope_scaling brings its setting and cutoff_len
to inference in its tuneforge_config.yaml (infer.engine.settings_from_adapter), so it is scaled as it was trained.
"""

from __future__ import annotations

import math


def check(cfg) -> list[str]:
    """Problems with `rope_scaling` (config._model_problems adds these)."""
    kind = cfg.model.rope_scaling
    if kind is None:
        return []
    if cfg.finetune.stage == "cls":
        return ["`rope_scaling` is built for the language-model stages; stage cls uses the model's own positions"]
    return []


def pretrained_positions(config) -> int | None:
    """The positions the model was pretrained on: a scaled model's original length, else max_position_embeddings."""
    rope = getattr(config, "rope_parameters", None) or {}
    return rope.get("original_max_position_embeddings") or getattr(config, "max_position_embeddings", None)


def factor(config, cutoff_len: int, training: bool) -> float | None:
    """The scaling factor for inputs of up to `cutoff_len` tokens, or None where nothing is scaled."""
    positions = pretrained_positions(config)
    if not positions:
        return None
    if cutoff_len > positions:
        return float(math.ceil(cutoff_len / positions))
    return None if training else 2.0


def scale(config, kind: str, cutoff_len: int, training: bool) -> str:
    """Set `config`'s RoPE scaling (transformers' rope_parameters) for `kind`; returns what was done, for a notice."""
    current = getattr(config, "rope_parameters", None)
    positions = pretrained_positions(config)
    if not isinstance(current, dict) or not positions:
        return f"rope_scaling has no effect: {type(config).__name__} has no RoPE parameters to scale"
    if current.get("rope_type", "default") != "default":
        return (f"rope_scaling has no effect: the model's RoPE is already scaled ({current['rope_type']}, factor "
                f"{current.get('factor')})")
    by = factor(config, cutoff_len, training)
    if by is None:
        return (f"rope_scaling has no effect: cutoff_len {cutoff_len} fits the {positions} positions the model was "
                "pretrained on")
    params = {"rope_type": kind, "factor": by, "rope_theta": current.get("rope_theta")}
    if kind in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = positions
    if kind == "llama3":  # Llama 3.1's published values, as LLaMA-Factory sets them
        params.update(low_freq_factor=1.0, high_freq_factor=4.0)
    config.rope_parameters = params
    if kind != "dynamic":  # dynamic NTK reads max_position_embeddings as the pretrained length and scales beyond it
        config.max_position_embeddings = int(positions * by)
    return f"rope_scaling {kind}: RoPE scaled by {by:g} ({positions} pretrained positions, inputs up to " \
           f"{int(positions * by)})"
