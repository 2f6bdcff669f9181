"""What the training and distillation loops do around their steps: stop on SIGTERM
(Preemption), log and save at their intervals and at the end (log_and_save), and always restore
the signal handler, finish pending saves and flush the metrics (guarded_loop)."""
from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils


class Preemption:
    """SIGTERM (the preemption notice of TPU VMs, SLURM and Kubernetes) as a stop request that
    the loop checks between steps, at the same step on every process.

    One process: a Python handler sets a flag. Several: JAX's preemption service (started by
    jax.distributed) catches SIGTERM, and `reached_preemption_sync_point` turns true at one
    common step on all processes, so they save the same checkpoint together; a process that
    stopped alone would leave the others waiting in a collective."""

    def __init__(self):
        self._flag = False
        self._multi_process = jax.process_count() > 1
        if not self._multi_process:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self._flag = True

    def requested(self, step: int) -> bool:
        """Whether to save and stop after `step`; called once per step on every process."""
        if self._multi_process:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._flag

    def restore(self):
        if not self._multi_process:
            signal.signal(signal.SIGTERM, self._previous)


def log_and_save(train_config: ml_collections.ConfigDict, step: int, at_end: bool,
                 flush_metrics: Callable[[], None], save: Callable[[], None]) -> None:
    """After `step`: log every train.log_every steps and save every train.checkpoint_every
    steps, both at the end (`at_end`: the last step, a preemption, a distillation stage's end).
    The metrics are flushed before every save, so a non-finite step raises before it is saved."""
    if (train_config.log_every and step % train_config.log_every == 0) or at_end:
        flush_metrics()
    if (train_config.checkpoint_every and step % train_config.checkpoint_every == 0) or at_end:
        flush_metrics()
        save()


@contextlib.contextmanager
def guarded_loop(manager: Any, writer: Any) -> Iterator[Preemption]:
    """A Preemption for the loop; on leaving (normally or by an error) the SIGTERM handler is
    restored, the checkpoint manager's pending saves are finished and the writer is flushed."""
    preemption = Preemption()
    try:
        yield preemption
    finally:
        preemption.restore()
        manager.wait_until_finished()
        writer.flush()
