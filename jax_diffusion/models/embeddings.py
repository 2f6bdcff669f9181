"""Conditioning embeddings: sinusoidal timestep features -> MLP, plus an optional class embedding.

The result `emb` (width 4 * ch) is what every ResBlock projects into a per-channel bias (DDPM) or a
scale and shift (AdaGN, Improved DDPM).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_diffusion.models.layers import default_init


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0, freq_shift: int = 0,
                       flip_sin_to_cos: bool = True) -> jax.Array:
    """Sinusoidal features of t (int or float timesteps [B]), float32 [B, dim].

    f_i = max_period^(-i / (dim/2 - freq_shift)), i < dim/2; features [cos(t f) | sin(t f)], or
    [sin(t f) | cos(t f)] with flip_sin_to_cos=False. improved-diffusion: freq_shift=0, [cos | sin];
    Ho et al.'s DDPM: freq_shift=1 (the last frequency is exactly 1/max_period), [sin | cos].
    `dim` must be even (the U-Net's `ch` is a multiple of 32). Computed in float32 even for bf16
    models: t reaches 4000, where bf16 could not even represent the argument.
    """
    half = dim // 2
    exponents = jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    freqs = jnp.exp(-math.log(max_period) * exponents)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    parts = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
    return jnp.concatenate(parts, axis=-1)


class ConditioningEmbedding(nn.Module):
    """emb = Dense(SiLU(Dense(sinusoid(t)))) [+ label_embed(y)], width 4 * ch.

    With `num_classes > 0` the label table has num_classes + 1 rows; the last row is the null label
    (used when y is None, and by classifier-free guidance).
    """

    ch: int
    num_classes: int = 0
    freq_shift: int = 0
    flip_sin_to_cos: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array, y: jax.Array | None = None) -> jax.Array:
        width = 4 * self.ch
        emb = timestep_embedding(t, self.ch, freq_shift=self.freq_shift,
                                 flip_sin_to_cos=self.flip_sin_to_cos)
        emb = nn.Dense(width, dtype=self.dtype, kernel_init=default_init(), name="dense0")(emb)
        emb = nn.Dense(width, dtype=self.dtype, kernel_init=default_init(),
                       name="dense1")(nn.silu(emb))
        if self.num_classes > 0:
            if y is None:
                y = jnp.full(t.shape, self.num_classes, dtype=jnp.int32)
            table = nn.Embed(self.num_classes + 1, width, name="label_embed")
            emb = emb + table(y).astype(self.dtype)
        elif y is not None:
            raise ValueError("labels y were given but config.model.num_classes=0 "
                             "(unconditional model); pass y=None or set num_classes > 0")
        return emb
