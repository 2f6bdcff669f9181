"""Orbax checkpoints: `workdir/checkpoints/<step>/` with four items.

  state       step, params, opt_state, rng (everything but the EMA, restored onto a target)
  ema_params  the EMA weights in float32: restores with no target through Orbax alone
              (`ocp.StandardCheckpointer().restore(".../<step>/ema_params")`), for other tools
  config      the run's config as JSON
  data        the input iterator's state as JSON, so a resumed run sees the same batches
  power_emas  (config.train.ema="power" only) the power-function EMAs, one per tracked width

Every failure to find or read a checkpoint becomes a `CheckpointError` whose message names the
checkpoint and says what to do.

A save blocks the training loop only for a device-side copy of the state (see `save`): Orbax's
own blocking part (the copy to host memory, one metadata record per array) runs on a thread.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import sys
import threading
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.sharding import Sharding

from jax_diffusion.errors import CheckpointError

# The Orbax release whose failed-restore behaviour `quiet_failed_restore_noise` knows (its
# internals are recognised by name): re-check the filter when upgrading orbax-checkpoint.
ORBAX_VERSION_TARGETED = "0.12.8"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class BackgroundSavingManager(ocp.CheckpointManager):
    """An Orbax CheckpointManager that can run the blocking part of a save on a thread
    (`save_in_background`). Every later call from the thread that started it (the training
    loop's) first waits for that part to end, so the loop never sees a half-started save, and an
    error raised there surfaces in the loop's next call."""

    _pending: threading.Thread | None = None
    _pending_error: BaseException | None = None
    _owner: threading.Thread | None = None  # the thread that started the background save

    def save_in_background(self, step: int, args: ocp.args.Composite) -> None:
        """Start `save(step, args=args)` on a thread and return. `args` must hold arrays nothing
        else will donate or overwrite (a copy made for the save)."""
        self.finish_background_save()
        self._owner = threading.current_thread()

        def run() -> None:
            try:
                self._save_now(step, args)
            except BaseException as e:  # noqa: BLE001  (re-raised on the caller's thread)
                self._pending_error = e

        self._pending = threading.Thread(target=run, name=f"checkpoint-save-{step}")
        self._pending.start()

    def _save_now(self, step: int, args: ocp.args.Composite) -> None:
        super().save(step, args=args)

    def finish_background_save(self) -> None:
        """Wait until the blocking part of a background save has run (not until the files are
        written: that is wait_until_finished); re-raise its error."""
        pending = self._pending
        if pending is None or threading.current_thread() is not self._owner:
            # Orbax's own threads (the background save itself, its finalize thread) call these
            # methods too; they must not wait for the save they belong to.
            return
        pending.join()
        self._pending = None
        error, self._pending_error = self._pending_error, None
        if error is not None:
            raise error


def _after_background_save(name: str):
    def method(self, *args, **kwargs):
        self.finish_background_save()
        return getattr(ocp.CheckpointManager, name)(self, *args, **kwargs)
    method.__name__ = name
    method.__doc__ = (f"CheckpointManager.{name}, after the blocking part of a background "
                      f"save has run.")
    return method


# Every public call that reads or changes the checkpoints waits for a background save first.
for _name in ("save", "restore", "item_metadata", "metadata", "all_steps", "latest_step",
              "should_save", "delete", "reload", "check_for_errors", "wait_until_finished",
              "close"):
    setattr(BackgroundSavingManager, _name, _after_background_save(_name))


def create_manager(workdir: str, max_to_keep: int = 3, async_save: bool = True,
                   read_only: bool = False, keep_period: int | None = None
                   ) -> ocp.CheckpointManager:
    """The run's CheckpointManager. Saves are asynchronous: writing overlaps training. Steps
    that are multiples of `keep_period` are never deleted (a distillation's stage ends).

    A single-process run's asynchronous manager also starts saves on a thread
    (BackgroundSavingManager). With several processes Orbax's save begins with a barrier that
    is a device collective (multihost_utils.sync_global_devices): issued from a thread it could
    interleave differently with the training step's collectives on different processes, so
    there the blocking part stays on the loop's thread."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=async_save, keep_period=keep_period)
    # Named handlers let a fresh manager read item metadata before any save or restore.
    handlers = {"state": ocp.StandardCheckpointHandler(),
                "ema_params": ocp.StandardCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "power_emas": ocp.StandardCheckpointHandler()}
    in_background = async_save and not read_only and jax.process_count() == 1
    manager_class = BackgroundSavingManager if in_background else ocp.CheckpointManager
    return manager_class(checkpoint_dir(workdir), options=options, item_handlers=handlers)


def save_args(state: Any, config: ml_collections.ConfigDict, data_state: Any
              ) -> ocp.args.Composite:
    """The four items of a checkpoint of `state` (a TrainState), five with power EMAs."""
    train_part = {"step": state.step, "params": state.params, "opt_state": state.opt_state,
                  "rng": state.rng}
    power = {"power_emas": ocp.args.StandardSave(state.power_emas)} if state.power_emas else {}
    return ocp.args.Composite(
        state=ocp.args.StandardSave(train_part),
        ema_params=ocp.args.StandardSave(state.ema_params),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
        data=ocp.args.JsonSave(copy.deepcopy(data_state)), **power)


def _device_copy(tree: Any) -> Any:
    """New device buffers holding `tree`'s values; the copy is dispatched, not waited for."""
    return jax.device_put(tree, may_alias=False)


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         config: ml_collections.ConfigDict, data_state: Any) -> None:
    """Start saving `state` (a TrainState) at `step`; returns before the files are written.

    With a BackgroundSavingManager it returns before Orbax has even copied the arrays to host
    memory: the arrays handed to Orbax are a device-side copy of the state (dispatched
    asynchronously), which the next step's donation of the state cannot touch. That copy holds
    one more state's worth of device memory until Orbax has its host copy."""
    if isinstance(manager, BackgroundSavingManager):
        manager.save_in_background(step, save_args(_device_copy(state), config, data_state))
    else:
        manager.save(step, args=save_args(state, config, data_state))


def _step_path(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(manager.directory), str(step))


def select_step(manager: ocp.CheckpointManager, step: int = -1) -> int:
    """`step`, or the latest step when step < 0, checking that it exists."""
    steps = manager.all_steps()
    if not steps:
        raise CheckpointError(
            f"no checkpoint in {manager.directory}: train first (--mode=train with this "
            f"--workdir), or point --workdir at a finished run")
    if step < 0:
        return max(steps)
    if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {manager.directory}; "
                              f"available steps: {sorted(steps)}")
    return step


def _path_str(path) -> str:
    """'a/b/0': one spelling for a dict key, an attribute (namedtuple field) or an index, since
    Orbax's metadata stores namedtuples as dicts."""
    parts = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
    return "/".join(str(p) for p in parts)


def _root_cause(e: BaseException) -> str:
    """'Type: first line' of the innermost chained exception. Orbax wraps TensorStore's precise
    error (which file, which byte range) in a generic one."""
    seen = {id(e)}
    while (inner := e.__cause__ or e.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        e = inner
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _check_compatible(manager: ocp.CheckpointManager, step: int, item: str, target: Any,
                      subtree: str | None = None) -> None:
    """Compare the stored tree (or its `subtree`) with the target before restoring, to name
    what differs."""
    path = _step_path(manager, step)
    try:
        stored = manager.item_metadata(step)[item]
        stored_tree = stored.tree if hasattr(stored, "tree") else stored
    except Exception as e:  # noqa: BLE001  (any read failure here means a damaged checkpoint)
        quiet_failed_restore_noise()
        raise CheckpointError(f"checkpoint {path} is unreadable ({_root_cause(e)}); "
                              f"it may be truncated: delete it or pick another step") from None
    if stored_tree is None:
        raise CheckpointError(f"checkpoint {path} has no readable '{item}' item; it may be "
                              f"truncated: delete it or pick another step")
    if subtree is not None:
        stored_tree = stored_tree[subtree]
    stored_leaves = {_path_str(k): v for k, v in jax.tree_util.tree_leaves_with_path(stored_tree)}
    target_leaves = {_path_str(k): v for k, v in jax.tree_util.tree_leaves_with_path(target)}
    missing = sorted(set(target_leaves) - set(stored_leaves))
    extra = sorted(set(stored_leaves) - set(target_leaves))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {path} does not match the model in the config: "
            f"{len(missing)} parameters missing (e.g. {missing[:2]}), {len(extra)} unexpected "
            f"(e.g. {extra[:2]}); was it trained with another config.model? Its config is in "
            f"{path}/config")
    for name, want in target_leaves.items():
        have = tuple(stored_leaves[name].shape)
        if have != tuple(want.shape):
            raise CheckpointError(
                f"checkpoint {path} does not match the model in the config: {item}/{name} has "
                f"shape {have} there but {tuple(want.shape)} in the config; was it trained with "
                f"another config.model? Its config is in {path}/config")


def _abstract(tree: Any, sharding: Sharding) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


class _DropOrphanedTaskErrors(logging.Filter):
    """Drops asyncio's reports of tasks nobody awaited ("Task exception was never retrieved")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("Task exception was never retrieved",
                                                   "Task was destroyed but it is pending"))


_ORPHANED_TASK_ERRORS = _DropOrphanedTaskErrors()


def _drop_abandoned_reads(previous_hook):
    """An unraisable-exception hook that drops the reads Orbax abandoned; the rest goes on to
    `previous_hook`."""
    def hook(unraisable) -> None:
        exc, obj = unraisable.exc_value, unraisable.object
        abandoned_read = (str(exc).startswith("Encountered error while reading array index")
                          and "_read_array_index_and_device_put" in repr(obj))
        closed_loop = isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
        if not (abandoned_read or closed_loop):
            previous_hook(unraisable)
    hook.quiets_orbax = True
    return hook


def quiet_failed_restore_noise() -> None:
    """Silence the echoes of a failed Orbax restore (orbax-checkpoint ORBAX_VERSION_TARGETED),
    for the rest of the process, which then ends with the one-line CheckpointError. Idempotent.

    When one array of a damaged checkpoint fails to read, Orbax stops waiting for its other
    concurrent reads and closes their event loop. Those reads then fail too and report it two
    ways, racing the error line: asyncio logs each unawaited task's traceback when the task is
    garbage-collected, sometimes at exit; and the abandoned coroutines (which catch
    BaseException, so also the GeneratorExit of being closed) and TensorStore's callbacks into
    the closed loop raise where nobody catches them, which Python reports through
    sys.unraisablehook."""
    logging.getLogger("asyncio").addFilter(_ORPHANED_TASK_ERRORS)
    if not getattr(sys.unraisablehook, "quiets_orbax", False):
        sys.unraisablehook = _drop_abandoned_reads(sys.unraisablehook)


def _restore(manager: ocp.CheckpointManager, step: int, **items: Any) -> Any:
    try:
        return manager.restore(step, args=ocp.args.Composite(**items))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001  (orbax/tensorstore raise many types for bad files)
        quiet_failed_restore_noise()
        raise CheckpointError(
            f"checkpoint {_step_path(manager, step)} could not be restored ({_root_cause(e)}); "
            f"it may be truncated or from another model: delete it or pick another step"
        ) from None


def restore_train_state(manager: ocp.CheckpointManager, step: int, state_template: Any,
                        sharding: Sharding) -> tuple[Any, Any]:
    """(TrainState, data iterator state) at `step`, placed with `sharding`.

    `state_template` is a TrainState (or its jax.eval_shape) that fixes structure and dtypes.
    """
    train_part = {"step": state_template.step, "params": state_template.params,
                  "opt_state": state_template.opt_state, "rng": state_template.rng}
    _check_compatible(manager, step, "state", train_part)
    _check_compatible(manager, step, "ema_params", state_template.ema_params)
    power = {}
    if state_template.power_emas:
        _check_power_emas(manager, step, state_template.power_emas)
        power = {"power_emas": ocp.args.StandardRestore(
            _abstract(state_template.power_emas, sharding))}
    restored = _restore(
        manager, step,
        state=ocp.args.StandardRestore(_abstract(train_part, sharding)),
        ema_params=ocp.args.StandardRestore(_abstract(state_template.ema_params, sharding)),
        data=ocp.args.JsonRestore(), **power)
    state = state_template.replace(ema_params=restored.ema_params, **restored.state)
    if power:
        state = state.replace(power_emas=tuple(restored.power_emas))
    return state, restored.data


def _check_power_emas(manager: ocp.CheckpointManager, step: int, template: tuple) -> None:
    """The checkpoint must hold as many power EMAs as `template`, each fitting the model."""
    path = _step_path(manager, step)
    if not os.path.isdir(os.path.join(path, "power_emas")):
        raise CheckpointError(f"checkpoint {path} holds no power EMAs (it was trained with "
                              f"config.train.ema='fixed'): resume it with --config.train.ema="
                              f"fixed, or start the power EMA run in a new --workdir")
    _check_compatible(manager, step, "power_emas", list(template))


def restore_power_emas(manager: ocp.CheckpointManager, step: int, params_template: Any,
                       count: int, sharding: Sharding) -> tuple:
    """The `count` power EMAs of the checkpoint at `step` (config.train.ema="power"), placed
    with `sharding`; `params_template` fixes the parameters' structure."""
    template = (params_template,) * count
    _check_power_emas(manager, step, template)
    return tuple(_restore(manager, step, power_emas=ocp.args.StandardRestore(
        _abstract(template, sharding))).power_emas)


def restore_params(manager: ocp.CheckpointManager, step: int, state_template: Any,
                   sharding: Sharding, use_ema: bool = True) -> Any:
    """Only the EMA (or raw) parameters at `step`, placed with `sharding` on the current devices,
    whatever device count wrote them. `state_template`: a TrainState or its jax.eval_shape."""
    if use_ema:
        _check_compatible(manager, step, "ema_params", state_template.ema_params)
        return _restore(manager, step, ema_params=ocp.args.StandardRestore(
            _abstract(state_template.ema_params, sharding))).ema_params
    state, _ = restore_train_state(manager, step, state_template, sharding)
    return state.params


def restore_config(manager: ocp.CheckpointManager, step: int) -> dict:
    """The config recorded with the checkpoint at `step`, as a plain dict (its JSON)."""
    return _restore(manager, step, config=ocp.args.JsonRestore()).config
