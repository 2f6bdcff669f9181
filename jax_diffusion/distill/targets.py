"""The pure math of distillation: step grids, the progressive-distillation target and its loss
weight (Salimans & Ho 2022, Algorithm 2), and the teacher's ODE step, grid and distance of
consistency distillation (Song et al. 2023, Algorithm 2), on a discrete-time diffusion. The DDIM,
Euler and Heun steps themselves are the samplers' (`samplers.steps`).

Conventions: x_t = alpha_t x0 + sigma_t eps with alpha_t = sqrt(abar_t), sigma_t =
sqrt(1 - abar_t); abar arrays here are per example [B], and abar = 1 stands for the clean end
of the chain (where a DDIM step returns x0). Every function is elementwise in the batch, so it
runs in float64 when its inputs are float64.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from jax_diffusion.samplers.steps import X0Fn, ddim_update, euler_step, heun_step, per_example
from jax_diffusion.schedules import edm_sigmas, step_timesteps, trailing_timesteps

def progressive_target(teacher_x0: X0Fn, x: jax.Array, t: jax.Array, t_mid: jax.Array,
                       t_end: jax.Array, alphas_cumprod: np.ndarray) -> jax.Array:
    """The x0 that makes ONE student DDIM step from t to t_end land where TWO teacher DDIM steps
    t -> t_mid -> t_end land (Salimans & Ho 2022, Algorithm 2):

        z'  = DDIM(x, x0_teacher(x, t), t -> t_mid)
        z'' = DDIM(z', x0_teacher(z', t_mid), t_mid -> t_end)
        x~  = (z'' - (sigma_end / sigma_t) x) / (alpha_end - (sigma_end / sigma_t) alpha_t)

    t, t_mid, t_end: original timesteps [B] with t > t_mid > t_end; t_end = -1 is the clean end
    (abar = 1), where x~ = z''. `alphas_cumprod`: the T-step abar table.
    """
    table = jnp.asarray(alphas_cumprod, x.dtype)
    abar_t, abar_mid = table[t], table[t_mid]
    abar_end = jnp.where(t_end < 0, jnp.ones((), x.dtype), table[jnp.maximum(t_end, 0)])
    z_mid = ddim_update(x, teacher_x0(x, t), abar_t, abar_mid)
    z_end = ddim_update(z_mid, teacher_x0(z_mid, t_mid), abar_mid, abar_end)
    ratio = per_example(jnp.sqrt((1.0 - abar_end) / (1.0 - abar_t)), x)
    return ((z_end - ratio * x)
            / (per_example(jnp.sqrt(abar_end), x) - ratio * per_example(jnp.sqrt(abar_t), x)))


def truncated_snr_weight(abar: jax.Array) -> jax.Array:
    """max(SNR, 1) = max(abar / (1 - abar), 1): the x-space loss weight of progressive
    distillation ("truncated SNR", Salimans & Ho 2022, sec. 4), finite at SNR = 0."""
    return jnp.maximum(abar / (1.0 - abar), 1.0)


def stage_timesteps(num_timesteps: int, student_steps: int, index: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(t, t_mid, t_end) original timesteps [B] for student steps `index` [B] in
    0..student_steps-1 of a stage whose teacher has 2 * student_steps steps on the trailing
    grid: the student's step i spans teacher steps 2i+1 -> 2i -> 2i-1 (-1: the clean end)."""
    grid = jnp.asarray(trailing_timesteps(num_timesteps, 2 * student_steps), jnp.int32)
    padded = jnp.concatenate([jnp.full((1,), -1, jnp.int32), grid])  # padded[k + 1] = grid[k]
    return padded[2 * index + 2], padded[2 * index + 1], padded[2 * index]



# ---------------------------------------------------------------- consistency distillation
# The teacher's ODE step of consistency distillation: the values of config.distill.solver.
ODE_STEPS = {"heun": heun_step, "euler": euler_step}


def consistency_timesteps(betas: np.ndarray, num_scales: int, sigma_max: float) -> np.ndarray:
    """The num_scales levels (ascending original timesteps) consistency distillation trains on:
    t = T - 1, where sampling starts, and below it Karras-spaced levels (rho 7) from sigma_min
    = sigma_0 to the last timestep with sigma <= sigma_max, each the timestep nearest in log
    sigma (`step_timesteps` 'karras' on that head of the chain); all num_scales Karras-spaced
    when sigma_{T-1} <= sigma_max. A cosine schedule reaches sigma 2e4 at T - 1: without the cap
    most levels would be pure noise."""
    betas = np.asarray(betas, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    sigma = edm_sigmas(abar)
    total = len(betas)
    head = int(np.searchsorted(sigma, sigma_max, side="right"))  # timesteps with sigma <= max
    if num_scales < 3 or head < num_scales - 1:
        raise ValueError(f"num_scales={num_scales} levels need num_scales >= 3 and at least "
                         f"num_scales - 1 timesteps with sigma <= sigma_max={sigma_max} "
                         f"(there are {head})")
    if head >= total:
        return step_timesteps("karras", total, num_scales, betas, sigma_max=sigma_max)
    return np.append(step_timesteps("karras", head, num_scales - 1, betas[:head],
                                    sigma_max=sigma_max), total - 1)


def pseudo_huber(difference: jax.Array) -> jax.Array:
    """sqrt(||d||^2 + c^2) - c per example [B], c = 0.00054 sqrt(dim) (Song & Dhariwal 2023,
    "Improved techniques for training consistency models"): the L2 norm for large errors, so
    a few far-off examples do not dominate as under the squared error, and smooth at 0."""
    dim = int(np.prod(difference.shape[1:]))
    c = 0.00054 * np.sqrt(dim)
    squared = jnp.sum(difference.reshape(difference.shape[0], -1) ** 2, axis=1)
    return jnp.sqrt(squared + c ** 2) - c
