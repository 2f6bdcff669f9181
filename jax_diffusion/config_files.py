"""Loading `configs/*.py` files by path, as ml_collections' config flag does."""
from __future__ import annotations

import importlib.util
import os

import ml_collections

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of the config file at `path`."""
    name = "jax_diffusion_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def default_config() -> ml_collections.ConfigDict:
    """configs/default.py: every key with its default, the base of every experiment config."""
    return load_config_file(os.path.join(CONFIG_DIR, "default.py"))
