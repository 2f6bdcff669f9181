"""Sampling from a trained model (library): restore the (EMA) parameters onto the current
devices, generate batch-sharded samples with the sampler in `config.sample`, and the grids that
training writes. `--mode=sample` (sample_command.py) and `--mode=eval` build on it.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from jax_diffusion import checkpoints, consistency, images, parallel, power_ema, samplers
from jax_diffusion.diffusion import check_trained_with
from jax_diffusion.train_state import abstract_train_state

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


def restore_for_sampling(config: ml_collections.ConfigDict, workdir: str, mesh,
                         model: nn.Module) -> tuple[object, int]:
    """(params, step): EMA (or raw, or the tracked power EMA of config.sample.ema_sigma_rel)
    parameters of the chosen checkpoint, replicated on `mesh`.
    A checkpoint trained with another diffusion (schedule, T, parametrisation, variance,
    timestep scaling) is refused: its network's output would be read wrongly."""
    manager = checkpoints.create_manager(workdir, read_only=True)
    step = checkpoints.select_step(manager, config.sample.checkpoint_step)
    saved = checkpoints.restore_config(manager, step)
    check_trained_with(saved.get("diffusion", {}), config.diffusion,
                       f"{checkpoints.checkpoint_dir(workdir)}/{step}")
    template = abstract_train_state(config, model)
    if config.sample.ema_sigma_rel:   # a power EMA the run tracked
        params = power_ema.restore_tracked(manager, step, saved, template.params,
                                           parallel.replicated(mesh), config.sample.ema_sigma_rel)
        return params, step
    params = checkpoints.restore_params(manager, step, template, parallel.replicated(mesh),
                                        use_ema=config.sample.use_ema)
    return params, step


def student_config(config: ml_collections.ConfigDict, workdir: str
                   ) -> ml_collections.ConfigDict:
    """`config`, or for the workdir of a distilled student (--mode=distill) a copy that samples
    it as its checkpoint records: its parametrisation, sampler, eta, step count and guidance,
    whatever config.sample says for teachers. With several stages kept, the stage whose step
    count is config.sample.num_steps is chosen, else the last one (config.sample.checkpoint_step
    >= 0 picks one directly). A consistency student (one stage) samples with
    config.sample.num_steps steps when that is below its distill.num_scales (the levels it was
    trained on), else with the steps it records (1)."""
    manager = checkpoints.create_manager(workdir, read_only=True)
    if not manager.all_steps():
        return config  # restore_for_sampling names the problem
    latest = checkpoints.restore_config(manager, manager.latest_step())
    if not latest.get("distill", {}).get("student_steps", 0):
        return config
    num_steps = config.sample.num_steps
    if config.sample.checkpoint_step >= 0:
        step = checkpoints.select_step(manager, config.sample.checkpoint_step)
    elif latest["sample"]["method"] == consistency.SAMPLER:
        step = manager.latest_step()
    else:
        per_stage = latest["distill"]["steps_per_stage"]
        stages = {checkpoints.restore_config(manager, s)["distill"]["student_steps"]: s
                  for s in manager.all_steps() if s % per_stage == 0}
        step = stages.get(config.sample.num_steps, manager.latest_step())
        if config.sample.num_steps not in stages:
            logging.info("%s holds distilled students at %s steps; config.sample.num_steps=%d "
                         "is not one of them: sampling the latest", workdir,
                         ", ".join(map(str, sorted(stages))), config.sample.num_steps)
    record = checkpoints.restore_config(manager, step)
    effective = ml_collections.ConfigDict(config.to_dict())
    effective.diffusion.mean_type = record["diffusion"]["mean_type"]
    for key in ("method", "eta", "num_steps", "schedule", "guidance_scale"):
        effective.sample[key] = record["sample"][key]
    effective.sample.checkpoint_step = step
    for key, value in record["distill"].items():   # the method and its parametrisation
        if key in effective.distill:
            effective.distill[key] = value
    if effective.sample.method == consistency.SAMPLER:
        if 1 <= num_steps < effective.distill.num_scales:
            effective.sample.num_steps = num_steps
        else:
            logging.info("%s holds a consistency model trained on %d levels; "
                         "config.sample.num_steps=%d is not below that: sampling with %d",
                         workdir, effective.distill.num_scales, num_steps,
                         effective.sample.num_steps)
    logging.info("Distilled student: checkpoint %d, %s with %d steps, eta %g", step,
                 effective.sample.method, effective.sample.num_steps, effective.sample.eta)
    return effective
