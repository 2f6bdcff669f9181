"""Training: create_train_state -> make_train_step (train_step.py) -> train (on the shared
loop, loop.py); `run_train` is --mode=train.
"""
from __future__ import annotations

import logging

import jax
import ml_collections

from jax_diffusion import data
from jax_diffusion.config_checks import choice, fraction, positive_int, require
from jax_diffusion.errors import ConfigError
from jax_diffusion.generation import sampling
from jax_diffusion.models import create_model
from jax_diffusion.runtime import parallel
from jax_diffusion.training import checkpoints, power_ema
from jax_diffusion.training.loop import LoopSpec, run_loop
from jax_diffusion.training.train_state import (TrainState, abstract_train_state, create_optimizer,
                                       create_train_state)
from jax_diffusion.training.train_state import learning_rate_schedule
from jax_diffusion.training.train_step import make_train_step, next_batches
from jax_diffusion.training.train_step import STEP_LOOPS


def run_length(config: ml_collections.ConfigDict) -> int:
    """Total steps: num_steps, or epochs x iterations_per_epoch (one pass when that is 0).
    The config validation checked the multiple of steps_per_jit except for a length that
    depends on the dataset size, checked here."""
    train = config.train
    if train.epochs <= 0:
        return train.num_steps
    per_epoch = train.iterations_per_epoch
    if per_epoch <= 0:
        per_epoch = max(1, data.dataset_info(config)[0] // train.batch_size)
    length = train.epochs * per_epoch
    if length % train.steps_per_jit:
        raise ConfigError(f"config.train.epochs={train.epochs} gives {length} steps "
                          f"({per_epoch} per epoch), which must be a multiple of "
                          f"config.train.steps_per_jit={train.steps_per_jit}")
    return length


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Train per `config` (validated), resuming from the latest checkpoint in `workdir` if there
    is one; returns the final state."""
    mesh = parallel.create_mesh()
    parallel.check_divisible(config.train.batch_size, mesh, "config.train.batch_size")
    num_steps = run_length(config)
    k = config.train.steps_per_jit

    model = create_model(config.model)
    tx = create_optimizer(config.train)
    iterator = data.create_train_iterator(config, seed=config.train.seed,
                                          process_index=jax.process_index(),
                                          process_count=jax.process_count())
    manager = checkpoints.create_manager(workdir, config.train.max_to_keep)
    if manager.latest_step() is None:
        state = create_train_state(config, model, tx, mesh)
    else:  # restore onto the abstract state: no throw-away initialisation of a large model
        step = manager.latest_step()
        power_ema.check_same_widths(checkpoints.restore_config(manager, step), config.train)
        state, data_state = checkpoints.restore_train_state(
            manager, step, abstract_train_state(config, model), parallel.replicated(mesh))
        if data_state:  # an imported checkpoint has none: its run starts the data afresh
            iterator.set_state(data_state)
        logging.info("Resuming from %s at step %d", checkpoints.checkpoint_dir(workdir) +
                     f"/{step}", step)
    train_step = make_train_step(config, model, tx, mesh)
    grid_sampler = (sampling.GridSampler(config, model, mesh) if config.train.sample_every
                    else None)

    def advance(state: TrainState, step: int):
        state, metrics = train_step(state, next_batches(iterator, k, mesh))
        return state, metrics, k

    def scalars(values: dict, step: int) -> None:
        steps_per_s = values["steps_per_s"]
        values.update(img_per_s=steps_per_s * config.train.batch_size,
                      eta_min=(num_steps - step) / max(steps_per_s, 1e-9) / 60.0)

    def after_step(state: TrainState, step: int, writer) -> None:
        snapshots.after_step(step, state.power_emas)
        if grid_sampler and step % config.train.sample_every == 0:
            grid_sampler.write(state.ema_params, step, workdir, writer)

    spec = LoopSpec(advance, record=lambda: config, after_step=after_step, scalars=scalars,
                    hint="Try a lower --config.train.lr or --config.train.grad_clip, or check "
                         "the data")
    with power_ema.snapshot_writer(config, workdir, int(state.step), num_steps) as snapshots:
        return run_loop(state, spec, config=config, workdir=workdir, manager=manager,
                        iterator=iterator, num_steps=num_steps)


def run_train(config: ml_collections.ConfigDict, workdir: str) -> None:
    """--mode=train."""
    train(config, workdir)


def validate_train_config(config: ml_collections.ConfigDict) -> None:
    """config.train's rules."""
    train = config.train
    for name in ("num_steps", "batch_size", "steps_per_jit", "max_to_keep"):
        positive_int(train, name, "train")
    for name in ("epochs", "iterations_per_epoch", "warmup_steps", "log_every",
                 "checkpoint_every", "sample_every"):
        positive_int(train, name, "train", minimum=0)
    require(train.lr > 0, "train.lr", train.lr, "must be > 0")
    learning_rate_schedule(train)  # raises ConfigError for an unknown or impossible lr_schedule
    require(train.grad_clip > 0, "train.grad_clip", train.grad_clip, "must be > 0")
    require(train.weight_decay >= 0, "train.weight_decay", train.weight_decay, "must be >= 0")
    fraction(train.ema_decay, "train.ema_decay", 0.0, 1.0, high_open=True)
    fraction(train.label_dropout, "train.label_dropout", 0.0, 1.0, high_open=True)
    if train.label_dropout > 0:
        require(config.model.num_classes > 0, "train.label_dropout", train.label_dropout,
                 "needs a class-conditional model (config.model.num_classes > 0)")
    choice(train.step_loop, "train.step_loop", STEP_LOOPS)
    k = train.steps_per_jit
    for name in ("log_every", "checkpoint_every", "sample_every"):
        require(train[name] % k == 0, f"train.{name}", train[name],
                 f"must be 0 or a multiple of config.train.steps_per_jit={k}")
    if train.epochs == 0 or train.iterations_per_epoch > 0:  # else it needs the dataset size
        steps = (train.epochs * train.iterations_per_epoch if train.epochs
                 else train.num_steps)
        require(steps % k == 0, "train.num_steps" if not train.epochs else "train.epochs",
                 steps, f"gives a run length that must be a multiple of "
                 f"config.train.steps_per_jit={k}")
