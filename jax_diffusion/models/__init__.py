"""Flax Linen models. `create_model(config.model)` returns the U-Net; see unet.py for the call
signature."""
import jax
import jax.numpy as jnp
import ml_collections

from jax_diffusion.models.unet import UNet, create_model, validate_model_config

__all__ = ["UNet", "create_model", "example_inputs", "validate_model_config"]


def example_inputs(config: ml_collections.ConfigDict, batch: int = 1
                   ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Zero (x, t, y) with the shapes and dtypes of `config`, for init and tracing."""
    size, channels = config.data.image_size, config.data.channels
    x = jnp.zeros((batch, size, size, channels), jnp.float32)
    t = jnp.zeros((batch,), jnp.int32)
    y = jnp.zeros((batch,), jnp.int32) if config.model.num_classes > 0 else None
    return x, t, y
