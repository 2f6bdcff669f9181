"""Min-SNR-gamma loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
Weighting Strategy", sec. 3.4) against the paper's formulas written out in float64.

The paper weighs the x0-space error ||x0 - x0_hat||^2 by min(SNR_t, gamma), SNR_t = abar_t / (1 -
abar_t). Since eps - eps_hat = sqrt(SNR) (x0_hat - x0) and v - v_hat = (x0_hat - x0) / sqrt(1 -
abar), that is min(SNR, gamma) / SNR times the eps error and min(SNR, gamma) / (SNR + 1) times the
v error. The tests check both forms: the weights against these expressions, and the trained loss
against min(SNR, gamma) times the x0-space error of whatever the model predicted.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_diffusion import diffusion as diffusion_lib
from jax_diffusion import schedules
from jax_diffusion.config_files import default_config
from jax_diffusion.diffusion import GaussianDiffusion, create_diffusion
from jax_diffusion.errors import CheckpointError, ConfigError

T = 50
SHAPE = (4, 3, 3, 2)
TIMESTEPS = np.array([0, 7, 30, T - 1])


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def cosine_abar(t: int) -> float:
    """Nichol & Dhariwal eq. 17 with s = 0.008, as a product of the clipped betas."""
    def f(u):
        return math.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2
    prod = 1.0
    for s in range(t + 1):
        prod *= 1.0 - min(1.0 - f(s + 1) / f(s), 0.999)
    return prod


def paper_weight(t: int, mean_type: str, gamma: float) -> float:
    a = cosine_abar(t)
    snr = a / (1.0 - a)
    return {"eps": min(snr, gamma) / snr, "v": min(snr, gamma) / (snr + 1.0),
            "x0": min(snr, gamma)}[mean_type]


def make(mean_type: str, weighting: str = "min_snr", gamma: float = 5.0,
         loss_type: str = "mse") -> GaussianDiffusion:
    var_type = "learned_range" if loss_type == "hybrid" else "fixed_large"
    return GaussianDiffusion(schedules.get_beta_schedule("cosine", T), mean_type, var_type,
                             loss_type, loss_weighting=weighting, min_snr_gamma=gamma)


@pytest.mark.parametrize("mean_type", ["eps", "v", "x0"])
@pytest.mark.parametrize("gamma", [5.0, 1.0])
def test_weights_match_the_paper(mean_type, gamma):
    d = make(mean_type, gamma=gamma)
    expected = [paper_weight(t, mean_type, gamma) for t in range(T)]
    np.testing.assert_allclose(d.loss_weights, expected, rtol=1e-12)
    # The cap is active at both ends of this schedule: SNR > gamma early, < gamma late.
    snr = d.alphas_cumprod / (1 - d.alphas_cumprod)
    assert snr[0] > gamma > snr[-1]


@pytest.mark.parametrize("mean_type", ["eps", "v", "x0"])
def test_weighted_loss_is_capped_snr_times_the_x0_error(x64, mean_type):
    """loss = min(SNR_t, 5) ||x0 - x0_hat||^2 per example, x0_hat from the model's raw output."""
    d = make(mean_type)
    rng = np.random.default_rng(0)
    x0, noise, output = (rng.uniform(-1, 1, SHAPE), rng.normal(size=SHAPE),
                         rng.normal(size=SHAPE))
    terms = d.training_losses(lambda x, t: jnp.asarray(output), jnp.asarray(x0),
                              jnp.asarray(TIMESTEPS), jax.random.key(0), noise=jnp.asarray(noise))
    for b, t in enumerate(TIMESTEPS):
        a = cosine_abar(int(t))
        x_t = math.sqrt(a) * x0[b] + math.sqrt(1 - a) * noise[b]
        x0_hat = {"eps": (x_t - math.sqrt(1 - a) * output[b]) / math.sqrt(a),
                  "v": math.sqrt(a) * x_t - math.sqrt(1 - a) * output[b],
                  "x0": output[b]}[mean_type]
        snr = a / (1 - a)
        expected = min(snr, 5.0) * np.mean((x0[b] - x0_hat) ** 2)
        assert float(terms["loss"][b]) == pytest.approx(expected, rel=1e-10)
        # "mse" stays the unweighted error of the parameterisation's own target.
        target = {"eps": noise[b], "x0": x0[b],
                  "v": math.sqrt(a) * noise[b] - math.sqrt(1 - a) * x0[b]}[mean_type]
        assert float(terms["mse"][b]) == pytest.approx(np.mean((target - output[b]) ** 2),
                                                       rel=1e-10)


def test_negative_control_wrong_parameterisation_breaks_the_identity(x64):
    """The identity above is sensitive: eps-model errors weighted with the v formula are not
    min(SNR, 5) times the x0 error (off by (SNR + 1) / SNR, up to 1e5 at this T's last step)."""
    d_eps, d_v = make("eps"), make("v")
    rng = np.random.default_rng(1)
    x0, noise, output = (rng.uniform(-1, 1, SHAPE), rng.normal(size=SHAPE),
                         rng.normal(size=SHAPE))
    args = (jnp.asarray(x0), jnp.asarray(TIMESTEPS), jax.random.key(0))
    right = d_eps.training_losses(lambda x, t: jnp.asarray(output), *args,
                                  noise=jnp.asarray(noise))
    d_eps.loss_weights = d_v.loss_weights  # the bug: v's weights on an eps model
    wrong = d_eps.training_losses(lambda x, t: jnp.asarray(output), *args,
                                  noise=jnp.asarray(noise))
    ratio = np.asarray(wrong["loss"]) / np.asarray(right["loss"])
    assert np.all(ratio < 1) and ratio[-1] < 1e-3


@pytest.mark.parametrize("mean_type", ["eps", "v"])
def test_none_is_plain_l_simple_and_hybrid_adds_the_unweighted_bound(x64, mean_type):
    rng = np.random.default_rng(2)
    x0, noise = rng.uniform(-1, 1, SHAPE), rng.normal(size=SHAPE)
    out = rng.normal(size=SHAPE[:-1] + (2 * SHAPE[-1],))
    args = (lambda x, t: jnp.asarray(out), jnp.asarray(x0), jnp.asarray(TIMESTEPS),
            jax.random.key(0))
    plain = make(mean_type, "none", loss_type="hybrid").training_losses(*args,
                                                                        noise=jnp.asarray(noise))
    weighted = make(mean_type, loss_type="hybrid").training_losses(*args,
                                                                   noise=jnp.asarray(noise))
    np.testing.assert_array_equal(plain["loss"], plain["mse"] + plain["vb"])
    np.testing.assert_allclose(plain["vb"], weighted["vb"], rtol=1e-12)
    weights = np.array([paper_weight(int(t), mean_type, 5.0) for t in TIMESTEPS])
    np.testing.assert_allclose(weighted["loss"], weights * plain["mse"] + plain["vb"],
                               rtol=1e-10)


def test_respaced_weights_use_the_kept_steps_snr():
    kept = {0, 10, 20, 49}
    d = GaussianDiffusion(schedules.get_beta_schedule("cosine", T), "eps",
                          use_timesteps=kept, loss_weighting="min_snr")
    np.testing.assert_allclose(d.loss_weights, [paper_weight(t, "eps", 5.0) for t in sorted(kept)],
                               rtol=1e-12)


def test_config_keys_reach_the_diffusion():
    config = default_config()
    assert config.diffusion.loss_weighting == "none"  # the published recipes stay as published
    np.testing.assert_array_equal(create_diffusion(config.diffusion).loss_weights, 1.0)
    config.diffusion.loss_weighting = "min_snr"
    config.diffusion.min_snr_gamma = 2.0
    config.diffusion.mean_type = "v"
    np.testing.assert_allclose(create_diffusion(config.diffusion).loss_weights[-1],
                               paper_weight_at_T1000_last_v(2.0), rtol=1e-12)


def paper_weight_at_T1000_last_v(gamma: float) -> float:
    betas = schedules.get_beta_schedule("linear", 1000)
    a = float(np.prod(1.0 - betas))
    snr = a / (1 - a)
    return min(snr, gamma) / (snr + 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(weighting="snr"), r"config.diffusion.loss_weighting='snr' is unknown"),
    (dict(weighting="min_snr", loss_type="kl"), r"loss_type='kl' does not have"),
    (dict(weighting="min_snr", gamma=0.0), r"config.diffusion.min_snr_gamma=0.0 must be > 0"),
])
def test_bad_settings_are_one_line_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        diffusion_lib.loss_weights(np.array([0.9, 0.5, 0.1]), "eps", **kwargs)
    assert "\n" not in str(info.value)


def test_a_checkpoint_is_sampled_with_its_own_parameterisation():
    """configs/digits.py moved from eps to v: an eps checkpoint read with the new config must be a
    one-line CheckpointError naming the key and the fix, not silently wrong samples."""
    config = default_config().diffusion
    saved = config.to_dict()
    diffusion_lib.check_trained_with(saved, config, "runs/digits/checkpoints/1500")  # same: fine
    saved["mean_type"] = "eps"
    config.mean_type = "v"
    with pytest.raises(CheckpointError, match=r"trained with diffusion.mean_type='eps' but the "
                       r"config says 'v': pass --config.diffusion.mean_type=eps") as info:
        diffusion_lib.check_trained_with(saved, config, "runs/digits/checkpoints/1500")
    assert "\n" not in str(info.value)
    # Keys that do not change the output's meaning (loss weighting) may differ.
    saved["mean_type"], saved["loss_weighting"] = "v", "none"
    config.loss_weighting = "min_snr"
    diffusion_lib.check_trained_with(saved, config, "x")
