"""Drawing images with a restored model: the jitted, batch-sharded sample function of the sampler
in `config.sample`, the batch loop, and the grids that training writes. `--mode=sample`,
`--mode=eval` and `Pipeline` build on it.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from jax_diffusion import images, samplers
from jax_diffusion.runtime import parallel
from jax_diffusion.samplers import consistency

SampleFn = Callable[[object, jax.Array, jax.Array], jax.Array]


def default_labels(num_samples: int, num_classes: int) -> np.ndarray:
    """Classes cycling 0..K-1 (all zeros for an unconditional model)."""
    if num_classes <= 0:
        return np.zeros((num_samples,), np.int32)
    return (np.arange(num_samples) % num_classes).astype(np.int32)


def make_sample_fn(config: ml_collections.ConfigDict, model: nn.Module, mesh,
                   batch_size: int) -> SampleFn:
    """jit(params, key, labels [batch_size]) -> uint8 images [batch_size, H, W, C], the batch
    sharded over the mesh; compiled once for all batches."""
    parallel.check_divisible(batch_size, mesh, "the sampling batch size")
    sample_config, num_classes = config.sample, config.model.num_classes
    shape = (batch_size, config.data.image_size, config.data.image_size, config.data.channels)

    def generate(params, key, labels):
        def conditional(x, t, y):
            return model.apply({"params": params}, x, t, y, train=False)
        if num_classes > 0 and sample_config.guidance_scale != 1.0:
            model_fn = samplers.guided_model_fn(conditional, labels, num_classes,
                                                sample_config.guidance_scale)
        else:
            y = labels if num_classes > 0 else None
            model_fn = lambda x, t: conditional(x, t, y)  # noqa: E731
        if sample_config.method == consistency.SAMPLER:   # a consistency student's record
            x0 = consistency.sample_from_config(model_fn, config, shape, key)
        else:
            x0 = samplers.sample_from_config(model_fn, config, shape, key)
        return images.to_uint8(x0)

    batch = parallel.batch_sharded(mesh)
    return jax.jit(generate, in_shardings=(parallel.replicated(mesh), parallel.replicated(mesh),
                                           batch), out_shardings=batch)


def generate_samples(sample_fn: SampleFn, params, labels: np.ndarray, batch_size: int,
                     seed: int, mesh, progress: bool = True, overlap: bool = True) -> np.ndarray:
    """All samples for `labels`, batch by batch; batch i uses key fold_in(seed, i), so the
    images depend on the seed and batch size, not on the device count. Batch i+1 is sampled
    while batch i is fetched (parallel.map_batches; overlap=False: one after the other)."""
    base_key = jax.random.PRNGKey(seed)
    return parallel.map_batches(
        lambda i, chunk: sample_fn(params, jax.random.fold_in(base_key, i), chunk),
        (labels.astype(np.int32),), batch_size, mesh, "sampling" if progress else None,
        overlap=overlap)


class GridSampler:
    """Writes a grid of EMA samples during training: PNG under workdir/grids and TensorBoard."""

    def __init__(self, config: ml_collections.ConfigDict, model: nn.Module, mesh):
        self.num = parallel.round_up_to_devices(config.sample.grid_size, mesh)
        self.labels = default_labels(self.num, config.model.num_classes)
        self.mesh = mesh
        self.seed = config.sample.seed
        self.sample_fn = make_sample_fn(config, model, mesh, self.num)
        self.ncols = config.model.num_classes or int(np.ceil(np.sqrt(self.num)))

    def write(self, params, step: int, workdir: str, writer) -> None:
        samples = generate_samples(self.sample_fn, params, self.labels, self.num, self.seed,
                                   self.mesh, progress=False)
        if jax.process_index() != 0:
            return
        # Class-conditional: one column per class, so each column is one label.
        grid = images.make_grid(samples, self.ncols)
        images.save_png(grid, os.path.join(workdir, "grids", f"step_{step:08d}.png"), scale=2)
        writer.write_images(step, {"samples": grid[None]})
