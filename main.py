"""jax_diffusion entry point: parse flags, set up logging, run the mode.

  python main.py --config=configs/cifar10.py --workdir=runs/cifar10 --mode=train
  python main.py --config=configs/digits.py --workdir=runs/digits --mode=sample \
      --config.sample.num_steps=20
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from jax_diffusion.runtime import cpu_flags  # noqa: E402

cpu_flags.use_fast_cpu_convolutions()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jax_diffusion import cli  # noqa: E402  (after the XLA flags

cli.exit_on_unknown_keys(sys.argv)
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "digits.py"),
    "Experiment config file (configs/*.py); override keys with --config.section.key=value.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, samples.")
_MODE = flags.DEFINE_enum("mode", "train", list(cli.MODES), "What to do.")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        return cli.fail(f"unexpected arguments {argv[1:]}; all options are --flags")
    if not _WORKDIR.value:
        return cli.fail("--workdir is required, e.g. --workdir=runs/digits")
    cli.setup_logging()
    return cli.run(_MODE.value, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
