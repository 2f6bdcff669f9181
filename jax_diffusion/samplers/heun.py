"""EDM's Heun sampler (Karras et al. 2022, Alg. 1; Alg. 2 with churn > 0) on the kept timesteps,
written in the EDM frame x_EDM = x_VP sqrt(1 + sigma^2) (coefficients from
`tables.edm_heun_table`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_diffusion.diffusion import GaussianDiffusion
from jax_diffusion.processes import levels_diffusion
from jax_diffusion.samplers.plan import Chain, Plan, batch_timesteps, cast_table
from jax_diffusion.samplers.tables import edm_heun_table


def edm_heun_plan(chain: Chain) -> Plan:
    diffusion, model_abar = chain.diffusion, chain.model_alphas_cumprod
    table, evaluated = edm_heun_table(diffusion, chain.churn, model_abar)
    # Rows reversed so that row i is the iteration the scan runs at index i (n-1 first).
    c = cast_table({name: value[::-1] if value.ndim else value for name, value in table.items()},
                   chain.dtype)
    if len(evaluated) == diffusion.num_timesteps:   # no churned level off the grid
        evaluator = diffusion
    elif model_abar is None:   # a continuous model: a diffusion over every level it sees
        evaluator = levels_diffusion(evaluated)
    else:
        betas = 1.0 - model_abar / np.append(1.0, model_abar[:-1])
        evaluator = GaussianDiffusion(betas, diffusion.model_mean_type, diffusion.model_var_type,
                                      diffusion.loss_type, use_timesteps=evaluated)

    def step(state, i):
        x, x_hat, d = state
        x_eval = x
        if chain.churn > 0:
            z = jax.random.normal(jax.random.fold_in(chain.chain_key, i), chain.shape, x.dtype)
            x_eval = x + c["noise"][i] * z
        denoised = evaluator.p_mean_variance(chain.model_fn, x_eval * c["vp_in"][i],
                                             batch_timesteps(c["t"][i], chain.shape[0]),
                                             chain.clip_denoised)["pred_xstart"]
        d_new = (x_eval - denoised) / c["sigma"][i]
        euler = c["ratio"][i] * x_eval + (1.0 - c["ratio"][i]) * denoised
        heun = x_hat + c["half_dt"][i] * (d + d_new)
        is_euler = c["euler"][i]
        return (jnp.where(is_euler, euler, heun), jnp.where(is_euler, x_eval, x_hat),
                jnp.where(is_euler, d_new, d)), denoised

    def init(x_T):
        return x_T * c["start"], jnp.zeros_like(x_T), jnp.zeros_like(x_T)

    # x_VP = x_EDM / sqrt(1 + sigma^2) at the level each iteration reaches (1 at sigma = 0).
    return Plan(len(table["t"]), init, step, lambda state, i: state[0] * c["vp_out"][i])
