"""Running main.py as a user would, for the command-line tests: the command, its environment
(the tiny test model's flags, the shared compilation cache) and the one-line error check."""
import os
import subprocess
import sys

from tiny_config import ROOT, tiny_flags

from jax_diffusion.cli import compilation_cache_dir

MAIN = os.path.join(ROOT, "main.py")
ENV = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "PYTHONPATH": ROOT,
       "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu",
       "JAX_COMPILATION_CACHE_DIR": compilation_cache_dir()}
TIMEOUT = 240  # seconds per run: a loaded 2-core machine, the first run compiling


def command(workdir, *args, **overrides) -> list[str]:
    """main.py on the tiny model; `section__key=value` overrides its flags."""
    return [sys.executable, MAIN, f"--workdir={workdir}", *tiny_flags(**overrides), *args]


def plain_command(workdir, *args) -> list[str]:
    """main.py with only the given flags (e.g. another --config)."""
    return [sys.executable, MAIN, f"--workdir={workdir}", *args]


def run_main(workdir, *args, timeout: float = TIMEOUT, **overrides
             ) -> subprocess.CompletedProcess:
    return subprocess.run(command(workdir, *args, **overrides), env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The run failed with exactly one `error:` line, the last one, and no traceback; returns
    that line."""
    assert result.returncode != 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert result.stderr.rstrip().splitlines()[-1] == errors[0], result.stderr[-3000:]
    return errors[0]
