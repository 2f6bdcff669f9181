"""Post-hoc EMA math (jax_diffusion/training/phema.py) against float64 references written from the
paper's definitions (numerical integrals of the profiles, the discrete EMA's own weights), and
the reconstruction of a tracked width from float16 snapshots of the other widths on a toy
parameter trajectory; the config rules of the post-hoc EMA keys and EDM's half-life EMA."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate
from tiny_config import tiny_config

from jax_diffusion import config_validation
from jax_diffusion.errors import CheckpointError, ConfigError
from jax_diffusion.training import phema
from jax_diffusion.training import power_ema
from jax_diffusion.training.train_step import halflife_ema_decay


def _profile(t, gamma):
    """p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t], 0 after."""
    return lambda tau: (gamma + 1) * tau ** gamma / t ** (gamma + 1) if tau <= t else 0.0


def _integral_inner_product(t_a, g_a, t_b, g_b):
    value, _ = integrate.quad(lambda tau: _profile(t_a, g_a)(tau) * _profile(t_b, g_b)(tau),
                              0.0, min(t_a, t_b), epsabs=0, epsrel=1e-13, limit=200)
    return value


def test_gamma_and_sigma_rel_invert_each_other_at_edm2s_values():
    """EDM2 quotes gamma 16.97 for sigma_rel 0.05 and 6.94 for 0.10; sigma_rel is the profile's
    standard deviation over t, computed here by integrating the profile."""
    gammas = phema.gamma_of_sigma_rel(np.array([0.05, 0.10]))
    np.testing.assert_allclose(gammas, [16.97, 6.94], atol=5e-3)
    for sigma_rel, gamma in zip([0.05, 0.10], gammas, strict=True):
        p = _profile(1.0, gamma)
        mean = integrate.quad(lambda x, p=p: x * p(x), 0, 1, epsrel=1e-13)[0]
        var = integrate.quad(lambda x, p=p, m=mean: (x - m) ** 2 * p(x), 0, 1,
                             epsrel=1e-13)[0]
        assert np.sqrt(var) == pytest.approx(sigma_rel, rel=1e-10)
    grid = np.linspace(0.01, 0.28, 28)
    np.testing.assert_allclose(phema.sigma_rel_of_gamma(phema.gamma_of_sigma_rel(grid)), grid,
                               rtol=1e-12)
    with pytest.raises(ValueError):
        phema.gamma_of_sigma_rel(0.29)  # wider than a flat average (gamma = 0)


def test_tracked_beta_gives_the_power_profile():
    """The weights the discrete EMA with beta_t = (1 - 1/t)^(gamma + 1) gives each step's
    parameters after T steps: nothing on the initialisation, sum 1, and relative standard
    deviation sigma_rel (the discretisation error is O(1/T)); a fixed decay keeps a share
    beta^T of the initialisation."""
    steps = 20_000
    for sigma_rel in (0.05, 0.10):
        gamma = phema.gamma_of_sigma_rel(sigma_rel)
        sizes = phema.power_ema_step_size(gamma, np.arange(1, steps + 1))
        assert sizes[0] == 1.0   # beta_1 = 0: the initialisation is forgotten at once
        # weight of step tau: (1 - beta_tau) * prod_{s > tau} beta_s
        log_betas = np.log1p(-sizes[1:])   # beta_2 .. beta_T
        later = np.concatenate([np.cumsum(log_betas[::-1])[::-1], [0.0]])
        weights = sizes * np.exp(later)
        assert weights.sum() == pytest.approx(1.0, abs=1e-12)
        tau = np.arange(1, steps + 1) / steps
        mean = np.sum(weights * tau)
        std = np.sqrt(np.sum(weights * (tau - mean) ** 2))
        assert std == pytest.approx(sigma_rel, rel=1e-3)
    # At t = 1e6 the series (g + 1)/t - (g + 1) g / (2 t^2) is exact to 1e-17 relative; float32
    # arithmetic on 1 - 1/t would be off by ~5%.
    t, g = 1e6, 6.94
    series = (g + 1) / t - (g + 1) * g / (2 * t * t) + (g + 1) * g * (g - 1) / (6 * t ** 3)
    assert phema.power_ema_step_size(g, t) == pytest.approx(series, rel=1e-10)


def test_inner_products_match_the_integrals():
    cases = [(100.0, 16.97, 100.0, 16.97), (30.0, 6.94, 100.0, 16.97), (100.0, 3.5, 7.0, 6.94),
             (1.0, 0.5, 2.0, 40.0), (5000.0, 6.94, 4000.0, 6.94)]
    for t_a, g_a, t_b, g_b in cases:
        want = _integral_inner_product(t_a, g_a, t_b, g_b)
        assert phema.profile_inner_product(t_a, g_a, t_b, g_b) == pytest.approx(want, rel=1e-9)
        assert phema.profile_inner_product(t_b, g_b, t_a, g_a) == pytest.approx(want, rel=1e-9)


def test_coefficients_match_a_solve_of_integrated_profiles():
    """The closed-form coefficients equal those of the same least-squares problem assembled by
    numerical integration; the target (t=900, 0.08) is not among the inputs."""
    steps = [100, 100, 300, 300, 600, 600, 900, 900]
    widths = [0.05, 0.10] * 4
    gammas = phema.gamma_of_sigma_rel(np.array(widths))
    target_gamma = float(phema.gamma_of_sigma_rel(0.08))
    gram = np.array([[_integral_inner_product(ta, ga, tb, gb)
                      for tb, gb in zip(steps, gammas, strict=True)]
                     for ta, ga in zip(steps, gammas, strict=True)])
    rhs = np.array([_integral_inner_product(t, g, 900.0, target_gamma)
                    for t, g in zip(steps, gammas, strict=True)])
    want = np.linalg.solve(gram, rhs)
    want /= want.sum()
    got = phema.reconstruction_coefficients(steps, widths, 900, 0.08)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    # A tracked width at a snapshot's step is that snapshot alone.
    alone = phema.reconstruction_coefficients(steps, widths, 900, 0.10)
    np.testing.assert_allclose(alone, np.eye(8)[7], atol=1e-8)


def _toy_run(widths, steps=2000, every=50, size=64):
    """Power EMAs (float64) of a noisy, drifting toy parameter vector, and float16 snapshots
    [(step, [width, size])] every `every` steps."""
    rng = np.random.default_rng(0)
    gammas = phema.gamma_of_sigma_rel(np.array(widths))
    theta, optimum = 3.0 * rng.normal(size=size), rng.normal(size=size)
    emas, snapshots = np.zeros((len(widths), size)), []
    for t in range(1, steps + 1):
        theta = theta + 0.01 * (optimum - theta) + 0.05 * rng.normal(size=size)
        emas += phema.power_ema_step_size(gammas, t)[:, None] * (theta - emas)
        if t % every == 0:
            snapshots.append((t, emas.astype(np.float16)))
    return emas, snapshots


def _rebuild(snapshots, widths, use, steps, sigma_rel):
    pairs = [(t, i) for t, _ in snapshots for i in use]
    x = phema.reconstruction_coefficients([t for t, _ in pairs], [widths[i] for _, i in pairs],
                                          steps, sigma_rel)
    stacked = np.stack([snap[i].astype(np.float64) for _, snap in snapshots for i in use])
    return x @ stacked


def test_a_tracked_width_is_rebuilt_from_the_snapshots_of_the_others():
    """0.10 rebuilt from the snapshots of 0.05 and 0.15 alone equals the tracked 0.10 EMA to
    the float16 precision of the snapshots (|theta| <~ 4: half an ulp ~ 2e-3), while the
    widths differ from each other by 100x more. Negative controls: the rebuild for the wrong
    width, or from snapshots relabelled with swapped widths, misses by far more."""
    widths = (0.05, 0.10, 0.15)
    emas, snapshots = _toy_run(widths)
    rebuilt = _rebuild(snapshots, widths, [0, 2], 2000, 0.10)
    error = np.max(np.abs(rebuilt - emas[1]))
    assert error < 2e-3
    assert np.max(np.abs(emas[0] - emas[1])) > 100 * error
    assert np.max(np.abs(emas[2] - emas[1])) > 50 * error
    wrong_width = _rebuild(snapshots, widths, [0, 2], 2000, 0.07)
    assert np.max(np.abs(wrong_width - emas[1])) > 20 * error
    swapped = [(t, snap[::-1]) for t, snap in snapshots]
    relabelled = _rebuild(swapped, widths, [0, 2], 2000, 0.10)
    assert np.max(np.abs(relabelled - emas[1])) > 20 * error


def test_config_rules_are_one_line_errors():
    assert phema.parse_sigma_rels("0.05, 0.1", "eval.ema_sweep") == (0.05, 0.1)
    assert phema.parse_sigma_rels((0.05, 0.1), "train.ema_sigma_rels") == (0.05, 0.1)
    for bad, words in [("0.05,abc", "not a number"), ("0.05,0.3", "must lie in"),
                       ("0.1,0.1", "twice"), ("", "not a number")]:
        with pytest.raises(ConfigError, match=words):
            phema.parse_sigma_rels(bad, "eval.ema_sweep")


def _validate(mode="train", workdir="run", **overrides):
    config = tiny_config(**overrides)
    config_validation.validate_config(config, mode, workdir)


@pytest.mark.parametrize("mode, overrides, words", [
    ("train", {"train__ema": "powr"}, "config.train.ema='powr' is unknown; allowed: fixed"),
    ("train", {"train__ema": "power", "train__ema_sigma_rels": (0.05, 0.4)},
     "config.train.ema_sigma_rels=0.4 must lie in"),
    ("train", {"train__ema": "power", "train__ema_snapshot_every": 3, "train__steps_per_jit": 2,
               "train__num_steps": 10, "train__log_every": 2, "train__checkpoint_every": 2},
     "ema_snapshot_every=3 must be a positive multiple of config.train.steps_per_jit=2"),
    ("train", {"train__ema_rampup_ratio": 0.05}, "ema_rampup_ratio=0.05 caps the half-life"),
    ("train", {"train__ema_halflife_kimg": -1.0}, "must be >= 0"),
    ("sample", {"sample__ema_sigma_rel": 0.1, "sample__use_ema": False}, "drop one"),
    ("sample", {"sample__ema_sigma_rel": -0.1}, "sample.ema_sigma_rel=-0.1 must lie in"),
    ("eval", {"eval__ema_sweep": "0.05,x", "eval__metrics": "digits"}, "'x' is not a number"),
    ("eval", {"eval__ema_sweep": "0.05", "eval__sweep": "ddim:5", "eval__metrics": "digits"},
     "both set"),
    ("eval", {"eval__ema_sweep": "0.05", "eval__metrics": "nll"}, "no metric that scores"),
    ("phema", {}, "config.phema.output_workdir is empty"),
    ("phema", {"phema__output_workdir": "run"}, "is --workdir itself"),
    ("phema", {"phema__output_workdir": "out", "phema__sigma_rel": 0.0}, "must lie in"),
    ("phema", {"phema__output_workdir": "out", "phema__step": 0}, "snapshot's step"),
])
def test_bad_post_hoc_ema_settings_are_one_line_config_errors(mode, overrides, words):
    with pytest.raises(ConfigError, match=re.escape(words)) as raised:
        _validate(mode, **overrides)
    assert "\n" not in str(raised.value)


def test_good_post_hoc_ema_settings_pass():
    """Controls for the rules above: a config's ema_decay does not stop the power form."""
    _validate("train", train__ema="power", train__ema_decay=0.9999)
    _validate("train", train__ema_halflife_kimg=500.0, train__ema_rampup_ratio=0.05)
    _validate("eval", eval__ema_sweep="0.02,0.05,0.1,0.15,0.2", eval__metrics="digits")
    _validate("phema", phema__output_workdir="out", phema__sigma_rel=0.15, phema__step=1000)


def test_halflife_ema_follows_edm():
    """EDM's EMA: beta = 0.5^(B / h), h = min(halflife, rampup x images seen after the step);
    off (None) when the half-life is 0, so the bare decay of today's runs stays."""
    config = tiny_config(train__ema_halflife_kimg=0.5, train__ema_rampup_ratio=0.05)
    decay = halflife_ema_decay(config.train)
    batch = config.train.batch_size
    for step in (0, 10, 100, 10_000):
        images = (step + 1) * batch
        halflife = min(500.0, 0.05 * images)
        assert float(decay(jnp.int32(step))) == pytest.approx(0.5 ** (batch / halflife),
                                                              rel=1e-6)
    assert float(decay(jnp.int32(0))) < 1e-3   # rampup: the first step keeps no initialisation
    no_rampup = tiny_config(train__ema_halflife_kimg=0.5)
    assert float(halflife_ema_decay(no_rampup.train)(jnp.int32(0))) == pytest.approx(
        0.5 ** (batch / 500.0), rel=1e-6)
    assert halflife_ema_decay(tiny_config().train) is None


def test_a_resumed_power_ema_run_keeps_its_widths():
    recorded = {"train": {"ema": "power", "ema_sigma_rels": [0.05, 0.1]}}
    power_ema.check_same_widths(recorded, tiny_config(train__ema="power").train)
    power_ema.check_same_widths({"train": {"ema": "fixed"}}, tiny_config(train__ema="power").train)
    changed = tiny_config(train__ema="power", train__ema_sigma_rels=(0.05, 0.2))
    with pytest.raises(ConfigError, match=r"widths \[0.05, 0.1\] but .*ema_sigma_rels"):
        power_ema.check_same_widths(recorded, changed.train)


def _write_snapshots(workdir, steps):
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    writer = power_ema.SnapshotWriter(workdir, (0.05, 0.1), every=1, last_step=max(steps),
                                      resumed_step=0)
    for step in steps:
        writer.after_step(step, tuple(jax.tree.map(lambda x, s=step, i=i: x * s + i, params)
                                      for i in range(2)))
    writer.close()
    return params


def test_snapshots_past_the_resumed_checkpoint_are_deleted_and_rebuilds_name_their_steps(
        tmp_path):
    """A run resumed at step 2 deletes the snapshots of steps 3 and 4 (written after the
    checkpoint it resumed from) and keeps 1 and 2; a rebuild at a step with no snapshot, or in
    a workdir with none, is one CheckpointError naming what exists."""
    workdir = str(tmp_path)
    params = _write_snapshots(workdir, [1, 2, 3, 4])
    power_ema.SnapshotWriter(workdir, (0.05, 0.1), every=1, last_step=4,
                             resumed_step=2).close()
    assert sorted(power_ema.snapshot_manager(workdir, read_only=True).all_steps()) == [1, 2]
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    rebuilt, step = power_ema.reconstruct(workdir, params, sharding, 0.1)
    assert step == 2   # the tracked width at a snapshot step: that snapshot, 2 params + 1
    np.testing.assert_allclose(rebuilt["w"], params["w"] * 2 + 1, rtol=1e-6)
    with pytest.raises(CheckpointError, match=r"no power-EMA snapshot at step 3 .*\[1, 2\]"):
        power_ema.reconstruct(workdir, params, sharding, 0.1, step=3)
    with pytest.raises(CheckpointError, match="no power-EMA snapshots in .*ema=power"):
        power_ema.reconstruct(str(tmp_path / "empty"), params, sharding, 0.1)


def test_the_jitted_update_uses_the_float64_step_size():
    """update_power_emas (float32, in the train step) moves each EMA by 1 - beta_t of
    power_ema_step_size to float32 precision, also at t = 1e6 where 1 - 1/t in float32 would be
    off by ~5%; the first update replaces the EMA by the parameters."""
    params = {"w": jnp.ones((3,), jnp.float32)}
    emas = ({"w": jnp.zeros((3,), jnp.float32)},) * 2
    update = jax.jit(power_ema.update_power_emas, static_argnums=2)
    for t in (1, 2, 100, 10 ** 6):
        moved = update(emas, params, (0.05, 0.1), jnp.int32(t))
        want = phema.power_ema_step_size(phema.gamma_of_sigma_rel(np.array([0.05, 0.1])), t)
        got = np.array([float(m["w"][0]) for m in moved])
        np.testing.assert_allclose(got, want, rtol=2e-6)
    unchanged = update(emas, params, (), jnp.int32(5))   # no widths (the fixed form)
    assert all(float(jnp.abs(m["w"]).max()) == 0.0 for m in unchanged)
