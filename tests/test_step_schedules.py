"""schedules.step_timesteps: the timesteps each step schedule visits."""
import numpy as np
import pytest

from jax_diffusion import schedules

T = 1000
BETAS = {name: schedules.get_beta_schedule(name, T) for name in ("linear", "cosine")}


def test_uniform_is_improved_diffusions_respacing():
    assert list(schedules.step_timesteps("uniform", T, 10, BETAS["linear"])) == list(
        range(0, 1000, 100))                                        # the DDIM stride
    assert set(schedules.step_timesteps("uniform", T, 37, BETAS["linear"])) == (
        schedules.space_timesteps(T, "37"))                         # no stride gives 37: sections


def test_quadratic_is_quadratic_in_t():
    got = schedules.step_timesteps("quadratic", T, 10, BETAS["linear"])
    np.testing.assert_array_equal(got, np.rint(999 * (np.arange(10) / 9) ** 2))


def _sigmas(name):
    abar = np.cumprod(1.0 - BETAS[name])
    return np.sqrt((1.0 - abar) / abar)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_karras_is_nearest_to_rho_7_sigmas_from_sigma_80(name):
    # Karras et al. 2022, eq. 5 and Table 1: sigma_max = 80 (both schedules' last sigma is above:
    # linear 157, cosine 2e4), sigma_min = sigma(t = 0).
    sigma = _sigmas(name)
    assert sigma[-1] > 80.0
    ramp = np.linspace(0.0, 1.0, 12)
    targets = (80.0 ** (1 / 7) + ramp * (sigma[0] ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    expected = sorted(int(np.argmin(np.abs(np.log(sigma) - np.log(s)))) for s in targets)
    assert len(set(expected)) == 12   # no collisions to push apart at this count
    got = schedules.step_timesteps("karras", T, 12, BETAS[name])
    np.testing.assert_array_equal(got, expected)
    assert 70.0 < sigma[got[-1]] < 90.0 and got[-1] < T - 1


def _nearest_in_log_sigma(name, sigma_targets):
    sigma = _sigmas(name)
    return [int(np.argmin(np.abs(np.log(sigma) - np.log(s)))) for s in sigma_targets]


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_logsnr_is_even_in_log_sigma_from_sigma_80(name):
    # Written out: lambda = -log sigma, so even in log-SNR is even in log sigma, here from
    # sigma(t = 0) to EDM's sigma_max = 80 (linear: 157 at t = T-1, cosine: 2e4).
    sigma = _sigmas(name)
    got = schedules.step_timesteps("logsnr", T, 12, BETAS[name])
    targets = np.exp(np.linspace(np.log(sigma[0]), np.log(80.0), 12))
    expected = _nearest_in_log_sigma(name, targets)
    assert len(set(expected)) == 12
    assert np.max(np.abs(got - np.array(expected))) <= 1   # interpolated, then rounded in t
    assert got[0] == 0 and 70.0 < sigma[got[-1]] < 90.0
    assert set(got) == schedules.logsnr_timesteps(T, 12, name, sigma_max=80.0)
    # sigma_max = inf: the whole process, t = 0 to T-1 (the unbounded helper's default).
    unbounded = schedules.step_timesteps("logsnr", T, 12, BETAS[name], sigma_max=np.inf)
    assert set(unbounded) == schedules.logsnr_timesteps(T, 12, name) and unbounded[-1] == T - 1


@pytest.mark.parametrize("name", ["logsnr", "karras"])
def test_sigma_min_ends_the_grid_early(name):
    # sigma_min = 0.05 (t = 11 on linear betas): the lowest step is the one nearest it, the rest
    # spaced above it; the default grid starts at t = 0.
    sigma = _sigmas("linear")
    got = schedules.step_timesteps(name, T, 10, BETAS["linear"], sigma_min=0.05)
    assert got[0] == _nearest_in_log_sigma("linear", [0.05])[0] > 5
    assert 70.0 < sigma[got[-1]] < 90.0 and len(got) == 10
    if name == "logsnr":   # even in log sigma between the two bounds
        steps = np.diff(np.log(sigma[got]))
        np.testing.assert_allclose(steps, np.log(80.0 / 0.05) / 9, rtol=0.05)
    assert schedules.step_timesteps(name, T, 10, BETAS["linear"])[0] == 0


def test_sigma_bounds_outside_the_process():
    with pytest.raises(ValueError, match=r"sigma_min=200 and sigma_max=80 leave no range"):
        schedules.step_timesteps("logsnr", T, 10, BETAS["linear"], sigma_min=200.0)
    with pytest.raises(ValueError, match=r"sigma_min=0 and sigma_max=0.001 leave no range"):
        schedules.step_timesteps("karras", T, 10, BETAS["linear"], sigma_max=1e-3)


@pytest.mark.parametrize("name", schedules.STEP_SCHEDULES)
@pytest.mark.parametrize("count", [1, 2, 40, 300, 1000])
def test_exactly_count_distinct_ascending_steps(name, count):
    got = schedules.step_timesteps(name, T, count, BETAS["linear"])
    assert len(got) == count and np.all(np.diff(got) > 0) and got[0] >= 0 and got[-1] < T
    if name == "quadratic" and count > 1:
        assert got[0] == 0 and got[-1] == T - 1
    if name in ("logsnr", "karras") and count > 1:   # up to sigma = 80, or pushed above it
        assert got[0] == 0 and got[-1] >= np.argmin(np.abs(np.log(_sigmas("linear") / 80.0)))
    if name == "trailing":  # starts from pure noise, steps of T / count
        assert got[-1] == T - 1 and got[0] == T // count - 1


def test_bad_schedule_or_count():
    with pytest.raises(ValueError, match=r"unknown step schedule 'cosine'; allowed: uniform"):
        schedules.step_timesteps("cosine", T, 10, BETAS["linear"])
    with pytest.raises(ValueError, match=r"count=0 steps must be between 1 and"):
        schedules.step_timesteps("karras", T, 0, BETAS["linear"])
