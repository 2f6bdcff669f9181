"""Training: create_train_state -> make_train_step (train_step.py) -> train (the loop);
`run_train` is --mode=train.
"""
from __future__ import annotations

import logging

import jax
import ml_collections

from jax_diffusion import checkpoints, data, loop_events, parallel, sampling, tensorboard_writer
from jax_diffusion.diffusion import create_diffusion
from jax_diffusion.errors import ConfigError
from jax_diffusion.metric_window import MetricWindow
from jax_diffusion.models import create_model
from jax_diffusion.train_state import (TrainState, abstract_train_state, create_optimizer,
                                       create_train_state)
from jax_diffusion.train_step import make_train_step, next_batches


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
    diffusion = create_diffusion(config.diffusion)
    tx = create_optimizer(config.train)
    iterator = data.create_train_iterator(config, seed=config.train.seed,
                                          process_index=jax.process_index(),
                                          process_count=jax.process_count())
    manager = checkpoints.create_manager(workdir, config.train.max_to_keep)
    if manager.latest_step() is None:
        state = create_train_state(config, model, tx, mesh)
    else:  # restore onto the abstract state: no throw-away initialisation of a large model
        step = manager.latest_step()
        state, data_state = checkpoints.restore_train_state(
            manager, step, abstract_train_state(config, model), parallel.replicated(mesh))
        if data_state:  # an imported checkpoint has none: its run starts the data afresh
            iterator.set_state(data_state)
        logging.info("Resuming from %s at step %d", checkpoints.checkpoint_dir(workdir) +
                     f"/{step}", step)
    step = int(state.step)

    writer = tensorboard_writer.create_writer(workdir, just_logging=jax.process_index() > 0)
    train_step = make_train_step(config, model, diffusion, tx, mesh)
    grid_sampler = (sampling.GridSampler(config, model, mesh) if config.train.sample_every
                    else None)
    window = MetricWindow(step)
    last_saved = f"step {step}" if step else "none yet"

    def nonfinite(bad: int) -> str:
        manager.wait_until_finished()
        return (f"the loss or gradient became NaN/Inf at step {bad}; stopped without saving. "
                f"The last good checkpoint ({last_saved}) stays in "
                f"{checkpoints.checkpoint_dir(workdir)}. Try a lower --config.train.lr or "
                f"--config.train.grad_clip, or check the data")

    def flush_metrics() -> None:
        scalars = window.flush(step, nonfinite)
        if scalars is None:
            return
        steps_per_s = scalars["steps_per_s"]
        scalars.update(img_per_s=steps_per_s * config.train.batch_size,
                       eta_min=(num_steps - step) / max(steps_per_s, 1e-9) / 60.0)
        writer.write_scalars(step, scalars)

    def save() -> None:
        nonlocal last_saved
        checkpoints.save(manager, step, state, config, iterator.get_state())
        last_saved = f"step {step}"

    with loop_events.guarded_loop(manager, writer) as preemption:
        while step < num_steps:
            state, metrics = train_step(state, next_batches(iterator, k, mesh))
            step += k
            window.add(metrics)
            # Read the flag once: SIGTERM may arrive while this step is being logged or saved,
            # and "stop" must then wait for the next step's save, not skip this one's.
            preempted = preemption.requested(step)
            loop_events.log_and_save(config.train, step, step >= num_steps or preempted,
                                     flush_metrics, save)
            if grid_sampler and step % config.train.sample_every == 0:
                grid_sampler.write(state.ema_params, step, workdir, writer)
            if preempted:
                logging.info("Preempted: checkpoint saved at step %d", step)
                break
    return state


def run_train(config: ml_collections.ConfigDict, workdir: str) -> None:
    """--mode=train."""
    train(config, workdir)
