"""The up-front config checks for pr, sfid and fd_dinov2 (in-process): one line naming the key,
before any device, dataset or checkpoint is touched; the good configs pass."""
import numpy as np
import pytest
from tiny_config import tiny_config

from jax_diffusion.config_validation import validate_config
from jax_diffusion.errors import ConfigError


def _config(metrics: str, **eval_overrides):
    config = tiny_config(eval__metrics=metrics)
    config.eval.update(eval_overrides)
    return config


@pytest.fixture(scope="module")
def stats_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stats")
    paths = {"mu_sigma": str(tmp / "mu_sigma.npz"), "complete": str(tmp / "complete.npz"),
             "weights": str(tmp / "weights.pth")}
    np.savez(paths["mu_sigma"], mu=np.zeros(4), sigma=np.eye(4))
    np.savez(paths["complete"], mu=np.zeros(4), sigma=np.eye(4), features=np.zeros((5, 4)),
             spatial_mu=np.zeros(3), spatial_sigma=np.eye(3))
    with open(paths["weights"], "wb") as f:
        f.write(b"x")
    return paths


@pytest.mark.parametrize("metrics, overrides, words", [
    ("fid,prc", {}, r"config\.eval\.metrics='fid,prc': unknown \['prc'\]; allowed: "
                    r".*pr, sfid, fd_dinov2"),
    ("pr", {"num_samples": 3}, r"config\.eval\.num_samples=3 must be > 3 for precision/recall"),
    ("sfid", {"num_samples": 1}, r"config\.eval\.num_samples=1 must be >= 2"),
    ("fd_dinov2", {"num_samples": 1}, r"config\.eval\.num_samples=1 must be >= 2"),
    ("pr", {"reference_stats": "mu_sigma"}, r"config\.eval\.reference_stats=.* has no "
                                             r"reference 'features', which precision/recall"),
    ("sfid", {"reference_stats": "mu_sigma"}, r"has no sFID statistics spatial_mu, "
                                               r"spatial_sigma: drop sfid"),
    ("fd_dinov2", {"dinov2_weights": "/nonexistent/dinov2.pth"},
     r"config\.eval\.dinov2_weights='/nonexistent/dinov2\.pth' is not a file"),
    ("fid", {"dinov2_sha256": "abc"}, r"config\.eval\.dinov2_sha256='abc': needs the 64 hex"),
])
def test_bad_settings_are_one_line_naming_the_key(stats_files, tmp_path, metrics, overrides,
                                                  words):
    overrides = {key: stats_files.get(value, value) if isinstance(value, str) else value
                 for key, value in overrides.items()}
    with pytest.raises(ConfigError, match=words) as raised:
        validate_config(_config(metrics, inception_weights=stats_files["weights"], **overrides),
                        "eval", str(tmp_path / "run"))
    assert "\n" not in str(raised.value)


def test_good_settings_pass(stats_files, tmp_path):
    """The negative control of the cases above: the same metrics with what they need."""
    validate_config(_config("fid,is,kid,pr,sfid,fd_dinov2", num_samples=4,
                            inception_weights=stats_files["weights"],
                            reference_stats=stats_files["complete"],
                            dinov2_weights=stats_files["weights"]), "eval", str(tmp_path / "run"))
    validate_config(_config("fd_dinov2", num_samples=2), "eval", str(tmp_path / "run"))
