"""The sampler a config describes: its one-line checks, the respaced diffusion its method and
step schedule visit, and `sample_from_config`, the library entry point of --mode=sample/eval."""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from jax_diffusion import schedules
from jax_diffusion.config_checks import positive_int, require
from jax_diffusion.diffusion import GaussianDiffusion, ModelFn, create_diffusion
from jax_diffusion.errors import ConfigError
from jax_diffusion.processes import (CONTINUOUS, continuous_process, levels_diffusion,
                                     process_name)
from jax_diffusion.samplers.chain import sample
from jax_diffusion.samplers.methods import KNOB_DEFAULTS, METHODS, methods_reading

AUTO = "auto"   # config.sample.schedule: the method's recommended grid for the process


def check_sample_config(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError (one line: key, value, what is allowed) for a config.sample that
    cannot run on config.diffusion."""
    sample_config, total = config.sample, config.diffusion.num_timesteps
    method = sample_config.method
    if method not in METHODS:
        raise ConfigError(f"config.sample.method={method!r} is unknown; allowed: "
                          f"{', '.join(METHODS)}")
    process = process_name(config.diffusion)
    allowed = schedules.LEVEL_SCHEDULES if process in CONTINUOUS else schedules.STEP_SCHEDULES
    if sample_config.schedule not in (AUTO,) + allowed:
        raise ConfigError(f"config.sample.schedule={sample_config.schedule!r} is not defined on "
                          f"config.diffusion.process={process!r}; allowed: "
                          f"{', '.join((AUTO,) + allowed)}")
    spec = METHODS[method]
    eta, churn = sample_config.eta, sample_config.churn
    if not 0.0 <= eta <= 1.0:
        raise ConfigError(f"config.sample.eta={eta} must lie in [0, 1] (0: deterministic DDIM, "
                          "1: DDPM-like)")
    if churn < 0:
        raise ConfigError(f"config.sample.churn={churn} must be >= 0 (0: Karras et al. Alg. 1)")
    for knob, default in KNOB_DEFAULTS.items():
        if sample_config[knob] != default and knob not in spec.knobs:
            readers = " or ".join(f"config.sample.method={m!r}" for m in methods_reading(knob))
            raise ConfigError(f"config.sample.{knob}={sample_config[knob]} applies only to "
                              f"{readers} (got {method!r}); set config.sample.{knob}={default:g}")
    nfe = sample_config.num_steps
    problem = spec.nfe_problem(nfe)
    if problem is None and process in CONTINUOUS:
        pass   # any number of levels
    elif problem is None and not 1 <= spec.chain_steps(nfe) <= total:
        problem = (f"must be at most {spec.num_evaluations(total)} for {method!r} with "
                   f"config.diffusion.num_timesteps={total}")
    if problem is not None:
        raise ConfigError(f"config.sample.num_steps={nfe!r} (network evaluations) {problem}")
    _check_sigma_bounds(config)
    if sample_config.guidance_scale < 0:
        raise ConfigError(f"config.sample.guidance_scale={sample_config.guidance_scale} must be "
                          ">= 0 (1: the conditional model, 0: the unconditional one)")


def _check_sigma_bounds(config: ml_collections.ConfigDict) -> None:
    sample_config = config.sample
    sigma_min, sigma_max = sample_config.sigma_min, sample_config.sigma_max
    if not 0.0 <= sigma_min < sigma_max:
        raise ConfigError(f"config.sample.sigma_min={sigma_min} and config.sample.sigma_max="
                          f"{sigma_max} must satisfy 0 <= sigma_min < sigma_max")
    if process_name(config.diffusion) in CONTINUOUS:
        lowest, highest = _level_bounds(config)
        if not lowest < highest:
            raise ConfigError(f"config.sample.sigma_min={sigma_min} / sigma_max={sigma_max} leave "
                              f"nothing of the process's levels [{config.diffusion.sigma_min:g}, "
                              f"{config.diffusion.sigma_max:g}] (config.diffusion.sigma_min/max)")
        return
    if resolved_schedule(config) not in schedules.SIGMA_SCHEDULES:
        if (sigma_min, sigma_max) != (0.0, schedules.SIGMA_MAX):
            raise ConfigError(f"config.sample.sigma_min/sigma_max bound only the "
                              f"{' and '.join(schedules.SIGMA_SCHEDULES)} step schedules (got "
                              f"config.sample.schedule={sample_config.schedule!r}); keep them at "
                              f"0 and {schedules.SIGMA_MAX:g}")
        return
    betas = schedules.get_beta_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    abar = np.cumprod(1.0 - betas)
    try:
        schedules.sigma_bounds(abar, sigma_min, sigma_max)
    except ValueError:
        sigma = schedules.edm_sigmas(abar[[0, -1]])
        raise ConfigError(f"config.sample.sigma_min={sigma_min} / sigma_max={sigma_max} leave "
                          f"nothing of this diffusion's sigmas [{sigma[0]:.3g}, {sigma[1]:.3g}]"
                          ) from None


def resolved_schedule(config: ml_collections.ConfigDict) -> str:
    """config.sample.schedule, with "auto" replaced by the method's grid for the process."""
    if config.sample.schedule != AUTO:
        return config.sample.schedule
    return METHODS[config.sample.method].auto_schedules[process_name(config.diffusion)]


def _level_bounds(config: ml_collections.ConfigDict) -> tuple[float, float]:
    """(lowest, highest) noise level of a continuous process's grid: the process's range
    narrowed to config.sample's."""
    return (max(config.diffusion.sigma_min, config.sample.sigma_min),
            min(config.diffusion.sigma_max, config.sample.sigma_max))


def chain_diffusion(config: ml_collections.ConfigDict) -> GaussianDiffusion:
    """The diffusion respaced to the timesteps config.sample's method and schedule visit for
    config.sample.num_steps network evaluations (all T steps unrespaced); for a continuous
    process, the levels diffusion over the noise levels of that grid."""
    check_sample_config(config)
    count = METHODS[config.sample.method].chain_steps(config.sample.num_steps)
    if process_name(config.diffusion) in CONTINUOUS:
        process = continuous_process(config.diffusion)
        return levels_diffusion(schedules.level_grid(resolved_schedule(config), count,
                                                     *_level_bounds(config), process.time,
                                                     process.level))
    total = config.diffusion.num_timesteps
    betas = schedules.get_beta_schedule(config.diffusion.schedule, total)
    kept = schedules.step_timesteps(resolved_schedule(config), total, count, betas,
                                    config.sample.sigma_min, config.sample.sigma_max)
    return create_diffusion(config.diffusion, respacing=None if len(kept) == total else kept)


def sample_from_config(model_fn: ModelFn, config: ml_collections.ConfigDict,
                       shape: Sequence[int], key: jax.Array,
                       noise: jax.Array | None = None) -> jax.Array:
    """x0 of `shape` with the sampler config.sample describes (method, num_steps = NFE,
    schedule, eta, churn, clip_denoised) on config.diffusion; `model_fn(x, t)` is the network
    (already guided, see `guided_model_fn`); on a continuous process it is the network F, which
    `ContinuousProcess.denoise_vp` turns into the data prediction the samplers take. The
    library entry point of --mode=sample/eval."""
    diffusion = chain_diffusion(config)
    sample_config = config.sample
    if process_name(config.diffusion) in CONTINUOUS:
        process = continuous_process(config.diffusion)
        chain_model_fn = functools.partial(process.denoise_vp, model_fn)
        model_abar = None
    else:
        chain_model_fn = model_fn
        model_abar = np.cumprod(1.0 - schedules.get_beta_schedule(
            config.diffusion.schedule, config.diffusion.num_timesteps))
    return sample(chain_model_fn, diffusion, shape, key, method=sample_config.method,
                  eta=sample_config.eta, clip_denoised=sample_config.clip_denoised, noise=noise,
                  churn=sample_config.churn, model_alphas_cumprod=model_abar)


def with_method(config: ml_collections.ConfigDict, method: str,
                nfe: int) -> ml_collections.ConfigDict:
    """A copy of `config` sampling with `method` at `nfe` network evaluations, its knobs (eta,
    churn) kept where the method reads them and reset to their defaults where it does not;
    checked like any config."""
    setting = config.copy_and_resolve_references()
    setting.sample.method, setting.sample.num_steps = method, nfe
    spec = METHODS.get(method)
    for knob, default in KNOB_DEFAULTS.items():
        if spec is not None and knob not in spec.knobs:
            setting.sample[knob] = default
    check_sample_config(setting)
    return setting


def validate_sample_config(config: ml_collections.ConfigDict) -> None:
    """config.sample's rules: the sampler (`check_sample_config`), guidance and the counts."""
    sample = config.sample
    check_sample_config(config)
    if sample.guidance_scale != 1.0:
        require(config.model.num_classes > 0, "sample.guidance_scale", sample.guidance_scale,
                 "needs a class-conditional model (config.model.num_classes > 0); use 1")
    for name in ("num_samples", "batch_size", "grid_size"):
        positive_int(sample, name, "sample")
    positive_int(sample, "checkpoint_step", "sample", minimum=-1)
