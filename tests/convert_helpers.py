"""Shared by the conversion tests: configs, random diffusers models with every tensor perturbed,
and the project's U-Net applied to converted weights."""
import math

import jax
import jax.numpy as jnp
import numpy as np
from tiny_config import ROOT

from jax_diffusion.config_files import load_config_file
from jax_diffusion.convert.diffusers_config import unet2d_config
from jax_diffusion.models import create_model


def load_config(name: str):
    return load_config_file(f"{ROOT}/configs/{name}.py")


def small(config, **model_overrides):
    """A reduced version of a published config that keeps its conventions and block types:
    two levels of 32 and 64 channels at 16x16, attention at 8x8."""
    config.data.image_size = 16
    config.model.update(dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,)))
    config.model.update(model_overrides)
    return config


def random_state_dict(model, seed: int) -> dict[str, np.ndarray]:
    """Every tensor of a torch model drawn afresh, none zero: weights N(0, 1/fan_in), GroupNorm
    scales 1 + N(0, 0.1^2), biases N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        shape = tuple(tensor.shape)
        if len(shape) >= 2:
            value = rng.standard_normal(shape) / math.sqrt(math.prod(shape[1:]))
        elif "norm" in name and name.endswith("weight"):
            value = 1 + 0.1 * rng.standard_normal(shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        state[name] = value.astype(np.float32)
    return state


def diffusers_unet(config, state: dict[str, np.ndarray] | None = None, seed: int = 0):
    """diffusers' UNet2DModel for `config` (eval mode) and its weights as numpy."""
    import torch
    from diffusers import UNet2DModel

    arguments = {k: v for k, v in unet2d_config(config).items() if k != "_class_name"}
    unet = UNet2DModel(**arguments).eval()
    state = random_state_dict(unet, seed) if state is None else state
    unet.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return unet, state


def torch_forward(unet, x: np.ndarray, t: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """NHWC in, NHWC out, like the project's model."""
    import torch
    with torch.no_grad():
        out = unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                   class_labels=None if y is None else torch.from_numpy(y)).sample
    return out.numpy().transpose(0, 2, 3, 1)


def jax_forward(config, params, x: np.ndarray, t: np.ndarray,
                y: np.ndarray | None = None) -> np.ndarray:
    model = create_model(config.model)
    apply = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
    return np.asarray(apply(params, jnp.asarray(x), jnp.asarray(t),
                            None if y is None else jnp.asarray(y)))


def random_inputs(config, batch: int, seed: int, float_t: bool = False):
    """x ~ N(0, 1), t uniform over the T steps (or floats in [0, 1000)), labels uniform."""
    rng = np.random.default_rng(seed)
    size, channels = config.data.image_size, config.data.channels
    x = rng.standard_normal((batch, size, size, channels)).astype(np.float32)
    if float_t:
        t = (rng.uniform(0, 1000, batch)).astype(np.float32)
    else:
        t = rng.integers(0, config.diffusion.num_timesteps, batch).astype(np.int64)
    classes = config.model.num_classes
    y = rng.integers(0, classes, batch).astype(np.int64) if classes else None
    return x, t, y
