"""Flax Linen models. `create_model(config.model)` returns the U-Net; see unet.py for the call signature."""
from jax_diffusion.models.unet import UNet, create_model, validate_model_config

__all__ = ["UNet", "create_model", "validate_model_config"]
