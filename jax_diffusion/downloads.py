"""Where the project caches what it fetches or compiles: the user cache directory."""
from __future__ import annotations

import os


def cache_dir() -> str:
    """$JAX_DIFFUSION_CACHE_DIR, else $XDG_CACHE_HOME/jax_diffusion, else ~/.cache/jax_diffusion."""
    if os.environ.get("JAX_DIFFUSION_CACHE_DIR"):
        return os.environ["JAX_DIFFUSION_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jax_diffusion")
