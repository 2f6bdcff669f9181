"""Adding a sampler is one module and one row: a toy method registered from this file alone runs
through `--mode=sample` and the NFE sweep of `--mode=eval`, and follows the table's rules."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_config import tiny_config

from jax_diffusion import cli, samplers
from jax_diffusion.diffusion import extract
from jax_diffusion.errors import ConfigError
from jax_diffusion.evaluation import run as eval_run
from jax_diffusion.samplers import Plan, SamplerSpec
from jax_diffusion.samplers.plan import batch_timesteps

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "pre_layout_run")


def _renoise_plan(chain):
    """Predict x0, then noise it afresh to the next kept level (a consistency-style chain)."""
    diffusion, shape = chain.diffusion, chain.shape

    def step(x, i):
        t = batch_timesteps(i, shape[0])
        x0 = diffusion.p_mean_variance(chain.model_fn, x, t, chain.clip_denoised)["pred_xstart"]
        abar_prev = extract(diffusion.alphas_cumprod_prev, t, x)
        z = jax.random.normal(jax.random.fold_in(chain.chain_key, i), shape, x.dtype)
        return jnp.sqrt(abar_prev) * x0 + jnp.sqrt(1.0 - abar_prev) * z, x0

    return Plan(diffusion.num_timesteps, lambda x: x, step, lambda x, i: x)


@pytest.fixture
def toy():
    spec = samplers.register(SamplerSpec("toy_renoise", _renoise_plan))
    yield spec
    del samplers.METHODS[spec.name]


@pytest.fixture
def workdir(tmp_path):
    shutil.copytree(os.path.join(FIXTURE, "checkpoints"), tmp_path / "run" / "checkpoints")
    return str(tmp_path / "run")


def _config(**overrides):
    return tiny_config(train__num_steps=2, sample__num_samples=8, sample__batch_size=8,
                       **overrides)


def _sampled(workdir, **overrides):
    assert cli.run("sample", _config(**overrides), workdir) == 0
    return np.load(os.path.join(workdir, "samples", "samples_0.npz"))["images"]


def test_toy_sampler_runs_through_mode_sample(toy, workdir):
    toy_images = _sampled(workdir, sample__method="toy_renoise", sample__num_steps=3,
                          sample__eta=0.0)
    assert toy_images.shape == (8, 8, 8, 1) and toy_images.dtype == np.uint8
    # Its own chain: not DDIM's on the same grid and seed.
    ddim_images = _sampled(workdir, sample__method="ddim", sample__num_steps=3, sample__eta=0.0)
    assert not np.array_equal(toy_images, ddim_images)
    # The table's rules apply to it: a knob it does not read is refused.
    config = _config(sample__method="toy_renoise", sample__eta=0.5)
    with pytest.raises(ConfigError, match=r"config\.sample\.eta=0\.5 applies only to "
                                          r"config\.sample\.method='ddim' \(got 'toy_renoise'\)"):
        samplers.check_sample_config(config)


def test_unregistered_method_is_refused(workdir):
    with pytest.raises(ConfigError, match=r"config\.sample\.method='toy_renoise' is unknown"):
        samplers.check_sample_config(_config(sample__method="toy_renoise"))


@pytest.mark.slow
def test_toy_sampler_runs_through_the_sweep(toy, workdir, monkeypatch):
    rng = np.random.default_rng(0)
    projection = rng.normal(size=(64, 16))

    def features(images):   # (pool, logits, spatial) as the FID Inception gives them
        pool = np.tanh(images.reshape(len(images), -1).astype(np.float64) / 255.0 @ projection)
        return pool, pool[:, :10], pool[:, :8]

    monkeypatch.setattr(eval_run, "inception_feature_fn", lambda config, mesh: features)
    config = _config(eval__metrics="fid", eval__num_samples=16, eval__batch_size=16,
                     sample__eta=1.0)
    config.eval.sweep = "toy_renoise:2,3;ddim:3"
    eval_run.run_eval(config, workdir)
    with open(os.path.join(workdir, "sweep", "sweep_fid.json")) as f:
        rows = json.load(f)["rows"]
    assert [(row["method"], row["nfe"]) for row in rows] == [
        ("toy_renoise", 2), ("toy_renoise", 3), ("ddim", 3)]
    assert len({row["fid"] for row in rows}) == 3
