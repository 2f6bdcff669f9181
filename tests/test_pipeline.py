"""`Pipeline`: the notebook entry point draws exactly the images of `--mode=sample`, from a
workdir and from a model read in memory."""
import os
import shutil

import numpy as np
import pytest
from tiny_config import tiny_config

from jax_diffusion import Pipeline, cli
from jax_diffusion.convert import run as convert_run
from jax_diffusion.errors import ConfigError

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "pre_layout_run")


def _config(**overrides):
    """The config the fixture was trained and sampled with (see test_checkpoint_fixture.py)."""
    return tiny_config(train__num_steps=2, sample__num_samples=8, sample__batch_size=8,
                       **overrides)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline") / "run"
    shutil.copytree(os.path.join(FIXTURE, "checkpoints"), path / "checkpoints")
    return str(path)


@pytest.fixture(scope="module")
def pipeline(workdir):
    return Pipeline.from_workdir(workdir)


def test_from_workdir_samples_the_images_of_mode_sample(workdir, pipeline):
    assert cli.run("sample", _config(), workdir) == 0
    written = np.load(os.path.join(workdir, "samples", "samples_0.npz"))
    images, labels = pipeline.sample(8, method="ddim", num_steps=5, seed=0)
    assert images.dtype == np.uint8 and images.shape == (8, 8, 8, 1)
    np.testing.assert_array_equal(images, written["images"])
    np.testing.assert_array_equal(labels, written["labels"])
    np.testing.assert_array_equal(images, np.load(os.path.join(FIXTURE, "expected_samples.npz"))
                                  ["images"])
    # Negative control: another seed, other images.
    assert not np.array_equal(pipeline.sample(8, method="ddim", num_steps=5, seed=1).images,
                              images)


def test_labels_and_sampler_settings_are_the_callers(pipeline):
    sevens = pipeline.sample(4, labels=[7, 7, 7, 7], method="ddim", num_steps=3, seed=0)
    np.testing.assert_array_equal(sevens.labels, [7, 7, 7, 7])
    assert sevens.images.shape == (4, 8, 8, 1)
    # Fewer steps, another chain: the caller's num_steps reaches the sampler.
    assert not np.array_equal(pipeline.sample(4, labels=[7] * 4, method="ddim", num_steps=5,
                                              seed=0).images, sevens.images)
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.9"):
        pipeline.sample(2, labels=[0, 10])
    with pytest.raises(ValueError, match="labels has 3 entries for num_samples=2"):
        pipeline.sample(2, labels=[0, 1, 2])
    with pytest.raises(ConfigError, match=r"config\.sample\.method='heun' is unknown"):
        pipeline.sample(2, method="heun")


def test_from_pretrained_diffusers_directory_equals_the_workdir(workdir, pipeline, tmp_path):
    """The workdir exported to a diffusers UNet2DModel directory and read back in memory
    (architecture from its config.json, diffusion from the config) samples the same images."""
    target = str(tmp_path / "unet")
    export = _config()
    export.convert.target = target
    convert_run.run_export(export, workdir)
    pretrained = Pipeline.from_pretrained(target, config=_config())
    assert pretrained.workdir is None
    ours = pipeline.sample(8, method="ddim", num_steps=5, seed=0).images
    np.testing.assert_array_equal(
        pretrained.sample(8, method="ddim", num_steps=5, seed=0).images, ours)


def test_from_pretrained_state_dict_needs_a_config(tmp_path):
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"not read")
    with pytest.raises(ConfigError, match="records no architecture: pass config="):
        Pipeline.from_pretrained(str(weights))
