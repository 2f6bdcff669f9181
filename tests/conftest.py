"""Test set-up: 8 forced CPU devices and the persistent compilation cache (the one main.py
uses), before JAX touches a device."""
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
