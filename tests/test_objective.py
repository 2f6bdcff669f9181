"""The training side of the processes: EDM's preconditioning and loss weight, the flow's velocity
loss, the EDM weight on the discrete VP process, the noise-level laws of
config.train.noise_sampling, the "auto" step schedules and the config rules joining a process to
its keys; then (slow) tiny edm and flow runs through training, resume and sampling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_config import tiny_config

from configs import default
from jax_diffusion import Pipeline, cli, processes, schedules
from jax_diffusion.config_validation import validate_config
from jax_diffusion.diffusion import create_diffusion, loss_weights
from jax_diffusion.errors import CheckpointError, ConfigError
from jax_diffusion.generation import restore
from jax_diffusion.models import create_model
from jax_diffusion.runtime import parallel
from jax_diffusion.samplers import chain_diffusion
from jax_diffusion.samplers.from_config import resolved_schedule
from jax_diffusion.training import checkpoints
from jax_diffusion.training.objective import training_objective

SD = 0.5
RNG = np.random.default_rng(0)
X0 = RNG.uniform(-1.0, 1.0, (5, 4, 4, 1))
NOISE = RNG.standard_normal((5, 4, 4, 1))
LEVELS = np.array([0.003, 0.08, 0.7, 4.0, 60.0])


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _process_config(process, **diffusion):
    config = default.get_config()
    config.diffusion.process = process
    config.diffusion.loss_weighting = {"edm": "edm", "flow": "none"}.get(process, "none")
    config.train.noise_sampling = {"edm": "lognormal"}.get(process, "uniform")
    config.diffusion.update(diffusion)
    return config


# ---------------------------------------------------------------- 1. losses in closed form
def _edm_reference(network_out, x, s):
    """Karras et al. 2022, Table 1: D = c_skip x + c_out F with the c's written out, float64."""
    s = s.reshape(-1, 1, 1, 1)
    c_skip = SD ** 2 / (s ** 2 + SD ** 2)
    c_out = s * SD / np.sqrt(SD ** 2 + s ** 2)
    return c_skip * x + c_out * network_out


def test_edm_preconditioning_and_loss_match_the_paper(x64):
    process = processes.ContinuousProcess("edm", SD)
    seen = {}

    def network(x_in, noise_input):   # F = 3 x_in: records what the network is given
        seen["x_in"], seen["c"] = np.asarray(x_in), np.asarray(noise_input)
        return 3.0 * x_in

    x = X0 + LEVELS.reshape(-1, 1, 1, 1) * NOISE
    denoised = np.asarray(process.denoise(network, jnp.asarray(x), jnp.asarray(LEVELS)))
    c_in = 1.0 / np.sqrt(LEVELS ** 2 + SD ** 2)
    np.testing.assert_allclose(seen["x_in"], c_in.reshape(-1, 1, 1, 1) * x, rtol=1e-13)
    np.testing.assert_allclose(seen["c"], processes.NOISE_INPUT_SCALE * np.log(LEVELS) / 4,
                               rtol=1e-13)
    np.testing.assert_allclose(denoised, _edm_reference(3.0 * seen["x_in"], x, LEVELS),
                               rtol=1e-12)

    terms = process.training_losses(network, jnp.asarray(X0), jnp.asarray(LEVELS),
                                    jnp.asarray(NOISE))
    weight = (LEVELS ** 2 + SD ** 2) / (LEVELS * SD) ** 2
    mse = np.mean((denoised - X0) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(terms["mse"], mse, rtol=1e-12)
    np.testing.assert_allclose(terms["loss"], weight * mse, rtol=1e-12)
    # Negative control: the x0 error unweighted is far from the loss at the low levels.
    assert abs(float(terms["loss"][0]) - mse[0]) > 10 * mse[0]


def test_flow_loss_is_the_velocity_error_and_denoise_inverts_it(x64):
    process = processes.ContinuousProcess("flow", SD)
    t = LEVELS / (1 + LEVELS)
    x_t = (1 - t).reshape(-1, 1, 1, 1) * X0 + t.reshape(-1, 1, 1, 1) * NOISE
    seen = {}

    def exact_velocity(x, noise_input):
        seen["x"], seen["c"] = np.asarray(x), np.asarray(noise_input)
        return jnp.asarray(NOISE - X0)

    terms = process.training_losses(exact_velocity, jnp.asarray(X0), jnp.asarray(LEVELS),
                                    jnp.asarray(NOISE))
    np.testing.assert_allclose(seen["x"], x_t, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(seen["c"], processes.NOISE_INPUT_SCALE * t, rtol=1e-13)
    np.testing.assert_array_equal(terms["loss"], np.zeros(5))
    # With the exact velocity, the data prediction x_t - t v is x0 itself, from the VP frame too.
    x_vp = x_t / np.sqrt((1 - t) ** 2 + t ** 2).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(process.denoise_vp(exact_velocity, jnp.asarray(x_vp),
                                                  jnp.asarray(LEVELS)), X0, atol=1e-12)
    zero = process.training_losses(lambda x, c: jnp.zeros_like(x), jnp.asarray(X0),
                                   jnp.asarray(LEVELS), jnp.asarray(NOISE))
    np.testing.assert_allclose(zero["loss"], np.mean((NOISE - X0) ** 2, axis=(1, 2, 3)),
                               rtol=1e-12)


@pytest.mark.parametrize("mean_type", ["eps", "v", "x0"])
def test_edm_weight_on_vp_is_lambda_times_the_x0_error(mean_type, x64):
    """loss_weighting="edm" on the discrete process weighs each parameterisation's error so that
    the loss is lambda(s) ||x0_pred - x0||^2 at s = sqrt((1 - abar) / abar)."""
    config = _process_config("vp", schedule="cosine", mean_type=mean_type, loss_weighting="edm")
    diffusion = create_diffusion(config.diffusion)
    t = jnp.array([0, 3, 200, 700, 999])
    error = 0.01 * RNG.standard_normal(X0.shape)

    def model_fn(x_t, timesteps):
        target = {"eps": NOISE, "x0": X0,
                  "v": np.asarray(diffusion.v_target(jnp.asarray(X0), t, jnp.asarray(NOISE)))}
        return jnp.asarray(target[mean_type] + error)

    terms = diffusion.training_losses(model_fn, jnp.asarray(X0), t, None, jnp.asarray(NOISE))
    x_t = diffusion.q_sample(jnp.asarray(X0), t, jnp.asarray(NOISE))
    output = model_fn(x_t, t)
    x0_pred = {"eps": diffusion.predict_xstart_from_eps(x_t, t, output),
               "v": diffusion.predict_xstart_from_v(x_t, t, output), "x0": output}[mean_type]
    abar = diffusion.alphas_cumprod[np.asarray(t)]
    s2 = (1 - abar) / abar
    lam = (s2 + SD ** 2) / (s2 * SD ** 2)
    expected = lam * np.mean((np.asarray(x0_pred) - X0) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(terms["loss"], expected, rtol=1e-9)
    other = loss_weights(diffusion.alphas_cumprod, mean_type, "min_snr")[np.asarray(t)]
    assert not np.allclose(other * np.asarray(terms["mse"]), expected, rtol=1e-2)


# ---------------------------------------------------------------- 2. noise levels
def _draw(config, count=40_000):
    return np.asarray(training_objective(config).sample_levels(jax.random.key(5), count),
                      np.float64)


def test_lognormal_and_logit_normal_levels_follow_their_laws():
    log_s = np.log(_draw(_process_config("edm")))
    assert abs(log_s.mean() + 1.2) < 0.03 and abs(log_s.std() - 1.2) < 0.03
    flow = _process_config("flow")
    flow.train.noise_sampling = "logit_normal"
    s = _draw(flow)
    t = s / (1 + s)
    logit = np.log(t / (1 - t))
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1.0) < 0.03
    flow.train.noise_sampling = "uniform"
    t = _draw(flow) / (1 + _draw(flow))
    assert abs(t.mean() - 0.5) < 0.01 and abs(np.mean(t < 0.25) - 0.25) < 0.01


def test_vp_lognormal_levels_land_on_the_nearest_timesteps():
    config = _process_config("vp", schedule="cosine")
    config.train.noise_sampling = "lognormal"
    timesteps = _draw(config).astype(int)
    sigma = schedules.edm_sigmas(create_diffusion(config.diffusion).alphas_cumprod)
    log_s = np.log(sigma[timesteps])
    assert abs(np.median(log_s) + 1.2) < 0.05
    assert abs(np.percentile(log_s, 84.1) - np.percentile(log_s, 15.9) - 2 * 1.2) < 0.1
    # Uniform timesteps (today's vp default) put the median level near s = 1 instead.
    config.train.noise_sampling = "uniform"
    assert abs(np.median(np.log(sigma[_draw(config).astype(int)]))) < 0.2


def test_vp_uniform_levels_are_todays_timesteps_bit_for_bit():
    config = _process_config("vp")
    key = jax.random.key(9)
    np.testing.assert_array_equal(training_objective(config).sample_levels(key, 64),
                                  jax.random.randint(key, (64,), 0, 1000))


# ---------------------------------------------------------------- 3. step schedules
@pytest.mark.parametrize("process, method, expected", [
    ("vp", "ddim", "uniform"), ("vp", "dpm_solver++", "logsnr"), ("vp", "edm_heun", "karras"),
    ("edm", "ddim", "karras"), ("edm", "unipc", "logsnr"), ("flow", "euler", "uniform"),
    ("flow", "dpm_solver++3m", "logsnr")])
def test_auto_schedule_is_the_methods_grid_for_the_process(process, method, expected):
    config = _process_config(process)
    config.sample.method, config.sample.num_steps = method, 9
    assert config.sample.schedule == "auto"
    assert resolved_schedule(config) == expected
    auto = chain_diffusion(config)
    config.sample.schedule = expected
    explicit = chain_diffusion(config)
    np.testing.assert_array_equal(auto.alphas_cumprod, explicit.alphas_cumprod)
    config.sample.schedule = "quadratic"   # negative control: another grid differs
    assert not np.allclose(chain_diffusion(config).alphas_cumprod, auto.alphas_cumprod)


def test_level_grids_span_the_bounds_in_their_own_spacing():
    flow = processes.ContinuousProcess("flow", SD)
    t = flow.time(schedules.level_grid("uniform", 5, 0.002, 80.0, flow.time, flow.level))
    np.testing.assert_allclose(np.diff(t), np.diff(t)[0], rtol=1e-12)
    log_s = np.log(schedules.level_grid("logsnr", 5, 0.002, 80.0))
    np.testing.assert_allclose(np.diff(log_s), np.diff(log_s)[0], rtol=1e-12)
    root = schedules.level_grid("karras", 5, 0.002, 80.0) ** (1 / 7)
    np.testing.assert_allclose(np.diff(root), np.diff(root)[0], rtol=1e-10)
    assert schedules.level_grid("karras", 5, 0.002, 80.0)[[0, -1]].tolist() == [0.002, 80.0]


# ---------------------------------------------------------------- 4. config rules
@pytest.mark.parametrize("process, settings, mode, pattern", [
    ("sde", {}, "train", r"config\.diffusion\.process='sde' is unknown; allowed: vp, edm, flow"),
    ("edm", {"diffusion.loss_weighting": "none"}, "train",
     r"config\.diffusion\.loss_weighting='none' must be 'edm' on process 'edm'"),
    ("flow", {"diffusion.loss_weighting": "edm"}, "train",
     r"config\.diffusion\.loss_weighting='edm' must be 'none' on process 'flow'"),
    ("edm", {"train.noise_sampling": "uniform"}, "train",
     r"config\.train\.noise_sampling='uniform' is not defined on process 'edm'"),
    ("edm", {"diffusion.mean_type": "v"}, "train",
     r"config\.diffusion\.mean_type='v' applies to process 'vp' only"),
    ("flow", {"diffusion.loss_type": "hybrid"}, "train",
     r"config\.diffusion\.loss_type='hybrid' applies to process 'vp' only"),
    ("edm", {"sample.schedule": "trailing"}, "sample",
     r"config\.sample\.schedule='trailing' is not defined on config\.diffusion\.process='edm'"),
    ("flow", {"eval.metrics": "digits,nll"}, "eval", r"asks for 'nll'.*'flow' does not define"),
    ("flow", {}, "distill", r"process='flow': distillation is written for .*'vp' only"),
    ("edm", {}, "export", r"process='edm': export is written for .*'vp' only"),
    ("vp", {"train.noise_sampling": "gamma"}, "train",
     r"config\.train\.noise_sampling='gamma' is unknown"),
])
def test_process_rules_are_one_config_error_naming_the_key(process, settings, mode, pattern,
                                                           tmp_path):
    config = tiny_config()
    for dotted, value in {"diffusion.process": process, "diffusion.mean_type": "eps",
                          "diffusion.loss_weighting": {"edm": "edm"}.get(process, "none"),
                          "train.noise_sampling": {"edm": "lognormal"}.get(process, "uniform"),
                          "convert.target": str(tmp_path / "out"), **settings}.items():
        section, key = dotted.split(".")
        config[section][key] = value
    with pytest.raises(ConfigError, match=pattern) as raised:
        validate_config(config, mode, str(tmp_path / "run"))
    assert "\n" not in str(raised.value)


def test_a_continuous_checkpoint_is_checked_on_its_process_only():
    """vp's schedule keys mean nothing to a flow network: a flow checkpoint recorded with another
    beta schedule samples; one recorded as edm, or with another sigma_data, is refused."""
    from jax_diffusion.diffusion import check_trained_with
    config = _process_config("flow").diffusion
    saved = dict(config.to_dict(), schedule="cosine", mean_type="v")
    check_trained_with(saved, config, "run/checkpoints/3")
    for key, value in (("process", "edm"), ("sigma_data", 1.0)):
        with pytest.raises(CheckpointError, match=rf"trained with diffusion\.{key}="):
            check_trained_with(dict(saved, **{key: value}), config, "run/checkpoints/3")


def test_from_pretrained_refuses_a_continuous_process(tmp_path):
    with pytest.raises(ConfigError, match=r"process='edm': published diffusers and "
                                          r"improved-diffusion models are 'vp' models"):
        Pipeline.from_pretrained(str(tmp_path), config=_process_config("edm"))


# ---------------------------------------------------------------- 5. end to end (slow)
def _continuous_tiny(process, steps):
    config = tiny_config(train__num_steps=steps, train__checkpoint_every=2, train__log_every=2)
    config.model.num_groups = 8
    config.diffusion.process, config.diffusion.mean_type = process, "eps"
    config.diffusion.loss_weighting = "edm" if process == "edm" else "none"
    config.train.noise_sampling = "lognormal" if process == "edm" else "logit_normal"
    config.sample.method, config.sample.eta = "dpm_solver++", 0.0
    return config


def _params(workdir, config, step):
    mesh = parallel.create_mesh(jax.devices()[:1])
    config.sample.checkpoint_step = step
    return jax.device_get(restore.restore_for_sampling(config, workdir, mesh,
                                                        create_model(config.model))[0])


@pytest.mark.slow
@pytest.mark.parametrize("process", ["edm", "flow"])
def test_continuous_process_trains_resumes_bit_exactly_and_samples(process, tmp_path):
    split, straight = str(tmp_path / "split"), str(tmp_path / "straight")
    for workdir, steps in ((split, 2), (split, 4), (straight, 4)):
        assert cli.run("train", _continuous_tiny(process, steps), workdir) == 0
    config = _continuous_tiny(process, 4)
    resumed, direct = _params(split, config, 4), _params(straight, config, 4)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(resumed),
                                                    jax.tree.leaves(direct), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(_params(split, config, 2)), jax.tree.leaves(direct), strict=True))

    pipe = Pipeline.from_workdir(straight)
    guided = pipe.sample(8, method="unipc", num_steps=6, guidance_scale=2.0, seed=0)
    plain = pipe.sample(8, method="unipc", num_steps=6, seed=0)
    assert guided.images.shape == (8, 8, 8, 1) and guided.images.dtype == np.uint8
    assert not np.array_equal(guided.images, plain.images)
    heun = pipe.sample(8, method="edm_heun", num_steps=5, seed=0)
    assert len(np.unique(heun.images)) > 10

    vp = tiny_config()   # the same network read as a vp model: refused, not misread
    with pytest.raises(CheckpointError, match=rf"diffusion\.process='{process}'"):
        restore.restore_for_sampling(vp, straight, parallel.create_mesh(jax.devices()[:1]),
                                     create_model(vp.model))
    assert checkpoints.create_manager(straight, read_only=True).latest_step() == 4
