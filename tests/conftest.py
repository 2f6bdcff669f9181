"""Test set-up: 8 forced CPU devices and the persistent compilation cache (the one main.py
uses), before JAX touches a device; tests needing PyTorch skipped where it is not installed."""
import importlib.util
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from jax_diffusion.runtime import cpu_flags  # noqa: E402

cpu_flags.use_fast_cpu_convolutions()

import jax  # noqa: E402

from jax_diffusion.cli import compilation_cache_dir  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", compilation_cache_dir())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pytest  # noqa: E402
from torch_reference import REASON as NO_TORCH  # noqa: E402

TORCH_INSTALLED = importlib.util.find_spec("torch") is not None


def _skip_where_torch_is_missing():
    """A hook wrapper's body: a test (or fixture) that imports torch where it is not installed is
    skipped with the reason, not failed. Where torch is installed, nothing changes."""
    try:
        return (yield)
    except ImportError as error:
        # diffusers' PyTorch classes raise ImportError naming PyTorch when used without it.
        about_torch = (error.name or "").partition(".")[0] == "torch" or "PyTorch" in str(error)
        if TORCH_INSTALLED or not about_torch:
            raise
        pytest.skip(NO_TORCH)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _skip_where_torch_is_missing())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _skip_where_torch_is_missing())
