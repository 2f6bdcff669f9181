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
import math
from collections.abc import Callable, Sequence
from numbers import Real

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jax_diffusion import schedules
from jax_diffusion.diffusion import GaussianDiffusion, ModelFn, create_diffusion, extract
from jax_diffusion.errors import ConfigError

# Names used by checks outside the repository: the values of config.sample.method.
METHODS = ("ddpm", "ddim", "dpm_solver++", "dpm_solver++3m", "unipc", "edm_heun")
# Multistep data-prediction solvers (Lu et al. 2022; Zhao et al. 2023) and their highest order.
MULTISTEP_ORDERS = {"dpm_solver++": 2, "dpm_solver++3m": 3, "unipc": 3}
# The dpm-solver reference lowers the order of the final steps below this many steps.
LOWER_ORDER_FINAL_BELOW = 10
HISTORY = 4   # model outputs a step combines: m_i and the three before it (UniC-3)

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


# ---------------------------------------------------------------- multistep coefficient tables
def half_lambda(alphas_cumprod: np.ndarray) -> np.ndarray:
    """lambda = log(alpha / sigma) = 0.5 log(abar / (1 - abar)), float64."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    return 0.5 * (np.log(abar) - np.log1p(-abar))


def multistep_orders(method: str, num_steps: int) -> np.ndarray:
    """The order of the step leaving each kept index i (to i-1), int [K].

    Warm-up: the step leaving K-1 is first order, the next second order, ... (no earlier model
    outputs yet). The step out of i = 0 goes to lambda = +inf and is first order. Lower orders at
    the end as the references do: DPM-Solver++(3M) below LOWER_ORDER_FINAL_BELOW steps (the
    dpm-solver reference's lower_order_final), UniPC always (its reference's lower_order_final).
    """
    top = MULTISTEP_ORDERS[method]
    i = np.arange(num_steps)
    orders = np.minimum(top, num_steps - i)
    if method == "unipc" or (method == "dpm_solver++3m" and num_steps < LOWER_ORDER_FINAL_BELOW):
        orders = np.minimum(orders, i + 1)
    orders[0] = 1
    return orders


def _dpm_solver_pp_row(lam: np.ndarray, sigma: np.ndarray, alpha: np.ndarray, i: int,
                       order: int) -> tuple[float, np.ndarray]:
    """(a, w): x_{i-1} = a x_i + sum_j w_j m_{i+j} for one DPM-Solver++ step of `order`.

    Lu et al. 2022, data prediction, h = lambda_{i-1} - lambda_i, phi_1 = e^{-h} - 1:
      1: x' = (sigma_s / sigma_t) x - alpha_s phi_1 m_i                         (= DDIM)
      2: ... - 0.5 alpha_s phi_1 D1,  D1 = (m_i - m_{i+1}) / r0,  r0 = h_0 / h    (2M)
      3: ... + alpha_s phi_2 D1 - alpha_s phi_3 D2 with phi_2 = phi_1 / h + 1,
         phi_3 = phi_2 / h - 1/2, D1_k = (m_{i+k} - m_{i+k+1}) / r_k,
         D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1) ~ h x0',
         D2 = 2 (D1_0 - D1_1) / (r0 + r1) ~ h^2 x0''                            (3M)
    D1 and D2 are the derivatives, times h and h^2, of the quadratic through the last three data
    predictions in lambda, so the step integrates that quadratic exactly (the Taylor form of Lu
    et al.'s eq. for the data prediction). The dpm-solver and diffusers multistep code omit the
    2 in D2, which leaves a local O(h^3) error and second-order convergence (measured in
    tests/test_solvers.py); their singlestep third-order solver has it.
    """
    h = lam[i - 1] - lam[i]
    alpha_s = alpha[i - 1]
    phi_1 = np.expm1(-h)
    w = np.zeros(HISTORY)
    w[0] = -alpha_s * phi_1
    if order >= 2:
        r0 = (lam[i] - lam[i + 1]) / h
        d1_0 = np.zeros(HISTORY)          # D1_0 as weights on the window
        d1_0[0], d1_0[1] = 1.0 / r0, -1.0 / r0
        if order == 2:
            w += -0.5 * alpha_s * phi_1 * d1_0
        else:
            r1 = (lam[i + 1] - lam[i + 2]) / h
            d1_1 = np.zeros(HISTORY)
            d1_1[1], d1_1[2] = 1.0 / r1, -1.0 / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = 2.0 * (d1_0 - d1_1) / (r0 + r1)
            phi_2 = phi_1 / h + 1.0
            phi_3 = phi_2 / h - 0.5
            w += alpha_s * phi_2 * d1 - alpha_s * phi_3 * d2
    return sigma[i - 1] / sigma[i], w


def _unipc_rhos(lam: np.ndarray, start: int, end: int, order: int,
                corrector: bool) -> tuple[np.ndarray, float]:
    """(rho, B(h)) of UniP (predictor) or UniC (corrector) with B(h) = e^h - 1 ("bh2"),
    for the step from kept index `start` to `end` = start - 1 (Zhao et al. 2023, Alg. 2-3).

    r_k = (lambda_{start+k} - lambda_start) / h for k < order, then r = 1; R[l, k] = r_k^l;
    with hh = -h (data prediction), b_l = (l+1)! h phi_{l+2}(hh) / B(h), where
    h phi_1 = e^hh - 1 and h phi_{k+1} = h phi_k / hh - 1/k!.
    The predictor solves R[:-1, :-1] rho = b[:-1] (rho = 1/2 at order 2), the corrector
    R rho = b (rho = 1/2 at order 1), as the reference implementation does.
    """
    h = lam[end] - lam[start]
    hh = -h
    b_h = np.expm1(hh)
    rks = np.array([(lam[start + k] - lam[start]) / h for k in range(1, order)] + [1.0])
    r_matrix = np.stack([rks ** power for power in range(order)])
    b = np.zeros(order)
    h_phi = np.expm1(hh) / hh - 1.0
    factorial = 1.0
    for l in range(order):  # noqa: E741
        b[l] = h_phi * factorial / b_h
        factorial *= l + 2
        h_phi = h_phi / hh - 1.0 / factorial
    if corrector:
        rho = np.array([0.5]) if order == 1 else np.linalg.solve(r_matrix, b)
    elif order == 1:
        rho = np.zeros(0)
    else:
        rho = np.array([0.5]) if order == 2 else np.linalg.solve(r_matrix[:-1, :-1], b[:-1])
    return rho, b_h


def _unipc_row(lam, sigma, alpha, start: int, end: int, order: int, corrector: bool,
               offset: int) -> tuple[float, np.ndarray]:
    """(a, w): x_end = a x_start + sum_j w_j M_j for UniP (corrector=False) or UniC.

    The window M = [m_i, m_{i+1}, ...] with m_start at position `offset` (0 for the predictor,
    whose step starts at i; 1 for the corrector, which in iteration i corrects the step from
    i+1 to i using m_i at position 0):
      x_end = (sigma_end / sigma_start) x_start - alpha_end (e^{-h} - 1) m_start
              - alpha_end B(h) (sum_k rho_k D_k [+ rho_last (m_end - m_start), corrector]),
      D_k = (m_{start+k} - m_start) / r_k.
    """
    rho, b_h = _unipc_rhos(lam, start, end, order, corrector)
    h = lam[end] - lam[start]
    alpha_end = alpha[end]
    w = np.zeros(HISTORY)
    w[offset] = -alpha_end * np.expm1(-h)
    for k in range(1, order):
        r_k = (lam[start + k] - lam[start]) / h
        w[offset + k] += -alpha_end * b_h * rho[k - 1] / r_k
        w[offset] += alpha_end * b_h * rho[k - 1] / r_k
    if corrector:
        w[0] += -alpha_end * b_h * rho[-1]
        w[offset] += alpha_end * b_h * rho[-1]
    return sigma[end] / sigma[start], w


def multistep_table(method: str, alphas_cumprod: np.ndarray) -> dict[str, np.ndarray]:
    """Float64 coefficients of a multistep solver over the K kept steps, rows indexed by i.

    Iteration i evaluates m_i = x0(x_i, t_i) and combines the window M = [m_i .. m_{i+3}]:
      corrected x_i = keep[i] x_i + base[i] x_{i+1} + sum_j corr[i, j] M_j   (UniC; identity
                      for the DPM-Solvers and at the first step),
      x_{i-1}       = scale[i] x_i + sum_j pred[i, j] M_j                  (x_{-1} = m_0).
    """
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    num = len(abar)
    lam, alpha, sigma = half_lambda(abar), np.sqrt(abar), np.sqrt(1.0 - abar)
    orders = multistep_orders(method, num)
    table = {"keep": np.ones(num), "base": np.zeros(num), "corr": np.zeros((num, HISTORY)),
             "scale": np.zeros(num), "pred": np.zeros((num, HISTORY))}
    table["pred"][0, 0] = 1.0
    for i in range(1, num):
        if method == "unipc":
            table["scale"][i], table["pred"][i] = _unipc_row(lam, sigma, alpha, i, i - 1,
                                                             orders[i], False, 0)
        else:
            table["scale"][i], table["pred"][i] = _dpm_solver_pp_row(lam, sigma, alpha, i,
                                                                     orders[i])
    if method == "unipc":
        for i in range(num - 1):   # correct the step from i+1 to i, at its predictor's order
            table["keep"][i] = 0.0
            table["base"][i], table["corr"][i] = _unipc_row(lam, sigma, alpha, i + 1, i,
                                                            orders[i + 1], True, 1)
    return table


# ---------------------------------------------------------------- EDM Heun table
def _edm_sigma(alphas_cumprod: np.ndarray) -> np.ndarray:
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    return np.sqrt((1.0 - abar) / abar)


def edm_heun_table(diffusion: GaussianDiffusion, churn: float,
                   model_alphas_cumprod: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Karras et al. 2022, Alg. 1 (churn = 0) and Alg. 2 on the kept steps' sigmas, sigma =
    sqrt((1 - abar) / abar), x_EDM = x_VP sqrt(1 + sigma^2); S_tmin = 0, S_tmax = inf and
    S_noise = 1 (churn at every step, unit noise). Returns (table in execution order, j = 0 ..
    2K-2, and the sorted original timesteps the model is evaluated at).

    Step m from sigma_m to sigma_{m+1} (0 after the last): gamma = min(churn / K, sqrt(2) - 1),
    sigma_hat = sigma_m (1 + gamma) snapped to the model's nearest discrete noise level in log
    sigma (the model is defined only there, as EDM does for its discrete iDDPM models), x_hat =
    x + sqrt(sigma_hat^2 - sigma_m^2) z. Even j: Euler, d = (x_hat - D(x_hat)) / sigma_hat,
    x' = x_hat + (sigma_{m+1} - sigma_hat) d (written as a convex combination, so x' = D exactly
    at sigma = 0); odd j: Heun, x' = x_hat + (sigma_{m+1} - sigma_hat) (d + d') / 2.
    """
    kept = np.asarray(diffusion.timestep_map, dtype=np.int64)   # ascending original timesteps
    sigma = _edm_sigma(diffusion.alphas_cumprod)
    num = len(sigma)
    gamma = min(churn / num, math.sqrt(2.0) - 1.0)
    log_sigma_all = np.log(_edm_sigma(model_alphas_cumprod))
    hat_t = kept.copy()
    if gamma > 0:
        targets = np.log(sigma * (1.0 + gamma))
        hat_t = np.argmin(np.abs(targets[:, None] - log_sigma_all[None, :]), axis=1)
        hat_t = np.maximum(hat_t, kept)   # never below the current level (rounding ties)
    # Where the snap lands on the current level itself, no churn: an exact 0, not the square
    # root of a rounding difference.
    sigma_hat = np.where(hat_t == kept, sigma, np.exp(log_sigma_all[hat_t]))
    evaluated = np.unique(np.concatenate([kept, hat_t]))
    index_of = {int(t): n for n, t in enumerate(evaluated)}
    rows = []   # (t, sigma, vp_in, vp_out, noise, euler, ratio, half_dt)
    for k in range(num - 1, -1, -1):   # kept index of the current level
        s_hat = sigma_hat[k]
        s_next = sigma[k - 1] if k > 0 else 0.0
        vp_next = 1.0 / math.sqrt(1.0 + s_next ** 2)
        rows.append((index_of[int(hat_t[k])], s_hat, 1.0 / math.sqrt(1.0 + s_hat ** 2), vp_next,
                     math.sqrt(max(s_hat ** 2 - sigma[k] ** 2, 0.0)), True, s_next / s_hat, 0.0))
        if k > 0:
            rows.append((index_of[int(kept[k - 1])], s_next, vp_next, vp_next, 0.0, False, 0.0,
                         0.5 * (s_next - s_hat)))
    names = ("t", "sigma", "vp_in", "vp_out", "noise", "euler", "ratio", "half_dt")
    columns = zip(*rows, strict=True)
    table = {name: np.asarray(column) for name, column in zip(names, columns, strict=True)}
    table["start"] = np.array(math.sqrt(1.0 + sigma[-1] ** 2))
    return table, evaluated


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
    c = _cast(multistep_table(chain.method, diffusion.alphas_cumprod), chain.dtype)
    corrects = chain.method == "unipc"

    def combine(weights, window):
        return sum(weights[j] * window[j] for j in range(HISTORY))

    def step(state, i):
        x, base, history = state
        m = diffusion.p_mean_variance(chain.model_fn, x, _batch_t(i, batch),
                                      chain.clip_denoised)["pred_xstart"]
        window = (m,) + history
        if corrects:
            x = c["keep"][i] * x + c["base"][i] * base + combine(c["corr"][i], window)
        x_next = c["scale"][i] * x + combine(c["pred"][i], window)
        return (x_next, x, window[:HISTORY - 1]), m

    def init(x_T):
        zeros = jnp.zeros_like(x_T)
        return x_T, zeros, (zeros,) * (HISTORY - 1)

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
    if sample_config.guidance_scale < 0:
        raise ConfigError(f"config.sample.guidance_scale={sample_config.guidance_scale} must be "
                          ">= 0 (1: the conditional model, 0: the unconditional one)")


def chain_diffusion(config: ml_collections.ConfigDict) -> GaussianDiffusion:
    """The diffusion respaced to the timesteps config.sample's method and schedule visit for
    config.sample.num_steps network evaluations (all T steps unrespaced)."""
    check_sample_config(config)
    total = config.diffusion.num_timesteps
    betas = schedules.get_beta_schedule(config.diffusion.schedule, total)
    kept = schedules.step_timesteps(config.sample.schedule, total,
                                    chain_steps(config.sample.method, config.sample.num_steps),
                                    betas)
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
