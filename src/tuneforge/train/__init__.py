"""Training: one recipe per stage (sft.py runs pt and sft), sharing loop.py, checkpoint.py and logging.py."""


def run_stage(cfg) -> dict:
    """Run the recipe of `cfg.finetune.stage` and return its results."""
    from .common import compile_settings, deterministic_kernels
    from .stages import STAGES

    with deterministic_kernels(cfg.train.full_determinism), compile_settings(cfg.train.torch_compile):
        return STAGES[cfg.finetune.stage].recipe_module().run(cfg)
