"""How a failed restore reports itself: the innermost cause, and no stray asyncio tracebacks;
and that a save started in the background keeps the state of its step while training goes on."""
import asyncio
import gc
import logging
import sys
import threading
import types

import jax
import numpy as np
import pytest
from tiny_config import tiny_config

from jax_diffusion import data
from jax_diffusion.models import create_model
from jax_diffusion.runtime import parallel
from jax_diffusion.training import checkpoints
from jax_diffusion.training import train


def _orphaned_task_reports(caplog) -> list[logging.LogRecord]:
    """Leave a failed asyncio task unawaited, as Orbax does with its other reads once one read
    has failed, and return what asyncio logs when the task is collected."""
    async def failing_read():
        raise ValueError("byte range is not valid")

    caplog.clear()
    loop = asyncio.new_event_loop()
    task = loop.create_task(failing_read())
    loop.run_until_complete(asyncio.sleep(0))  # the task runs and fails; nobody awaits it
    loop.close()
    assert task.done()
    del task
    gc.collect()
    return [r for r in caplog.records if "never retrieved" in r.getMessage()]


def test_failed_restore_silences_orphaned_read_tracebacks(caplog, monkeypatch):
    asyncio_logger = logging.getLogger("asyncio")
    installed = checkpoints._ORPHANED_TASK_ERRORS in asyncio_logger.filters
    asyncio_logger.removeFilter(checkpoints._ORPHANED_TASK_ERRORS)  # whatever ran before
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    try:
        reports = _orphaned_task_reports(caplog)
        assert len(reports) == 1 and reports[0].exc_info is not None  # what would be printed
        checkpoints.quiet_failed_restore_noise()
        hook = sys.unraisablehook
        checkpoints.quiet_failed_restore_noise()
        assert asyncio_logger.filters.count(checkpoints._ORPHANED_TASK_ERRORS) == 1
        assert sys.unraisablehook is hook and hook is not sys.__unraisablehook__
        assert _orphaned_task_reports(caplog) == []
        asyncio_logger.error("Unclosed client session")  # other asyncio reports still pass
        assert [r.getMessage() for r in caplog.records] == ["Unclosed client session"]
    finally:
        if not installed:
            asyncio_logger.removeFilter(checkpoints._ORPHANED_TASK_ERRORS)


class _Abandoned:
    """Stands for the coroutine object Orbax abandons (its repr names the read function)."""

    def __repr__(self) -> str:
        return "<coroutine object _read_array_index_and_device_put at 0x0>"


def test_failed_restore_hook_drops_only_the_abandoned_reads():
    passed = []
    hook = checkpoints._drop_abandoned_reads(passed.append)

    def unraisable(exc, obj):
        return types.SimpleNamespace(exc_value=exc, object=obj)

    hook(unraisable(Exception("Encountered error while reading array index 3"), _Abandoned()))
    hook(unraisable(RuntimeError("Event loop is closed"), None))
    assert passed == []
    other = unraisable(ValueError("a real problem"), _Abandoned())
    hook(other)
    hook(unraisable(Exception("Encountered error while reading array index 3"), object()))
    assert len(passed) == 2 and passed[0] is other


def test_root_cause_is_the_innermost_first_line():
    try:
        try:
            raise ValueError('OUT_OF_RANGE: Error reading "conv.kernel"\nfull spec: {...}')
        except ValueError as inner:
            raise Exception("Encountered error while reading array index") from inner
    except Exception as outer:
        assert (checkpoints._root_cause(outer)
                == 'ValueError: OUT_OF_RANGE: Error reading "conv.kernel"')
    cyclic = RuntimeError("a")
    cyclic.__context__ = KeyError("b")
    cyclic.__context__.__context__ = cyclic
    assert checkpoints._root_cause(cyclic) == "KeyError: 'b'"
    assert checkpoints._root_cause(OSError()) == "OSError"


# ------------------------------------------------------------------ background saves
def _held_back_saves(monkeypatch) -> threading.Event:
    """Make every background save wait for the returned event before Orbax touches the arrays,
    so that the steps after the save run (and donate the state) first, deterministically."""
    release = threading.Event()
    original = checkpoints.BackgroundSavingManager._save_now

    def held(self, step, args):
        assert release.wait(120), "the test never released the save"
        original(self, step, args)

    monkeypatch.setattr(checkpoints.BackgroundSavingManager, "_save_now", held)
    return release


def _leaves(tree):
    return [np.array(x, copy=True) for x in jax.tree.leaves(tree)]


@pytest.mark.slow  # compiles the tiny train step
def test_background_save_keeps_the_state_of_its_step(tmp_path, monkeypatch):
    """The checkpoint of step 2 holds the step-2 state bit for bit, although its save ran only
    after two more steps had donated (deleted) the step-2 arrays. Negative control: handing
    Orbax the state itself instead of its device-side copy fails on the donated arrays."""
    config = tiny_config()
    mesh = parallel.create_mesh(jax.devices()[:1])
    model = create_model(config.model)
    tx = train.create_optimizer(config.train)
    step_fn = train.make_train_step(config, model, tx, mesh)
    iterator = data.create_train_iterator(config, seed=0)
    state = train.create_train_state(config, model, tx, mesh)
    manager = checkpoints.create_manager(str(tmp_path))
    assert isinstance(manager, checkpoints.BackgroundSavingManager)
    release = _held_back_saves(monkeypatch)

    def steps(state, count):
        for _ in range(count):
            donated = jax.tree.leaves(state)
            state, _ = step_fn(state, train.next_batches(iterator, 1, mesh))
            assert all(x.is_deleted() for x in donated)  # the step really took the buffers
        return state

    state = steps(state, 2)
    at_save = _leaves(state)
    checkpoints.save(manager, 2, state, config, {"step": 2})
    state = steps(state, 2)  # runs while the save is held back
    release.set()
    manager.wait_until_finished()
    template = jax.eval_shape(lambda: train.create_train_state(config, model, tx, mesh))
    restored, data_state = checkpoints.restore_train_state(manager, 2, template,
                                                           parallel.replicated(mesh))
    assert data_state == {"step": 2} and int(restored.step) == 2
    assert all(np.array_equal(a, b) for a, b in zip(at_save, _leaves(restored), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(at_save, _leaves(state), strict=True))

    # Negative control: no copy, so the save finds the arrays the next step donated.
    release.clear()
    monkeypatch.setattr(checkpoints, "_device_copy", lambda tree: tree)
    checkpoints.save(manager, 4, state, config, {"step": 4})
    state = steps(state, 1)
    release.set()
    with pytest.raises(RuntimeError, match="deleted"):
        manager.wait_until_finished()
    manager.close()
