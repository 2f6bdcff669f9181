"""Consistency distillation's math (consistency.py, distill_targets) against the paper's formulas
written out plainly in float64 numpy (EDM variables: x_sigma = x_t / sqrt(abar), sigma =
sqrt((1 - abar) / abar)) and against the project's own samplers, on the Gaussian-mixture data
whose exact denoiser is known (gaussian_mixture.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gaussian_mixture as gm
from jax_diffusion import samplers, schedules
from jax_diffusion.diffusion import GaussianDiffusion
from jax_diffusion.distill import loop as distill
from jax_diffusion.distill import targets as distill_targets
from jax_diffusion.samplers import consistency

T = 1000
SIGMA_DATA = 0.5
GMM = gm.THREE_MODES


def _abar(schedule):
    betas = schedules.get_beta_schedule(schedule, T)
    return betas, np.cumprod(1.0 - betas)


def _sigma(abar):
    return np.sqrt((1.0 - abar) / abar)


def _paper_f(x_sigma, denoised, sigma, sigma_min):
    """f = c_skip x + c_out F with F = (D - c_skip_edm x) / c_out_edm, as written in the module
    docstring, for one level."""
    c_skip = SIGMA_DATA ** 2 / ((sigma - sigma_min) ** 2 + SIGMA_DATA ** 2)
    c_out = (sigma - sigma_min) * SIGMA_DATA / np.sqrt(sigma ** 2 + SIGMA_DATA ** 2)
    c_skip_edm = SIGMA_DATA ** 2 / (sigma ** 2 + SIGMA_DATA ** 2)
    c_out_edm = sigma * SIGMA_DATA / np.sqrt(sigma ** 2 + SIGMA_DATA ** 2)
    return c_skip * x_sigma + c_out * (denoised - c_skip_edm * x_sigma) / c_out_edm


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_boundary_condition_is_exact(schedule):
    betas, abar = _abar(schedule)
    sigma = schedules.edm_sigmas(abar)
    c_skip, c_out = consistency.boundary_scalings(sigma, sigma[0], SIGMA_DATA)
    assert c_skip[0] == 1.0 and c_out[0] == 0.0
    assert np.all(c_skip[1:] < 1.0) and np.all(c_out[1:] > 0.0)
    skip, out = consistency.consistency_table(abar, SIGMA_DATA)
    assert out[0] == 0.0 and skip[0] == 1.0 / np.sqrt(abar[0])

    # In float32 the network's output does not reach f at t = 0, however large: f = x_sigma.
    diffusion = GaussianDiffusion(betas, "v")
    x = jax.random.normal(jax.random.key(0), (4, 2, 2, 1))
    garbage = 1e6 * jax.random.normal(jax.random.key(1), x.shape)
    t = jnp.zeros((4,), jnp.int32)
    f = consistency.consistency_output(diffusion, SIGMA_DATA, x, t, garbage)
    np.testing.assert_array_equal(f, x * jnp.float32(1.0 / np.sqrt(abar[0])))
    # Negative control: one timestep up, the network's output counts.
    f_up = consistency.consistency_output(diffusion, SIGMA_DATA, x, t + 1, garbage)
    assert float(jnp.max(jnp.abs(f_up - x * jnp.float32(skip[1])))) > 1.0


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_consistency_function_is_the_papers_formula_for_every_head(mean_type):
    """The teacher's head, whichever it is, enters F as EDM's preconditioned output of its
    denoiser: f from the network's raw output equals c_skip x + c_out (D - c_skip_edm x) /
    c_out_edm with D the exact data prediction."""
    with jax.enable_x64(True):
        betas, abar = _abar("cosine")
        sigma = _sigma(abar)
        diffusion = GaussianDiffusion(betas, mean_type)
        t = np.array([0, 1, 7, 120, 500, 870, 990, 999])
        x = jax.random.normal(jax.random.key(2), (len(t),) + GMM.event_shape, jnp.float64)
        eps = gm.eps_star(GMM, x, jnp.asarray(abar[t]))
        a = jnp.asarray(abar[t]).reshape(-1, 1, 1, 1)
        x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
        output = {"eps": eps, "x0": x0, "v": jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0}[mean_type]
        f = consistency.consistency_output(diffusion, SIGMA_DATA, x, jnp.asarray(t), output)
        for i, t_i in enumerate(t):
            x_sigma = np.asarray(x[i]) / np.sqrt(abar[t_i])
            denoised = gm.x0_star_np(GMM, np.asarray(x[i])[None], abar[t_i])[0]
            expected = _paper_f(x_sigma, denoised, sigma[t_i], sigma[0])
            np.testing.assert_allclose(np.asarray(f[i]), expected, rtol=1e-10, atol=1e-10)


def _reference_ode_step(x_high, t_high, t_low, abar, solver):
    """Karras et al. Alg. 1's Euler / Heun step in EDM variables, float64 numpy, per example;
    returned in VP space."""
    out = []
    for x, t_h, t_l in zip(x_high, t_high, t_low, strict=True):
        a_h, a_l = abar[t_h], abar[t_l]
        s_h, s_l = _sigma(a_h), _sigma(a_l)
        x_sigma = x / np.sqrt(a_h)
        d = (x_sigma - gm.x0_star_np(GMM, x[None], a_h)[0]) / s_h
        x_next = x_sigma + (s_l - s_h) * d
        if solver == "heun":
            d_next = (x_next - gm.x0_star_np(GMM, (np.sqrt(a_l) * x_next)[None], a_l)[0]) / s_l
            x_next = x_sigma + (s_l - s_h) * 0.5 * (d + d_next)
        out.append(np.sqrt(a_l) * x_next)
    return np.stack(out)


# The cosine cases in the fast tier, the linear ones in the whole suite.
@pytest.mark.parametrize("schedule", [pytest.param("linear", marks=pytest.mark.slow), "cosine"])
@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_consistency_target_is_the_teachers_ode_step(schedule, solver):
    """The target f_theta^-(x', t_n) with x' the teacher's
    ODE step from t_{n+1} equals the paper's formulas in float64 to 1e-6 (relative to the
    largest value), on every interval of the grid."""
    with jax.enable_x64(True):
        betas, abar = _abar(schedule)
        sigma = _sigma(abar)
        grid = distill_targets.consistency_timesteps(betas, 18, 80.0)
        diffusion = GaussianDiffusion(betas, "eps")
        eps_fn = gm.eps_model(GMM, abar)

        def teacher_x0(x, t):
            return diffusion.p_mean_variance(eps_fn, x, t, clip_denoised=False)["pred_xstart"]

        n = jnp.asarray(np.repeat(np.arange(len(grid) - 1), 2))
        t_high, t_low = jnp.asarray(grid)[n + 1], jnp.asarray(grid)[n]
        data = jnp.asarray(GMM.sample(np.random.default_rng(0), len(n)))
        a_high = jnp.asarray(abar)[t_high].reshape(-1, 1, 1, 1)
        z = jax.random.normal(jax.random.key(3), data.shape, jnp.float64)
        x_high = jnp.sqrt(a_high) * data + jnp.sqrt(1 - a_high) * z
        x_low = distill_targets.ODE_STEPS[solver](teacher_x0, x_high, t_high, t_low, abar)
        assert x_low.dtype == jnp.float64

        reference = _reference_ode_step(np.asarray(x_high), np.asarray(t_high),
                                        np.asarray(t_low), abar, solver)
        scale = np.max(np.abs(reference))
        assert np.max(np.abs(np.asarray(x_low) - reference)) <= 1e-6 * scale

        # The whole target: here the target network is the exact denoiser in the eps head.
        target = consistency.consistency_output(diffusion, SIGMA_DATA, x_low, t_low,
                                                eps_fn(x_low, t_low))
        expected = np.stack([
            _paper_f(r / np.sqrt(abar[t]), gm.x0_star_np(GMM, r[None], abar[t])[0], sigma[t],
                     sigma[0]) for r, t in zip(reference, np.asarray(t_low), strict=True)])
        assert np.max(np.abs(np.asarray(target) - expected)) <= 1e-6 * np.max(np.abs(expected))

        # Negative control: the other solver is far off at this tolerance.
        other = "euler" if solver == "heun" else "heun"
        wrong = distill_targets.ODE_STEPS[other](teacher_x0, x_high, t_high, t_low, abar)
        assert np.max(np.abs(np.asarray(wrong) - reference)) > 1e-3 * scale


@pytest.mark.slow   # a cross-check of the float64 test above, through the samplers' own steps
@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_the_ode_step_is_the_samplers_step(solver):
    """The same steps by the project's samplers (another code path): edm_heun's first Heun step
    on the two-level chain {t_n, t_{n+1}}, and DDIM (eta 0) on the grid's respaced chain."""
    with jax.enable_x64(True):
        betas, abar = _abar("cosine")
        grid = distill_targets.consistency_timesteps(betas, 18, 80.0)
        full = GaussianDiffusion(betas, "eps")
        eps_fn = gm.eps_model(GMM, abar)

        def teacher_x0(x, t):
            return full.p_mean_variance(eps_fn, x, t, clip_denoised=False)["pred_xstart"]

        shape = (3,) + GMM.event_shape
        for n in range(len(grid) - 1):
            x_high = 1.3 * jax.random.normal(jax.random.key(n), shape, jnp.float64)
            t_high = jnp.full((3,), grid[n + 1])
            t_low = jnp.full((3,), grid[n])
            ours = distill_targets.ODE_STEPS[solver](teacher_x0, x_high, t_high, t_low, abar)
            if solver == "heun":
                two_levels = GaussianDiffusion(betas, "eps", use_timesteps={grid[n], grid[n + 1]})
                _, trajectory = samplers.sample(eps_fn, two_levels, shape, jax.random.key(0),
                                                method="edm_heun", clip_denoised=False,
                                                noise=x_high, return_trajectory=True)
                theirs = trajectory[2]   # x_T, the Euler point, the Heun step, the end
            else:
                chain = GaussianDiffusion(betas, "eps", use_timesteps=set(grid))
                theirs, _ = samplers.ddim_step(chain, eps_fn, x_high, jnp.full((3,), n + 1),
                                               jnp.zeros(shape), 0.0, clip_denoised=False)
            np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-9,
                                       atol=1e-9)


def test_training_grid():
    for schedule in ("cosine", "linear"):
        betas, abar = _abar(schedule)
        sigma = _sigma(abar)
        grid = distill_targets.consistency_timesteps(betas, 18, 80.0)
        assert len(grid) == 18 and grid[0] == 0 and grid[-1] == T - 1
        assert np.all(np.diff(grid) > 0)
        head = int(np.sum(sigma <= 80.0))   # sigma_{T-1} > 80 for both schedules
        assert sigma[grid[-2]] <= 80.0 < sigma[-1]
        np.testing.assert_array_equal(
            grid[:-1], schedules.step_timesteps("karras", head, 17, betas[:head]))
    # No cap when sigma_max lies above sigma_{T-1}: the plain Karras levels.
    betas, _ = _abar("linear")
    np.testing.assert_array_equal(distill_targets.consistency_timesteps(betas, 18, 1e6),
                                  schedules.step_timesteps("karras", T, 18, betas,
                                                           sigma_max=np.inf))
    with pytest.raises(ValueError, match="num_scales"):
        distill_targets.consistency_timesteps(betas, 18, 0.02)


def test_pseudo_huber_is_its_formula():
    difference = np.random.default_rng(0).normal(size=(3, 4, 4, 2))
    c = 0.00054 * np.sqrt(32)
    expected = [np.sqrt(np.sum(d ** 2) + c ** 2) - c for d in difference]
    with jax.enable_x64(True):
        np.testing.assert_allclose(distill_targets.pseudo_huber(jnp.asarray(difference)),
                                   expected, rtol=1e-12)
        assert float(distill_targets.pseudo_huber(jnp.zeros((1, 4, 4, 2)))[0]) == 0.0


@pytest.mark.parametrize("num_steps", [1, 2, 3])
def test_multistep_sampler_is_algorithm_1(num_steps):
    """consistency.sample with the exact denoiser as the network against Algorithm 1 written
    out in EDM variables (the same noises), clipping included."""
    with jax.enable_x64(True):
        betas, abar = _abar("cosine")
        sigma = _sigma(abar)
        diffusion = GaussianDiffusion(betas, "eps")
        eps_fn = gm.eps_model(GMM, abar)
        levels = schedules.trailing_timesteps(T, num_steps)[::-1]
        shape = (5,) + GMM.event_shape
        key = jax.random.key(4)
        noise = jax.random.normal(jax.random.key(5), shape, jnp.float64)
        ours = consistency.sample(eps_fn, diffusion, SIGMA_DATA, levels, shape, key,
                                  clip_denoised=True, noise=noise)

        _, chain_key = jax.random.split(key)

        def f(x_sigma, t):
            x_vp = np.sqrt(abar[t]) * x_sigma
            denoised = gm.x0_star_np(GMM, x_vp, abar[t])
            return np.clip(_paper_f(x_sigma, denoised, sigma[t], sigma[0]), -1.0, 1.0)

        x = f(sigma[levels[0]] * np.asarray(noise), levels[0])
        for k in range(1, num_steps):
            z = np.asarray(jax.random.normal(jax.random.fold_in(chain_key, k), shape,
                                             jnp.float64))
            tau = sigma[levels[k]]
            x = f(x + np.sqrt(tau ** 2 - sigma[0] ** 2) * z, levels[k])
        np.testing.assert_allclose(np.asarray(ours), x, rtol=1e-9, atol=1e-9)
        if num_steps > 1:   # negative control: the steps after the first change the samples
            one = consistency.sample(eps_fn, diffusion, SIGMA_DATA, levels[:1], shape, key,
                                     noise=noise)
            assert float(jnp.max(jnp.abs(one - ours))) > 1e-3


def test_target_network_is_the_ema_of_the_updated_student():
    params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
    tx = optax.chain(optax.sgd(0.1), distill.target_network(0.9))
    state = tx.init(params)
    for _ in range(3):
        grads = {"w": jnp.array([0.3, 1.0]), "b": jnp.array(-2.0)}
        updates, new_state = tx.update(grads, state, params)
        new_params = optax.apply_updates(params, updates)
        for name in params:
            expected = 0.9 * state[-1].params[name] + 0.1 * new_params[name]
            np.testing.assert_allclose(new_state[-1].params[name], expected, rtol=1e-6)
        params, state = new_params, new_state
    assert not np.allclose(state[-1].params["w"], params["w"])  # it lags the student
