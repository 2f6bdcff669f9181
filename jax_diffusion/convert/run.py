"""--mode=import and --mode=export: PyTorch checkpoints <-> the run's Orbax checkpoints.

import: config.convert.source (a diffusers UNet2DModel directory, or a state-dict file) ->
WD/checkpoints/<config.convert.step>/ with params = ema_params = the imported weights, a fresh
optimizer state and the config, so --mode=sample and --mode=eval restore it like a trained run.
export: the EMA weights of WD's latest checkpoint (or config.sample.checkpoint_step) -> a diffusers
UNet2DModel directory config.convert.target (config.json + diffusion_pytorch_model.safetensors).
Every check runs before anything is written.
"""
from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jax_diffusion import errors
from jax_diffusion.convert.diffusers_config import unet2d_config
from jax_diffusion.convert.readers import SAFETENSORS_NAME
from jax_diffusion.convert.sources import FORMATS, read_source
from jax_diffusion.convert.weights import state_dict_from_params
from jax_diffusion.models import create_model
from jax_diffusion.runtime import parallel
from jax_diffusion.training import checkpoints
from jax_diffusion.training.train_state import TrainState, abstract_train_state, create_optimizer



def validate_convert_config(config: ml_collections.ConfigDict, mode: str) -> None:
    """Raise ConfigError for a config.convert that `mode` ("import" or "export") cannot use."""
    c = config.convert
    if mode == "import":
        if not c.source:
            raise errors.ConfigError(
                "config.convert.source is empty: set --config.convert.source=PATH (a diffusers "
                "model directory or a .safetensors/.pt file)")
        if c.format not in FORMATS:
            raise errors.ConfigError(f"config.convert.format={c.format!r} is not one of "
                                     f"{', '.join(FORMATS)}")
        if c.step < 0:
            raise errors.ConfigError(f"config.convert.step={c.step} must be >= 0")
    elif mode == "export" and not c.target:
        raise errors.ConfigError("config.convert.target is empty: set --config.convert.target=DIR "
                                 "(where the diffusers model directory is written)")


def _fresh_state(config: ml_collections.ConfigDict, params):
    """A TrainState at step 0 holding `params` (and as EMA), with a fresh optimizer state and the
    rng a fresh run of this config starts from."""
    params = jax.tree.map(jnp.asarray, params)
    rng = jax.random.split(jax.random.PRNGKey(config.train.seed))[1]
    return TrainState(step=jnp.asarray(config.convert.step, jnp.int32), params=params,
                      ema_params=params, opt_state=create_optimizer(config.train).init(params),
                      rng=rng)


def run_import(config: ml_collections.ConfigDict, workdir: str) -> None:
    """--mode=import: write config.convert.source's weights as WD/checkpoints/<step>/."""
    validate_convert_config(config, "import")
    existing = checkpoints.checkpoint_dir(workdir)
    if os.path.isdir(existing) and os.listdir(existing):
        raise errors.ConversionError(f"{existing} already holds checkpoints: import into an empty "
                                     f"--workdir")
    params = read_source(config)
    manager = checkpoints.create_manager(workdir, async_save=False)
    # data_state {}: no input iterator has run; a resumed --mode=train starts a fresh one.
    checkpoints.save(manager, config.convert.step, _fresh_state(config, params), config, {})
    manager.wait_until_finished()
    manager.close()
    logging.info("Imported %s into %s/%d", config.convert.source, existing, config.convert.step)


def run_export(config: ml_collections.ConfigDict, workdir: str) -> None:
    """--mode=export: WD's EMA weights -> diffusers UNet2DModel directory config.convert.target."""
    validate_convert_config(config, "export")
    diffusers_config = unet2d_config(config)  # raises before anything is read if not expressible
    target = config.convert.target
    if os.path.exists(os.path.join(target, "config.json")):
        raise errors.ConversionError(f"{target} already holds a model (config.json): export into "
                                     f"a new directory")
    manager = checkpoints.create_manager(workdir, read_only=True)
    step = checkpoints.select_step(manager, config.sample.checkpoint_step)
    template = abstract_train_state(config, create_model(config.model))
    params = checkpoints.restore_params(manager, step, template,
                                        parallel.replicated(parallel.create_mesh()))
    state = state_dict_from_params(jax.tree.map(np.asarray, params), config)
    write_diffusers_dir(target, diffusers_config, state)
    logging.info("Exported the EMA weights of %s/%d to %s", checkpoints.checkpoint_dir(workdir),
                 step, target)


def write_diffusers_dir(target: str, diffusers_config: dict, state: dict[str, np.ndarray]) -> None:
    """config.json + diffusion_pytorch_model.safetensors, each written to a temporary name first."""
    from safetensors.numpy import save_file
    os.makedirs(target, exist_ok=True)
    weights = os.path.join(target, SAFETENSORS_NAME)
    save_file(state, weights + ".tmp", metadata={"format": "pt"})
    os.replace(weights + ".tmp", weights)
    config_path = os.path.join(target, "config.json")
    with open(config_path + ".tmp", "w") as f:
        json.dump(diffusers_config, f, indent=2)
    os.replace(config_path + ".tmp", config_path)
