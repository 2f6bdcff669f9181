"""improved-diffusion's released unconditional CIFAR-10 model (Nichol & Dhariwal 2021,
cifar10_uncond_50M_500K.pt): configs/cifar10_improved.py without labels. Its flags: 128 channels,
3 res blocks, learned sigma, dropout 0.3, cosine schedule with T=4000, L_hybrid; the defaults
num_heads=4, attention at 16 and 8, scale-shift norm and rescale_timesteps=True.

Import the .pt with --mode=import --config.convert.source=PATH (format improved_diffusion)."""
import os

import ml_collections

from jax_diffusion.config_files import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(os.path.join(os.path.dirname(__file__), "cifar10_improved.py"))
    config.model.num_classes = 0
    return config
