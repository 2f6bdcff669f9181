"""The learning-rate schedule: linear warmup, then constant or cosine decay to 0, against the
formula written out (Loshchilov & Hutter 2017, SGDR, without restarts)."""
import math

import ml_collections
import numpy as np
import pytest

from jax_diffusion.config_files import default_config
from jax_diffusion.errors import ConfigError
from jax_diffusion.training.train_state import learning_rate_schedule


def train_config(**overrides) -> ml_collections.ConfigDict:
    config = default_config().train
    config.update(overrides)
    return config


def expected_lr(step: int, lr: float, warmup: int, total: int, schedule: str) -> float:
    if step < warmup:
        return lr * step / warmup
    if schedule == "constant":
        return lr
    progress = min(step - warmup, total - warmup) / (total - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize("schedule, warmup", [("cosine", 200), ("cosine", 0),
                                              ("constant", 200), ("constant", 0)])
def test_values_match_the_formula(schedule, warmup):
    config = train_config(lr=1e-3, warmup_steps=warmup, num_steps=1500, lr_schedule=schedule)
    fn = learning_rate_schedule(config)
    steps = [0, 1, 100, 199, 200, 201, 500, 850, 1200, 1499, 1500, 1600]
    got = np.array([float(fn(s)) for s in steps])
    want = np.array([expected_lr(s, 1e-3, warmup, 1500, schedule) for s in steps])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-10)  # float32 cos near pi
    if schedule == "cosine":
        # Half-way through the decay the rate is half the peak; at the end it is 0.
        assert float(fn(warmup + (1500 - warmup) // 2)) == pytest.approx(5e-4, rel=1e-3)
        assert float(fn(1500)) == 0.0


def test_negative_control_cosine_differs_from_constant():
    """The formula check above can fail: the constant schedule is not the cosine one."""
    cosine = learning_rate_schedule(train_config(lr_schedule="cosine", num_steps=1500))
    constant = learning_rate_schedule(train_config(lr_schedule="constant", num_steps=1500))
    assert float(cosine(1000)) < 0.5 * float(constant(1000))


def test_default_is_constant_as_published():
    assert default_config().train.lr_schedule == "constant"


@pytest.mark.parametrize("overrides, match", [
    (dict(lr_schedule="linear"), r"config.train.lr_schedule='linear' is unknown"),
    (dict(lr_schedule="cosine", epochs=3), r"config.train.epochs > 0"),
    (dict(lr_schedule="cosine", num_steps=100, warmup_steps=100), r"num_steps=100 > "),
])
def test_bad_settings_are_one_line_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match) as info:
        learning_rate_schedule(train_config(**overrides))
    assert "\n" not in str(info.value)
