"""Classifier-free guidance (Ho & Salimans 2022) as a model function any sampler takes."""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jax_diffusion.diffusion import ModelFn

LabelModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def guided_model_fn(model_fn: LabelModelFn, y: jax.Array, null_label: int | jax.Array,
                    scale: float | jax.Array) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022) as a `model_fn(x, t)` for `sample`.

    Calls model_fn([x, x], [t, t], [y, null]) ONCE on the doubled batch and returns
        uncond + scale (cond - uncond)
    on the mean part (the first C = x.shape[-1] channels). With 2C output channels (learned_range:
    [mean C | v C]) the variance part is the conditional pass's, unguided. scale = 1 is the
    conditional model, scale = 0 the unconditional one.
    """
    y = jnp.asarray(y)
    null = jnp.broadcast_to(jnp.asarray(null_label, y.dtype), y.shape)

    def guided(x: jax.Array, t: jax.Array) -> jax.Array:
        batch, channels = x.shape[0], x.shape[-1]
        out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                       jnp.concatenate([y, null]))
        if out.shape[-1] not in (channels, 2 * channels):
            raise ValueError(f"model output has {out.shape[-1]} channels; expected C={channels} "
                             f"or 2C={2 * channels} (learned_range [mean | v])")
        cond, uncond = out[:batch], out[batch:]
        mean = uncond[..., :channels] + scale * (cond[..., :channels] - uncond[..., :channels])
        return jnp.concatenate([mean, cond[..., channels:]], axis=-1)

    return guided
