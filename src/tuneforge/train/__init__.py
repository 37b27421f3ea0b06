"""Training: one recipe per stage (sft.py runs pt and sft), sharing loop.py, checkpoint.py and logging.py."""


def run_stage(cfg) -> dict:
    """Run the recipe of `cfg.finetune.stage` and return its results."""
    from importlib import import_module

    recipe = {"pt": "sft", "sft": "sft", "rm": "rm", "dpo": "dpo", "kto": "kto", "cls": "cls"}[cfg.finetune.stage]
    return import_module(f"{__name__}.{recipe}").run(cfg)
