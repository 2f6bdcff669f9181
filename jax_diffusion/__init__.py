"""jax_diffusion: Gaussian diffusion models (DDPM, Improved DDPM, DDIM, DPM-Solver++, EDM Heun)
in JAX/Flax. `Pipeline` is the notebook entry point; it is imported on first use, so importing a
submodule does not load the model stack."""
from __future__ import annotations

import importlib

__all__ = ["Pipeline", "Samples"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("jax_diffusion.pipeline"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
