"""The progressive-distillation target against the project's DDIM sampler and against plain
float64 formulas, on the Gaussian-mixture data whose exact denoiser is known (gaussian_mixture.py).

One student DDIM step from t to t_end with x0 = the target must land exactly where two teacher
DDIM steps t -> t_mid -> t_end land; the teacher steps are taken by samplers.ddim_step on the
teacher's respaced diffusion (another code path: p_mean_variance, the eps re-derivation)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaussian_mixture as gm
from jax_diffusion import schedules
from jax_diffusion.diffusion import GaussianDiffusion
from jax_diffusion.distill import targets as distill_targets
from jax_diffusion.samplers import ddim_step

T = 1000
GMM = gm.THREE_MODES


def test_trailing_grid_nests_under_halving():
    for n in (2, 4, 8, 64, 128, 256):
        grid = schedules.trailing_timesteps(T, n)
        assert grid[-1] == T - 1 and len(set(grid)) == n and np.all(np.diff(grid) > 0)
        np.testing.assert_array_equal(grid[1::2], schedules.trailing_timesteps(T, n // 2))
    np.testing.assert_array_equal(schedules.trailing_timesteps(T, 4), [249, 499, 749, 999])


def _reference_target(abar, x, t, t_mid, t_end, x0_fn):
    """Algorithm 2 of Salimans & Ho written out in float64 numpy, one example at a time."""
    out = []
    for i in range(len(x)):
        a_t, a_m = abar[t[i]], abar[t_mid[i]]
        a_e = 1.0 if t_end[i] < 0 else abar[t_end[i]]
        z = x[i]
        x0 = x0_fn(z[None], t[i])[0]
        z1 = np.sqrt(a_m) * x0 + np.sqrt(1 - a_m) * (z - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
        x0 = x0_fn(z1[None], t_mid[i])[0]
        z2 = np.sqrt(a_e) * x0 + np.sqrt(1 - a_e) * (z1 - np.sqrt(a_m) * x0) / np.sqrt(1 - a_m)
        r = np.sqrt(1 - a_e) / np.sqrt(1 - a_t)
        out.append((z2 - r * z) / (np.sqrt(a_e) - r * np.sqrt(a_t)))
    return np.stack(out)


# One case in the fast tier (cosine, 2 student steps); the others, each a few seconds of
# compilation, in the whole suite.
@pytest.mark.parametrize("schedule", [pytest.param("linear", marks=pytest.mark.slow), "cosine"])
@pytest.mark.parametrize("student_steps", [pytest.param(1, marks=pytest.mark.slow), 2,
                                           pytest.param(4, marks=pytest.mark.slow)])
def test_one_student_step_on_the_target_equals_two_teacher_ddim_steps(schedule, student_steps):
    with jax.enable_x64(True):
        betas = schedules.get_beta_schedule(schedule, T)
        abar = np.cumprod(1.0 - betas)
        eps_fn = gm.eps_model(GMM, abar)
        teacher_grid = schedules.trailing_timesteps(T, 2 * student_steps)
        teacher = GaussianDiffusion(betas, "eps", use_timesteps=set(teacher_grid))
        student = GaussianDiffusion(betas, "x0", use_timesteps=set(teacher_grid[1::2]))
        full = GaussianDiffusion(betas, "eps")

        def teacher_x0(x, t):  # clipping off: the mixture is not image data
            return full.p_mean_variance(eps_fn, x, t, clip_denoised=False)["pred_xstart"]

        batch = 6 * student_steps
        index = jnp.arange(batch) % student_steps  # every student step, several examples each
        x = jax.random.normal(jax.random.key(0), (batch,) + GMM.event_shape, jnp.float64)
        t, t_mid, t_end = distill_targets.stage_timesteps(T, student_steps, index)
        target = distill_targets.progressive_target(teacher_x0, x, t, t_mid, t_end, abar)
        assert target.dtype == jnp.float64

        # Two teacher DDIM steps by the sampler (indices into the teacher's 2N-step grid) ...
        zeros = jnp.zeros_like(x)
        i_teacher = 2 * index + 1
        z_mid, _ = ddim_step(teacher, eps_fn, x, i_teacher, zeros, 0.0, clip_denoised=False)
        z_two, _ = ddim_step(teacher, eps_fn, z_mid, i_teacher - 1, zeros, 0.0,
                             clip_denoised=False)
        # ... against one student DDIM step whose x0-prediction is the target.
        z_one, _ = ddim_step(student, lambda _x, _t: target, x, index, zeros, 0.0,
                             clip_denoised=False)
        scale = float(jnp.max(jnp.abs(z_two)))
        assert float(jnp.max(jnp.abs(z_one - z_two))) <= 1e-6 * scale
        np.testing.assert_array_equal(np.asarray(teacher.timestep_map)[np.asarray(i_teacher)],
                                      np.asarray(t))

        def numpy_x0(z, t_scalar):
            return np.asarray(teacher_x0(jnp.asarray(z), jnp.full((1,), t_scalar)))

        reference = _reference_target(abar, np.asarray(x), np.asarray(t), np.asarray(t_mid),
                                      np.asarray(t_end), numpy_x0)
        np.testing.assert_allclose(np.asarray(target), reference, rtol=1e-9, atol=1e-9)

        # Negative control: one teacher step instead of two (t_mid skipped) is far off.
        skipped = distill_targets.progressive_target(teacher_x0, x, t, t_end, t_end, abar) \
            if student_steps > 1 else None
        if skipped is not None:
            z_bad, _ = ddim_step(student, lambda _x, _t: skipped, x, index, zeros, 0.0,
                                 clip_denoised=False)
            assert float(jnp.max(jnp.abs(z_bad - z_two))) > 1e-3 * scale


def test_target_of_the_exact_denoiser_on_one_gaussian_is_its_posterior_mean():
    """For data N(mu, s^2 I) the probability-flow ODE is linear; DDIM with the exact denoiser
    over the last step (to the clean end) returns E[x0 | x_t] itself, so the target of a
    one-step student at its last step is the posterior mean, written in closed form."""
    with jax.enable_x64(True):
        mu, s = 0.7, 0.4
        one = gm.GaussianMixture(np.array([1.0]), np.full((1, 4), mu), np.array([s]), (2, 2, 1))
        abar = np.cumprod(1.0 - schedules.get_beta_schedule("cosine", T))
        full = GaussianDiffusion(schedules.get_beta_schedule("cosine", T), "eps")
        eps_fn = gm.eps_model(one, abar)

        def teacher_x0(x, t):
            return full.p_mean_variance(eps_fn, x, t, clip_denoised=False)["pred_xstart"]

        x = jax.random.normal(jax.random.key(1), (5, 2, 2, 1), jnp.float64)
        t, t_mid, t_end = distill_targets.stage_timesteps(T, 1, jnp.zeros((5,), jnp.int32))
        target = distill_targets.progressive_target(teacher_x0, x, t, t_mid, t_end, abar)
        # The last teacher step lands on x0(z_mid); z_mid from the first step.
        a_t, a_m = abar[999], abar[499]

        def posterior_mean(z, a):
            return mu + np.sqrt(a) * s ** 2 / (a * s ** 2 + 1 - a) * (z - np.sqrt(a) * mu)

        z = np.asarray(x)
        x0 = posterior_mean(z, a_t)
        z_mid = np.sqrt(a_m) * x0 + np.sqrt(1 - a_m) * (z - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
        np.testing.assert_allclose(np.asarray(target), posterior_mean(z_mid, a_m), rtol=1e-10)


def test_truncated_snr_weight():
    abar = jnp.array([0.0, 0.25, 0.5, 0.8])
    np.testing.assert_allclose(distill_targets.truncated_snr_weight(abar), [1, 1, 1, 4], rtol=1e-6)


@pytest.mark.slow   # compiles the U-Net three times
def test_the_teacher_is_guided_with_distill_guidance_scale():
    """The teacher's x0 is uncond + w (cond - uncond) with w = distill.guidance_scale (x0 is
    linear in the network's output when not clipped), whatever sample.guidance_scale says."""
    from tiny_config import tiny_config

    from jax_diffusion.distill import loop as distill
    from jax_diffusion.diffusion import create_diffusion
    from jax_diffusion.models import create_model

    # AdaGN: with DDPM's bias-before-GroupNorm the tiny model's 32 channels (one per group)
    # erase the label's embedding entirely.
    config = tiny_config(model__use_scale_shift_norm=True, sample__guidance_scale=1.0,
                         sample__clip_denoised=False)
    model = create_model(config.model)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    t = jnp.array([10, 300, 700, 999])
    labels = jnp.array([0, 3, 7, 9])
    params = jax.jit(lambda: model.init(jax.random.key(1), x, t, labels, train=False))()["params"]
    # The output convolution starts at zero: perturb every weight so the output depends on y.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(treedef, [leaf + 0.1 * jax.random.normal(key, leaf.shape)
                                          for leaf, key in zip(leaves, keys, strict=True)])
    diffusion = create_diffusion(config.diffusion)

    def x0_with(scale, y):
        config.distill.guidance_scale = scale   # read when traced
        x0 = jax.jit(lambda p, y: distill.teacher_x0_fn(model, diffusion, p, y, config)(x, t))
        return np.asarray(x0(params, y))

    guided = x0_with(2.5, labels)
    cond = x0_with(1.0, labels)
    uncond = x0_with(1.0, jnp.full_like(labels, config.model.num_classes))   # the null label
    np.testing.assert_allclose(guided, uncond + 2.5 * (cond - uncond), rtol=1e-4, atol=1e-4)
    assert np.abs(guided - cond).max() > 1e-2   # negative control: guidance changes the target
