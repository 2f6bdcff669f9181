"""The entry layer under main.py: one-line errors for bad flags and config keys, JAX set-up,
the config checked once, and the dispatch by --mode from one table.

Every mode is a function `(config, workdir) -> None` in the module that owns it, named in
`MODES` and imported only when that mode runs (training and evaluation import TensorFlow for
TensorBoard; a bad flag should not wait for that). A `UserError` becomes one `error:` line and
exit status 1; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable

import ml_collections
from absl import flags

from jax_diffusion import config_files
from jax_diffusion.errors import ConfigError, UserError

# --mode -> "module:function"; each function is (config, workdir) -> None.
MODES: dict[str, str] = {
    "train": "jax_diffusion.training.train:run_train",
    "sample": "jax_diffusion.generation.sample_command:run_sample",
    "eval": "jax_diffusion.evaluation.run:run_eval",
    "bench": "jax_diffusion.bench.run:run_bench",
    "import": "jax_diffusion.convert.run:run_import",
    "export": "jax_diffusion.convert.run:run_export",
    "distill": "jax_diffusion.distill.loop:run_distill",
    "phema": "jax_diffusion.training.phema_command:run_phema",
}


def mode_function(mode: str) -> Callable[[ml_collections.ConfigDict, str], None]:
    module, function = MODES[mode].split(":")
    return getattr(importlib.import_module(module), function)


def fail(message: str) -> int:
    """Print one line to stderr and give the exit status for main.py. A message written on
    several lines (e.g. the tfds "not prepared" one) is joined into one."""
    one_line = " ".join(line.strip() for line in message.splitlines() if line.strip())
    print(f"error: {one_line}", file=sys.stderr)
    return 1


def _config_file(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return os.path.join(config_files.CONFIG_DIR, "digits.py")


def _unknown_key(argv: list[str]) -> str | None:
    """A message for a config file that does not load or for the first --config.a.b override
    whose key does not exist, else None."""
    path = _config_file(argv)
    if not os.path.exists(path):
        return f"config file {path} not found; the configs are in {config_files.CONFIG_DIR}"
    try:
        config = config_files.load_config_file(path)
    except ConfigError as e:
        return str(e)
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        keys = arg[len("--config."):].split("=", 1)[0].split(".")
        node, walked = config, "config"
        for key in keys:
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                return (f"unknown config key {walked}.{key} (from {arg.split('=')[0]}); valid keys "
                        f"in {walked}: {', '.join(valid) if valid else '(none: not a section)'}")
            node, walked = node[key], f"{walked}.{key}"
    return None


def exit_on_unknown_keys(argv: list[str]) -> None:
    """Check the config file and the --config.a.b overrides before ml_collections applies them
    (it raises a bare KeyError with a traceback while the config flag is being defined)."""
    message = _unknown_key(argv[1:])
    if message:
        sys.exit(fail(message))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a one-line error instead of a traceback or a usage dump."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001  (absl and ml_collections raise several types)
        message = _unknown_key(argv[1:]) or str(e).splitlines()[0]
        sys.exit(fail(message))


class _OwnInfoOnly(logging.Filter):
    """Keep INFO lines from this project (its metric lines included); libraries' INFO is
    noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "jax_diffusion" in record.pathname


def setup_logging() -> None:
    """INFO for our progress and metrics, warnings and errors from everything."""
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.INFO)
    absl_logging.get_absl_handler().addFilter(_OwnInfoOnly())


def compilation_cache_dir() -> str:
    """$JAX_COMPILATION_CACHE_DIR, else `xla/` in the user cache directory (never the repo)."""
    from jax_diffusion.downloads import cache_dir
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(cache_dir(), "xla")


def setup_jax(config: ml_collections.ConfigDict) -> None:
    """The persistent compilation cache (a second run does not compile again), then the join of
    a multi-process run; processes other than 0 log only warnings and errors."""
    import jax
    from absl import logging as absl_logging

    from jax_diffusion.runtime import distributed
    jax.config.update("jax_compilation_cache_dir", compilation_cache_dir())
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if distributed.initialize(config.distributed):
        logging.info(
            "Process %d of %d: %d local devices, %d in all", jax.process_index(),
            jax.process_count(), jax.local_device_count(), jax.device_count())
        if jax.process_index() > 0:
            absl_logging.set_verbosity(absl_logging.WARNING)


def run(mode: str, config: ml_collections.ConfigDict, workdir: str) -> int:
    """Validate, set up JAX, run the mode; returns the exit status. A UserError is one line (its
    traceback at -v=1); anything else propagates with its traceback."""
    from jax_diffusion import config_validation
    from jax_diffusion.runtime import parallel
    try:
        config_validation.validate_config(config, mode, workdir)
        setup_jax(config)
        config_validation.check_device_divisibility(config, mode, parallel.create_mesh())
        mode_function(mode)(config, workdir)
    except UserError as e:
        logging.debug("traceback", exc_info=True)
        return fail(str(e))
    return 0
