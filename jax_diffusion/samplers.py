"""Reverse-process samplers: DDPM ancestral, DDIM, DPM-Solver++(2M); classifier-free guidance.

Each sampler is a small pure step function and one `jax.lax.scan` over the diffusion's (possibly
respaced) timesteps, from index K-1 down to 0, so the program and its compile time do not grow
with the number of steps. `model_fn(x_t, timesteps)` always receives the ORIGINAL timesteps
(`diffusion.timesteps_for_model(t)`). Schedule arrays are float64 numpy cast to x's dtype at use:
float32 by default, float64 with x64 on and float64 noise. Nothing here places data on devices;
a caller shards the batch with jit in/out shardings.
"""
from __future__ import annotations

from numbers import Real
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_diffusion.diffusion import GaussianDiffusion

METHODS = ("ddpm", "ddim", "dpm_solver++")

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
LabelModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _at(arr: np.ndarray, t: jax.Array, x: jax.Array) -> jax.Array:
    """arr[t] in x's dtype, shaped [B, 1, ...] to broadcast against x."""
    return jnp.asarray(arr, x.dtype)[t].reshape(t.shape + (1,) * (x.ndim - 1))


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
    abar = _at(diffusion.alphas_cumprod, t, x)
    abar_prev = _at(diffusion.alphas_cumprod_prev, t, x)
    sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar)) * jnp.sqrt(1.0 - abar / abar_prev)
    x_prev = (jnp.sqrt(abar_prev) * x0 + jnp.sqrt(1.0 - abar_prev - sigma ** 2) * eps
              + sigma * z)
    return x_prev, x0


def dpm_solver_pp_step(x: jax.Array, x0: jax.Array, x0_prev: jax.Array, abar_t: jax.Array,
                       abar_s: jax.Array, half_inv_r: jax.Array) -> jax.Array:
    """One DPM-Solver++(2M) step from t to s, abar_s > abar_t (Lu et al. 2022, Alg. 2).

    With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma),
    h = lambda_s - lambda_t and r = h_prev / h (h_prev: the step that led to t):
        D   = (1 + 1/(2r)) x0 - 1/(2r) x0_prev,
        x_s = (sigma_s / sigma_t) x - alpha_s (e^{-h} - 1) D.
    `half_inv_r` = 1/(2r); 0 gives the first-order step (DPM-Solver++1 = DDIM with eta = 0).
    e^{-h} = alpha_t sigma_s / (sigma_t alpha_s) stays finite (0) at abar_s = 1, where the
    first-order step returns x_s = x0.
    """
    alpha_t, sigma_t = jnp.sqrt(abar_t), jnp.sqrt(1.0 - abar_t)
    alpha_s, sigma_s = jnp.sqrt(abar_s), jnp.sqrt(1.0 - abar_s)
    exp_neg_h = alpha_t * sigma_s / (sigma_t * alpha_s)
    d = x0 + half_inv_r * (x0 - x0_prev)
    return (sigma_s / sigma_t) * x - alpha_s * (exp_neg_h - 1.0) * d


def dpm_solver_pp_half_inv_r(alphas_cumprod: np.ndarray) -> np.ndarray:
    """1/(2r) for the step leaving each kept index i (to i-1), float64 [K]; 0 = first order.

    r_i = (lambda_i - lambda_{i+1}) / (lambda_{i-1} - lambda_i). The first step (i = K-1) has no
    previous x0 and the last (i = 0, to abar = 1, lambda = +inf, where r = 0) is first order, so
    the sampler's output is exactly the data prediction x0(x_{t_0}, t_0) at the last kept step.
    """
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    lam = 0.5 * (np.log(abar) - np.log1p(-abar))
    half_inv_r = np.zeros_like(abar)
    i = np.arange(1, len(abar) - 1)
    half_inv_r[i] = (lam[i - 1] - lam[i]) / (2.0 * (lam[i] - lam[i + 1]))
    return half_inv_r


def _check_args(method: str, eta, shape: tuple[int, ...], noise) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; allowed: {', '.join(METHODS)}")
    if isinstance(eta, Real):  # a traced eta is not checked
        if method != "ddim" and eta != 0:
            raise ValueError(f"eta={eta} applies only to method 'ddim', got method {method!r}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta={eta} must lie in [0, 1] (0: deterministic DDIM, 1: DDPM-like)")
    if len(shape) < 2:
        raise ValueError(f"shape must be batched [B, ...], got {shape}")
    if noise is not None and tuple(noise.shape) != shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected shape {shape}")


def sample(model_fn: ModelFn, diffusion: GaussianDiffusion, shape: Sequence[int], key: jax.Array,
           method: str = "ddpm", eta: float | jax.Array = 0.0, clip_denoised: bool = True,
           noise: jax.Array | None = None, return_trajectory: bool = False
           ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Draw x0 of `shape` by running the reverse chain from x_T = `noise` (N(0, I) from `key`,
    in JAX's default float dtype, when None).

    method: "ddpm" (ancestral, `ddpm_step`), "ddim" (`ddim_step` with `eta`; eta must be 0 for
    the other methods), or "dpm_solver++" (DPM-Solver++(2M), `dpm_solver_pp_step`, with data
    predictions at the K kept steps; the step out of kept step 0 goes to abar = 1, lambda = +inf,
    where only the first-order step is defined, so the result is x0(x_{t_0}, t_0)). One lax.scan
    over the K = diffusion.num_timesteps kept steps, one model call per step; the noise of step
    i is N(0, I) from fold_in(key', i). Works under an outer jit with traced key, noise, eta and
    closed-over params.

    Returns x0, or (x0, trajectory [K+1, *shape]) from x_T to x0 with return_trajectory.
    """
    shape = tuple(int(d) for d in shape)
    _check_args(method, eta, shape, noise)
    noise_key, chain_key = jax.random.split(key)
    x_T = jax.random.normal(noise_key, shape) if noise is None else jnp.asarray(noise)
    batch = shape[0]

    def body(carry, i):
        x, x0_prev = carry
        t = jnp.full((batch,), i, dtype=jnp.int32)
        if method == "dpm_solver++":
            half_inv_r = dpm_solver_pp_half_inv_r(diffusion.alphas_cumprod)  # host, at trace
            x0 = diffusion.p_mean_variance(model_fn, x, t, clip_denoised)["pred_xstart"]
            x_next = dpm_solver_pp_step(
                x, x0, x0_prev, jnp.asarray(diffusion.alphas_cumprod, x.dtype)[i],
                jnp.asarray(diffusion.alphas_cumprod_prev, x.dtype)[i],
                jnp.asarray(half_inv_r, x.dtype)[i])
        else:
            z = jax.random.normal(jax.random.fold_in(chain_key, i), shape, x.dtype)
            if method == "ddpm":
                x_next, x0 = ddpm_step(diffusion, model_fn, x, t, z, clip_denoised)
            else:
                x_next, x0 = ddim_step(diffusion, model_fn, x, t, z, eta, clip_denoised)
        return (x_next, x0), (x_next if return_trajectory else None)

    steps = jnp.arange(diffusion.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    (x0, _), states = jax.lax.scan(body, (x_T, jnp.zeros_like(x_T)), steps)
    if return_trajectory:
        return x0, jnp.concatenate([x_T[None], states], axis=0)
    return x0


def guided_model_fn(model_fn: LabelModelFn, y: jax.Array, null_label: int | jax.Array,
                    scale: float | jax.Array) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022) as a `model_fn(x, t)` for `sample`.

    Calls model_fn([x, x], [t, t], [y, null]) ONCE on the doubled batch and returns
        uncond + scale (cond - uncond)
    on the mean part (the first C = x.shape[-1] channels). With 2C output channels (learned_range:
    [mean C | v C]) the variance part is the conditional pass's, unguided. scale = 1 is the
    conditional model, scale = 0 the unconditional one.
    """
    y = jnp.asarray(y)
    null = jnp.broadcast_to(jnp.asarray(null_label, y.dtype), y.shape)

    def guided(x: jax.Array, t: jax.Array) -> jax.Array:
        batch, channels = x.shape[0], x.shape[-1]
        out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                       jnp.concatenate([y, null]))
        if out.shape[-1] not in (channels, 2 * channels):
            raise ValueError(f"model output has {out.shape[-1]} channels; expected C={channels} "
                             f"or 2C={2 * channels} (learned_range [mean | v])")
        cond, uncond = out[:batch], out[batch:]
        mean = uncond[..., :channels] + scale * (cond[..., :channels] - uncond[..., :channels])
        return jnp.concatenate([mean, cond[..., channels:]], axis=-1)

    return guided
