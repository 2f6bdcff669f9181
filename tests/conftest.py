"""Test set-up: 8 forced CPU devices and the persistent compilation cache, before JAX touches a device."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from jax_diffusion import cpu_flags  # noqa: E402

cpu_flags.use_fast_cpu_convolutions()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".cache", "jax")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
