"""A checkpoint written before the package moved into subpackages still restores and samples
bit-identically: the checkpoint layout and parameter-tree names are part of the public surface.

tests/fixtures/pre_layout_run holds the tiny digits model (tests/tiny_config.py) trained for two
steps by `main.py --mode=train` (train.num_steps=2, train.checkpoint_every=2) and the 8 images its
`--mode=sample` drew then (sample.num_samples=8, sample.batch_size=8, DDIM 5 steps, seed 0).
"""
import os
import shutil

import numpy as np
from tiny_config import tiny_config

from jax_diffusion.generation import sample_command

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "pre_layout_run")


def _fixture_config():
    return tiny_config(train__num_steps=2, sample__num_samples=8, sample__batch_size=8)


def test_pre_layout_checkpoint_samples_bit_identically(tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(os.path.join(FIXTURE, "checkpoints"), workdir / "checkpoints")
    sample_command.run_sample(_fixture_config(), str(workdir))
    got = np.load(workdir / "samples" / "samples_0.npz")
    expected = np.load(os.path.join(FIXTURE, "expected_samples.npz"))
    np.testing.assert_array_equal(got["labels"], expected["labels"])
    np.testing.assert_array_equal(got["images"], expected["images"])
    # Negative control: another seed draws other images, so equality above is not vacuous.
    other = _fixture_config()
    other.sample.seed = 1
    sample_command.run_sample(other, str(workdir))
    assert not np.array_equal(np.load(workdir / "samples" / "samples_0.npz")["images"],
                              expected["images"])


def test_a_recorded_config_from_before_num_groups_reads_back_as_32_groups(tmp_path):
    """The fixture's recorded config predates config.model.num_groups; Pipeline.from_workdir
    (the recorded config over configs/default.py) gives the 32 groups the model was trained
    with."""
    from jax_diffusion import Pipeline
    from jax_diffusion.training import checkpoints

    workdir = tmp_path / "run"
    shutil.copytree(os.path.join(FIXTURE, "checkpoints"), workdir / "checkpoints")
    manager = checkpoints.create_manager(str(workdir), read_only=True)
    recorded = checkpoints.restore_config(manager, 2)["model"]
    assert "norm_eps" in recorded and "num_groups" not in recorded
    assert Pipeline.from_workdir(str(workdir)).config.model.num_groups == 32
