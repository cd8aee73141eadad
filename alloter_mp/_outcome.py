"""Turning what a task's engine sent back into facts for its batch.

Every runner (the local pool, Ray) gets the same ``(code, body)`` reply for a task
from :func:`alloter_mp._task.execute`, and settles it here, so that the errors a
caller sees — :class:`TaskError` with the remote traceback, the original exception
or a :class:`RemoteError` as its cause — are the same whatever ran the task.
"""

from __future__ import annotations

from typing import Any

from . import _transport
from ._batch import Batch, Slot
from ._errors import TaskError

__all__ = ["attach_output", "report_item", "report_outcome", "task_error_from"]


def report_outcome(batch: Batch, slot: Slot, ok: bool, body: Any) -> None:
    """Tell ``batch`` what a worker sent back for ``slot``.

    ``body`` is the pickled result when ``ok``, else the fields of an
    :class:`~alloter_mp._transport.ExceptionInfo`.
    """
    if ok:
        try:
            result = _transport.loads(body)
        except Exception as exc:
            batch.task_failed(slot, _unloadable_result(slot.base, exc))
        else:
            batch.task_returned(slot, result)
        return
    info = _transport.ExceptionInfo(*body)
    cause = _transport.rebuild_exception(info)
    batch.task_failed(slot, task_error_from(slot.base + info.offset, cause, info.traceback))


def report_item(
    batch: Batch,
    slot: Slot,
    offset: int,
    ok: bool,
    body: Any,
    output: tuple[str, str] | None = None,
) -> None:
    """Tell ``batch`` what a worker sent back for item ``offset`` of chunk ``slot``
    (``output``: what the item wrote, when it was captured)."""
    index = slot.base + offset
    if ok:
        try:
            value = _transport.loads(body)
        except Exception as exc:
            batch.item_failed(slot, offset, attach_output(_unloadable_result(index, exc), output))
        else:
            batch.item_returned(slot, offset, value)
        return
    info = _transport.ExceptionInfo(*body)
    cause = _transport.rebuild_exception(info)
    error = task_error_from(index, cause, info.traceback)
    batch.item_failed(slot, offset, attach_output(error, output))


def attach_output(error: TaskError, output: tuple[str, str] | None) -> TaskError:
    """``error`` carrying the captured ``(stdout, stderr)`` of its task, if any."""
    if output is not None:
        error.stdout, error.stderr = output
    return error


def _unloadable_result(index: int, exc: BaseException) -> TaskError:
    error = TaskError(
        index,
        f"the task's result cannot be unpickled in the parent: {exc!r}",
        type_name=type(exc).__name__,
    )
    error.__cause__ = exc
    return error


def task_error_from(index: int, cause: BaseException, remote_traceback: str) -> TaskError:
    """The :class:`TaskError` for a task that raised ``cause``."""
    message = _message(cause)
    error = TaskError(index, message, remote_traceback, type_name=_type_name(cause))
    error.__cause__ = cause
    return error


def _type_name(exc: BaseException) -> str:
    name = getattr(exc, "type_name", None)  # a RemoteError stands for another type
    return name if isinstance(name, str) else type(exc).__name__


def _message(exc: BaseException) -> str:
    message = getattr(exc, "message", None)
    if isinstance(message, str) and type(exc).__name__ == "RemoteError":
        return message
    try:
        return str(exc)
    except Exception:
        return "<unprintable message>"
