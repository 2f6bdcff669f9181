"""Loading `configs/*.py` files by path, as ml_collections' config flag does.

`default_config()` returns configs/default.py locked: an experiment config can change any key
but not add one, so a misspelt key in a `configs/*.py` file fails when it is loaded.
`comma_list` is the one parser for comma-separated config values ("fid,is", "10,50").
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Sequence

import ml_collections

from jax_diffusion.errors import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of the config file at `path`; a key it sets that configs/default.py does not
    have raises ConfigError naming the file."""
    name = "jax_diffusion_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.get_config()
    except AttributeError as e:
        if "since the config is locked" not in str(e):
            raise
        raise ConfigError(f"{path} sets a key that configs/default.py does not define "
                          f"({str(e).splitlines()[0]}); fix the spelling or add the key with "
                          f"its default to configs/default.py") from None


def default_config() -> ml_collections.ConfigDict:
    """configs/default.py: every key with its default, the base of every experiment config,
    locked against new keys."""
    config = load_config_file(os.path.join(CONFIG_DIR, "default.py"))
    config.lock()
    return config


def comma_list(value: str | int | Sequence, key: str, allowed: Iterable[str] | None = None,
               *, integers: bool = False) -> tuple:
    """A comma-separated config value as a tuple: "fid, is" -> ("fid", "is"); with
    `integers`, "10,50" or 10 -> (10, 50), each >= 1. Empty lists, unknown names and bad
    integers raise ConfigError naming `key`."""
    if isinstance(value, (list, tuple)):
        items = [str(v).strip() for v in value]
    else:
        items = [part.strip() for part in str(value).split(",")]
    items = [item for item in items if item]
    if integers:
        try:
            numbers = tuple(int(item) for item in items)
        except ValueError:
            numbers = ()
        if not numbers or min(numbers) < 1:
            raise ConfigError(f"{key}={value!r} must be a positive integer or comma-separated "
                              f"positive integers such as \"10,50\"")
        return numbers
    allowed = tuple(allowed) if allowed is not None else None
    unknown = [item for item in items if allowed is not None and item not in allowed]
    if not items or unknown:
        what = f"unknown {unknown}" if unknown else "empty"
        choices = f"; allowed: {', '.join(allowed)} (comma-separated)" if allowed else ""
        raise ConfigError(f"{key}={value!r}: {what}{choices}")
    return tuple(items)
