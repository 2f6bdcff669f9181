"""Consistency models (Song et al. 2023) on the project's discrete-time VP diffusion: the
boundary-condition parametrisation, the consistency function of a network, and the multistep
consistency sampler (Algorithm 1). Training is consistency distillation (distill.py).

The EDM view the samplers use (Karras et al. 2022): sigma_t = sqrt((1 - abar_t) / abar_t) and
x_sigma = x_t / sqrt(abar_t) for the VP state x_t; sigma_min = sigma_0 (t = 0). A consistency
model is
    f(x_sigma, sigma) = c_skip(sigma) x_sigma + c_out(sigma) F(x_sigma, sigma),
    c_skip = sigma_d^2 / ((sigma - sigma_min)^2 + sigma_d^2),
    c_out  = (sigma - sigma_min) sigma_d / sqrt(sigma^2 + sigma_d^2),
so f(x, sigma_min) = x exactly (the boundary condition). F is the teacher's network read as
EDM's preconditioned output: its data prediction D (through the eps / x0 / v head,
`GaussianDiffusion.p_mean_variance`, unclipped) gives
    F = (D - c_skip_edm x_sigma) / c_out_edm,
    c_skip_edm = sigma_d^2 / (sigma^2 + sigma_d^2),  c_out_edm = sigma sigma_d / sqrt(sigma^2 +
    sigma_d^2),
so a student initialised from the teacher starts as the teacher's denoiser away from sigma_min,
as the paper's students start from their EDM teachers. Folded, per timestep:
    f = skip_t x_t + out_t D,  out_t = c_out / c_out_edm = (sigma - sigma_min) / sigma,
    skip_t = (c_skip - out_t c_skip_edm) / sqrt(abar_t).
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jax_diffusion import schedules
from jax_diffusion.diffusion import GaussianDiffusion, ModelFn, create_diffusion

# config.sample.method of a consistency student: written by --mode=distill into its
# checkpoints, never chosen by hand (it is not in samplers.METHODS).
SAMPLER = "consistency"


def boundary_scalings(sigma: np.ndarray, sigma_min: float, sigma_data: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(c_skip, c_out) of the boundary-condition parametrisation (Song et al. 2023, App. C):
    c_skip(sigma_min) = 1 and c_out(sigma_min) = 0 exactly."""
    sigma = np.asarray(sigma, dtype=np.float64)
    c_skip = sigma_data ** 2 / ((sigma - sigma_min) ** 2 + sigma_data ** 2)
    c_out = (sigma - sigma_min) * sigma_data / np.sqrt(sigma ** 2 + sigma_data ** 2)
    return c_skip, c_out


def consistency_table(alphas_cumprod: np.ndarray, sigma_data: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(skip [T], out [T]) with f(x_t, t) = skip_t x_t + out_t D(x_t, t), float64; out_0 = 0."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    sigma = schedules.edm_sigmas(abar)
    c_skip, c_out = boundary_scalings(sigma, sigma[0], sigma_data)
    out = (sigma - sigma[0]) / sigma
    c_skip_edm = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    return (c_skip - out * c_skip_edm) / np.sqrt(abar), out


def consistency_output(diffusion: GaussianDiffusion, sigma_data: float, x_t: jax.Array,
                       t: jax.Array, model_output: jax.Array) -> jax.Array:
    """f(x_t, t) in data space from the network's output at x_t (VP), t (original timesteps
    [B]); `diffusion` is the full T-step one in the network's parametrisation."""
    skip, out = consistency_table(diffusion.alphas_cumprod, sigma_data)
    x0 = diffusion.p_mean_variance(None, x_t, t, clip_denoised=False,
                                   model_output=model_output)["pred_xstart"]
    shape = t.shape + (1,) * (x_t.ndim - 1)
    return (jnp.asarray(skip, x_t.dtype)[t].reshape(shape) * x_t
            + jnp.asarray(out, x_t.dtype)[t].reshape(shape) * x0)


def sample(model_fn: ModelFn, diffusion: GaussianDiffusion, sigma_data: float,
           timesteps: Sequence[int], shape: Sequence[int], key: jax.Array,
           clip_denoised: bool = True, noise: jax.Array | None = None) -> jax.Array:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) over the original
    `timesteps` tau_1 > ... > tau_K (K network evaluations), written in VP space:

        x = sigma_1 z in EDM, i.e. x_t = sqrt(1 - abar_1) z;  x0 = f(x, tau_1)
        for k = 2..K:  x_sigma = x0 + sqrt(tau_k^2 - sigma_min^2) z_k, i.e.
                       x_t = sqrt(abar_k) x0 + sqrt(1 - abar_k - abar_k sigma_min^2) z_k;
                       x0 = f(x_t, tau_k)

    each f clipped to [-1, 1] with clip_denoised (as the reference sampler does). `key` is
    split into (noise_key, chain_key); z_k is N(0, I) from fold_in(chain_key, k - 1) (k - 1:
    the level's 0-based index). `noise` (z of the first level) defaults to N(0, I) from
    noise_key. `diffusion`: the full T-step one.
    """
    shape = tuple(int(d) for d in shape)
    levels = np.asarray(timesteps, dtype=np.int64)
    if levels.ndim != 1 or len(levels) < 1 or np.any(np.diff(levels) >= 0):
        raise ValueError(f"timesteps must be strictly decreasing, got {list(levels)}")
    abar = np.asarray(diffusion.alphas_cumprod, dtype=np.float64)
    sigma_min = schedules.edm_sigmas(abar)[0]
    level_abar = abar[levels]
    # Row k: how level k's input is made from the previous level's x0; the last row (1, 0)
    # carries the final x0 out of the scan unchanged.
    data_scale = np.append(np.sqrt(level_abar[1:]), 1.0)
    noise_scale = np.append(np.sqrt(np.maximum(
        1.0 - level_abar[1:] - level_abar[1:] * sigma_min ** 2, 0.0)), 0.0)
    skip, out = consistency_table(abar, sigma_data)
    noise_key, chain_key = jax.random.split(key)
    z = jax.random.normal(noise_key, shape) if noise is None else jnp.asarray(noise)
    dtype = z.dtype
    x_first = jnp.asarray(np.sqrt(1.0 - level_abar[0]), dtype) * z
    table = {"t": jnp.asarray(levels, jnp.int32), "skip": jnp.asarray(skip[levels], dtype),
             "out": jnp.asarray(out[levels], dtype), "data": jnp.asarray(data_scale, dtype),
             "noise": jnp.asarray(noise_scale, dtype)}

    def step(x, k):
        t = jnp.full((shape[0],), table["t"][k], jnp.int32)
        x0 = diffusion.p_mean_variance(model_fn, x, t, clip_denoised=False)["pred_xstart"]
        f = table["skip"][k] * x + table["out"][k] * x0
        if clip_denoised:
            f = jnp.clip(f, -1.0, 1.0)
        z_k = jax.random.normal(jax.random.fold_in(chain_key, k + 1), shape, dtype)
        return table["data"][k] * f + table["noise"][k] * z_k, None

    x0, _ = jax.lax.scan(step, x_first, jnp.arange(len(levels), dtype=jnp.int32))
    return x0


def sampling_timesteps(config: ml_collections.ConfigDict) -> np.ndarray:
    """The config.sample.num_steps levels of config.sample.schedule, descending (first T-1
    for the trailing grid the students record)."""
    total = config.diffusion.num_timesteps
    betas = schedules.get_beta_schedule(config.diffusion.schedule, total)
    kept = schedules.step_timesteps(config.sample.schedule, total, config.sample.num_steps, betas,
                                    config.sample.sigma_min, config.sample.sigma_max)
    return kept[::-1]


def sample_from_config(model_fn: ModelFn, config: ml_collections.ConfigDict,
                       shape: Sequence[int], key: jax.Array,
                       noise: jax.Array | None = None) -> jax.Array:
    """`sample` as config.sample (num_steps, schedule, clip_denoised) and
    config.distill.sigma_data of a consistency student describe it."""
    return sample(model_fn, create_diffusion(config.diffusion), config.distill.sigma_data,
                  sampling_timesteps(config), shape, key, config.sample.clip_denoised, noise)
