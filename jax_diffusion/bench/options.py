"""config.bench: its parts, its comma-list keys parsed, and its rules (light: importing it needs
neither the input pipeline nor the benchmark parts)."""
from __future__ import annotations

import ml_collections

from jax_diffusion import samplers
from jax_diffusion.config_checks import choice, positive_int, require
from jax_diffusion.config_files import comma_list
from jax_diffusion.errors import ConfigError

PARTS = ("train", "fwd", "sample", "data", "host", "checkpoint", "memory", "eval")


def parse_worker_counts(value: str | int) -> tuple[int, ...]:
    """config.bench.data_workers, e.g. "0,1,2" -> (0, 1, 2): worker process counts >= 0."""
    items = comma_list(value, "config.bench.data_workers")
    if not all(item.isdigit() for item in items):
        raise ConfigError(f"config.bench.data_workers={value!r} must list worker counts >= 0, "
                          f"such as \"0,1,2\"")
    return tuple(int(item) for item in items)


def parse_parts(value: str) -> tuple[str, ...]:
    """config.bench.parts, e.g. "train,sample" -> ("train", "sample")."""
    return comma_list(value, "config.bench.parts", PARTS)


def parse_steps(value: int | str) -> tuple[int, ...]:
    """config.bench.sample_steps, an int or a comma string: 10 -> (10,), "10,50" -> (10, 50)."""
    return comma_list(value, "config.bench.sample_steps", integers=True)


def validate_bench_config(bench: ml_collections.ConfigDict) -> None:
    """config.bench's rules."""
    comma_list(bench.parts, "config.bench.parts", PARTS)
    comma_list(bench.sample_steps, "config.bench.sample_steps", integers=True)
    parse_worker_counts(bench.data_workers)
    for name in ("steps_per_jit", "memory_batches"):
        comma_list(bench[name], f"config.bench.{name}", integers=True)
    for name in ("data_batch_size", "data_batches", "checkpoint_loop_calls"):
        positive_int(bench, name, "bench")
    positive_int(bench, "gap_batches", "bench", minimum=2)  # a gap lies between two batches
    require(isinstance(bench.data_dir, str), "bench.data_dir", bench.data_dir,
             "must be a directory path, or '' for <workdir>/bench_data")
    choice(bench.method, "bench.method", samplers.METHODS)
    for name in ("batch_size", "sample_batch_size", "num_steps", "windows"):
        positive_int(bench, name, "bench")
    positive_int(bench, "warmup_steps", "bench", minimum=0)
