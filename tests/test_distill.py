"""--mode=distill on the tiny digits model: stages, checkpoints that record the student's sampler,
bitwise resume after a stop inside a stage, sampling the student, and one-line bad inputs."""
import os

import jax
import numpy as np
import pytest
from cli_helpers import error_line, run_main
from tiny_config import tiny_config

from jax_diffusion.distill import loop as distill
from jax_diffusion.errors import ConfigError
from jax_diffusion.generation import restore, sampling
from jax_diffusion.models import create_model
from jax_diffusion.runtime import parallel
from jax_diffusion.training import checkpoints
from jax_diffusion.training import loop_events
from jax_diffusion.training import train
from jax_diffusion.training.train_state import abstract_train_state

# Integration: distillation stages and main.py runs. In `make test`, not in `make test-fast`.
pytestmark = pytest.mark.slow

DISTILL = dict(distill__teacher_steps=4, distill__num_halvings=2, distill__steps_per_stage=3,
               train__checkpoint_every=0, train__log_every=1, train__max_to_keep=1,
               sample__grid_size=8)


@pytest.fixture(scope="module")
def teacher_workdir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("teacher"))
    train.train(tiny_config(train__num_steps=4, train__checkpoint_every=4), workdir)
    return workdir


def _config(teacher, **overrides):
    return tiny_config(distill__teacher_workdir=teacher, **{**DISTILL, **overrides})


class _StopAt:
    """Stands in for the SIGTERM handler: asks to stop after one step."""

    def __init__(self, step):
        self.step = step

    def requested(self, step):
        return step == self.step

    def restore(self):
        pass


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# Consistency distillation: one stage of 6 steps on a 5-level grid, the target network's EMA
# (distill.target_decay 0.95) in the optimizer state.
CONSISTENCY = dict(distill__method="consistency", distill__steps_per_stage=6,
                   distill__num_scales=5)


@pytest.mark.parametrize("method", ["progressive", "consistency"])
def test_distillation_resumes_bitwise_and_records_the_student(teacher_workdir, tmp_path,
                                                              monkeypatch, method):
    config = _config(teacher_workdir, **(CONSISTENCY if method == "consistency" else {}))
    straight = distill.distill(config, str(tmp_path / "straight"))
    assert int(straight.step) == 6

    resumed_dir = str(tmp_path / "resumed")
    # Stop at step 4, then resume. Progressive: inside stage 2, whose teacher comes from the
    # kept stage-1 checkpoint (step 3), the rest from the step-4 checkpoint. Consistency: the
    # target network comes back from the optimizer state.
    monkeypatch.setattr(loop_events, "Preemption", lambda: _StopAt(4))
    stopped = distill.distill(config, resumed_dir)
    assert int(stopped.step) == 4
    monkeypatch.undo()
    resumed = distill.distill(config, resumed_dir)
    for a, b in zip(_leaves(straight), _leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    # Negative control: the stop changed something that a broken resume would not restore.
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(stopped.params),
                                                        _leaves(resumed.params), strict=True))
    assert os.path.exists(os.path.join(resumed_dir, "grids", "step_00000006.png"))
    if method == "progressive":
        _check_progressive_student(resumed_dir, teacher_workdir)
    else:
        _check_consistency_student(config, resumed, resumed_dir)


def _check_progressive_student(resumed_dir, teacher_workdir):
    manager = checkpoints.create_manager(resumed_dir, read_only=True)
    assert {3, 6} <= set(manager.all_steps())  # stage ends kept despite max_to_keep=1
    for step, steps in ((3, 2), (6, 1)):
        record = checkpoints.restore_config(manager, step)
        assert record["sample"]["method"] == "ddim" and record["sample"]["eta"] == 0.0
        assert record["sample"]["num_steps"] == steps == record["distill"]["student_steps"]
        assert record["diffusion"]["mean_type"] == "v"

    # The student's sampler comes from its checkpoint, whatever config.sample says; the step
    # count picks the stage.
    final = restore.student_config(
        tiny_config(sample__method="ddpm", sample__eta=0.0, sample__num_steps=1), resumed_dir)
    assert (final.sample.method, final.sample.eta, final.sample.num_steps) == ("ddim", 0.0, 1)
    assert final.sample.checkpoint_step == 6 and final.diffusion.mean_type == "v"
    two = restore.student_config(tiny_config(sample__num_steps=2), resumed_dir)
    assert (two.sample.num_steps, two.sample.checkpoint_step) == (2, 3)
    # A count no stage holds is refused, naming the ones held (was: the last stage, silently).
    teacher_style = tiny_config(sample__method="ddpm", sample__eta=0.0, sample__num_steps=50)
    with pytest.raises(ConfigError, match=r"holds distilled students that sample in 1 or 2 "
                                          r"steps; config\.sample\.num_steps=50 is not one"):
        restore.student_config(teacher_style, resumed_dir)
    assert restore.student_config(teacher_style, teacher_workdir) is teacher_style

    mesh = parallel.create_mesh()
    model = create_model(two.model)
    params, step = restore.restore_for_sampling(two, resumed_dir, mesh, model)
    stage_params = checkpoints.restore_params(manager, 3, abstract_train_state(two, model),
                                              parallel.replicated(mesh))
    for a, b in zip(_leaves(params), _leaves(stage_params), strict=True):
        np.testing.assert_array_equal(a, b)
    sample_fn = sampling.make_sample_fn(two, model, mesh, 8)
    images = sampling.generate_samples(sample_fn, params, np.arange(8) % 10, 8, 0, mesh)
    assert images.shape == (8, 8, 8, 1) and images.dtype == np.uint8


def _check_consistency_student(config, state, resumed_dir):
    record = checkpoints.restore_config(checkpoints.create_manager(resumed_dir, read_only=True),
                                        6)
    assert record["sample"]["method"] == "consistency" and record["sample"]["num_steps"] == 1
    assert record["distill"]["student_steps"] == 1 and record["diffusion"]["mean_type"] == "v"
    # The target network lags the student (decay 0.95), and is not the sampled EMA either.
    target = _leaves(distill.target_params(config, state))
    assert any(not np.array_equal(a, b) for a, b in zip(target, _leaves(state.params),
                                                        strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(target, _leaves(state.ema_params),
                                                        strict=True))
    # Any step count below the grid's 5 levels is the user's; another is refused.
    final = restore.student_config(tiny_config(sample__method="ddpm", sample__num_steps=1),
                                   resumed_dir)
    assert (final.sample.method, final.sample.num_steps) == ("consistency", 1)
    assert final.distill.method == "consistency" and final.sample.checkpoint_step == 6
    assert restore.student_config(tiny_config(sample__num_steps=2),
                                  resumed_dir).sample.num_steps == 2
    with pytest.raises(ConfigError, match=r"trained on 5 noise levels; config\.sample\."
                                          r"num_steps=50 must lie in 1\.\.4"):
        restore.student_config(tiny_config(sample__num_steps=50), resumed_dir)
    # --mode=sample on the student's workdir at 1 and 2 steps, with no other flag.
    for steps in (1, 2):
        result = run_main(resumed_dir, "--mode=sample", sample__num_steps=str(steps),
                          sample__num_samples="8", sample__batch_size="8")
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"with consistency, {steps} steps" in result.stderr, result.stderr[-3000:]
        with np.load(os.path.join(resumed_dir, "samples", "samples_0.npz")) as samples:
            assert samples["images"].shape == (8, 8, 8, 1)


def test_the_first_stage_starts_from_the_teacher(teacher_workdir, tmp_path, monkeypatch):
    """After one step of stage 1 the student differs from the teacher by one optimizer step:
    with the lr set to 0 it is the teacher exactly (negative control: lr > 0 moves it)."""
    config = _config(teacher_workdir)
    mesh = parallel.create_mesh()
    teacher = distill.load_teacher(config, create_model(config.model), mesh)
    for lr, same in ((1e-30, True), (1e-3, False)):
        monkeypatch.setattr(loop_events, "Preemption", lambda: _StopAt(1))
        state = distill.distill(_config(teacher_workdir, distill__lr=lr),
                                str(tmp_path / f"lr{lr}"))
        equal = all(np.array_equal(a, b) for a, b in zip(_leaves(state.params),
                                                          _leaves(teacher), strict=True))
        assert equal == same


def test_bad_inputs_are_one_line(tmp_path):
    """No teacher checkpoint; a halving count that does not divide the teacher's steps."""
    empty = tmp_path / "empty"
    empty.mkdir()
    line = error_line(run_main(str(tmp_path / "student"), "--mode=distill",
                               distill__teacher_workdir=str(empty)))
    assert "config.distill.teacher_workdir=" in line and "holds no checkpoint" in line, line
    line = error_line(run_main(str(tmp_path / "student"), "--mode=distill",
                               distill__teacher_workdir=str(empty), distill__teacher_steps="12",
                               distill__num_halvings="3"))
    assert "config.distill.num_halvings=3 halves config.distill.teacher_steps=12" in line, line
    line = error_line(run_main(str(tmp_path / "student"), "--mode=distill",
                               distill__teacher_workdir=str(empty),
                               distill__method="consistency", distill__num_scales="3000"))
    assert "config.distill.num_scales=3000 with config.distill.sigma_max=80.0" in line, line


def test_a_teacher_of_another_architecture_is_one_line(teacher_workdir, tmp_path):
    line = error_line(run_main(str(tmp_path / "student"), "--mode=distill", model__ch="64",
                               distill__teacher_workdir=teacher_workdir))
    assert "the teacher (config.distill.teacher_workdir) does not fit" in line, line
    assert "does not match the model in the config" in line, line
