"""EDM2's power-function EMA in training and after it (the math is phema.py).

Training (config.train.ema="power"): the state holds one power EMA per width of
config.train.ema_sigma_rels (`update_power_emas`, inside the jitted step), beside the fixed EMA;
every config.train.ema_snapshot_every steps and at the run's last step `SnapshotWriter` stores
them in float16 under `<workdir>/phema_snapshots/<step>/` (items `snapshot`: the EMAs in the
order of `meta`'s `sigma_rels`), written like the checkpoints by Orbax, on a background thread
with one process, sharded like the parameters with several. Snapshots are never deleted by
`max_to_keep`; a resumed run deletes those past its checkpoint and writes them again.

After training: `reconstruct` rebuilds the EMA of any width at a snapshot's step, streaming over
the snapshots (an accumulator and one snapshot in memory); `--mode=phema` (phema_command.py)
writes it as an ordinary workdir; `restore_tracked` reads a tracked width for
config.sample.ema_sigma_rel.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from jax_diffusion.errors import CheckpointError, ConfigError
from jax_diffusion.training import checkpoints
from jax_diffusion.training import phema

SNAPSHOT_DIR = "phema_snapshots"
SNAPSHOT_DTYPE = jnp.float16   # what EDM2 stores: half the bytes of float32


def tracked_sigma_rels(train_config: ml_collections.ConfigDict) -> tuple[float, ...]:
    """The widths of the power EMAs the training state holds: () for config.train.ema="fixed"."""
    if train_config.ema != "power":
        return ()
    return tuple(float(s) for s in train_config.ema_sigma_rels)


def update_power_emas(power_emas: tuple, params: Any, sigma_rels: Sequence[float],
                      t: jax.Array) -> tuple:
    """Each EMA moved towards `params` by 1 - beta_t = 1 - (1 - 1/t)^(gamma + 1) at the t-th
    update (t >= 1), computed as -expm1((gamma + 1) log1p(-1/t)): 1 - 1/t itself has no float32
    digits to spare once t passes ~1e5."""
    if not sigma_rels:
        return power_emas
    gammas = phema.gamma_of_sigma_rel(np.asarray(sigma_rels, np.float64))
    log_keep = jnp.log1p(-1.0 / t.astype(jnp.float32))
    return tuple(optax.incremental_update(params, ema, -jnp.expm1((float(g) + 1.0) * log_keep))
                 for ema, g in zip(power_emas, gammas, strict=True))


def _recorded_widths(recorded: dict) -> tuple[float, ...]:
    """The tracked widths of a checkpoint's recorded config; () for a fixed-EMA run."""
    train = recorded.get("train", {})
    if train.get("ema") != "power":
        return ()
    return tuple(float(s) for s in train.get("ema_sigma_rels", ()))


def check_same_widths(recorded: dict, train_config: ml_collections.ConfigDict) -> None:
    """A resumed power-EMA run must track the widths its checkpoint tracked (`recorded`: the
    checkpoint's config): the state's EMAs are those widths' averages."""
    had = _recorded_widths(recorded)
    want = tracked_sigma_rels(train_config)
    if had and want and had != want:
        raise ConfigError(f"this workdir's power EMAs have widths {list(had)} but "
                          f"config.train.ema_sigma_rels={list(want)}; resume with "
                          f"--config.train.ema_sigma_rels=\"{tuple(had)}\" or use another "
                          f"--workdir")


def snapshot_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), SNAPSHOT_DIR)


def snapshot_manager(workdir: str, read_only: bool = False) -> ocp.CheckpointManager:
    """The snapshots' manager: every step kept, asynchronous writes, the blocking part on a
    thread with one process (the rule of checkpoints.create_manager)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=not read_only,
                                           read_only=read_only,
                                           enable_async_checkpointing=not read_only)
    handlers = {"snapshot": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    in_background = not read_only and jax.process_count() == 1
    manager_class = checkpoints.BackgroundSavingManager if in_background else ocp.CheckpointManager
    return manager_class(snapshot_dir(workdir), options=options, item_handlers=handlers)


class SnapshotWriter:
    """Stores the state's power EMAs in float16 every `every` steps and at `last_step`."""

    def __init__(self, workdir: str, sigma_rels: Sequence[float], every: int, last_step: int,
                 resumed_step: int):
        self.sigma_rels, self.every, self.last_step = list(sigma_rels), every, last_step
        self.manager = snapshot_manager(workdir)
        stale = [s for s in self.manager.all_steps() if s > resumed_step]
        for step in stale:   # written after the checkpoint resumed from: written again
            self.manager.delete(step)
        if stale:
            logging.info("Deleted the power-EMA snapshots after step %d: %s", resumed_step,
                         stale)

    def after_step(self, step: int, power_emas: tuple) -> None:
        if step % self.every and step < self.last_step:
            return
        # New float16 buffers: the next step's donation of the state cannot touch them.
        half = jax.tree.map(lambda x: x.astype(SNAPSHOT_DTYPE), power_emas)
        args = ocp.args.Composite(snapshot=ocp.args.StandardSave(half),
                                  meta=ocp.args.JsonSave({"sigma_rels": self.sigma_rels}))
        if isinstance(self.manager, checkpoints.BackgroundSavingManager):
            self.manager.save_in_background(step, args)
        else:
            self.manager.save(step, args=args)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class _NoSnapshots:
    def after_step(self, step: int, power_emas: tuple) -> None:
        del step, power_emas


@contextlib.contextmanager
def snapshot_writer(config: ml_collections.ConfigDict, workdir: str, resumed_step: int,
                    last_step: int) -> Iterator[SnapshotWriter | _NoSnapshots]:
    """The training loop's snapshot writer (one that writes nothing for config.train.ema=
    "fixed"); on leaving, its pending writes are finished."""
    sigma_rels = tracked_sigma_rels(config.train)
    if not sigma_rels:
        yield _NoSnapshots()
        return
    writer = SnapshotWriter(workdir, sigma_rels, config.train.ema_snapshot_every, last_step,
                            resumed_step)
    try:
        yield writer
    finally:
        writer.close()


def _half(tree: Any, sharding) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, SNAPSHOT_DTYPE,
                                                       sharding=sharding), tree)


def _snapshot_table(manager: ocp.CheckpointManager, workdir: str, step: int
                    ) -> tuple[int, dict[int, list[float]]]:
    """(the step rebuilt at, {snapshot step <= it: its widths}); `step` -1 = the latest."""
    steps = sorted(manager.all_steps())
    if not steps:
        raise CheckpointError(f"no power-EMA snapshots in {snapshot_dir(workdir)}: train with "
                              f"--config.train.ema=power first")
    if step < 0:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"no power-EMA snapshot at step {step} in "
                              f"{snapshot_dir(workdir)}; snapshot steps: {steps}")
    table = {s: manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                                ).meta["sigma_rels"] for s in steps if s <= step}
    return step, table


def reconstruct(workdir: str, params_template: Any, sharding, sigma_rel: float,
                step: int = -1) -> tuple[Any, int]:
    """(float32 parameters, step): the power EMA of width `sigma_rel` after `step` updates (-1:
    the latest snapshot's step), the sum of x_i times snapshot i with the coefficients of
    phema.reconstruction_coefficients, read one snapshot step at a time."""
    manager = snapshot_manager(workdir, read_only=True)
    step, table = _snapshot_table(manager, workdir, step)
    pairs = [(s, i, width) for s, widths in table.items() for i, width in enumerate(widths)]
    coefficients = phema.reconstruction_coefficients(
        [s for s, _, _ in pairs], [w for _, _, w in pairs], step, sigma_rel)
    by_step: dict[int, list[float]] = {}
    for (s, _, _), x in zip(pairs, coefficients, strict=True):
        by_step.setdefault(s, []).append(float(x))

    @functools.partial(jax.jit, donate_argnums=0)
    def accumulate(total, snapshot, weights):
        for ema, weight in zip(snapshot, weights, strict=True):
            total = jax.tree.map(lambda a, b, w=weight: a + w * b.astype(jnp.float32), total,
                                 ema)
        return total

    total = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32, device=sharding),
                         params_template)
    for s, weights in by_step.items():
        template = _half((params_template,) * len(weights), sharding)
        try:
            snapshot = manager.restore(s, args=ocp.args.Composite(
                snapshot=ocp.args.StandardRestore(template))).snapshot
        except Exception as e:  # noqa: BLE001  (orbax/tensorstore raise many types)
            raise CheckpointError(f"power-EMA snapshot {snapshot_dir(workdir)}/{s} could not be "
                                  f"read ({type(e).__name__}); it may be truncated or from "
                                  f"another model: delete it") from None
        total = accumulate(total, tuple(snapshot), jnp.asarray(weights, jnp.float32))
    logging.info("Rebuilt the power EMA of sigma_rel %g at step %d from %d snapshots "
                 "(%d profiles)", sigma_rel, step, len(by_step), len(pairs))
    return total, step


def restore_tracked(manager: ocp.CheckpointManager, step: int, recorded: dict,
                    params_template: Any, sharding, sigma_rel: float) -> Any:
    """The tracked power EMA of width `sigma_rel` of the checkpoint at `step`, whose recorded
    config is `recorded`; CheckpointError when the run did not track that width."""
    widths = list(_recorded_widths(recorded))
    matches = [i for i, width in enumerate(widths) if np.isclose(width, sigma_rel)]
    if not matches:
        tracked = ", ".join(f"{w:g}" for w in widths) or "none: config.train.ema='fixed'"
        raise CheckpointError(
            f"config.sample.ema_sigma_rel={sigma_rel:g} is not tracked by the checkpoint at "
            f"step {step} (tracked: {tracked}); rebuild it with --mode=phema "
            f"--config.phema.sigma_rel={sigma_rel:g} --config.phema.output_workdir=DIR")
    emas = checkpoints.restore_power_emas(manager, step, params_template, len(widths), sharding)
    return emas[matches[0]]
