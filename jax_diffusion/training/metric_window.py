"""The host side of logging a training loop: the device metrics of the steps since the last log,
fetched together (no per-step synchronisation), checked for a non-finite step, and averaged."""
from __future__ import annotations

import time
from collections.abc import Callable

import jax
import numpy as np

from jax_diffusion.errors import NonFiniteLossError


class MetricWindow:
    """Collects each compiled call's metrics (arrays on the device, a "finite" flag per step)
    and turns them into scalars at `flush`."""

    def __init__(self, step: int):
        self._pending: list[dict] = []
        self._start_time, self._start_step = time.time(), step

    def add(self, metrics: dict) -> None:
        self._pending.append(metrics)

    def flush(self, step: int, on_nonfinite: Callable[[int], str]) -> dict[str, float] | None:
        """The window's mean metrics and its steps_per_s at `step` (None for an empty window),
        and a new window. A step that was not finite raises NonFiniteLossError with the message
        `on_nonfinite(that step)` (the callback may first wait for pending saves)."""
        if not self._pending:
            return None
        fetched = jax.device_get(self._pending)
        self._pending.clear()
        stacked = {name: np.concatenate([np.atleast_1d(m[name]) for m in fetched])
                   for name in fetched[0]}
        if not np.all(stacked["finite"] == 1):
            raise NonFiniteLossError(
                on_nonfinite(self._start_step + int(np.argmin(stacked["finite"])) + 1))
        elapsed = max(time.time() - self._start_time, 1e-9)
        scalars = {name: float(np.mean(v)) for name, v in stacked.items() if name != "finite"}
        scalars["steps_per_s"] = (step - self._start_step) / elapsed
        self._start_time, self._start_step = time.time(), step
        return scalars
