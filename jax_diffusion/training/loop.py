"""The one loop that training and distillation share: steps until the run length, metrics
averaged over windows, a checkpoint at every interval, at the end and on SIGTERM, and a stop
with the last good checkpoint kept when a step's loss or gradient is not finite."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from jax_diffusion.runtime import tensorboard_writer
from jax_diffusion.training import checkpoints, loop_events
from jax_diffusion.training.metric_window import MetricWindow
from jax_diffusion.training.train_state import TrainState

# (state, step) -> (state after the call, its metrics, steps it took)
Advance = Callable[[TrainState, int], tuple[TrainState, dict, int]]


@dataclasses.dataclass
class LoopSpec:
    """What differs between the loops that `run_loop` drives.

    advance: runs the next compiled call from `step`.
    record: the config saved with a checkpoint taken now (a distillation stage's record).
    boundary: whether `step` ends a unit that must be logged and saved (a distillation stage).
    after_step: called after every call's logging and saving, e.g. to write a sample grid.
    scalars: adds the loop's own scalars to a logged window.
    what: the loss's name in the non-finite error; hint: the fix it suggests.
    """
    advance: Advance
    record: Callable[[], ml_collections.ConfigDict]
    hint: str
    what: str = "loss"
    boundary: Callable[[int], bool] = lambda step: False
    after_step: Callable[[TrainState, int, Any], None] = lambda state, step, writer: None
    scalars: Callable[[dict, int], None] = lambda scalars, step: None


def run_loop(state: TrainState, spec: LoopSpec, *, config: ml_collections.ConfigDict,
             workdir: str, manager, iterator, num_steps: int) -> TrainState:
    """Steps `state` until `num_steps`; returns the last state."""
    step = int(state.step)
    writer = tensorboard_writer.create_writer(workdir, just_logging=jax.process_index() > 0)
    window = MetricWindow(step)
    last_saved = f"step {step}" if step else "none yet"

    def nonfinite(bad: int) -> str:
        manager.wait_until_finished()
        return (f"the {spec.what} or gradient became NaN/Inf at step {bad}; stopped without "
                f"saving. The last good checkpoint ({last_saved}) stays in "
                f"{checkpoints.checkpoint_dir(workdir)}. {spec.hint}")

    def flush_metrics() -> None:
        scalars = window.flush(step, nonfinite)
        if scalars is not None:
            spec.scalars(scalars, step)
            writer.write_scalars(step, scalars)

    def save() -> None:
        nonlocal last_saved
        checkpoints.save(manager, step, state, spec.record(), iterator.get_state())
        last_saved = f"step {step}"

    with loop_events.guarded_loop(manager, writer) as preemption:
        while step < num_steps:
            state, metrics, taken = spec.advance(state, step)
            step += taken
            window.add(metrics)
            # Read the flag once: SIGTERM may arrive while this step is being logged or saved,
            # and "stop" must then wait for the next step's save, not skip this one's.
            preempted = preemption.requested(step)
            at_end = step >= num_steps or preempted or spec.boundary(step)
            loop_events.log_and_save(config.train, step, at_end, flush_metrics, save)
            spec.after_step(state, step, writer)
            if preempted:
                logging.info("Preempted: checkpoint saved at step %d", step)
                break
    return state
