"""What a training step minimises: the noise levels it draws (config.train.noise_sampling) and
the loss at them, for the discrete VP process (diffusion.py) and the continuous ones
(processes.py).

Noise levels are drawn as EDM levels s = sigma / alpha where a distribution is given in them:
  uniform:      vp: timesteps uniform on 0..T-1 (Ho et al.); flow: t ~ U(0, 1) (Liu et al.).
  lognormal:    ln s ~ N(lognormal_mean, lognormal_std^2) (EDM: -1.2, 1.2).
  logit_normal: logit(t) ~ N(logit_normal_mean, logit_normal_std^2) for the flow time
                t = s / (1 + s) (Esser et al. 2024: 0, 1); since logit(t) = ln s, this is the
                lognormal law in s with those parameters, on any process.
On vp a drawn level becomes the timestep nearest to it in log s, s_t = sqrt((1 - abar_t) / abar_t).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jax_diffusion.config_checks import choice, require
from jax_diffusion.diffusion import ModelFn, create_diffusion
from jax_diffusion.processes import CONTINUOUS, PROCESSES, continuous_process, process_name
from jax_diffusion.schedules import edm_sigmas

NOISE_SAMPLINGS = ("uniform", "lognormal", "logit_normal")


@dataclasses.dataclass(frozen=True)
class Objective:
    """sample_levels(key, batch) -> the levels [batch] of one step (timesteps on vp, noise
    levels s otherwise); losses(model_fn, x0, levels, key) -> per-example terms {"loss", ...},
    with model_fn(network input, noise input) the network."""
    sample_levels: Callable[[jax.Array, int], jax.Array]
    losses: Callable[[ModelFn, jax.Array, jax.Array, jax.Array], dict]


def training_objective(config: ml_collections.ConfigDict) -> Objective:
    """The Objective of config.diffusion and config.train (validated)."""
    train = config.train
    sampling = getattr(train, "noise_sampling", "uniform")

    def log_normal_levels(key: jax.Array, batch: int) -> jax.Array:
        mean, std = ((train.lognormal_mean, train.lognormal_std) if sampling == "lognormal"
                     else (train.logit_normal_mean, train.logit_normal_std))
        return jnp.exp(mean + std * jax.random.normal(key, (batch,)))

    if process_name(config.diffusion) in CONTINUOUS:
        process = continuous_process(config.diffusion)

        def continuous_levels(key: jax.Array, batch: int) -> jax.Array:
            if sampling == "uniform":   # flow's t ~ U(0, 1); t < 1, so s is finite
                return process.level(jax.random.uniform(key, (batch,)))
            return log_normal_levels(key, batch)

        def continuous_losses(model_fn, x0, levels, key):
            noise = jax.random.normal(key, x0.shape, x0.dtype)
            return process.training_losses(model_fn, x0, levels, noise)

        return Objective(continuous_levels, continuous_losses)

    diffusion = create_diffusion(config.diffusion)
    log_sigma = np.log(edm_sigmas(diffusion.alphas_cumprod))   # increasing in t

    def timesteps(key: jax.Array, batch: int) -> jax.Array:
        if sampling == "uniform":
            return jax.random.randint(key, (batch,), 0, diffusion.num_timesteps)
        distance = jnp.abs(jnp.log(log_normal_levels(key, batch))[:, None]
                           - jnp.asarray(log_sigma, jnp.float32)[None, :])
        return jnp.argmin(distance, axis=1).astype(jnp.int32)

    return Objective(timesteps, diffusion.training_losses)


def validate_objective_config(config: ml_collections.ConfigDict) -> None:
    """The rules joining config.diffusion.process to its keys and to config.train.noise_sampling."""
    diffusion, train = config.diffusion, config.train
    process = diffusion.process
    choice(process, "diffusion.process", PROCESSES)
    choice(train.noise_sampling, "train.noise_sampling", NOISE_SAMPLINGS)
    for key in ("lognormal_std", "logit_normal_std"):
        require(train[key] > 0, f"train.{key}", train[key], "must be > 0")
    require(diffusion.sigma_data > 0, "diffusion.sigma_data", diffusion.sigma_data,
            "must be > 0 (EDM: 0.5 for images in [-1, 1])")
    if process not in CONTINUOUS:
        return
    require(0 < diffusion.sigma_min < diffusion.sigma_max, "diffusion.sigma_min",
            diffusion.sigma_min, f"must satisfy 0 < sigma_min < sigma_max="
            f"{diffusion.sigma_max} (EDM: 0.002 and 80)")
    what = {"edm": "EDM's preconditioned F", "flow": "the velocity eps - x0"}[process]
    for key, value in (("mean_type", "eps"), ("var_type", "fixed_large"), ("loss_type", "mse"),
                       ("rescale_timesteps", False)):
        require(diffusion[key] == value, f"diffusion.{key}", diffusion[key],
                f"applies to process 'vp' only (process {process!r} trains {what}); "
                f"leave it at {value!r}")
    weighting = {"edm": "edm", "flow": "none"}[process]
    require(diffusion.loss_weighting == weighting, "diffusion.loss_weighting",
            diffusion.loss_weighting, f"must be {weighting!r} on process {process!r} (its loss "
            f"is {'EDM weighted' if process == 'edm' else 'the plain velocity error'})")
    require(not (process == "edm" and train.noise_sampling == "uniform"),
            "train.noise_sampling", train.noise_sampling,
            "is not defined on process 'edm' (levels in (0, inf)): use 'lognormal'")
