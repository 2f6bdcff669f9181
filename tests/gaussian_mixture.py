"""Test helper: an isotropic Gaussian mixture as the data distribution, with its exact denoiser.

Data x0 ~ sum_k w_k N(mu_k, s_k^2 I) in D dimensions. Under x_t = a x0 + s eps
(a = sqrt(abar_t), s = sqrt(1 - abar_t)) the marginal is again a mixture,
    p(x_t) = sum_k w_k N(a mu_k, v_k I),  v_k = a^2 s_k^2 + s^2,
so the exact noise predictor is eps*(x_t, t) = E[eps | x_t] = -s grad log p(x_t)
    = s sum_k r_k(x_t) (x_t - a mu_k) / v_k,
with responsibilities r_k = softmax_k(log w_k + log N(x_t; a mu_k, v_k I)) taken by log-sum-exp.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    weights: np.ndarray      # [K], sums to 1
    means: np.ndarray        # [K, D]
    stds: np.ndarray         # [K]
    event_shape: tuple       # shape of one sample, prod = D

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n exact samples [n, *event_shape] (float64)."""
        k = rng.choice(len(self.weights), size=n, p=self.weights)
        x = self.means[k] + self.stds[k, None] * rng.standard_normal((n, self.means.shape[1]))
        return x.reshape((n,) + self.event_shape)



# The mixture the sampler, solver and distillation tests share: three overlapping modes of
# different weights and widths in 4 dimensions, shaped as 2x2 one-channel images.
THREE_MODES = GaussianMixture(
    weights=np.array([0.2, 0.3, 0.5]),
    means=1.75 * np.array([[-0.4, -0.4, 0.4, 0.4], [0.4, -0.4, -0.4, 0.0], [0.2, 0.4, 0.0, -0.4]]),
    stds=np.array([0.25, 0.3, 0.3]),
    event_shape=(2, 2, 1))

def log_responsibilities(gmm: GaussianMixture, x: jax.Array, a: jax.Array,
                         s: jax.Array) -> jax.Array:
    """log r_k(x_t), [B, K], for x flattened to [B, D] and a, s of shape [B, 1]."""
    dim = x.shape[1]
    means = jnp.asarray(gmm.means, x.dtype)
    var = a ** 2 * jnp.asarray(gmm.stds, x.dtype) ** 2 + s ** 2                     # [B, K]
    sq = jnp.sum((x[:, None, :] - a[:, :, None] * means[None]) ** 2, axis=-1)      # [B, K]
    logits = (jnp.log(jnp.asarray(gmm.weights, x.dtype)) - 0.5 * sq / var
              - 0.5 * dim * jnp.log(2.0 * jnp.pi * var))
    return logits - jax.nn.logsumexp(logits, axis=1, keepdims=True)


def eps_star(gmm: GaussianMixture, x_t: jax.Array, abar: jax.Array) -> jax.Array:
    """The exact eps*(x_t, t) = s sum_k r_k (x_t - a mu_k) / v_k, for abar [B] (abar < 1)."""
    x = x_t.reshape(x_t.shape[0], -1)
    a = jnp.sqrt(abar)[:, None]
    s = jnp.sqrt(1.0 - abar)[:, None]
    r = jnp.exp(log_responsibilities(gmm, x, a, s))                                  # [B, K]
    var = a ** 2 * jnp.asarray(gmm.stds, x.dtype) ** 2 + s ** 2                     # [B, K]
    diff = x[:, None, :] - a[:, :, None] * jnp.asarray(gmm.means, x.dtype)[None]     # [B, K, D]
    eps = s * jnp.sum((r / var)[:, :, None] * diff, axis=1)
    return eps.reshape(x_t.shape)


def eps_model(gmm: GaussianMixture, alphas_cumprod: np.ndarray):
    """model_fn(x_t, timesteps) -> eps*; timesteps index the ORIGINAL T-step abar table."""

    def model_fn(x: jax.Array, timesteps: jax.Array) -> jax.Array:
        return eps_star(gmm, x, jnp.asarray(alphas_cumprod, x.dtype)[timesteps])

    return model_fn


@dataclasses.dataclass
class Recovery:
    ok: bool
    weights: np.ndarray      # measured component weights [K]
    var_ratios: np.ndarray   # sample variance / true variance, averaged over dims [K]


def check_recovery(gmm: GaussianMixture, samples, weight_tol: float = 0.03,
                   var_range: tuple[float, float] = (0.8, 1.2)) -> Recovery:
    """Assign each sample to its most probable component under the true mixture and compare.

    ok iff all samples are finite, every weight is within weight_tol of the truth and every
    per-component variance ratio lies in var_range.
    """
    x = np.asarray(samples, dtype=np.float64).reshape(len(samples), -1)
    num = len(gmm.weights)
    if not np.all(np.isfinite(x)):
        return Recovery(False, np.full(num, np.nan), np.full(num, np.nan))
    # Most probable component at t = 0: argmax_k log w_k + log N(x; mu_k, s_k^2 I).
    sq = np.sum((x[:, None, :] - gmm.means[None]) ** 2, axis=-1)
    labels = np.argmax(np.log(gmm.weights) - 0.5 * sq / gmm.stds ** 2
                       - x.shape[1] * np.log(gmm.stds), axis=1)
    weights = np.bincount(labels, minlength=num) / len(x)
    var_ratios = np.array([
        np.mean(np.var(x[labels == k], axis=0, ddof=1)) / gmm.stds[k] ** 2
        if np.sum(labels == k) > 1 else 0.0 for k in range(num)])
    ok = bool(np.all(np.abs(weights - gmm.weights) <= weight_tol)
              and np.all((var_ratios >= var_range[0]) & (var_ratios <= var_range[1])))
    return Recovery(ok, weights, var_ratios)


def x0_star_np(gmm: GaussianMixture, x_t: np.ndarray, abar: float) -> np.ndarray:
    """The exact data prediction E[x0 | x_t] = (x_t - s eps*) / a in float64 numpy, for one
    abar < 1 and x_t of any batched shape: the same formula as eps_star, without JAX."""
    x = np.asarray(x_t, dtype=np.float64).reshape(len(x_t), -1)
    a, s = np.sqrt(abar), np.sqrt(1.0 - abar)
    var = a ** 2 * gmm.stds ** 2 + s ** 2                                          # [K]
    diff = x[:, None, :] - a * gmm.means[None]                                     # [B, K, D]
    logits = (np.log(gmm.weights) - 0.5 * np.sum(diff ** 2, axis=-1) / var
              - 0.5 * x.shape[1] * np.log(2.0 * np.pi * var))
    logits -= logits.max(axis=1, keepdims=True)
    r = np.exp(logits)
    r /= r.sum(axis=1, keepdims=True)
    eps = s * np.sum((r / var)[:, :, None] * diff, axis=1)
    return ((x - s * eps) / a).reshape(np.shape(x_t))
