"""Training: one recipe per stage (sft.py runs pt and sft), sharing loop.py, checkpoint.py and logging.py."""


def run_stage(cfg) -> dict:
    """Run the recipe of `cfg.finetune.stage` and return its results."""
    from .common import deterministic_kernels
    from .stages import STAGES

    with deterministic_kernels(cfg.train.full_determinism):
        return STAGES[cfg.finetune.stage].recipe_module().run(cfg)
