"""What main.py needs besides flag definitions: one-line errors for bad flags and config keys,
JAX set-up, and the dispatch by --mode."""
from __future__ import annotations

import logging
import os
import sys

import ml_collections
from absl import flags

from jax_diffusion import config_files

MODES = ("train", "sample", "eval", "bench")


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
    """A message for the first --config.a.b override whose key does not exist, else None."""
    path = _config_file(argv)
    if not os.path.exists(path):
        return f"config file {path} not found; the configs are in {config_files.CONFIG_DIR}"
    config = config_files.load_config_file(path)
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
    """Check --config.a.b overrides before ml_collections applies them (it raises a bare
    KeyError with a traceback while the config flag is being defined)."""
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
    """Keep INFO lines from this project and clu's metric lines; libraries' INFO is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.levelno >= logging.WARNING or "jax_diffusion" in record.pathname
                or "/clu/" in record.pathname)


def _drop_abandoned_checkpoint_reads(previous_hook):
    """An unraisable-exception hook that drops the echoes of a failed Orbax restore.

    When one array of a damaged checkpoint fails to read, Orbax closes its event loop with the
    other reads still pending; their coroutines (which catch BaseException, so also the
    GeneratorExit of being closed) and TensorStore's callbacks into the closed loop then print
    dozens of tracebacks, racing the one-line CheckpointError. Everything else goes on to
    `previous_hook`."""
    def hook(unraisable) -> None:
        exc, obj = unraisable.exc_value, unraisable.object
        abandoned_read = (str(exc).startswith("Encountered error while reading array index")
                          and "_read_array_index_and_device_put" in repr(obj))
        closed_loop = isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
        if not (abandoned_read or closed_loop):
            previous_hook(unraisable)
    return hook


def setup_logging() -> None:
    """INFO for our progress and metrics, warnings and errors from everything."""
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.INFO)
    absl_logging.get_absl_handler().addFilter(_OwnInfoOnly())
    sys.unraisablehook = _drop_abandoned_checkpoint_reads(sys.unraisablehook)


def setup_jax(config: ml_collections.ConfigDict) -> None:
    """The persistent compilation cache (a second run does not compile again), then the join of
    a multi-process run; processes other than 0 log only warnings and errors."""
    import jax
    from absl import logging as absl_logging
    from jax_diffusion import distributed
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.join(config_files.REPO_ROOT, ".cache", "jax"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if distributed.initialize(config.distributed):
        logging.info(
            "Process %d of %d: %d local devices, %d in all", jax.process_index(),
            jax.process_count(), jax.local_device_count(), jax.device_count())
        if jax.process_index() > 0:
            absl_logging.set_verbosity(absl_logging.WARNING)


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: shown as one line (the traceback at -v=1)."""
    from jax_diffusion.checkpoints import CheckpointError
    from jax_diffusion.data import DatasetNotFoundError
    from jax_diffusion.distributed import DistributedSetupError
    from jax_diffusion.train import NonFiniteLossError
    # FileNotFoundError covers missing datasets, Inception weights and samples files.
    return (ValueError, FileNotFoundError, CheckpointError, DatasetNotFoundError,
            DistributedSetupError, NonFiniteLossError, NotImplementedError)


def run(mode: str, config: ml_collections.ConfigDict, workdir: str) -> None:
    """Dispatch by --mode."""
    if mode == "train":
        from jax_diffusion.train import train_and_evaluate
        train_and_evaluate(config, workdir)
    elif mode == "sample":
        from jax_diffusion.sampling import run_sample
        run_sample(config, workdir)
    elif mode == "eval":
        from jax_diffusion.evaluation.run import run_eval
        run_eval(config, workdir)
    else:
        assert mode == "bench", f"--mode={mode} is not one of {MODES}"
        from jax_diffusion.bench import run_bench
        run_bench(config, workdir)
