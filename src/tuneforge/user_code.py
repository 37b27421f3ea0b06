"""Functions users write themselves and name in a config as `path.py:function` (reward functions, metrics)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

from .config import ConfigError


def load_user_function(spec: str, key: str) -> Callable:
    """The function named by `path.py:function` (path relative to the working directory) for the option `key`;
    every problem with it is one line that says what to fix."""
    path, _, name = spec.rpartition(":")
    where = f"`{key}: {spec}`"
    if not path.endswith(".py") or not name.isidentifier():
        raise ConfigError(f"{where}: expected path.py:function, e.g. my_scores.py:f1")
    if not Path(path).is_file():
        raise ConfigError(f"{where}: file {Path(path).resolve()} not found")
    module_spec = importlib.util.spec_from_file_location(f"tuneforge_{key}_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # the user's file: any error in it is theirs to see, in one line
        raise ConfigError(f"{where}: importing {path} failed: {type(err).__name__}: {err}") from None
    function = getattr(module, name, None)
    if not callable(function):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ConfigError(f"{where}: {path} has no function {name!r} (it defines: {', '.join(found) or 'none'})")
    return function
