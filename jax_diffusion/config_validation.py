"""The whole config checked once, before any device, dataset or checkpoint is touched.

Part of the entry layer with cli.py. Each section's rules live in the module that owns the
section (`validate_<section>_config`), written with the primitives of config_checks.py; this
module only runs them in order. The modes then trust the config. Checks that need the device
count (batches split over all devices) run in `check_device_divisibility`, after the processes
of a multi-process run have joined.
"""
from __future__ import annotations

import os

import ml_collections

from jax_diffusion.bench.options import validate_bench_config
from jax_diffusion.config_files import comma_list
from jax_diffusion.convert.run import validate_convert_config
from jax_diffusion.data.pipeline import validate_data_config
from jax_diffusion.diffusion import validate_diffusion_config
from jax_diffusion.distill.loop import validate_distill_config
from jax_diffusion.errors import ConfigError
from jax_diffusion.evaluation.run import validate_eval_config
from jax_diffusion.models.unet import validate_model_section
from jax_diffusion.runtime import parallel
from jax_diffusion.runtime.distributed import validate_distributed_config
from jax_diffusion.samplers.from_config import validate_sample_config
from jax_diffusion.training.phema import validate_phema_config
from jax_diffusion.training.objective import validate_objective_config
from jax_diffusion.training.train import validate_train_config


def _check_workdir(workdir: str) -> None:
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir} is a file, not a directory; give a directory "
                          f"(it is created when missing)")


def validate_config(config: ml_collections.ConfigDict, mode: str, workdir: str) -> None:
    """Every section of `config` for `--mode=mode`; raises ConfigError on the first problem.

    Touches no device, dataset or checkpoint: only files the config names (reference
    statistics, a samples folder) are looked at, and only for the mode that reads them."""
    _check_workdir(workdir)
    validate_diffusion_config(config.diffusion)
    validate_objective_config(config)
    for refusing_mode, what in (("distill", "distillation"), ("import", "import"),
                                ("export", "export")):
        if mode == refusing_mode and config.diffusion.process != "vp":
            raise ConfigError(f"config.diffusion.process={config.diffusion.process!r}: {what} "
                              f"is written for the discrete process 'vp' only; use a vp model")
    validate_data_config(config.data)
    validate_model_section(config)
    validate_train_config(config)
    validate_sample_config(config)
    validate_eval_config(config, mode)
    validate_bench_config(config.bench)
    validate_distill_config(config, mode, workdir)
    validate_distributed_config(config.distributed)
    validate_phema_config(config, mode, workdir)
    if mode in ("import", "export"):
        validate_convert_config(config, mode)


def check_device_divisibility(config: ml_collections.ConfigDict, mode: str, mesh) -> None:
    """The global batches the mode uses must split evenly over all devices of `mesh` (of all
    processes); sampling and evaluation batches are rounded up to the device count instead."""
    keys = {"train": ("train.batch_size",),
            "eval": ("eval.nll_batch_size",) if "nll" in comma_list(
                config.eval.metrics, "config.eval.metrics") else (),
            "bench": ("bench.batch_size", "bench.sample_batch_size"),
            "distill": ("train.batch_size",)}.get(mode, ())
    for key in keys:
        section, name = key.split(".")
        parallel.check_divisible(config[section][name], mesh, f"config.{key}")
