"""Tests for jax_diffusion.schedules against plainly written references.

The references below are written straight from the papers, one timestep at a time with Python
floats and the math module, not vectorised the way the library is:
- Ho et al. 2020 (DDPM), sec. 4: beta_1 = 1e-4 ... beta_T = 0.02, linear, T = 1000.
- Nichol & Dhariwal 2021 (Improved DDPM), eq. 17: abar(t) = f(t) / f(0),
  f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), s = 0.008; beta_t = 1 - abar_t / abar_{t-1},
  clipped to at most 0.999.
- Improved DDPM's respacing (improved-diffusion, respace.py): the T steps are cut into equal
  sections (the first T % n one longer); section i keeps count_i steps at
  start + round(cur), cur = 0, stride, 2*stride, ... accumulated, stride = (size-1)/(count-1).
"""
import math

import numpy as np
import pytest

from jax_diffusion import schedules


# ----------------------------------------------------------------------------- references
def ref_linear_betas(T):
    """Ho et al.: evenly spaced from 1e-4 to 0.02 (for T = 1000), both ends scaled by 1000/T."""
    scale = 1000.0 / T
    lo, hi = scale * 1e-4, scale * 0.02
    if T == 1:
        return [lo]
    return [lo + (hi - lo) * i / (T - 1) for i in range(T)]


def ref_cosine_f(t, T, s=0.008):
    """Nichol & Dhariwal eq. 17: f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2)."""
    return math.cos((t / T + s) / (1.0 + s) * math.pi / 2.0) ** 2


def ref_cosine_betas(T):
    """beta_t = 1 - abar(t) / abar(t-1) (abar = f/f(0), so f(0) cancels), clipped at 0.999."""
    return [min(1.0 - ref_cosine_f(i + 1, T) / ref_cosine_f(i, T), 0.999) for i in range(T)]


def ref_space_timesteps(T, counts):
    """The Improved DDPM loop, written out: accumulate a fractional stride per section."""
    n = len(counts)
    size_per = T // n
    extra = T % n
    kept = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per + 1 if i < extra else size_per
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return set(kept)


def ref_alphas_cumprod(betas):
    """abar_t = prod_{s <= t} (1 - beta_s), one step at a time (Ho et al. sec. 2)."""
    out = []
    prod = 1.0
    for beta in betas:
        prod *= 1.0 - float(beta)
        out.append(prod)
    return out


# ----------------------------------------------------------------------------- beta schedules
@pytest.mark.parametrize("T", [1000, 250, 4000, 10])
def test_linear_schedule_matches_ho_et_al(T):
    betas = schedules.get_beta_schedule("linear", T)
    assert isinstance(betas, np.ndarray) and betas.dtype == np.float64 and betas.shape == (T,)
    np.testing.assert_allclose(betas, ref_linear_betas(T), rtol=1e-13, atol=0)


def test_linear_schedule_endpoints_at_T1000():
    betas = schedules.get_beta_schedule("linear", 1000)
    assert betas[0] == pytest.approx(1e-4, rel=1e-14)
    assert betas[-1] == pytest.approx(0.02, rel=1e-14)
    # abar_T for the DDPM schedule is about 4e-5 (the well-known value).
    assert ref_alphas_cumprod(betas)[-1] == pytest.approx(4.04e-5, rel=0.01)


@pytest.mark.parametrize("T", [1000, 4000, 50])
def test_cosine_schedule_matches_nichol_dhariwal(T):
    betas = schedules.get_beta_schedule("cosine", T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    np.testing.assert_allclose(betas, ref_cosine_betas(T), rtol=1e-12, atol=0)
    # The product of (1 - beta) reproduces abar(t) = f(t)/f(0) wherever no clipping happened.
    abar = ref_alphas_cumprod(betas)
    for t in range(T):
        if betas[t] < 0.999:
            assert abar[t] == pytest.approx(ref_cosine_f(t + 1, T) / ref_cosine_f(0, T),
                                            rel=1e-9)
    # f(T) = cos^2(pi/2) ~ 0, so the last beta hits the 0.999 clip; earlier ones do not.
    assert betas[-1] == 0.999
    assert np.all(betas[:-1] < 0.999)
    assert np.all(np.diff(betas) > 0)


def test_unknown_schedule_names_value_and_allowed():
    with pytest.raises(ValueError, match=r"'quadratic'.*allowed: linear, cosine"):
        schedules.get_beta_schedule("quadratic", 1000)


@pytest.mark.parametrize("T", [0, -5, 10.0, "1000"])
def test_bad_num_timesteps(T):
    with pytest.raises(ValueError, match="num_timesteps"):
        schedules.get_beta_schedule("linear", T)


# ----------------------------------------------------------------------------- space_timesteps
def test_space_timesteps_improved_ddpm_docstring_example():
    """T = 300, "10,15,20": 100 steps per section, strided to 10, 15 and 20 steps."""
    expected = ref_space_timesteps(300, [10, 15, 20])
    assert len(expected) == 45
    # Worked by hand: section 0 has stride 99/9 = 11 exactly -> 0, 11, ..., 99.
    assert sorted(t for t in expected if t < 100) == list(range(0, 100, 11))
    # Each section keeps its first and last step.
    assert {0, 99, 100, 199, 200, 299} <= expected
    # Section 1: stride 99/14; the 8th step is 100 + round(7 * 99/14) where the accumulated
    # cur is 49.4999... in floating point, so Improved DDPM keeps 149 (not 150).
    assert 149 in expected and 150 not in expected
    assert schedules.space_timesteps(300, "10,15,20") == expected
    assert schedules.space_timesteps(300, [10, 15, 20]) == expected


@pytest.mark.parametrize("T,counts", [
    (1000, [250]), (1000, [50]), (1000, [10]), (4000, [100]), (100, [15]),
    (1000, [5, 10, 15, 20, 25]), (301, [10, 15, 20]), (302, [10, 15, 20]), (7, [3, 2]),
    (1000, [1000]), (10, [1]), (16, [15]),
])
def test_space_timesteps_matches_improved_ddpm_loop(T, counts):
    kept = schedules.space_timesteps(T, counts)
    assert kept == ref_space_timesteps(T, counts)
    assert kept == schedules.space_timesteps(T, ",".join(map(str, counts)))
    assert all(isinstance(t, int) for t in kept)


def test_space_timesteps_sweep_small():
    """Every (T, equal counts) with T < 60 and 1..3 sections agrees with the reference loop."""
    for T in range(1, 60):
        for n in (1, 2, 3):
            for count in range(1, T // n + 1):
                counts = [count] * n
                got = schedules.space_timesteps(T, counts)
                assert got == ref_space_timesteps(T, counts), (T, counts)
                assert len(got) == n * count


def test_space_timesteps_ddim():
    assert schedules.space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert schedules.space_timesteps(1000, "ddim1000") == set(range(1000))
    assert schedules.space_timesteps(1000, "ddim100") == set(range(0, 1000, 10))
    # T = 10: stride 3 gives {0, 3, 6, 9}.
    assert schedules.space_timesteps(10, "ddim4") == {0, 3, 6, 9}


def test_space_timesteps_ddim_impossible_count():
    # For T = 10 the strides 1..10 give 10, 5, 4, 3, 2, 2, 2, 2, 2, 1 steps: never 7.
    with pytest.raises(ValueError, match=r"'ddim7'.*allowed ddimN: N in 1, 2, 3, 4, 5, 10\b"):
        schedules.space_timesteps(10, "ddim7")


def test_space_timesteps_section_too_large():
    # 300 steps in 2 sections of 150: section 1 cannot keep 300.
    with pytest.raises(ValueError, match=r"section 1 has 150.*between 1 and 150, got 300"):
        schedules.space_timesteps(300, [5, 300])
    # More steps than T in one section.
    with pytest.raises(ValueError, match=r"section 0 has 10.*got 11"):
        schedules.space_timesteps(10, "11")
    with pytest.raises(ValueError, match=r"got 0"):
        schedules.space_timesteps(10, [0])


@pytest.mark.parametrize("bad", ["10,abc", "ddimX", "", "ddim"])
def test_space_timesteps_unparseable(bad):
    with pytest.raises(ValueError, match=r"section_counts='" + bad + "'.*ddimN"):
        schedules.space_timesteps(100, bad)


def test_space_timesteps_empty_list():
    with pytest.raises(ValueError, match="empty"):
        schedules.space_timesteps(100, [])


# ----------------------------------------------------------------------------- log-SNR spacing
def ref_logsnr(betas):
    """lambda_t = log(abar_t / (1 - abar_t)), per step."""
    return [math.log(a / (1.0 - a)) for a in ref_alphas_cumprod(betas)]


@pytest.mark.parametrize("name,T,n", [("cosine", 1000, 10), ("cosine", 1000, 25),
                                      ("linear", 1000, 20), ("linear", 200, 7)])
def test_logsnr_timesteps_evenly_spaced_in_logsnr(name, T, n):
    kept = sorted(schedules.logsnr_timesteps(T, n, name))
    assert len(kept) == n and kept[0] == 0 and kept[-1] == T - 1
    lam = ref_logsnr(ref_linear_betas(T) if name == "linear" else ref_cosine_betas(T))
    targets = [lam[0] + (lam[-1] - lam[0]) * i / (n - 1) for i in range(n)]
    # The grid step nearest to each target in lambda, by brute force.
    best = [min(range(T), key=lambda s: abs(lam[s] - target)) for target in targets]

    def crowded(i):
        # Near the ends lambda moves fast per step (the cosine schedule's clipped last beta
        # drops it by ~10), so several targets share a step and must be pushed apart.
        return (any(best[j] - best[i] <= j - i for j in range(i + 1, n))
                or any(best[i] - best[j] <= i - j for j in range(i)))

    free = [i for i in range(n) if not crowded(i)]
    assert len(free) >= n // 2  # most steps are where the spacing can be honoured
    for i in free:
        t = kept[i]
        assert abs(t - best[i]) <= 1, (i, t, best[i])
        local = max(abs(lam[min(t + 1, T - 1)] - lam[t]), abs(lam[t] - lam[max(t - 1, 0)]))
        assert abs(lam[t] - targets[i]) <= local, (i, t)


def test_logsnr_timesteps_extremes_and_betas_input():
    assert schedules.logsnr_timesteps(50, 2, "linear") == {0, 49}
    assert schedules.logsnr_timesteps(50, 50, "cosine") == set(range(50))
    betas = schedules.get_beta_schedule("cosine", 100)
    by_name = schedules.logsnr_timesteps(100, 12, "cosine")
    assert schedules.logsnr_timesteps(100, 12, betas) == by_name
    # When n is close to T, duplicates are pushed apart: still exactly n distinct steps.
    assert len(schedules.logsnr_timesteps(30, 28, "cosine")) == 28


def test_logsnr_timesteps_bad_input():
    with pytest.raises(ValueError, match=r"n=1.*between 2 and num_timesteps=50"):
        schedules.logsnr_timesteps(50, 1, "linear")
    with pytest.raises(ValueError, match=r"n=51.*between 2 and num_timesteps=50"):
        schedules.logsnr_timesteps(50, 51, "linear")
    with pytest.raises(ValueError, match=r"shape \(40,\).*\(50,\)"):
        schedules.logsnr_timesteps(50, 5, np.full(40, 0.01))
    with pytest.raises(ValueError, match="unknown beta schedule 'foo'"):
        schedules.logsnr_timesteps(50, 5, "foo")


# ----------------------------------------------------------------------------- respacing
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_respaced_betas_keep_alphas_cumprod(name):
    T = 200
    betas = schedules.get_beta_schedule(name, T)
    kept = [0, 3, 17, 50, 51, 120, 199]
    new_betas, timestep_map = schedules.respaced_betas(betas, set(kept))
    assert timestep_map.tolist() == kept
    abar = ref_alphas_cumprod(ref_linear_betas(T) if name == "linear" else ref_cosine_betas(T))
    # The respaced chain reaches exactly the original abar at each kept step.
    # (atol: abar ~ 1e-7 at the last cosine step, where 1 - beta' loses digits.)
    np.testing.assert_allclose(ref_alphas_cumprod(new_betas), [abar[t] for t in kept],
                               rtol=1e-10, atol=1e-15)
    # beta'_i = 1 - abar_{t_i} / abar_{t_{i-1}}, with abar before the first kept step = 1.
    previous = 1.0
    for i, t in enumerate(kept):
        assert new_betas[i] == pytest.approx(1.0 - abar[t] / previous, rel=1e-10)
        previous = abar[t]


def test_respaced_betas_bad_input():
    betas = schedules.get_beta_schedule("linear", 10)
    with pytest.raises(ValueError, match=r"\[0, 9\].*got 0\.\.10"):
        schedules.respaced_betas(betas, [0, 10])
    with pytest.raises(ValueError, match="empty"):
        schedules.respaced_betas(betas, [])
