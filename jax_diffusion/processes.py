"""The continuous Gaussian paths x_t = alpha(t) x0 + sigma(t) eps beside the discrete VP process
of diffusion.py: EDM's (Karras et al. 2022; alpha = 1, sigma = t) and rectified flow (Liu et al.
2022, Lipman et al. 2023; alpha = 1 - t, sigma = t).

Every path is read through its noise level s = sigma / alpha (EDM's sigma; the step grids are
spaced in it) and its VP frame x_vp = x_t / sqrt(alpha^2 + sigma^2), where it is the VP process
with abar = 1 / (1 + s^2). The samplers run in that frame on a `GaussianDiffusion` over the
visited levels (`levels_diffusion`), with the network wrapped into a data prediction
(`ContinuousProcess.denoise_vp`): one solver suite serves every process.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_diffusion.diffusion import GaussianDiffusion, mean_flat

# Names used by checks outside the repository: the values of config.diffusion.process.
PROCESSES = ("vp", "edm", "flow")
CONTINUOUS = ("edm", "flow")
# The network's noise input is EDM's c_noise = ln(s) / 4 (edm) or t (flow) times this: the
# sinusoidal embedding (max period 10,000) was built for the DDPM range [0, 1000), as EDM's own
# VP wrapper feeds 999 t for the same network family.
NOISE_INPUT_SCALE = 1000.0

NetworkFn = Callable[[jax.Array, jax.Array], jax.Array]   # (network input, noise input) -> F


def process_name(diffusion_config) -> str:
    """config.diffusion.process, "vp" for configs saved before the key existed."""
    return getattr(diffusion_config, "process", None) or "vp"


@dataclasses.dataclass(frozen=True)
class ContinuousProcess:
    """One continuous path; levels are s = sigma / alpha per example, arrays [B]. The range of
    levels a sampler visits is config.diffusion.sigma_min/max, read where the grid is built."""
    name: str
    sigma_data: float

    def alpha_sigma(self, s: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(alpha, sigma) of the path at level s: edm (1, s); flow (1 - t, t), t = s / (1 + s)."""
        if self.name == "edm":
            return jnp.ones_like(s), s
        return 1.0 / (1.0 + s), s / (1.0 + s)

    def time(self, s):
        """The path's own time at level s: edm t = s; flow t = s / (1 + s). numpy or JAX."""
        return s if self.name == "edm" else s / (1.0 + s)

    def level(self, t):
        """The inverse of `time`: edm s = t; flow s = t / (1 - t)."""
        return t if self.name == "edm" else t / (1.0 - t)

    def noise_input(self, s: jax.Array) -> jax.Array:
        """What the network is conditioned on: NOISE_INPUT_SCALE x (edm: ln(s) / 4, EDM's
        c_noise; flow: t)."""
        if self.name == "edm":
            return NOISE_INPUT_SCALE * 0.25 * jnp.log(s)
        return NOISE_INPUT_SCALE * s / (1.0 + s)

    def denoise(self, network_fn: NetworkFn, x: jax.Array, s: jax.Array) -> jax.Array:
        """The data prediction D(x; s) from x in the path's own frame.

        edm (EDM's preconditioning, their Table 1): D = c_skip x + c_out F(c_in x, c_noise),
            c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2),
            c_in = 1 / sqrt(s^2 + sd^2), sd = sigma_data.
        flow: F is the velocity dx/dt = eps - x0, so D = x - t F.
        """
        level = _per_example(s, x)
        if self.name == "edm":
            sd = self.sigma_data
            norm = jnp.sqrt(level ** 2 + sd ** 2)
            out = network_fn(x / norm, self.noise_input(s)).astype(x.dtype)
            return sd ** 2 / norm ** 2 * x + level * sd / norm * out
        t = level / (1.0 + level)
        return x - t * network_fn(x, self.noise_input(s)).astype(x.dtype)

    def denoise_vp(self, network_fn: NetworkFn, x_vp: jax.Array, s: jax.Array) -> jax.Array:
        """D from x in the VP frame, x = x_vp sqrt(alpha^2 + sigma^2): what the samplers call."""
        alpha, sigma = self.alpha_sigma(_per_example(s, x_vp))
        return self.denoise(network_fn, x_vp * jnp.sqrt(alpha ** 2 + sigma ** 2), s)

    def training_losses(self, network_fn: NetworkFn, x0: jax.Array, s: jax.Array,
                        noise: jax.Array) -> dict:
        """Per-example losses [B] at levels s: {"loss", "mse"}.

        edm: lambda(s) ||D(x0 + s eps; s) - x0||^2 with lambda = (s^2 + sd^2) / (s sd)^2 (EDM's
             weight: unit loss at every level at initialisation); "mse" is the unweighted term.
        flow: ||F(x_t, t) - (eps - x0)||^2 at x_t = (1 - t) x0 + t eps (the velocity loss).
        """
        level = _per_example(s, x0)
        alpha, sigma = self.alpha_sigma(level)
        x_t = alpha * x0 + sigma * noise
        if self.name == "edm":
            mse = mean_flat((self.denoise(network_fn, x_t, s) - x0) ** 2)
            sd = self.sigma_data
            return {"mse": mse, "loss": (s ** 2 + sd ** 2) / (s * sd) ** 2 * mse}
        velocity = network_fn(x_t, self.noise_input(s)).astype(x0.dtype)
        mse = mean_flat((velocity - (noise - x0)) ** 2)
        return {"mse": mse, "loss": mse}


def continuous_process(diffusion_config) -> ContinuousProcess:
    """The ContinuousProcess config.diffusion describes (process "edm" or "flow")."""
    return ContinuousProcess(process_name(diffusion_config), float(diffusion_config.sigma_data))


def levels_diffusion(levels: np.ndarray) -> GaussianDiffusion:
    """The VP-frame diffusion a sampler walks over the ascending noise levels s_0 < ... < s_K-1:
    abar_i = 1 / (1 + s_i^2), a data-predicting model (mean_type "x0", the posterior variance for
    DDPM steps), and the model called with the level s itself (`model_levels`)."""
    levels = np.asarray(levels, dtype=np.float64)
    if levels.ndim != 1 or not np.all(levels > 0) or not np.all(np.diff(levels) > 0):
        raise ValueError(f"noise levels must be positive and increasing, got {levels}")
    abar = 1.0 / (1.0 + levels ** 2)
    betas = 1.0 - abar / np.append(1.0, abar[:-1])
    return GaussianDiffusion(betas, "x0", "fixed_small", model_levels=levels)


def _per_example(s: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.asarray(s, x.dtype).reshape(jnp.shape(s) + (1,) * (x.ndim - 1))
