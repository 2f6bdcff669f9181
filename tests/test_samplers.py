"""Samplers: float64 oracles for single steps and whole chains, an exact Gaussian-mixture
denoiser for DDPM / DDIM / DPM-Solver++, the one-scan structure, randomness, guidance, errors."""
import functools
import re

import gaussian_mixture as gm
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_diffusion import schedules
from jax_diffusion.diffusion import GaussianDiffusion
from jax_diffusion.samplers import (
    METHODS,
    ddim_step,
    ddpm_step,
    guided_model_fn,
    sample,
)

T = 1000
KEPT = (0, 3, 10, 50, 200, 500, 999)   # an arbitrary respacing, K = 7
LINEAR = schedules.get_beta_schedule("linear", T)


# ---------------------------------------------------------------- float64 reference (numpy)
def ref_schedule(kept):
    """Ho et al.'s linear schedule written out, abar at the kept steps and the respaced betas."""
    betas = np.linspace(1e-4, 0.02, T)
    abar_all = np.cumprod(1.0 - betas)
    kept = np.arange(T) if kept is None else np.array(sorted(kept))
    abar = abar_all[kept]
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    return kept, abar, abar_prev, 1.0 - abar / abar_prev


def ref_model(x, ts, learned=False):
    """A fixed smooth 'network' (numpy twin of jax_model); ts are original timesteps [B]."""
    ts = ts[:, None, None, None]
    eps = 0.7 * np.sin(1.3 * x + 0.002 * ts)
    return np.concatenate([eps, np.tanh(0.5 * x - 0.001 * ts)], -1) if learned else eps


def jax_model(learned=False):
    def model_fn(x, ts):
        ts = ts[:, None, None, None].astype(x.dtype)
        eps = 0.7 * jnp.sin(1.3 * x + 0.002 * ts)
        return jnp.concatenate([eps, jnp.tanh(0.5 * x - 0.001 * ts)], -1) if learned else eps
    return model_fn


def ref_x0_eps(x, eps, abar, clip):
    """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar), clipped; eps re-derived from that x0."""
    x0 = (x - np.sqrt(1.0 - abar) * eps) / np.sqrt(abar)
    if clip:
        x0 = np.clip(x0, -1.0, 1.0)
    return x0, (x - np.sqrt(abar) * x0) / np.sqrt(1.0 - abar)


def ref_ddpm_step(kept, var_type, x, idx, z, clip):
    kept, abar, abar_prev, beta = ref_schedule(kept)
    post_var = beta * (1.0 - abar_prev) / (1.0 - abar)
    channels = x.shape[-1]
    out = ref_model(x, kept[idx], learned=var_type == "learned_range")
    result = np.empty_like(x)
    for b, i in enumerate(idx):
        x0, _ = ref_x0_eps(x[b], out[b, ..., :channels], abar[i], clip)
        mean = (np.sqrt(abar_prev[i]) * beta[i] / (1.0 - abar[i]) * x0
                + np.sqrt(1.0 - beta[i]) * (1.0 - abar_prev[i]) / (1.0 - abar[i]) * x[b])
        if i == 0:
            result[b] = mean
            continue
        if var_type == "fixed_small":
            var = post_var[i]
        elif var_type == "fixed_large":
            var = beta[i]
        else:
            frac = (out[b, ..., channels:] + 1.0) / 2.0
            var = np.exp(frac * np.log(beta[i]) + (1.0 - frac) * np.log(post_var[i]))
        result[b] = mean + np.sqrt(var) * z[b]
    return result


def ref_ddim_step(kept, x, idx, z, eta, clip):
    kept, abar, abar_prev, _ = ref_schedule(kept)
    out = ref_model(x, kept[idx])
    result = np.empty_like(x)
    for b, i in enumerate(idx):
        x0, eps = ref_x0_eps(x[b], out[b], abar[i], clip)
        sigma = (eta * np.sqrt((1.0 - abar_prev[i]) / (1.0 - abar[i]))
                 * np.sqrt(1.0 - abar[i] / abar_prev[i]))
        result[b] = (np.sqrt(abar_prev[i]) * x0 + np.sqrt(1.0 - abar_prev[i] - sigma ** 2) * eps
                     + sigma * z[b])
    return result


def ref_chain(kept, x_T, method, clip):
    """Deterministic DDIM (eta 0) or DPM-Solver++(2M) chain, written from the papers, in lambda."""
    kept, abar, _, _ = ref_schedule(kept)
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    lam = np.log(alpha / sigma)
    x, x0_prev, trajectory = x_T, None, [x_T]
    for i in range(len(kept) - 1, -1, -1):
        x0, eps = ref_x0_eps(x, ref_model(x, np.full(len(x), kept[i])), abar[i], clip)
        if i == 0:   # to abar = 1: DDIM gives x0; DPM-Solver++ steps to lambda = +inf, also x0
            x = x0
        elif method == "ddim":
            x = alpha[i - 1] * x0 + sigma[i - 1] * eps
        else:
            h = lam[i - 1] - lam[i]
            if x0_prev is None:
                d = x0
            else:
                r = (lam[i] - lam[i + 1]) / h
                d = (1.0 + 1.0 / (2.0 * r)) * x0 - 1.0 / (2.0 * r) * x0_prev
            x = sigma[i - 1] / sigma[i] * x - alpha[i - 1] * (np.exp(-h) - 1.0) * d
        x0_prev = x0
        trajectory.append(x)
    return np.stack(trajectory)


def _step_inputs(kept):
    k = T if kept is None else len(kept)
    idx = np.array([0, 1, 2, k // 2, k - 1])
    rng = np.random.default_rng(k)
    return idx, 1.2 * rng.standard_normal((5, 2, 2, 3)), rng.standard_normal((5, 2, 2, 3))


# ---------------------------------------------------------------- 1. oracle numerics
@pytest.mark.parametrize("kept", [None, KEPT], ids=["T1000", "respaced7"])
@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_step_matches_float64_reference(var_type, kept):
    idx, x, z = _step_inputs(kept)
    loss = "hybrid" if var_type == "learned_range" else "mse"
    with jax.enable_x64(True):
        diffusion = GaussianDiffusion(LINEAR, "eps", var_type, loss, use_timesteps=kept)
        for clip in (True, False):
            got, _ = ddpm_step(diffusion, jax_model(var_type == "learned_range"), jnp.asarray(x),
                               jnp.asarray(idx, jnp.int32), jnp.asarray(z), clip)
            assert got.dtype == jnp.float64
            expected = ref_ddpm_step(kept, var_type, x, idx, z, clip)
            np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kept", [None, KEPT], ids=["T1000", "respaced7"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_matches_float64_reference(eta, kept):
    idx, x, z = _step_inputs(kept)
    with jax.enable_x64(True):
        diffusion = GaussianDiffusion(LINEAR, use_timesteps=kept)
        for clip in (True, False):
            got, _ = ddim_step(diffusion, jax_model(), jnp.asarray(x), jnp.asarray(idx, jnp.int32),
                               jnp.asarray(z), eta, clip)
            np.testing.assert_allclose(np.asarray(got), ref_ddim_step(kept, x, idx, z, eta, clip),
                                       rtol=1e-10, atol=1e-10)


def test_first_order_dpm_solver_pp_is_ddim():
    # Two kept steps: DPM-Solver++ has no earlier x0 for its first step, so both steps are first
    # order, which is DDIM with eta = 0 (Lu et al. 2022); the tables must agree with ddim_step.
    x_T = np.random.default_rng(4).standard_normal((3, 2, 2, 3))
    with jax.enable_x64(True):
        diffusion = GaussianDiffusion(LINEAR, use_timesteps=(40, 700))
        run = functools.partial(sample, jax_model(), diffusion, x_T.shape, jax.random.key(0),
                                clip_denoised=False, noise=jnp.asarray(x_T),
                                return_trajectory=True)
        np.testing.assert_allclose(run("dpm_solver++")[1], run("ddim")[1], rtol=1e-12,
                                   atol=1e-12)


@pytest.mark.parametrize("method", ["ddim", "dpm_solver++"])
def test_deterministic_chains_match_float64_reference(method):
    x_T = np.random.default_rng(3).standard_normal((3, 2, 2, 3))
    with jax.enable_x64(True):
        diffusion = GaussianDiffusion(LINEAR, use_timesteps=KEPT)
        for clip in (True, False):
            x0, trajectory = sample(jax_model(), diffusion, x_T.shape, jax.random.key(0), method,
                                    clip_denoised=clip, noise=jnp.asarray(x_T),
                                    return_trajectory=True)
            assert x0.dtype == trajectory.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(trajectory), ref_chain(KEPT, x_T, method, clip),
                                       rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- 2. exact mixture denoiser
# Components of std 0.25-0.3: at std 0.15 DDIM-50's coarse last step (from t=20, abar=0.9937)
# shrinks a component's variance to ~0.78 of the truth, below the [0.8, 1.2] band; here it gives
# ~0.85-0.88, the shrink the DDIM paper's few-step results imply. The mixture is not image data,
# so the samplers run with clip_denoised=False.
GMM = gm.THREE_MODES
NUM_SAMPLES = 8192
# name -> (schedule, method, var_type, kept timesteps or None)
GMM_SAMPLERS = {
    "ddpm1000_fixed_large": ("linear", "ddpm", "fixed_large", None),
    "ddpm1000_fixed_small": ("linear", "ddpm", "fixed_small", None),
    "ddim50": ("linear", "ddim", "fixed_large", schedules.space_timesteps(T, "ddim50")),
    "dpm_solver++20": ("linear", "dpm_solver++", "fixed_large",
                       schedules.logsnr_timesteps(T, 20, "linear")),
    "ddim50_cosine": ("cosine", "ddim", "fixed_large", schedules.space_timesteps(T, "ddim50")),
    "dpm_solver++20_cosine": ("cosine", "dpm_solver++", "fixed_large",
                              schedules.logsnr_timesteps(T, 20, "cosine")),
}


@functools.cache
def _gmm_sampler(name):
    """Jitted (key, sign) -> samples with model_fn = sign * eps*; one compile serves both signs."""
    schedule, method, var_type, kept = GMM_SAMPLERS[name]
    betas = schedules.get_beta_schedule(schedule, T)
    diffusion = GaussianDiffusion(betas, "eps", var_type, use_timesteps=kept)
    model = gm.eps_model(GMM, np.cumprod(1.0 - betas))  # original T-step abar
    return jax.jit(lambda key, sign: sample(lambda x, t: sign * model(x, t), diffusion,
                                            (NUM_SAMPLES,) + GMM.event_shape, key, method,
                                            clip_denoised=False))


@functools.cache
def _gmm_recovery(name, sign=1.0):
    recovery = gm.check_recovery(GMM, _gmm_sampler(name)(jax.random.key(11), sign))
    print(f"\n{name} sign={sign:+}: weights {np.round(recovery.weights, 4)}, "
          f"variance ratios {np.round(recovery.var_ratios, 3)}")
    return recovery


def test_eps_star_is_minus_s_grad_log_density():
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 2, 2, 1)))
        abar = jnp.asarray([0.999, 0.9, 0.5, 0.1, 0.01, 1e-4])

        def log_p(x_one, ab):   # written directly: log sum_k w_k N(x; a mu_k, v_k I)
            flat = x_one.reshape(-1)
            var = ab * GMM.stds ** 2 + (1.0 - ab)
            sq = jnp.sum((flat - jnp.sqrt(ab) * GMM.means) ** 2, axis=1)
            return jax.nn.logsumexp(jnp.log(GMM.weights) - 0.5 * sq / var
                                    - 0.5 * flat.size * jnp.log(2 * jnp.pi * var))

        grad = jax.jit(jax.vmap(jax.grad(log_p)))(x, abar)
        expected = -jnp.sqrt(1.0 - abar)[:, None, None, None] * grad
        eps = jax.jit(functools.partial(gm.eps_star, GMM))(x, abar)
        np.testing.assert_allclose(eps, expected, rtol=1e-12, atol=1e-12)


def test_recovery_check_accepts_exact_samples_and_rejects_shrunken_ones():
    exact = GMM.sample(np.random.default_rng(5), NUM_SAMPLES)
    assert gm.check_recovery(GMM, exact).ok
    labels = np.argmin(np.linalg.norm(exact.reshape(NUM_SAMPLES, 1, -1) - GMM.means, axis=2), 1)
    centers = GMM.means[labels].reshape(exact.shape)
    assert not gm.check_recovery(GMM, centers + 0.85 * (exact - centers)).ok   # variance x0.72
    assert not gm.check_recovery(GMM, exact[np.argsort(exact[:, 0, 0, 0])[:7000]]).ok  # weights


@pytest.mark.parametrize("name", sorted(GMM_SAMPLERS))
def test_sampler_recovers_gaussian_mixture(name):
    recovery = _gmm_recovery(name)
    assert recovery.ok, (recovery.weights, recovery.var_ratios)


@pytest.mark.parametrize("name", ["ddpm1000_fixed_large", "ddim50", "dpm_solver++20"])
def test_sign_error_in_model_fails_recovery(name):
    assert not _gmm_recovery(name, -1.0).ok


# ---------------------------------------------------------------- 3. one scan, one model call
def _jaxprs_in(value):
    if isinstance(value, jex.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _jaxprs_in(item)


def _equations(jaxpr):
    """Every equation of jaxpr and, recursively, of its sub-jaxprs (pjit, scan, cond, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in _jaxprs_in(value):
                yield from _equations(sub)


def _normalized_program(diffusion, method, churn):
    """StableHLO text with every constant payload dense<...> and every number replaced. Every
    constant is embedded: newer JAX passes those over jax_embedded_constants_max_bytes (1 KiB) as
    arguments instead, which would tell a 1000-step schedule from a 10-step one."""
    embedded_max = jax.config.jax_embedded_constants_max_bytes
    jax.config.update("jax_embedded_constants_max_bytes", 1 << 30)
    try:
        text = jax.jit(lambda key: sample(lambda x, t: jnp.tanh(x), diffusion, (4, 2, 2, 1), key,
                                          method, churn=churn, model_alphas_cumprod=ABAR)
                       ).lower(jax.random.key(0)).as_text()
    finally:
        jax.config.update("jax_embedded_constants_max_bytes", embedded_max)
    return re.sub(r"\d+", "0", re.sub(r"dense<[^>]*>", "dense<>", text))


ABAR = np.cumprod(1.0 - LINEAR)


@pytest.mark.parametrize("method, churn", [(method, 0.0) for method in METHODS]
                         + [("edm_heun", 10.0)])
def test_one_scan_with_one_model_call_and_program_size_independent_of_steps(method, churn):
    calls = []

    def model(x, t):
        calls.append(1)
        return jnp.tanh(x)   # the only tanh in the program marks the model call

    diffusion10 = GaussianDiffusion(LINEAR, use_timesteps=schedules.space_timesteps(T, "10"))
    jaxpr = jax.make_jaxpr(jax.jit(lambda key: sample(
        model, diffusion10, (4, 2, 2, 1), key, method, churn=churn,
        model_alphas_cumprod=ABAR)))(jax.random.key(0)).jaxpr
    scans = [eqn for eqn in _equations(jaxpr) if eqn.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == METHODS[method].num_evaluations(10)
    body = scans[0].params["jaxpr"].jaxpr
    assert sum(eqn.primitive.name == "tanh" for eqn in _equations(body)) == 1
    assert sum(eqn.primitive.name == "tanh" for eqn in _equations(jaxpr)) == 1
    assert len(calls) == 1
    # 10 and 1000 steps lower to the same program up to constant values and numbers (array
    # lengths, SSA names): nothing is unrolled, so compile time cannot grow with the steps.
    assert _normalized_program(diffusion10, method, churn) == _normalized_program(
        GaussianDiffusion(LINEAR), method, churn)


# ---------------------------------------------------------------- 4. randomness and trajectory
SMALL = GaussianDiffusion(LINEAR, use_timesteps=schedules.space_timesteps(T, "10"))
SMALL_SHAPE = (4, 2, 2, 1)
SMALL_MODEL = gm.eps_model(GMM, np.cumprod(1.0 - LINEAR))


@functools.cache
def _small_sampler(method):
    if method == "ddim":
        return jax.jit(lambda key, noise, eta: sample(SMALL_MODEL, SMALL, SMALL_SHAPE, key, "ddim",
                                                      eta=eta, noise=noise, return_trajectory=True))
    return jax.jit(lambda key, noise: sample(SMALL_MODEL, SMALL, SMALL_SHAPE, key, method,
                                             noise=noise, return_trajectory=True))


def test_ddim_eta_zero_is_deterministic_and_eta_positive_adds_noise():
    noise = jax.random.normal(jax.random.key(7), SMALL_SHAPE)
    run = _small_sampler("ddim")
    a0, _ = run(jax.random.key(1), noise, 0.0)
    b0, _ = run(jax.random.key(2), noise, 0.0)
    np.testing.assert_array_equal(a0, b0)
    a1, _ = run(jax.random.key(1), noise, 1.0)
    b1, _ = run(jax.random.key(2), noise, 1.0)
    assert np.max(np.abs(a1 - b1)) > 0.05 and np.max(np.abs(a1 - a0)) > 0.05
    half, _ = run(jax.random.key(1), noise, 0.5)
    assert np.max(np.abs(half - a0)) > 0.01 and np.max(np.abs(half - a1)) > 0.01


def test_ddpm_is_stochastic_and_dpm_solver_deterministic():
    noise = jax.random.normal(jax.random.key(7), SMALL_SHAPE)
    ddpm, dpm = _small_sampler("ddpm"), _small_sampler("dpm_solver++")
    key1, key2 = jax.random.key(1), jax.random.key(2)
    assert np.max(np.abs(ddpm(key1, noise)[0] - ddpm(key2, noise)[0])) > 0.05
    np.testing.assert_array_equal(dpm(key1, noise)[0], dpm(key2, noise)[0])


@pytest.mark.parametrize("method", METHODS)
def test_trajectory_runs_from_noise_to_sample(method):
    noise = jax.random.normal(jax.random.key(7), SMALL_SHAPE)
    args = (jax.random.key(1), noise) + ((0.0,) if method == "ddim" else ())
    x0, trajectory = _small_sampler(method)(*args)
    nfe = METHODS[method].num_evaluations(SMALL.num_timesteps)
    assert trajectory.shape == (nfe + 1,) + SMALL_SHAPE
    np.testing.assert_array_equal(trajectory[0], noise)
    np.testing.assert_array_equal(trajectory[-1], x0)
    assert np.all(np.isfinite(trajectory)) and np.all(np.abs(x0) <= 1.0)


def test_noise_drawn_from_key_when_not_given():
    run = jax.jit(lambda key: sample(SMALL_MODEL, SMALL, SMALL_SHAPE, key, "ddim",
                                     return_trajectory=True))
    (a, traj_a), (b, _) = run(jax.random.key(1)), run(jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert abs(float(jnp.std(traj_a[0])) - 1.0) < 0.6
    assert np.max(np.abs(traj_a[0] - run(jax.random.key(2))[1][0])) > 0.1


# ---------------------------------------------------------------- 5. classifier-free guidance
NULL = 10


def label_model(params, x, t, y, learned=False):
    """Output depends on x, t, the label and params; learned adds a label-dependent v part."""
    scale = params["w"][y][:, None, None, None]
    mean = scale * jnp.tanh(x) + 0.001 * t[:, None, None, None]
    return jnp.concatenate([mean, jnp.cos(scale * x)], -1) if learned else mean


@pytest.mark.parametrize("learned", [False, True])
def test_guided_model_fn(learned):
    params = {"w": jnp.linspace(0.5, 1.5, NULL + 1)}
    x = jax.random.normal(jax.random.key(0), (3, 2, 2, 2))
    t = jnp.array([5, 500, 999], jnp.int32)
    y = jnp.array([1, 4, 7])
    calls = []

    def model(x, t, y):
        calls.append(x.shape)
        return label_model(params, x, t, y, learned)

    cond = label_model(params, x, t, y, learned)
    uncond = label_model(params, x, t, jnp.full_like(y, NULL), learned)
    np.testing.assert_allclose(guided_model_fn(model, y, NULL, 1.0)(x, t), cond, rtol=1e-6)
    guided0 = guided_model_fn(model, y, NULL, 0.0)(x, t)
    np.testing.assert_allclose(guided0[..., :2], uncond[..., :2], rtol=1e-6)
    guided3 = guided_model_fn(model, y, NULL, 3.0)(x, t)
    np.testing.assert_allclose(guided3[..., :2], uncond[..., :2] + 3.0 * (cond - uncond)[..., :2],
                               rtol=1e-5, atol=1e-6)
    if learned:   # the variance half is the conditional pass's, at every scale
        np.testing.assert_array_equal(guided0[..., 2:], cond[..., 2:])
        np.testing.assert_array_equal(guided3[..., 2:], cond[..., 2:])
    calls.clear()
    jax.make_jaxpr(guided_model_fn(model, y, NULL, 3.0))(x, t)
    assert calls == [(6, 2, 2, 2)]   # one call on the doubled batch


def test_sample_under_outer_jit_with_traced_key_params_and_labels():
    diffusion = GaussianDiffusion(LINEAR, use_timesteps=schedules.space_timesteps(T, "5"))
    shape = (4, 2, 2, 1)

    def run(params, key, labels):
        model = functools.partial(label_model, params)
        return sample(guided_model_fn(model, labels, NULL, 2.0), diffusion, shape, key, "ddim")

    params = {"w": jnp.linspace(0.5, 1.5, NULL + 1)}
    labels = jnp.array([0, 3, 5, 9])
    jitted = jax.jit(run)(params, jax.random.key(4), labels)
    np.testing.assert_allclose(jitted, run(params, jax.random.key(4), labels), rtol=1e-5, atol=1e-6)


def test_batch_sharded_by_caller_matches_unsharded():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch = NamedSharding(mesh, P("data"))
    shape = (len(jax.devices()), 2, 2, 1)
    def run(key, noise):
        return sample(SMALL_MODEL, SMALL, shape, key, "ddpm", noise=noise)
    noise = jax.random.normal(jax.random.key(3), shape)
    sharded = jax.jit(run, in_shardings=(None, batch), out_shardings=batch)(
        jax.random.key(1), jax.device_put(noise, batch))
    assert sharded.sharding.is_equivalent_to(batch, len(shape))
    unsharded = jax.jit(run)(jax.random.key(1), noise)
    np.testing.assert_allclose(sharded, unsharded, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- 6. bad input
def test_bad_arguments_raise_value_errors_naming_them():
    key, shape = jax.random.key(0), (2, 2, 2, 1)
    with pytest.raises(ValueError, match=r"'heun'.*ddpm, ddim, euler, dpm_solver\+\+"):
        sample(SMALL_MODEL, SMALL, shape, key, method="heun")
    with pytest.raises(ValueError, match=r"noise has shape \(3, 2, 2, 1\), expected shape "
                                         r"\(2, 2, 2, 1\)"):
        sample(SMALL_MODEL, SMALL, shape, key, noise=jnp.zeros((3, 2, 2, 1)))
    with pytest.raises(ValueError, match=r"eta=0.5 applies only to method 'ddim'.*'ddpm'"):
        sample(SMALL_MODEL, SMALL, shape, key, method="ddpm", eta=0.5)
    with pytest.raises(ValueError, match=r"eta=1.5 must lie in \[0, 1\]"):
        sample(SMALL_MODEL, SMALL, shape, key, method="ddim", eta=1.5)
    def three_channels(x, t, y):
        return jnp.zeros(x.shape[:-1] + (3,))
    guided = guided_model_fn(three_channels, jnp.zeros(2, int), 0, 1.0)
    with pytest.raises(ValueError, match=r"3 channels; expected C=1 or 2C=2"):
        guided(jnp.zeros(shape), jnp.zeros(2, jnp.int32))
