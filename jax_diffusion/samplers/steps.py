"""Single reverse steps, each a small pure function testable alone: the DDPM and DDIM steps the
ancestral chain scans, and the deterministic DDIM / Euler / Heun steps between two noise levels
that distillation takes with its teacher.

Conventions for the level-to-level steps: x_t = alpha_t x0 + sigma_t eps with alpha_t =
sqrt(abar_t), sigma_t = sqrt(1 - abar_t); abar arrays are per example [B], and abar = 1 stands
for the clean end of the chain (where a DDIM step returns x0). Every function is elementwise in
the batch, so it runs in float64 when its inputs are float64.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_diffusion.diffusion import GaussianDiffusion, ModelFn, extract

# x0_fn(x_t, original timesteps [B]) -> the (clipped) data prediction of a network.
X0Fn = Callable[[jax.Array, jax.Array], jax.Array]


def ddpm_step(diffusion: GaussianDiffusion, model_fn: ModelFn, x: jax.Array, t: jax.Array,
              z: jax.Array, clip_denoised: bool = True) -> tuple[jax.Array, jax.Array]:
    """One ancestral step of p(x_{t-1} | x_t) (Ho et al. 2020): (x_{t-1}, pred_xstart).

    x_{t-1} = mean + exp(0.5 log_variance) z for t > 0 and x_{-1} = mean at t = 0, with mean and
    log_variance from `diffusion.p_mean_variance` (so every mean and variance type works).
    """
    out = diffusion.p_mean_variance(model_fn, x, t, clip_denoised)
    nonzero = (t != 0).astype(x.dtype).reshape(t.shape + (1,) * (x.ndim - 1))
    return out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * z, out["pred_xstart"]


def ddim_step(diffusion: GaussianDiffusion, model_fn: ModelFn, x: jax.Array, t: jax.Array,
              z: jax.Array, eta: float | jax.Array = 0.0,
              clip_denoised: bool = True) -> tuple[jax.Array, jax.Array]:
    """One DDIM step (Song et al. 2021, eq. 12 and 16): (x_prev, pred_xstart).

    sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev),
    x_prev  = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma_t^2) eps + sigma_t z,
    where x0 is the (clipped) pred_xstart and eps = predict_eps_from_xstart(x_t, t, x0) is
    re-derived from it, as improved-diffusion does. abar_prev = 1 at t = 0, where sigma_t = 0 and
    x_prev = x0. eta = 0 is deterministic; eta = 1 has the DDPM posterior variance.
    """
    out = diffusion.p_mean_variance(model_fn, x, t, clip_denoised)
    x0 = out["pred_xstart"]
    eps = diffusion.predict_eps_from_xstart(x, t, x0)
    abar = extract(diffusion.alphas_cumprod, t, x)
    abar_prev = extract(diffusion.alphas_cumprod_prev, t, x)
    sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar)) * jnp.sqrt(1.0 - abar / abar_prev)
    x_prev = (jnp.sqrt(abar_prev) * x0 + jnp.sqrt(1.0 - abar_prev - sigma ** 2) * eps
              + sigma * z)
    return x_prev, x0


def per_example(a: jax.Array, x: jax.Array) -> jax.Array:
    """Per-example values a [B] shaped to broadcast against x [B, ...], in x's dtype."""
    return jnp.asarray(a, x.dtype).reshape(a.shape + (1,) * (x.ndim - 1))


def ddim_update(x: jax.Array, x0: jax.Array, abar_from: jax.Array, abar_to: jax.Array
                ) -> jax.Array:
    """Deterministic DDIM (eta = 0) from abar_from to abar_to given the data prediction x0:
    x_to = alpha_to x0 + sigma_to (x - alpha_from x0) / sigma_from."""
    return (jnp.sqrt(per_example(abar_to, x)) * x0
            + jnp.sqrt(1.0 - per_example(abar_to, x)) * eps_from_x0(x, x0, abar_from))


def eps_from_x0(x: jax.Array, x0: jax.Array, abar: jax.Array) -> jax.Array:
    """eps = (x_t - alpha_t x0) / sigma_t."""
    a = per_example(abar, x)
    return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)


def euler_step(x0_fn: X0Fn, x: jax.Array, t_from: jax.Array, t_to: jax.Array,
               alphas_cumprod: np.ndarray) -> jax.Array:
    """One Euler step of the probability-flow ODE in sigma = sqrt((1 - abar) / abar) from
    t_from to t_to (original timesteps [B]), which is one DDIM (eta 0) step."""
    table = jnp.asarray(alphas_cumprod, x.dtype)
    return ddim_update(x, x0_fn(x, t_from), table[t_from], table[t_to])


def heun_step(x0_fn: X0Fn, x: jax.Array, t_from: jax.Array, t_to: jax.Array,
              alphas_cumprod: np.ndarray) -> jax.Array:
    """One Heun step of the probability-flow ODE in sigma from t_from to t_to (Karras et al.
    2022, Alg. 1 lines 5-7). In EDM variables the slope d = (x_sigma - D) / sigma is the eps of
    the VP state, so with DDIM steps:

        x'  = DDIM(x, D(x, t_from), t_from -> t_to)                          (Euler)
        e   = (eps(x, t_from) + eps(x', t_to)) / 2                           (mean slope)
        x_to = DDIM(x, x0 = (x - sqrt(1 - abar_from) e) / sqrt(abar_from), t_from -> t_to)
    """
    table = jnp.asarray(alphas_cumprod, x.dtype)
    abar_from, abar_to = table[t_from], table[t_to]
    x0 = x0_fn(x, t_from)
    x_euler = ddim_update(x, x0, abar_from, abar_to)
    slope = 0.5 * (eps_from_x0(x, x0, abar_from)
                   + eps_from_x0(x_euler, x0_fn(x_euler, t_to), abar_to))
    a_from = per_example(abar_from, x)
    return ddim_update(x, (x - jnp.sqrt(1.0 - a_from) * slope) / jnp.sqrt(a_from), abar_from,
                       abar_to)
