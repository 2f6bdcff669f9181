"""--mode=sample: draw `config.sample.num_samples` images from a checkpoint and write them.

Writes `<workdir>/samples/samples_0.npz` (images uint8 [N, H, W, C], labels int32 [N]: the
samples of all processes, gathered by process 0) and `<workdir>/samples_grid.png` (one row per
class for a class-conditional model). A new run replaces the samples files of an earlier one.
"""
from __future__ import annotations

import glob
import logging
import os

import jax
import ml_collections
import numpy as np

from jax_diffusion import images
from jax_diffusion.runtime import parallel
from jax_diffusion.generation import sampling
from jax_diffusion.models import create_model


def write_samples(workdir: str, samples: np.ndarray, labels: np.ndarray,
                  num_classes: int) -> str:
    """samples_0.npz and the grid PNG, replacing earlier samples files; returns the folder."""
    out_dir = os.path.join(workdir, "samples")
    os.makedirs(out_dir, exist_ok=True)
    for old in glob.glob(os.path.join(out_dir, "samples_*.npz")):
        os.remove(old)
    np.savez(os.path.join(out_dir, "samples_0.npz"), images=samples, labels=labels)
    if num_classes > 0:
        grid = images.make_grid(images.class_rows(samples, labels, num_classes), ncols=10)
    else:
        grid = images.make_grid(samples[:100], ncols=10)
    grid_path = os.path.join(workdir, "samples_grid.png")
    images.save_png(grid, grid_path, scale=2)
    logging.info("Wrote %d samples to %s and the grid to %s", len(samples), out_dir, grid_path)
    return out_dir


def run_sample(config: ml_collections.ConfigDict, workdir: str) -> None:
    """--mode=sample."""
    config = sampling.student_config(config, workdir)
    mesh = parallel.create_mesh()
    model = create_model(config.model)
    params, step = sampling.restore_for_sampling(config, workdir, mesh, model)
    sample_config = config.sample
    logging.info("Sampling %d images from step %d (%s params) with %s, %d steps",
                 sample_config.num_samples, step, "EMA" if sample_config.use_ema else "raw",
                 sample_config.method, sample_config.num_steps)
    batch_size = parallel.round_up_to_devices(
        min(sample_config.batch_size, sample_config.num_samples), mesh)
    labels = sampling.default_labels(sample_config.num_samples, config.model.num_classes)
    sample_fn = sampling.make_sample_fn(config, model, mesh, batch_size)
    samples = sampling.generate_samples(sample_fn, params, labels, batch_size,
                                        sample_config.seed, mesh)
    if jax.process_index() == 0:
        write_samples(workdir, samples, labels, config.model.num_classes)
