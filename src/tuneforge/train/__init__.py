"""Training: one recipe per stage (sft.py runs pt and sft), sharing loop.py, checkpoint.py and logging.py."""


def run_stage(cfg) -> dict:
    """Run the recipe of `cfg.finetune.stage` and return its results."""
    from .common import compile_settings, deterministic_kernels, float32_products
    from .stages import STAGES

    t = cfg.train
    with deterministic_kernels(t.full_determinism), float32_products(t.tf32), compile_settings(t.torch_compile):
        return STAGES[cfg.finetune.stage].recipe_module().run(cfg)
