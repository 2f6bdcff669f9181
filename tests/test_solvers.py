"""DPM-Solver++(3M), UniPC and EDM Heun: one step and whole chains against float64 references
written from the papers, Gaussian-mixture recovery at few NFE, the order of convergence on the
mixture's probability-flow ODE, and the config errors of check_sample_config."""
import functools
import math

import gaussian_mixture as gm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from configs import default

from jax_diffusion import schedules
from jax_diffusion.diffusion import GaussianDiffusion
from jax_diffusion.errors import ConfigError
from jax_diffusion.samplers import (
    PLANS,
    Chain,
    check_sample_config,
    num_evaluations,
    sample,
    sample_from_config,
)

T = 1000
LINEAR = schedules.get_beta_schedule("linear", T)
ABAR = np.cumprod(1.0 - LINEAR)
KEPT = (0, 3, 10, 50, 120, 200, 350, 500, 700, 999)   # an arbitrary respacing, K = 10
GMM = gm.GaussianMixture(
    weights=np.array([0.2, 0.3, 0.5]),
    means=1.75 * np.array([[-0.4, -0.4, 0.4, 0.4], [0.4, -0.4, -0.4, 0.0], [0.2, 0.4, 0.0, -0.4]]),
    stds=np.array([0.25, 0.3, 0.3]),
    event_shape=(2, 2, 1))
SHAPE = (6,) + GMM.event_shape


# ---------------------------------------------------------------- float64 references (numpy)
def half_lambda(abar):
    return np.log(np.sqrt(abar) / np.sqrt(1.0 - abar))


def dpm_orders(method, num):
    """Order of solver step s = 1..K (s = K - i leaves kept index i), as the dpm-solver
    reference's sample loop chooses it: warm-up min(order, s), lower_order_final below 10 steps
    (3M) or always (UniPC): min(order, K + 1 - s); the step to lambda = inf is first order."""
    top = {"dpm_solver++3m": 3, "unipc": 3}[method]
    orders = {}
    for s in range(1, num + 1):
        order = min(top, s)
        if method == "unipc" or num < 10:
            order = min(order, num + 1 - s)
        orders[num - s] = order
    return orders


def ref_dpm3m_step(x, models, lam, alpha, sigma, i, order, d2_scale=2.0):
    """Lu et al. 2022 (DPM-Solver++), data prediction, from lambda_i to lambda_{i-1}:
    x' = sigma'/sigma x + alpha' (1 - e^-h) x0 + alpha' phi_2 h x0' - alpha' phi_3 h^2 x0''
    with the derivatives of the polynomial through models = [m_i, m_{i+1}, m_{i+2}] in lambda.
    d2_scale = 1 is the dpm-solver / diffusers multistep code's D2 (half of h^2 x0'')."""
    h = lam[i - 1] - lam[i]
    out = sigma[i - 1] / sigma[i] * x - alpha[i - 1] * np.expm1(-h) * models[0]
    if order == 1:
        return out
    h0 = lam[i] - lam[i + 1]
    if order == 2:   # Alg. 2 (2M): D = (1 + 1/(2r)) m_i - 1/(2r) m_{i+1}, r = h0 / h
        r = h0 / h
        d = (1 + 1 / (2 * r)) * models[0] - models[1] / (2 * r)
        return sigma[i - 1] / sigma[i] * x - alpha[i - 1] * np.expm1(-h) * d
    h1 = lam[i + 1] - lam[i + 2]
    # Newton form in lambda: slope at lambda_i and the second divided difference.
    f01 = (models[0] - models[1]) / h0
    f12 = (models[1] - models[2]) / h1
    f012 = (f01 - f12) / (h0 + h1)
    first = h * (f01 + f012 * h0)          # h x0'(lambda_i)
    second = d2_scale * h * h * f012       # h^2 x0'' (d2_scale = 2)
    phi_2 = np.expm1(-h) / h + 1.0
    phi_3 = phi_2 / h - 0.5
    return out + alpha[i - 1] * phi_2 * first - alpha[i - 1] * phi_3 * second


def ref_multistep_chain(method, abar, x_T, model, d2_scale=2.0):
    """Whole DPM-Solver++(3M) or UniPC chain, list-based as the papers' algorithms; model(x, i)
    is the data prediction at kept index i. Returns every point handed to the model, then x0."""
    num = len(abar)
    lam, alpha, sigma = half_lambda(abar), np.sqrt(abar), np.sqrt(1.0 - abar)
    orders = dpm_orders(method, num)
    x, models, last, points = x_T, [], None, [x_T]
    for i in range(num - 1, -1, -1):
        m = model(x, i)
        if method == "unipc" and last is not None:   # UniC on the step from i+1 to i
            x = ref_unipc_update(last, [m] + models, lam, alpha, sigma, i + 1, orders[i + 1],
                                 corrector=True)
        models = [m] + models
        if i == 0:
            x = m
        elif method == "unipc":
            last = x
            x = ref_unipc_update(x, models, lam, alpha, sigma, i, orders[i], corrector=False)
        else:
            x = ref_dpm3m_step(x, models, lam, alpha, sigma, i, orders[i], d2_scale)
        points.append(x)
    return np.stack(points)


def phi(k, z):
    """phi_k(z) = int_0^1 e^{(1-s) z} s^{k-1} / (k-1)! ds: phi_1 = (e^z - 1)/z,
    phi_{k+1} = (phi_k - 1/k!) / z."""
    value = np.expm1(z) / z
    for n in range(1, k):
        value = (value - 1.0 / math.factorial(n)) / z
    return value


def ref_unipc_update(x, models, lam, alpha, sigma, start, order, corrector):
    """Zhao et al. 2023 (UniPC), B(h) = e^h - 1 (bh2), data prediction, from kept index
    `start` to start - 1. models[0] is the new m_{start-1} for the corrector (UniC), else
    models[0] = m_start. With hh = -h, r_k = (lambda_{start+k} - lambda_start) / h, the paper's
    R_p rows r^0 .. r^{p-1} and g_n = hh phi_{n+1}(hh) n! / B(h); UniP-2 uses rho = 1/2 and
    UniC-1 rho = 1/2."""
    shift = 1 if corrector else 0
    m_start = models[shift]
    h = lam[start - 1] - lam[start]
    hh = -h
    b_h = np.expm1(hh)
    rks = [(lam[start + k] - lam[start]) / h for k in range(1, order)]
    diffs = [(models[shift + k] - m_start) / rks[k - 1] for k in range(1, order)]
    g = np.array([hh * phi(n + 1, hh) * math.factorial(n) / b_h for n in range(1, order + 1)])
    if corrector:
        rows = np.array([[r ** n for r in rks + [1.0]] for n in range(order)])
        rho = np.array([0.5]) if order == 1 else np.linalg.solve(rows, g)
        diffs = diffs + [models[0] - m_start]
    elif order == 1:
        rho = np.zeros(0)
    elif order == 2:
        rho = np.array([0.5])
    else:
        rows = np.array([[r ** n for r in rks] for n in range(order - 1)])
        rho = np.linalg.solve(rows, g[:-1])
    result = (sigma[start - 1] / sigma[start] * x - alpha[start - 1] * np.expm1(-h) * m_start)
    return result - alpha[start - 1] * b_h * sum(r * d for r, d in zip(rho, diffs, strict=True))


def ref_edm_chain(abar_kept, x_T, denoise, churn, model_abar, noises):
    """Karras et al. 2022, Alg. 2 (Alg. 1 at churn = 0) with S_tmin = 0, S_tmax = inf,
    S_noise = 1, on sigma = sqrt((1 - abar)/abar); sigma_hat snapped to the model's nearest level
    in log sigma. denoise(x_edm, sigma) = D; noises[m] the z of step m. Returns x0 (VP = EDM
    at sigma = 0)."""
    sig = np.sqrt((1.0 - abar_kept) / abar_kept)
    model_sig = np.sqrt((1.0 - model_abar) / model_abar)
    num = len(sig)
    gamma = min(churn / num, math.sqrt(2.0) - 1.0)
    x = x_T * np.sqrt(1.0 + sig[-1] ** 2)
    for m, k in enumerate(range(num - 1, -1, -1)):
        s_cur = sig[k]
        s_hat = s_cur
        if gamma > 0:
            s_hat = model_sig[np.argmin(np.abs(np.log(model_sig) - np.log(s_cur * (1 + gamma))))]
        x_hat = x + np.sqrt(max(s_hat ** 2 - s_cur ** 2, 0.0)) * noises[m]
        s_next = sig[k - 1] if k > 0 else 0.0
        d = (x_hat - denoise(x_hat, s_hat)) / s_hat
        x = x_hat + (s_next - s_hat) * d
        if s_next > 0:
            d_next = (x - denoise(x, s_next)) / s_next
            x = x_hat + (s_next - s_hat) * 0.5 * (d + d_next)
    return x


def np_denoiser_at_sigma(x_edm, s):
    """D(x; sigma) of the exact mixture: the data prediction at x_VP = x / sqrt(1 + sigma^2)."""
    abar = 1.0 / (1.0 + s ** 2)
    return gm.x0_star_np(GMM, x_edm * np.sqrt(abar), abar)


# ---------------------------------------------------------------- 1. one step and whole chains
def _respaced(kept=KEPT):
    return GaussianDiffusion(LINEAR, use_timesteps=kept)


def _mixture_model(abar_table=ABAR):
    return gm.eps_model(GMM, abar_table)


def _x_T(seed=3):
    return np.random.default_rng(seed).standard_normal(SHAPE)


@pytest.mark.parametrize("method", ["dpm_solver++3m", "unipc"])
def test_one_multistep_step_matches_float64_reference(method):
    rng = np.random.default_rng(1)
    x, base = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    history = [rng.standard_normal(SHAPE) for _ in range(3)]   # m_{i+1}, m_{i+2}, m_{i+3}
    kept_abar = ABAR[list(KEPT)]
    lam, alpha, sigma = half_lambda(kept_abar), np.sqrt(kept_abar), np.sqrt(1.0 - kept_abar)
    orders = dpm_orders(method, len(KEPT))
    with jax.enable_x64(True):
        diffusion = _respaced()
        chain = Chain(method, diffusion, _mixture_model(), SHAPE, jnp.float64, jax.random.key(0),
                      0.0, False, 0.0, ABAR)
        plan = PLANS[method](chain)
        for i in (5, 3, 1):   # interior steps of order 3, and 2 (lower_order_final) at i = 1
            state = (jnp.asarray(x), jnp.asarray(base), tuple(map(jnp.asarray, history)))
            (x_next, corrected, _), m = plan.step(state, i)
            m_ref = gm.x0_star_np(GMM, x, kept_abar[i])
            np.testing.assert_allclose(np.asarray(m), m_ref, rtol=1e-12, atol=1e-12)
            models = [m_ref] + history
            if method == "unipc":
                x_c = ref_unipc_update(base, models, lam, alpha, sigma, i + 1, orders[i + 1],
                                       corrector=True)
                np.testing.assert_allclose(np.asarray(corrected), x_c, rtol=1e-10, atol=1e-10)
                expected = ref_unipc_update(x_c, models, lam, alpha, sigma, i, orders[i],
                                            corrector=False)
            else:
                expected = ref_dpm3m_step(x, models, lam, alpha, sigma, i, orders[i])
            np.testing.assert_allclose(np.asarray(x_next), expected, rtol=1e-10, atol=1e-10)
            print(f"\n{method} step i={i} (order {orders[i]}): max |jax - ref| "
                  f"{np.max(np.abs(np.asarray(x_next) - expected)):.1e}")


@pytest.mark.parametrize("kept", [KEPT, KEPT[-6:]], ids=["K10", "K6"])
@pytest.mark.parametrize("method", ["dpm_solver++3m", "unipc"])
def test_multistep_chain_matches_float64_reference(method, kept):
    x_T = _x_T()
    kept_abar = ABAR[list(kept)]
    expected = ref_multistep_chain(method, kept_abar, x_T,
                                   lambda x, i: gm.x0_star_np(GMM, x, kept_abar[i]))
    with jax.enable_x64(True):
        x0, trajectory = sample(_mixture_model(), _respaced(kept), SHAPE, jax.random.key(0),
                                method, clip_denoised=False, noise=jnp.asarray(x_T),
                                return_trajectory=True)
    assert x0.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(trajectory), expected, rtol=1e-10, atol=1e-10)
    # Negative control: the chain depends on the third-order term (not a first-order method).
    if method == "dpm_solver++3m" and len(kept) == 10:
        control = ref_multistep_chain(method, kept_abar, x_T,
                                      lambda x, i: gm.x0_star_np(GMM, x, kept_abar[i]),
                                      d2_scale=1.0)
        assert np.max(np.abs(control[-1] - expected[-1])) > 1e-6


@pytest.mark.parametrize("churn", [0.0, 30.0])
def test_edm_heun_chain_and_step_match_float64_reference(churn):
    x_T = _x_T()
    kept_abar = ABAR[list(KEPT)]
    key = jax.random.key(5)
    num = len(KEPT)
    chain_key = jax.random.split(key)[1]
    with jax.enable_x64(True):
        # Iteration i = 2K-2 - 2m runs the Euler half of step m and draws its churn noise.
        noises = [np.asarray(jax.random.normal(jax.random.fold_in(chain_key, 2 * num - 2 - 2 * m),
                                               SHAPE, jnp.float64)) for m in range(num)]
        x0 = sample(_mixture_model(), _respaced(), SHAPE, key, "edm_heun", clip_denoised=False,
                    noise=jnp.asarray(x_T), churn=churn, model_alphas_cumprod=ABAR)
        expected = ref_edm_chain(kept_abar, x_T, np_denoiser_at_sigma, churn, ABAR, noises)
        np.testing.assert_allclose(np.asarray(x0), expected, rtol=1e-10, atol=1e-10)
        # One step (its Euler and Heun iterations) from an arbitrary point through the plan.
        plan = PLANS["edm_heun"](Chain("edm_heun", _respaced(), _mixture_model(), SHAPE,
                                       jnp.float64, chain_key, 0.0, False, churn, ABAR))
        x = np.random.default_rng(2).standard_normal(SHAPE) * 3.0
        state = (jnp.asarray(x), jnp.zeros(SHAPE), jnp.zeros(SHAPE))
        for i in (2 * num - 2, 2 * num - 3):   # step m = 0 from sigma_{K-1} to sigma_{K-2}
            state, _ = plan.step(state, i)
    sig = np.sqrt((1.0 - kept_abar) / kept_abar)
    gamma = min(churn / num, math.sqrt(2.0) - 1.0)
    s_hat = sig[-1]
    if gamma > 0:
        model_sig = np.sqrt((1.0 - ABAR) / ABAR)
        s_hat = model_sig[np.argmin(np.abs(np.log(model_sig) - np.log(sig[-1] * (1 + gamma))))]
    x_hat = x + np.sqrt(s_hat ** 2 - sig[-1] ** 2) * noises[0]
    d = (x_hat - np_denoiser_at_sigma(x_hat, s_hat)) / s_hat
    euler = x_hat + (sig[-2] - s_hat) * d
    heun = x_hat + (sig[-2] - s_hat) * 0.5 * (d + (euler - np_denoiser_at_sigma(euler, sig[-2]))
                                              / sig[-2])
    np.testing.assert_allclose(np.asarray(state[0]), heun, rtol=1e-10, atol=1e-10)
    print(f"\nedm_heun churn={churn}: chain max |jax - ref| "
          f"{np.max(np.abs(np.asarray(x0) - expected)):.1e}")
