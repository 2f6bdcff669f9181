"""The ancestral chains: DDPM (`ddpm_step`), DDIM with any eta (`ddim_step`) and its eta-0 form,
Euler, one step per kept timestep of the (respaced) diffusion."""
from __future__ import annotations

import jax

from jax_diffusion.samplers.plan import Chain, Plan, batch_timesteps
from jax_diffusion.samplers.steps import ddim_step, ddpm_step


def ddpm_plan(chain: Chain) -> Plan:
    """Ho et al. 2020: x_{t-1} ~ p(x_{t-1} | x_t); the noise of step i from fold_in(key, i)."""
    return _ancestral_plan(chain, lambda x, t, z: ddpm_step(
        chain.diffusion, chain.model_fn, x, t, z, chain.clip_denoised))


def ddim_plan(chain: Chain) -> Plan:
    """Song et al. 2021 with chain.eta (0: deterministic)."""
    return _ancestral_plan(chain, lambda x, t, z: ddim_step(
        chain.diffusion, chain.model_fn, x, t, z, chain.eta, chain.clip_denoised))


def euler_plan(chain: Chain) -> Plan:
    """Euler steps of the probability-flow ODE, in sigma / alpha for any Gaussian path: the
    same update as DDIM with eta 0 (both are exact when the data prediction is constant)."""
    return _ancestral_plan(chain, lambda x, t, z: ddim_step(
        chain.diffusion, chain.model_fn, x, t, z, 0.0, chain.clip_denoised))


def _ancestral_plan(chain: Chain, one_step) -> Plan:
    shape = chain.shape

    def step(x, i):
        z = jax.random.normal(jax.random.fold_in(chain.chain_key, i), shape, x.dtype)
        return one_step(x, batch_timesteps(i, shape[0]), z)

    return Plan(chain.diffusion.num_timesteps, lambda x: x, step, lambda x, i: x)
