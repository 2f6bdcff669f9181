"""--mode=phema: the EMA of any width rebuilt after training from the power-EMA snapshots of a
config.train.ema="power" run (power_ema.py), written as an ordinary workdir."""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import ml_collections

from jax_diffusion.diffusion import check_trained_with
from jax_diffusion.errors import CheckpointError
from jax_diffusion.models import create_model
from jax_diffusion.runtime import parallel
from jax_diffusion.training import checkpoints
from jax_diffusion.training import power_ema
from jax_diffusion.training.train_state import TrainState, abstract_train_state, create_optimizer


def run_phema(config: ml_collections.ConfigDict, workdir: str) -> None:
    """--mode=phema: the EMA of width config.phema.sigma_rel rebuilt from the snapshots of
    --workdir, written as the checkpoint of a new workdir config.phema.output_workdir (params
    and EMA params both the rebuilt weights, a fresh optimizer state), which --mode=sample,
    eval and distill restore like a trained run's."""
    out = config.phema.output_workdir
    existing = checkpoints.checkpoint_dir(out)
    if os.path.isdir(existing) and os.listdir(existing):
        raise CheckpointError(f"{existing} already holds checkpoints: write the rebuilt EMA into "
                              f"an empty config.phema.output_workdir")
    # The new workdir records this config: it must read the network as the run trained it.
    source = checkpoints.create_manager(workdir, read_only=True)
    latest = checkpoints.select_step(source)
    check_trained_with(checkpoints.restore_config(source, latest).get("diffusion", {}),
                       config.diffusion, f"{checkpoints.checkpoint_dir(workdir)}/{latest}")
    mesh = parallel.create_mesh()
    template = abstract_train_state(config, create_model(config.model))
    params, step = power_ema.reconstruct(workdir, template.params, parallel.replicated(mesh),
                                         config.phema.sigma_rel, config.phema.step)
    record = config.copy_and_resolve_references()
    record.train.ema = "fixed"   # the new workdir holds one EMA, not the tracked ones
    rng = jax.random.split(jax.random.PRNGKey(config.train.seed))[1]
    state = TrainState(step=jnp.asarray(step, jnp.int32), params=params, ema_params=params,
                       opt_state=create_optimizer(config.train).init(params), rng=rng)
    manager = checkpoints.create_manager(out, async_save=False)
    checkpoints.save(manager, step, state, record, {})  # {}: no input iterator has run
    manager.wait_until_finished()
    manager.close()
    logging.info("Wrote the EMA of sigma_rel %g at step %d to %s/%d", config.phema.sigma_rel,
                 step, existing, step)
