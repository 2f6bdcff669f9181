"""The Gaussian paths of processes.py (edm, flow) beside the discrete VP process: the exact
Gaussian-mixture network of each path through `ContinuousProcess.denoise_vp`, every sampler's
chain against float64 references written from the papers in each process's OWN frame, the
orders of convergence per process, and the 3-mode mixture at 10 NFE from a config.

Every path x = alpha x0 + sigma eps is written here from its paper, independently of
processes.py: vp (Ho et al. 2020) alpha = sqrt(abar), sigma = sqrt(1 - abar); edm (Karras et al.
2022) alpha = 1, sigma = s; rectified flow (Liu et al. 2022) alpha = 1 - t, sigma = t. The level
is s = sigma / alpha, so abar = 1 / (1 + s^2) and t = s / (1 + s)."""
import functools
import math

import gaussian_mixture as gm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from solver_references import (
    fitted_order,
    pf_ode_solution,
    ref_heun_chain,
    ref_multistep_chain_on_path,
    rms,
)

from configs import default
from jax_diffusion import processes, schedules
from jax_diffusion.diffusion import GaussianDiffusion
from jax_diffusion.samplers import METHODS, sample, sample_from_config

GMM = gm.THREE_MODES
SHAPE = (6,) + GMM.event_shape
SIGMA_DATA = 0.5
T = 1000
LINEAR = schedules.get_beta_schedule("linear", T)
ABAR = np.cumprod(1.0 - LINEAR)
MULTISTEP = ("dpm_solver++", "dpm_solver++3m", "unipc")


# ---------------------------------------------------------------- the paths and the mixture
def path(process, s):
    """(alpha, sigma) of each path at the levels s (s = 0: the data, (1, 0)), float64."""
    s = np.asarray(s, dtype=np.float64)
    if process == "vp":
        return 1.0 / np.sqrt(1.0 + s ** 2), s / np.sqrt(1.0 + s ** 2)
    if process == "edm":
        return np.ones_like(s), s
    t = s / (1.0 + s)
    return 1.0 - t, t


def to_own_frame(process, x_vp, levels):
    """Points of the VP frame (leading axis: one per level) in the process's own frame:
    x = x_vp sqrt(alpha^2 + sigma^2)."""
    alpha, sigma = path(process, levels)
    norm = np.sqrt(alpha ** 2 + sigma ** 2)
    return np.asarray(x_vp) * norm.reshape(norm.shape + (1,) * (np.ndim(x_vp) - norm.ndim))


def posterior_mean(x, alpha, sigma):
    """E[x0 | alpha x0 + sigma eps = x] for x0 from the mixture, by Bayes per component:
    p(x | k) = N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I) and E[x0 | x, k] = mu_k +
    alpha s_k^2 (x - alpha mu_k) / (alpha^2 s_k^2 + sigma^2). Float64 numpy; alpha and sigma
    scalars or per example [B]."""
    flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    a = np.broadcast_to(np.asarray(alpha, np.float64), (len(x),))[:, None]
    s = np.broadcast_to(np.asarray(sigma, np.float64), (len(x),))[:, None]
    var = a ** 2 * GMM.stds ** 2 + s ** 2                                        # [B, K]
    diff = flat[:, None, :] - a[:, :, None] * GMM.means[None]                    # [B, K, D]
    logits = (np.log(GMM.weights) - 0.5 * np.sum(diff ** 2, axis=-1) / var
              - 0.5 * flat.shape[1] * np.log(2.0 * np.pi * var))
    r = np.exp(logits - logits.max(axis=1, keepdims=True))
    r /= r.sum(axis=1, keepdims=True)
    means = GMM.means[None] + (a * GMM.stds ** 2 / var)[:, :, None] * diff
    return np.sum(r[:, :, None] * means, axis=1).reshape(np.shape(x))


def _per_example(a, x):
    return a.reshape(a.shape + (1,) * (x.ndim - 1))


def _x0_star(x, alpha, sigma):
    """E[x0 | x] in JAX on the path (alpha, sigma) [B, 1, ...]: (x - sigma eps*) / alpha with
    the mixture's eps* of the VP frame x / sqrt(alpha^2 + sigma^2) (gaussian_mixture.eps_star)."""
    norm = jnp.sqrt(alpha ** 2 + sigma ** 2)
    eps = gm.eps_star(GMM, x / norm, ((alpha / norm) ** 2).reshape(-1))
    return (x - sigma * eps) / alpha


def exact_network(process, sigma_data=SIGMA_DATA):
    """The network F(network input, noise input) whose data prediction through the process's
    preconditioning is the exact E[x0 | x_t]:
    edm (Karras et al. Table 1, c_noise = ln(s) / 4, fed x 1000): x = x_in / c_in and
        F = (x0* - c_skip x) / c_out;
    flow (the velocity eps - x0 at t, fed x 1000): F = (x - x0*) / t."""
    if process == "edm":
        def network(x_in, c_noise):
            s = _per_example(jnp.exp(c_noise.astype(x_in.dtype) / 250.0), x_in)
            norm = jnp.sqrt(s ** 2 + sigma_data ** 2)
            x = x_in * norm
            c_skip, c_out = sigma_data ** 2 / norm ** 2, s * sigma_data / norm
            return (_x0_star(x, jnp.ones_like(s), s) - c_skip * x) / c_out
    else:
        def network(x, c_noise):
            t = _per_example(c_noise.astype(x.dtype) / 1000.0, x)
            return (x - _x0_star(x, 1.0 - t, t)) / t
    return network


def _process(name):
    return processes.ContinuousProcess(name, SIGMA_DATA)


# ---------------------------------------------------------------- 1. the exact networks
@pytest.mark.parametrize("process", ["edm", "flow"])
def test_exact_network_through_denoise_vp_is_the_mixture_posterior_mean(process):
    rng = np.random.default_rng(0)
    num = 64
    levels = np.exp(rng.uniform(np.log(0.002), np.log(80.0), num))   # one level per example
    alpha, sigma = path(process, levels)
    x0 = GMM.sample(rng, num)
    x = _per_example(alpha, x0) * x0 + _per_example(sigma, x0) * rng.standard_normal(x0.shape)
    x_vp = x / _per_example(np.sqrt(alpha ** 2 + sigma ** 2), x0)
    expected = posterior_mean(x, alpha, sigma)
    # The own-frame Bayes formula is gaussian_mixture's VP-frame x0* at abar = 1 / (1 + s^2).
    via_vp = np.concatenate([gm.x0_star_np(GMM, x_vp[b:b + 1], 1.0 / (1.0 + levels[b] ** 2))
                             for b in range(num)])
    np.testing.assert_allclose(via_vp, expected, rtol=0, atol=1e-12)
    with jax.enable_x64(True):
        network, continuous = exact_network(process), _process(process)
        got = continuous.denoise_vp(network, jnp.asarray(x_vp), jnp.asarray(levels))
        own = continuous.denoise(network, jnp.asarray(x), jnp.asarray(levels))
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(own), expected, rtol=0, atol=1e-12)
    print(f"\n{process}: max |denoise_vp(F) - E[x0 | x_t]| "
          f"{np.max(np.abs(np.asarray(got) - expected)):.1e} over s in [0.002, 80]")


@pytest.mark.parametrize("process", ["edm", "flow"])
def test_process_alpha_sigma_time_and_level_are_the_papers_paths(process):
    levels = np.array([0.002, 0.01, 0.3, 1.0, 7.0, 80.0])
    continuous = _process(process)
    with jax.enable_x64(True):
        alpha, sigma = continuous.alpha_sigma(jnp.asarray(levels))
    expected_alpha, expected_sigma = path(process, levels)   # flow: 1 - t cancels at large s
    np.testing.assert_allclose(np.asarray(alpha), expected_alpha, rtol=1e-13)
    np.testing.assert_allclose(np.asarray(sigma), expected_sigma, rtol=1e-13)
    own_time = levels if process == "edm" else expected_sigma   # edm: t = s; flow: t = sigma
    np.testing.assert_allclose(continuous.time(levels), own_time, rtol=1e-15)
    np.testing.assert_allclose(continuous.level(own_time), levels, rtol=1e-13)


# ---------------------------------------------------------------- 2. chains vs own-frame refs
VP_KEPT = (0, 10, 50, 120, 250, 450, 700, 999)   # a respaced discrete grid, K = 8
LOW, HIGH, COUNT = 0.01, 80.0, 8
OWN_GRIDS = {"edm": "karras", "flow": "uniform"}   # uniform: even in the flow's t
CHAIN_KEY = jax.random.key(7)
# (method, eta, churn): every method; churn only where levels are not snapped (edm, flow).
SETTINGS = [("ddim", 0.0, 0.0), ("euler", 0.0, 0.0), ("ddim", 1.0, 0.0), ("ddpm", 0.0, 0.0),
            ("dpm_solver++", 0.0, 0.0), ("dpm_solver++3m", 0.0, 0.0), ("unipc", 0.0, 0.0),
            ("edm_heun", 0.0, 0.0), ("edm_heun", 0.0, 2.0)]
CASES = [(process,) + setting for process in processes.PROCESSES for setting in SETTINGS
         if not (process == "vp" and setting[2] > 0)]


def _levels(process):
    """The K ascending levels of the chain: vp's respaced timesteps, else a level grid."""
    if process == "vp":
        abar = ABAR[list(VP_KEPT)]
        return np.sqrt((1.0 - abar) / abar)
    continuous = _process(process)
    return schedules.level_grid(OWN_GRIDS[process], COUNT, LOW, HIGH, continuous.time,
                                continuous.level)


def _x_T(seed=3):
    return np.random.default_rng(seed).standard_normal(SHAPE)   # N(0, I) in the VP frame


def _run_chain(process, method, eta, churn, x_T):
    """Our chain from x_T (VP frame) in float64: (trajectory in the VP frame, the level of
    each point)."""
    levels = _levels(process)
    if process == "vp":
        diffusion = GaussianDiffusion(LINEAR, use_timesteps=VP_KEPT)   # eps, fixed_large
        model = gm.eps_model(GMM, ABAR)
    else:
        diffusion = processes.levels_diffusion(levels)
        model = functools.partial(_process(process).denoise_vp, exact_network(process))
    with jax.enable_x64(True):
        _, trajectory = sample(model, diffusion, x_T.shape, CHAIN_KEY, method, eta=eta,
                               clip_denoised=False, noise=jnp.asarray(x_T),
                               return_trajectory=True, churn=churn)
    assert trajectory.dtype == jnp.float64
    num = len(levels)
    if method == "edm_heun":   # each step's Euler and Heun points, then the Euler step to 0
        point_levels = [levels[-1]] + [levels[k] for k in range(num - 2, -1, -1) for _ in "eh"]
    else:
        point_levels = list(levels[::-1])
    return np.asarray(trajectory), np.array(point_levels + [0.0])


def _chain_noises(method, num, shape):
    """The N(0, I) the chain draws: iteration i from fold_in(chain_key, i); DDPM / DDIM step i
    (from kept index i) at i, edm_heun's step m (its Euler half) at 2K - 2 - 2m."""
    chain_key = jax.random.split(CHAIN_KEY)[1]
    with jax.enable_x64(True):
        draws = {i: np.asarray(jax.random.normal(jax.random.fold_in(chain_key, i), shape,
                                                 jnp.float64)) for i in range(2 * num)}
    if method == "edm_heun":
        return [draws[2 * num - 2 - 2 * m] for m in range(num)]
    return draws


def ref_euler_step(process, x, d, s, s_next):
    """One Euler step of the probability-flow ODE in the process's own variables, with D = d:
    edm (Karras et al. eq. 4, sigma(t) = t, s(t) = 1): dx/ds = (x - D) / s;
    flow (Liu et al.): dx/dt = v, v = eps - x0 estimated as (x - D) / t;
    vp (Song et al. 2021, eq. 14): Euler in x / alpha over sigma / alpha = s."""
    if process == "edm":
        return x + (s_next - s) * (x - d) / s
    if process == "flow":
        t, t_next = s / (1.0 + s), s_next / (1.0 + s_next)
        return x + (t_next - t) * (x - d) / t
    alpha, alpha_next = path("vp", s)[0], path("vp", s_next)[0]
    return alpha_next * (x / alpha + (s_next - s) * (x / alpha - d) / s)


def ref_ddim_step(x, d, a, s, a_next, s_next, eta, z):
    """Song et al. 2021, eq. 12 and 16, on the path (a, s) -> (a_next, s_next): eps = (x - a D)
    / s, c^2 = eta^2 s_next^2 (1 - (a s_next / (a_next s))^2) (eta^2 times the variance of
    q(x_next | x, x0) on the path), x_next = a_next D + sqrt(s_next^2 - c^2) eps + c z."""
    eps = (x - a * d) / s
    c = eta * s_next * math.sqrt(1.0 - (a * s_next / (a_next * s)) ** 2)
    return a_next * d + math.sqrt(s_next ** 2 - c ** 2) * eps + c * z


def ref_ddpm_step(x, d, a, s, a_next, s_next, z, large):
    """Ho et al. 2020, eq. 6-7, on the path: the forward step x = r x_next + sqrt(v) w with
    r = a / a_next, v = s^2 - r^2 s_next^2 (beta_t on vp); x_next = r s_next^2 / s^2 x +
    a_next v / s^2 D + sqrt(var) z with var = v s_next^2 / s^2 (beta-tilde, the posterior's) or
    v (beta, large); no noise on the last step."""
    r = a / a_next
    v = s ** 2 - r ** 2 * s_next ** 2
    variance = v if large else v * s_next ** 2 / s ** 2
    return r * s_next ** 2 / s ** 2 * x + a_next * v / s ** 2 * d + math.sqrt(variance) * z


def reference_chain(process, method, eta, churn, levels, x_T, noises, alpha_override=None):
    """The float64 reference of a chain over `levels` in the process's own frame, from x_T in
    the VP frame: every point the chain reaches (trajectory order). alpha_override replaces the
    path's alpha in the solver's coefficients (a deliberately wrong reference)."""
    alpha, sigma = path(process, levels)
    x = to_own_frame(process, x_T, levels[-1])
    coefficients = alpha if alpha_override is None else alpha_override

    def model(y, i):
        return posterior_mean(y, alpha[i], sigma[i])

    if method in MULTISTEP:
        return ref_multistep_chain_on_path(method, coefficients, sigma, x, model)
    if method == "edm_heun":   # Heun in EDM's variables y = x / alpha, sigma = s
        points = ref_heun_chain(levels, x / alpha[-1], lambda y, s: posterior_mean(y, 1.0, s),
                                churn, noises)
        return np.stack([path(process, level)[0] * y for level, y in points])
    points = [x]
    for i in range(len(levels) - 1, -1, -1):
        a, s = coefficients[i], sigma[i]
        a_next, s_next = (coefficients[i - 1], sigma[i - 1]) if i > 0 else (1.0, 0.0)
        d = model(x, i)
        z = noises[i] if i > 0 else 0.0
        if method == "euler":
            x = ref_euler_step(process, x, d, levels[i], levels[i - 1] if i > 0 else 0.0)
        elif method == "ddim":
            x = ref_ddim_step(x, d, a, s, a_next, s_next, eta, z)
        else:   # vp samples with its default var_type fixed_large, the levels diffusion small
            x = ref_ddpm_step(x, d, a, s, a_next, s_next, z, large=process == "vp")
        points.append(x)
    return np.stack(points)


@pytest.mark.parametrize("process, method, eta, churn", CASES,
                         ids=lambda v: str(v) if not isinstance(v, float) else f"{v:g}")
def test_every_chain_point_matches_own_frame_float64_reference(process, method, eta, churn):
    x_T = _x_T()
    trajectory, point_levels = _run_chain(process, method, eta, churn, x_T)
    levels = _levels(process)
    expected = reference_chain(process, method, eta, churn, levels, x_T,
                               _chain_noises(method, len(levels), SHAPE))
    ours = to_own_frame(process, trajectory, point_levels)
    assert ours.shape == expected.shape == (METHODS[method].num_evaluations(len(levels)) + 1,
                                            ) + SHAPE
    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-10)
    print(f"\n{process} {method} eta={eta:g} churn={churn:g}: max |ours - ref| "
          f"{np.max(np.abs(ours - expected)):.1e} over {len(ours)} points")


def _flow_heun_in_flow_time(levels, x_T):
    """Heun's method on the flow's own ODE dx/dt = (x - D) / t in t (not EDM's variables):
    the same Euler points, other Heun points."""
    t = levels / (1.0 + levels)
    x = to_own_frame("flow", x_T, levels[-1])
    for k in range(len(levels) - 1, -1, -1):
        t_next = t[k - 1] if k > 0 else 0.0
        v = (x - posterior_mean(x, 1.0 - t[k], t[k])) / t[k]
        euler = x + (t_next - t[k]) * v
        if k > 0:
            v_next = (euler - posterior_mean(euler, 1.0 - t_next, t_next)) / t_next
            euler = x + (t_next - t[k]) * 0.5 * (v + v_next)
        x = euler
    return x


# DDIM with eta 0 is no control for alpha: on the flow, alpha = 1 - t or 1 give the same step
# (both are Euler in t, exact for a constant D), so the stochastic DDPM step stands for it.
@pytest.mark.parametrize("case", ["flow dpm_solver++ with alpha = 1",
                                  "flow ddpm with alpha = 1",
                                  "edm edm_heun with one level 0.1% off",
                                  "flow edm_heun as Heun in the flow's time t"])
def test_own_frame_reference_with_one_wrong_detail_differs_far_beyond_tolerance(case):
    process, method = case.split()[:2]
    x_T, levels = _x_T(), _levels(process)
    trajectory, _ = _run_chain(process, method, 0.0, 0.0, x_T)
    noises = _chain_noises(method, len(levels), SHAPE)
    if "alpha = 1" in case:   # the edm path's coefficients on flow samples
        wrong = reference_chain(process, method, 0.0, 0.0, levels, x_T, noises,
                                alpha_override=np.ones_like(levels))[-1]
    elif "off" in case:
        shifted = levels.copy()
        shifted[3] *= 1.001
        wrong = reference_chain(process, method, 0.0, 0.0, shifted, x_T, noises)[-1]
    else:
        wrong = _flow_heun_in_flow_time(levels, x_T)
    difference = np.max(np.abs(trajectory[-1] - wrong))
    print(f"\n{case}: max |ours - wrong reference| {difference:.1e}")
    assert difference > 1e-6   # 1e4 times the tolerance of the references


# ---------------------------------------------------------------- 3. orders of convergence
ORDER_SAMPLES = 16
ORDER_GRIDS = (32, 64, 128)   # levels K; NFE = K (2K - 1 for edm_heun)
# UniPC: the corrector UniC-p raises UniP-p's order by one (Zhao et al. 2023), 3 + 1; 3M has
# the factor 2 in D2 (samplers/tables.py), third order.
ORDERS = [("euler", 1, 0.25), ("dpm_solver++", 2, 0.3), ("dpm_solver++3m", 3, 0.35),
          ("unipc", 4, 0.6), ("edm_heun", 2, 0.3)]


@functools.cache
def _order_problem():
    """x_T (VP frame) and the exact x0 of the probability-flow ODE from s = HIGH to LOW: the
    same for every process (its ODE in y = x / alpha and s is the process's data prediction,
    E[x0 | x0 + s eps], whatever the path). The solvers run in the VP frame, so on one grid the
    three processes' chains agree to round-off and so do their errors: what differs is the
    network each wraps (eps on vp, F through denoise_vp on edm and flow)."""
    x_T = np.random.default_rng(21).standard_normal((ORDER_SAMPLES,) + GMM.event_shape)
    return x_T, pf_ode_solution(x_T, np.log(HIGH), np.log(LOW),
                                lambda y, s: posterior_mean(y, 1.0, s))


def _final_sample(process, method, levels, x_T):
    """x0 of our chain over the ascending levels (float64): vp on the unrespaced diffusion with
    abar = 1 / (1 + s^2) and the mixture's eps, edm / flow on the levels diffusion with F."""
    if process == "vp":
        abar = 1.0 / (1.0 + levels ** 2)
        diffusion = GaussianDiffusion(1.0 - abar / np.append(1.0, abar[:-1]))
        model = gm.eps_model(GMM, abar)
    else:
        diffusion = processes.levels_diffusion(levels)
        model = functools.partial(_process(process).denoise_vp, exact_network(process))
    with jax.enable_x64(True):
        return np.asarray(sample(model, diffusion, x_T.shape, jax.random.key(0), method,
                                 clip_denoised=False, noise=jnp.asarray(x_T)))


@pytest.mark.parametrize("method, order, tolerance", ORDERS, ids=[o[0] for o in ORDERS])
# vp's chains are the code test_solvers.py measures (over s in [0.01, 157]): slow here.
@pytest.mark.parametrize("process", [pytest.param("vp", marks=pytest.mark.slow), "edm", "flow"])
def test_error_falls_at_the_theoretical_order_on_each_process(process, method, order,
                                                               tolerance):
    x_T, exact = _order_problem()
    nfes, errors = [], []
    for num in ORDER_GRIDS:
        levels = np.exp(np.linspace(np.log(LOW), np.log(HIGH), num))   # even in log s
        nfes.append(METHODS[method].num_evaluations(num))
        errors.append(rms(_final_sample(process, method, levels, x_T), exact))
    slope = fitted_order(nfes, errors)
    print(f"\n{process} {method}: RMS error vs the exact ODE solution at NFE "
          + ", ".join(f"{n}: {e:.2e}" for n, e in zip(nfes, errors, strict=True))
          + f"; fitted order {slope:.2f} (theory {order})")
    assert abs(slope - order) <= tolerance


# ---------------------------------------------------------------- 4. the mixture at 10 NFE
NUM_SAMPLES = 8192


def _recovery_config(process, method="unipc", nfe=10, sigma_min=0.05):
    config = default.get_config()
    config.diffusion.process = process
    config.diffusion.sigma_min, config.diffusion.sigma_max = 0.002, 80.0
    config.diffusion.sigma_data = SIGMA_DATA
    config.sample.method, config.sample.num_steps = method, nfe
    config.sample.schedule = "auto"
    config.sample.sigma_min = sigma_min
    config.sample.clip_denoised = False   # the mixture is not image data
    return config


@functools.cache
def _mixture_samples(process, sign=1.0, sigma_min=0.05):
    config = _recovery_config(process, sigma_min=sigma_min)
    network = gm.eps_model(GMM, ABAR) if process == "vp" else exact_network(process)
    run = jax.jit(lambda key: sample_from_config(lambda x, c: sign * network(x, c), config,
                                                 (NUM_SAMPLES,) + GMM.event_shape, key))
    return run(jax.random.key(11))


def _recovery(process, sign=1.0, sigma_min=0.05):
    recovery = gm.check_recovery(GMM, _mixture_samples(process, sign, sigma_min), 0.03,
                                 (0.9, 1.1))
    print(f"\n{process} unipc 10 NFE auto grid, sample.sigma_min={sigma_min} sign={sign:+}: "
          f"weights {np.round(recovery.weights, 3)} (true {GMM.weights}), variance ratios "
          f"{np.round(recovery.var_ratios, 3)}")
    return recovery


@pytest.mark.parametrize("process", processes.PROCESSES)
def test_unipc_recovers_three_modes_at_10_nfe_on_each_process(process):
    recovery = _recovery(process)
    assert recovery.ok, (recovery.weights, recovery.var_ratios)


@pytest.mark.parametrize("process", ["edm", "flow"])
def test_ten_nfe_unipc_on_the_process_level_range_keeps_weights_with_variance_within_20pc(
        process):
    # The grid over the process's whole range (s from 0.002 to 80) at 10 NFE over-disperses the
    # modes by 10-13%, as vp's from t = 0 does (test_solvers.py): checked in [0.9, 1.2] so that
    # the shortfall is reported, not hidden; ending at s = 0.05 it is in [0.9, 1.1] (above).
    recovery = gm.check_recovery(GMM, _mixture_samples(process, sigma_min=0.0), 0.03, (0.9, 1.2))
    print(f"\n{process} unipc 10 NFE over s in [0.002, 80]: weights "
          f"{np.round(recovery.weights, 3)}, variance ratios {np.round(recovery.var_ratios, 3)}")
    assert recovery.ok, (recovery.weights, recovery.var_ratios)


@pytest.mark.parametrize("process", processes.PROCESSES)
def test_sign_flipped_network_fails_recovery(process):
    assert not _recovery(process, sign=-1.0).ok


def test_churned_level_on_a_grid_level_samples_instead_of_failing():
    """Churn that lands a level within rounding of the next grid level (logsnr grid, churn =
    K (r - 1) for the grid's ratio r) once made two levels equal, which the levels diffusion
    refused with a ValueError; the near-equal level is now that grid level."""
    levels = schedules.level_grid("logsnr", 32, 0.002, 80.0)
    aligned = 32 * (levels[1] / levels[0] - 1.0)
    x = sample(lambda x, s: jnp.zeros_like(x), processes.levels_diffusion(levels),
               (2, 2, 2, 1), jax.random.key(0), method="edm_heun", churn=aligned,
               clip_denoised=False)
    assert np.all(np.isfinite(np.asarray(x)))
