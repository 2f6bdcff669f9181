"""--mode=eval's pieces in-process: the sharded NLL and the metric list."""
import jax
import numpy as np
import pytest
from tiny_config import tiny_config

from jax_diffusion import data
from jax_diffusion.config_files import comma_list
from jax_diffusion.evaluation import nll, run
from jax_diffusion.models import create_model, example_inputs
from jax_diffusion.runtime import parallel

# Integration: NLL chains on 1 and 8 devices. In `make test`, not in `make test-fast`.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def nll_setup():
    # T = 20 keeps the 20-step calc_bpd_loop cheap; the sharding question does not depend on T.
    config = tiny_config(diffusion__num_timesteps=20)
    model = create_model(config.model)
    params = model.init(jax.random.PRNGKey(0), *example_inputs(config))["params"]
    # Perturb the zero-initialised output layer so the model is not the trivial eps = 0.
    params = jax.tree.map(lambda p: p + 0.01 * jax.random.normal(jax.random.PRNGKey(1), p.shape),
                          params)
    images, labels = data.load_eval_arrays(config, max_examples=12)
    return config, model, params, images, labels


def test_nll_sharded_on_8_devices_equals_1_device(nll_setup):
    """The same per-image bound on 1 device and batch-sharded over 8 (12 images: the last batch
    is filled up and trimmed)."""
    config, model, params, images, labels = nll_setup
    results = []
    for devices in (jax.devices()[:1], jax.devices()[:8]):
        mesh = parallel.create_mesh(devices)
        replicated = parallel.replicate(params, mesh)
        results.append(nll.nll_bits_per_dim(config, model, replicated, images, labels, mesh,
                                            batch_size=8))
    one, eight = results
    assert one.shape == (12,) and np.all(np.isfinite(one)) and np.all(one > 0)
    np.testing.assert_allclose(eight, one, rtol=1e-5)


def test_nll_depends_on_the_model(nll_setup):
    """A different model gives a different bound (the function really evaluates the model)."""
    config, model, params, images, labels = nll_setup
    mesh = parallel.create_mesh(jax.devices()[:8])
    scaled = jax.tree.map(lambda p: 3.0 * p, params)
    a = nll.nll_bits_per_dim(config, model, params, images, labels, mesh, batch_size=8)
    b = nll.nll_bits_per_dim(config, model, scaled, images, labels, mesh, batch_size=8)
    assert np.abs(a - b).max() > 1e-3


def test_unknown_metric_is_named():
    with pytest.raises(ValueError, match=r"unknown \['fdi'\]; allowed: fid, is, kid, digits, nll"):
        comma_list("fdi,is", "config.eval.metrics", run.METRICS)
