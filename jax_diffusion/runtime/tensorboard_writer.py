"""The metric writer of training, distillation and evaluation: scalars to the console (absl INFO
lines, every process) and, on process 0, scalars and images to TensorBoard event files in the
workdir, written by tensorboardX (no TensorFlow needed; `tensorboard --logdir <workdir>` reads
them)."""
from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging


def _summary_writer_class() -> type:
    """tensorboardX.SummaryWriter, imported with PyTorch hidden: tensorboardX imports torch when
    it is installed only to accept torch tensors, which costs seconds per run and loads a second
    CUDA runtime beside JAX's on a GPU machine."""
    hidden = "torch" not in sys.modules
    if hidden:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which it catches
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hidden:
            del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """Writes scalars and images at a step: to the log always, to event files in `logdir` when
    it is given."""

    def __init__(self, logdir: str | None):
        self._events = _summary_writer_class()(logdir=logdir) if logdir else None

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One log line `[step] name=value, ...` and one TensorBoard point per scalar."""
        values = {name: float(value) for name, value in scalars.items()}
        logging.info("[%d] %s", step,
                     ", ".join(f"{name}={value:.6g}" for name, value in sorted(values.items())))
        if self._events:
            for name, value in values.items():
                self._events.add_scalar(name, value, step)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """[N, H, W, C] batches (uint8, or float in [0, 1]; C = 1 or 3), each one TensorBoard
        image (N > 1 tiled)."""
        logging.info("[%d] Got images: %s.", step,
                     {name: np.shape(batch) for name, batch in images.items()})
        if self._events:
            for name, batch in images.items():
                self._events.add_images(name, np.asarray(batch), step, dataformats="NHWC")

    def flush(self) -> None:
        """Writes everything pending to disk (the event files are otherwise flushed every 2 min)."""
        if self._events:
            self._events.flush()

    def close(self) -> None:
        if self._events:
            self._events.close()
            self._events = None


def create_writer(workdir: str, *, just_logging: bool = False) -> MetricWriter:
    """The writer of a run in `workdir`; `just_logging` (processes other than 0) writes no event
    files, so that one run has one set of curves."""
    return MetricWriter(None if just_logging else workdir)
