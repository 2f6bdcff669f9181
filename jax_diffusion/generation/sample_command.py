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
from jax_diffusion.pipeline import Pipeline


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
    """--mode=sample: `Pipeline.sample` with every setting from config.sample."""
    sample_config = config.sample
    pipeline = Pipeline(config, workdir=workdir)
    samples = pipeline.sample(sample_config.num_samples, seed=sample_config.seed, progress=True)
    if jax.process_index() == 0:
        write_samples(workdir, samples.images, samples.labels, config.model.num_classes)
