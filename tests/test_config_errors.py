"""The config checked once, up front: every kind of bad config exits 1 with one line naming the
key, before anything is sampled, trained, restored or read from a dataset (the workdir is never
created); and a bug that raises ValueError keeps its traceback."""
import os
import subprocess

import numpy as np
import pytest
from cli_helpers import ENV, command, error_line, plain_command
from tiny_config import ROOT

from jax_diffusion import cli
from jax_diffusion.config_files import default_config, load_config_file
from jax_diffusion.errors import ConfigError, UserError

CIFAR10 = os.path.join(ROOT, "configs", "cifar10.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The bad runs, started together; each gets a workdir that does not exist yet."""
    tmp = tmp_path_factory.mktemp("config_errors")
    stats = str(tmp / "mu_sigma.npz")
    np.savez(stats, mu=np.zeros(4), sigma=np.eye(4))
    a_file = str(tmp / "a_file")
    with open(a_file, "w") as f:
        f.write("not a directory")
    empty_tfds = str(tmp / "empty_tfds")
    os.makedirs(empty_tfds)
    typo_config = _typo_config(tmp)
    cases = {
        "method": ([], {"sample__method": "ddim2"}),
        "eta_method": ([], {"sample__method": "ddpm", "sample__eta": "0.5"}),
        "eta_range": ([], {"sample__eta": "1.5"}),
        "kid_stats": (["--mode=eval"], {"eval__metrics": "kid", "eval__reference_stats": stats,
                                        "eval__inception_weights": stats}),
        "not_divisible": ([], {"distributed__local_device_count": 4, "train__batch_size": 6}),
        "zero_batch": ([], {"train__batch_size": 0}),
        "negative_steps": ([], {"train__num_steps": -5}),
        "zero_sample_steps": (["--mode=sample"], {"sample__num_steps": 0}),
        "dataset": ([], {"data__dataset": "cifar11"}),
        "schedule": ([], {"sample__schedule": "cosine"}),
        "heun_even_nfe": (["--mode=sample"], {"sample__method": "edm_heun",
                                              "sample__num_steps": 4, "sample__eta": 0}),
        "empty_sweep": (["--mode=eval"], {"eval__sweep": ";"}),
    }
    commands = {name: command(str(tmp / name), *args, **overrides)
                for name, (args, overrides) in cases.items()}
    commands["workdir_file"] = command(a_file)
    commands["cifar10_method"] = plain_command(
        tmp / "cifar10_method", f"--config={CIFAR10}", "--config.sample.method=ddim2",
        f"--config.data.tfds_data_dir={empty_tfds}")
    commands["typo"] = plain_command(tmp / "typo", f"--config={typo_config}")
    processes = {name: subprocess.Popen(argv, env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
                 for name, argv in commands.items()}
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=120)  # a hang guard, not a speed check
        results[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout,
                                                    stderr)
    return {"results": results, "tmp": tmp}


@pytest.mark.slow  # main.py runs
@pytest.mark.parametrize("name, named", [
    ("method", ["config.sample.method='ddim2'", "allowed: ddpm, ddim"]),
    ("eta_method", ["config.sample.eta=0.5", "only to config.sample.method='ddim'"]),
    ("eta_range", ["config.sample.eta=1.5", "[0, 1]"]),
    ("kid_stats", ["config.eval.reference_stats=", "KID needs the reference 'features'"]),
    ("not_divisible", ["config.train.batch_size=6", "divisible", "4 devices"]),
    ("zero_batch", ["config.train.batch_size=0", ">= 1"]),
    ("negative_steps", ["config.train.num_steps=-5", ">= 1"]),
    ("zero_sample_steps", ["config.sample.num_steps=0", "positive integer"]),
    ("dataset", ["config.data.dataset='cifar11'", "tfds"]),
    ("cifar10_method", ["config.sample.method='ddim2'"]),
    ("schedule", ["config.sample.schedule='cosine'", "uniform"]),
    ("heun_even_nfe", ["config.sample.num_steps=4"]),
    ("empty_sweep", ["config.eval.sweep=';'", "empty"]),
    ("typo", ["typo.py", "nums_steps", "configs/default.py"]),
])
def test_bad_config_is_one_line_before_anything_runs(runs, name, named):
    line = error_line(runs["results"][name])
    for text in named:
        assert text in line, line
    # Nothing was trained, sampled or restored: the workdir was never created.
    assert not os.path.exists(runs["tmp"] / name)


@pytest.mark.slow  # main.py runs
def test_a_workdir_that_is_a_file(runs):
    line = error_line(runs["results"]["workdir_file"])
    assert "--workdir=" in line and "is a file" in line


@pytest.mark.slow  # main.py runs
def test_cifar10_bad_method_is_named_before_the_missing_data(runs):
    line = error_line(runs["results"]["cifar10_method"])
    assert "tfds build" not in line and "not prepared" not in line


def _typo_config(folder) -> str:
    path = str(folder / "typo.py")
    with open(path, "w") as f:
        f.write("from jax_diffusion.config_files import default_config\n\n"
                "def get_config():\n    config = default_config()\n"
                "    config.train.nums_steps = 10\n    return config\n")
    return path


def test_a_typo_in_a_config_file_fails_on_load(tmp_path):
    with pytest.raises(ConfigError, match="nums_steps"):
        load_config_file(_typo_config(tmp_path))
    with pytest.raises(AttributeError):  # the lock itself
        default_config().train.nums_steps = 10


def test_every_config_file_loads_and_validates(tmp_path):
    """The shipped configs pass the whole validation for every mode."""
    from jax_diffusion.config_validation import validate_config
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        if name.endswith(".py") and name != "default.py":
            config = load_config_file(os.path.join(ROOT, "configs", name))
            for mode in ("train", "sample", "bench"):
                validate_config(config, mode, str(tmp_path / "w"))


def test_a_bug_keeps_its_traceback_and_a_user_error_is_one_line(monkeypatch, capsys, tmp_path):
    """A ValueError raised inside a mode is a bug: it propagates (Python prints its traceback);
    a UserError is one `error:` line and exit status 1."""
    config = load_config_file(os.path.join(ROOT, "configs", "digits.py"))

    def planted_bug(config, workdir):
        raise ValueError("planted bug inside a step")

    monkeypatch.setattr(cli, "mode_function", lambda mode: planted_bug)
    with pytest.raises(ValueError, match="planted bug"):
        cli.run("bench", config, str(tmp_path))

    def user_error(config, workdir):
        raise UserError("the checkpoint is missing\nsecond line")

    monkeypatch.setattr(cli, "mode_function", lambda mode: user_error)
    assert cli.run("bench", config, str(tmp_path)) == 1
    assert capsys.readouterr().err == "error: the checkpoint is missing second line\n"


def test_reference_stats_of_another_fid_convention_are_refused(tmp_path):
    """Statistics computed with one Inception input convention are never used with another."""
    from jax_diffusion.config_validation import validate_config
    stats = str(tmp_path / "stats.npz")
    np.savez(stats, mu=np.zeros(4), sigma=np.eye(4), features=np.zeros((3, 4)),
             inception_preprocess=np.asarray("pytorch_fid"))
    config = load_config_file(os.path.join(ROOT, "configs", "cifar10.py"))
    config.eval.reference_stats = stats
    config.eval.inception_weights = stats  # any existing file: only the statistics matter here
    config.eval.inception_preprocess = "pytorch_fid"
    validate_config(config, "eval", str(tmp_path / "w"))
    config.eval.inception_preprocess = "tf1"
    with pytest.raises(ConfigError, match="inception_preprocess='pytorch_fid'.*not comparable"):
        validate_config(config, "eval", str(tmp_path / "w"))


def test_distilled_guidance_needs_a_class_conditional_teacher(tmp_path):
    from jax_diffusion.config_validation import validate_config
    config = load_config_file(os.path.join(ROOT, "configs", "digits.py"))
    config.distill.guidance_scale = 1.5
    validate_config(config, "train", str(tmp_path / "w"))   # digits is class-conditional
    config.model.num_classes, config.train.label_dropout = 0, 0.0
    with pytest.raises(ConfigError, match=r"config.distill.guidance_scale=1.5 .*class-conditional"):
        validate_config(config, "train", str(tmp_path / "w"))
    config.distill.guidance_scale = -1.0
    with pytest.raises(ConfigError, match=r"config.distill.guidance_scale=-1.0 must be >= 0"):
        validate_config(config, "train", str(tmp_path / "w"))
