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

import dataclasses
from collections.abc import Callable, Sequence
from numbers import Real

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jax_diffusion import schedules
from jax_diffusion.diffusion import GaussianDiffusion, ModelFn, create_diffusion, extract
from jax_diffusion.errors import ConfigError
from jax_diffusion.solver_tables import edm_heun_table, multistep_table

# Names used by checks outside the repository: the values of config.sample.method.
METHODS = ("ddpm", "ddim", "dpm_solver++", "dpm_solver++3m", "unipc", "edm_heun")

LabelModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


# ---------------------------------------------------------------- DDPM and DDIM steps
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


# ---------------------------------------------------------------- the method table
@dataclasses.dataclass(frozen=True)
class Chain:
    """What every method's plan is built from (all static but the key)."""
    method: str
    diffusion: GaussianDiffusion
    model_fn: ModelFn
    shape: tuple[int, ...]
    dtype: jnp.dtype
    chain_key: jax.Array
    eta: float | jax.Array
    clip_denoised: bool
    churn: float
    model_alphas_cumprod: np.ndarray


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one method runs: `init(x_T) -> state`; `step(state, i) -> (state, x0)` for i = n-1
    down to 0, one model call each; `position(state, i) -> x` in VP space (the trajectory; at
    i = 0 the sample)."""
    num_iterations: int
    init: Callable
    step: Callable
    position: Callable


def _cast(table: dict[str, np.ndarray], dtype) -> dict[str, jax.Array]:
    """Float tables to `dtype` once, outside the scan; integer and boolean ones unchanged."""
    return {name: jnp.asarray(value, dtype) if np.issubdtype(value.dtype, np.floating)
            else jnp.asarray(value) for name, value in table.items()}


def _batch_t(i: jax.Array, batch: int) -> jax.Array:
    return jnp.full((batch,), i, dtype=jnp.int32)


def _ancestral_plan(chain: Chain) -> Plan:
    diffusion, shape = chain.diffusion, chain.shape

    def step(x, i):
        z = jax.random.normal(jax.random.fold_in(chain.chain_key, i), shape, x.dtype)
        t = _batch_t(i, shape[0])
        if chain.method == "ddpm":
            return ddpm_step(diffusion, chain.model_fn, x, t, z, chain.clip_denoised)
        return ddim_step(diffusion, chain.model_fn, x, t, z, chain.eta, chain.clip_denoised)

    return Plan(diffusion.num_timesteps, lambda x: x, step, lambda x, i: x)


def _multistep_plan(chain: Chain) -> Plan:
    diffusion, batch = chain.diffusion, chain.shape[0]
    table = multistep_table(chain.method, diffusion.alphas_cumprod)
    # The window the method uses (2M: 2 outputs, 3M: 3, UniPC: 4), so no image-sized zeros
    # are carried or multiplied.
    used = np.flatnonzero(np.any(table["pred"] != 0, axis=0) | np.any(table["corr"] != 0, axis=0))
    width = int(used[-1]) + 1
    c = _cast(table, chain.dtype)
    corrects = chain.method == "unipc"

    def combine(weights, window):
        return sum(weights[j] * window[j] for j in range(width))

    def step(state, i):
        x, base, history = state
        m = diffusion.p_mean_variance(chain.model_fn, x, _batch_t(i, batch),
                                      chain.clip_denoised)["pred_xstart"]
        window = (m,) + history
        if corrects:
            x = c["keep"][i] * x + c["base"][i] * base + combine(c["corr"][i], window)
        x_next = c["scale"][i] * x + combine(c["pred"][i], window)
        return (x_next, x, window[:width - 1]), m

    def init(x_T):
        zeros = jnp.zeros_like(x_T)
        return x_T, zeros, (zeros,) * (width - 1)

    return Plan(diffusion.num_timesteps, init, step, lambda state, i: state[0])


def _edm_heun_plan(chain: Chain) -> Plan:
    diffusion, model_abar = chain.diffusion, chain.model_alphas_cumprod
    table, evaluated = edm_heun_table(diffusion, chain.churn, model_abar)
    # Rows reversed so that row i is the iteration the scan runs at index i (n-1 first).
    c = _cast({name: value[::-1] if value.ndim else value for name, value in table.items()},
              chain.dtype)
    if np.array_equal(evaluated, diffusion.timestep_map):
        evaluator = diffusion
    else:   # churned levels off the grid: a diffusion over every level the model sees
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
                                             _batch_t(c["t"][i], chain.shape[0]),
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


PLANS: dict[str, Callable[[Chain], Plan]] = {
    "ddpm": _ancestral_plan, "ddim": _ancestral_plan, "dpm_solver++": _multistep_plan,
    "dpm_solver++3m": _multistep_plan, "unipc": _multistep_plan, "edm_heun": _edm_heun_plan}


# ---------------------------------------------------------------- sample
def num_evaluations(method: str, num_steps: int) -> int:
    """NFE of a chain over `num_steps` kept timesteps: 2K - 1 for edm_heun, else K."""
    return 2 * num_steps - 1 if method == "edm_heun" else num_steps


def nfe_problem(method: str, nfe: int) -> str | None:
    """Why `method` cannot spend exactly `nfe` network evaluations, or None if it can."""
    if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)) or nfe < 1:
        return "must be a positive integer"
    if method == "edm_heun" and nfe % 2 == 0:
        return ("must be odd for edm_heun (Heun steps cost 2 evaluations, the last Euler step "
                f"1: 2K - 1), e.g. {nfe - 1} or {nfe + 1}")
    return None


def chain_steps(method: str, nfe: int) -> int:
    """The number K of kept timesteps a chain of `nfe` evaluations visits."""
    return (nfe + 1) // 2 if method == "edm_heun" else nfe


def _check_args(method: str, eta, churn, shape: tuple[int, ...], noise) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; allowed: {', '.join(METHODS)}")
    if isinstance(eta, Real):  # a traced eta is not checked
        if method != "ddim" and eta != 0:
            raise ValueError(f"eta={eta} applies only to method 'ddim', got method {method!r}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta={eta} must lie in [0, 1] (0: deterministic DDIM, 1: DDPM-like)")
    if not isinstance(churn, Real) or churn < 0:
        raise ValueError(f"churn={churn!r} must be a number >= 0 (0: Karras et al. Alg. 1)")
    if method != "edm_heun" and churn != 0:
        raise ValueError(f"churn={churn} applies only to method 'edm_heun', got {method!r}")
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

    method (METHODS): "ddpm" (ancestral, `ddpm_step`), "ddim" (`ddim_step` with `eta`; eta must
    be 0 for the other methods), "dpm_solver++" (DPM-Solver++(2M)), "dpm_solver++3m"
    (DPM-Solver++(3M)), "unipc" (UniPC-3 with B(h) = e^h - 1 and its corrector UniC), all
    three on data predictions (`multistep_table`), or "edm_heun" (Karras et al. Alg. 1, Alg. 2
    with `churn` > 0; `edm_heun_table`). With churn, `model_alphas_cumprod` is the model's
    original T-step abar (to snap the churned noise levels to it); it defaults to the
    diffusion's own when that is not respaced. `key` is split into (noise_key, chain_key);
    the noise of iteration i is N(0, I) from fold_in(chain_key, i). Works under an outer jit
    with traced key, noise, eta and closed-over params.

    Returns x0, or (x0, trajectory [NFE+1, *shape]) from x_T to x0 with return_trajectory (the
    point each evaluation leads to: the predictor's for UniPC, in VP space for edm_heun).
    """
    shape = tuple(int(d) for d in shape)
    _check_args(method, eta, churn, shape, noise)
    if model_alphas_cumprod is None:
        if churn > 0 and not np.array_equal(diffusion.timestep_map,
                                            np.arange(diffusion.original_num_steps)):
            raise ValueError("churn > 0 on a respaced diffusion needs model_alphas_cumprod, the "
                             "original T-step abar, to snap the churned noise levels to")
        model_alphas_cumprod = diffusion.alphas_cumprod
    noise_key, chain_key = jax.random.split(key)
    x_T = jax.random.normal(noise_key, shape) if noise is None else jnp.asarray(noise)
    plan = PLANS[method](Chain(method, diffusion, model_fn, shape, x_T.dtype, chain_key, eta,
                               clip_denoised, churn,
                               np.asarray(model_alphas_cumprod, dtype=np.float64)))

    def body(state, i):
        state, _ = plan.step(state, i)
        return state, (plan.position(state, i) if return_trajectory else None)

    steps = jnp.arange(plan.num_iterations - 1, -1, -1, dtype=jnp.int32)
    state, states = jax.lax.scan(body, plan.init(x_T), steps)
    x0 = plan.position(state, 0)
    if return_trajectory:
        return x0, jnp.concatenate([x_T[None], states], axis=0)
    return x0


# ---------------------------------------------------------------- classifier-free guidance
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


# ---------------------------------------------------------------- from a config
def check_sample_config(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError (one line: key, value, what is allowed) for a config.sample that
    cannot run on config.diffusion."""
    sample_config, total = config.sample, config.diffusion.num_timesteps
    method = sample_config.method
    if method not in METHODS:
        raise ConfigError(f"config.sample.method={method!r} is unknown; allowed: "
                          f"{', '.join(METHODS)}")
    if sample_config.schedule not in schedules.STEP_SCHEDULES:
        raise ConfigError(f"config.sample.schedule={sample_config.schedule!r} is unknown; "
                          f"allowed: {', '.join(schedules.STEP_SCHEDULES)}")
    eta, churn = sample_config.eta, sample_config.churn
    if not 0.0 <= eta <= 1.0:
        raise ConfigError(f"config.sample.eta={eta} must lie in [0, 1] (0: deterministic DDIM, "
                          "1: DDPM-like)")
    if eta != 0 and method != "ddim":
        raise ConfigError(f"config.sample.eta={eta} applies only to config.sample.method='ddim' "
                          f"(got {method!r}); set config.sample.eta=0")
    if churn < 0:
        raise ConfigError(f"config.sample.churn={churn} must be >= 0 (0: Karras et al. Alg. 1)")
    if churn != 0 and method != "edm_heun":
        raise ConfigError(f"config.sample.churn={churn} applies only to "
                          f"config.sample.method='edm_heun' (got {method!r}); set "
                          "config.sample.churn=0")
    nfe = sample_config.num_steps
    problem = nfe_problem(method, nfe)
    if problem is None and not 1 <= chain_steps(method, nfe) <= total:
        problem = (f"must be at most {num_evaluations(method, total)} for {method!r} with "
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
    if sample_config.schedule not in schedules.SIGMA_SCHEDULES:
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


def chain_diffusion(config: ml_collections.ConfigDict) -> GaussianDiffusion:
    """The diffusion respaced to the timesteps config.sample's method and schedule visit for
    config.sample.num_steps network evaluations (all T steps unrespaced)."""
    check_sample_config(config)
    total = config.diffusion.num_timesteps
    betas = schedules.get_beta_schedule(config.diffusion.schedule, total)
    kept = schedules.step_timesteps(config.sample.schedule, total,
                                    chain_steps(config.sample.method, config.sample.num_steps),
                                    betas, config.sample.sigma_min, config.sample.sigma_max)
    return create_diffusion(config.diffusion, respacing=None if len(kept) == total else kept)


def sample_from_config(model_fn: ModelFn, config: ml_collections.ConfigDict,
                       shape: Sequence[int], key: jax.Array,
                       noise: jax.Array | None = None) -> jax.Array:
    """x0 of `shape` with the sampler config.sample describes (method, num_steps = NFE,
    schedule, eta, churn, clip_denoised) on config.diffusion; `model_fn(x, t)` is the network
    (already guided, see `guided_model_fn`). The library entry point of --mode=sample/eval."""
    diffusion = chain_diffusion(config)
    betas = schedules.get_beta_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    sample_config = config.sample
    return sample(model_fn, diffusion, shape, key, method=sample_config.method,
                  eta=sample_config.eta, clip_denoised=sample_config.clip_denoised, noise=noise,
                  churn=sample_config.churn, model_alphas_cumprod=np.cumprod(1.0 - betas))
