"""Reverse-process samplers, one table of methods; classifier-free guidance.

Every method is a pure step `(state, i) -> (state, x0)` with exactly one network evaluation
(NFE), run by one `jax.lax.scan` over i = n-1 ... 0, so the program and its compile time do not
grow with the number of steps. The per-step coefficients are float64 numpy tables built on the
host before the scan and cast once to x's dtype (float32 by default, float64 with x64 on and
float64 noise). `model_fn(x_t, timesteps)` always receives the ORIGINAL timesteps
(`diffusion.timesteps_for_model(t)`). Nothing here places data on devices; a caller shards the
batch with jit in/out shardings.

A chain over the K kept timesteps t_{K-1} > ... > t_0 of a (respaced) diffusion evaluates the
model at each of them (NFE = K) and ends with the data prediction at t_0 (the step from t_0 to
abar = 1, lambda = +inf, where every solver is first order). edm_heun spends 2K - 1 NFE on the
same grid (Heun steps, the last one Euler to sigma = 0).
"""
from __future__ import annotations

from collections.abc import Sequence
from numbers import Real

import jax
import jax.numpy as jnp
import numpy as np

from jax_diffusion.diffusion import GaussianDiffusion, ModelFn
from jax_diffusion.samplers.methods import methods_reading, spec_of
from jax_diffusion.samplers.plan import Chain


def _names(methods: list[str]) -> str:
    return " or ".join(repr(m) for m in methods)


def _check_args(method: str, eta, churn, shape: tuple[int, ...], noise) -> None:
    spec = spec_of(method)
    if isinstance(eta, Real):  # a traced eta is not checked
        if "eta" not in spec.knobs and eta != 0:
            raise ValueError(f"eta={eta} applies only to method {_names(methods_reading('eta'))}, "
                             f"got method {method!r}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta={eta} must lie in [0, 1] (0: deterministic DDIM, 1: DDPM-like)")
    if not isinstance(churn, Real) or churn < 0:
        raise ValueError(f"churn={churn!r} must be a number >= 0 (0: Karras et al. Alg. 1)")
    if "churn" not in spec.knobs and churn != 0:
        raise ValueError(f"churn={churn} applies only to method "
                         f"{_names(methods_reading('churn'))}, got {method!r}")
    if len(shape) < 2:
        raise ValueError(f"shape must be batched [B, ...], got {shape}")
    if noise is not None and tuple(noise.shape) != shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected shape {shape}")


def sample(model_fn: ModelFn, diffusion: GaussianDiffusion, shape: Sequence[int], key: jax.Array,
           method: str = "ddpm", eta: float | jax.Array = 0.0, clip_denoised: bool = True,
           noise: jax.Array | None = None, return_trajectory: bool = False, churn: float = 0.0,
           model_alphas_cumprod: np.ndarray | None = None
           ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Draw x0 of `shape` by running the reverse chain over the diffusion's kept timesteps from
    x_T = `noise` (N(0, I) from `key`, in JAX's default float dtype, when None).

    method (a key of METHODS): "ddpm" (ancestral, `ddpm_step`), "ddim" (`ddim_step` with `eta`;
    eta must be 0 for the other methods), "euler" (the probability-flow ODE's Euler step, which
    is DDIM with eta 0), "dpm_solver++" (DPM-Solver++(2M)), "dpm_solver++3m"
    (DPM-Solver++(3M)), "unipc" (UniPC-3 with B(h) = e^h - 1 and its corrector UniC), all
    three on data predictions (`multistep_table`), or "edm_heun" (Karras et al. Alg. 1, Alg. 2
    with `churn` > 0; `edm_heun_table`). With churn, `model_alphas_cumprod` is the model's
    original T-step abar (to snap the churned noise levels to it); it defaults to the
    diffusion's own when that is not respaced. A continuous process's levels diffusion
    (`processes.levels_diffusion`) needs neither: its model takes any level. `key` is split
    into (noise_key, chain_key); the noise of iteration i is N(0, I) from fold_in(chain_key, i).
    Works under an outer jit with traced key, noise, eta and closed-over params.

    Returns x0, or (x0, trajectory [NFE+1, *shape]) from x_T to x0 with return_trajectory (the
    point each evaluation leads to: the predictor's for UniPC, in VP space for edm_heun).
    """
    shape = tuple(int(d) for d in shape)
    _check_args(method, eta, churn, shape, noise)
    if diffusion.model_levels is not None:   # a continuous process: every level is the model's
        model_alphas_cumprod = None
    else:
        if model_alphas_cumprod is None:
            if churn > 0 and not np.array_equal(diffusion.timestep_map,
                                                np.arange(diffusion.original_num_steps)):
                raise ValueError("churn > 0 on a respaced diffusion needs model_alphas_cumprod, "
                                 "the original T-step abar, to snap the churned noise levels to")
            model_alphas_cumprod = diffusion.alphas_cumprod
        model_alphas_cumprod = np.asarray(model_alphas_cumprod, dtype=np.float64)
    noise_key, chain_key = jax.random.split(key)
    x_T = jax.random.normal(noise_key, shape) if noise is None else jnp.asarray(noise)
    plan = spec_of(method).plan(Chain(method, diffusion, model_fn, shape, x_T.dtype, chain_key, eta,
                               clip_denoised, churn, model_alphas_cumprod))

    def body(state, i):
        state, _ = plan.step(state, i)
        return state, (plan.position(state, i) if return_trajectory else None)

    steps = jnp.arange(plan.num_iterations - 1, -1, -1, dtype=jnp.int32)
    state, states = jax.lax.scan(body, plan.init(x_T), steps)
    x0 = plan.position(state, 0)
    if return_trajectory:
        return x0, jnp.concatenate([x_T[None], states], axis=0)
    return x0
