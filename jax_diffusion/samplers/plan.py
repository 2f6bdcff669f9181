"""What every sampling method is built from: the `Chain` a method is given and the `Plan` it
returns (how its state starts, steps and maps back to an image)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_diffusion.diffusion import GaussianDiffusion, ModelFn


@dataclasses.dataclass(frozen=True)
class Chain:
    """What every method's plan is built from (all static but the key)."""
    method: str
    diffusion: GaussianDiffusion
    model_fn: ModelFn
    shape: tuple[int, ...]
    dtype: jnp.dtype
    chain_key: jax.Array
    eta: float | jax.Array
    clip_denoised: bool
    churn: float
    # The model's own T-step abar (a discrete VP model); None for a continuous process's model,
    # defined at every noise level.
    model_alphas_cumprod: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one method runs: `init(x_T) -> state`; `step(state, i) -> (state, x0)` for i = n-1
    down to 0, one model call each; `position(state, i) -> x` in VP space (the trajectory; at
    i = 0 the sample)."""
    num_iterations: int
    init: Callable
    step: Callable
    position: Callable


def cast_table(table: dict[str, np.ndarray], dtype) -> dict[str, jax.Array]:
    """Float tables to `dtype` once, outside the scan; integer and boolean ones unchanged."""
    return {name: jnp.asarray(value, dtype) if np.issubdtype(value.dtype, np.floating)
            else jnp.asarray(value) for name, value in table.items()}


def batch_timesteps(i: jax.Array, batch: int) -> jax.Array:
    """Timestep index i for every example of the batch: int32 [batch]."""
    return jnp.full((batch,), i, dtype=jnp.int32)
