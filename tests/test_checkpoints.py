"""How a failed restore reports itself: the innermost cause, and no stray asyncio tracebacks."""
import asyncio
import gc
import logging
import sys
import types

from jax_diffusion import checkpoints


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
