"""The task's side, whatever engine runs it: the in-task API and running one task.

:func:`cancelled`, :func:`raise_if_cancelled` and :func:`time_left` answer inside a
task from :data:`state`, which the engine running the task sets:

* a pool worker (:mod:`alloter_mp._worker`) points it at its shared words (see
  :mod:`alloter_mp._words`) and sets the batch id, the task's key and deadline
  before each task;
* a Ray task (:mod:`alloter_mp._ray_task`) gives a ``probe`` to ask instead, through
  :func:`foreign_task`.

:func:`execute` runs one task and measures it, and never raises for what the task
does: its outcome comes back as data, the same for every engine.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from . import _transport, _words
from ._errors import Cancelled
from ._measure import PeakMeter

__all__ = [
    "ERR",
    "OK",
    "cancelled",
    "execute",
    "foreign_task",
    "raise_if_cancelled",
    "state",
    "time_left",
]

# Outcome codes of execute().
OK = 0
ERR = 1


class TaskState:
    """What the in-task API reads; set by the engine around each task."""

    __slots__ = (
        "batch_id",
        "call_deadline",
        "deadline",
        "dump_result",
        "in_task",
        "item",
        "item_sink",
        "key",
        "local_cancel",
        "offsets",
        "per_item",
        "probe",
        "seq",
        "task_timeout",
        "words",
    )

    def __init__(self) -> None:
        self.words: memoryview | None = None  # a pool worker's shared words
        self.batch_id = 0
        self.seq = 0  # the running task's number on this worker
        self.key = 0  # the running task's words.task_key()
        self.local_cancel = -1  # a batch this worker saw fail: the rest of it is cancelled
        self.call_deadline: float | None = None  # the call's deadline
        self.task_timeout: float | None = None  # each task's (each chunk item's) own
        self.deadline: float | None = None  # the sooner of the call's and the task's own
        self.in_task = False
        # A map chunk whose items are judged one by one: which items to run, and
        # where each item's outcome goes (sink(seq, offset, code, body, start)).
        self.per_item = False
        self.offsets: list[int] | None = None
        self.item_sink: Callable[[int, int, int, Any, float], None] | None = None
        # The offset of the item a chunk runs outside a pool worker (a pool worker
        # keeps it in its words), for the log records it writes.
        self.item = 0
        # How a task run by another engine (Ray) asks whether it was cancelled.
        self.probe: Callable[[], bool] | None = None
        # How a result is pickled (a pool worker shares big buffers: see _worker).
        self.dump_result: Callable[[Any], Any] = _transport.dumps_result


state = TaskState()


def cancelled() -> bool:
    """``True`` once the batch the current task belongs to has been cancelled.

    A batch is cancelled by its first failure, its timeout, its context or the
    caller's interruption; a task alone is cancelled when its own ``task_timeout``
    passes. Outside a task this is always ``False``. Long tasks should check it now
    and then and return early: they get ``cancel_grace`` seconds before their worker
    is killed.
    """
    if not state.in_task:
        return False
    words = state.words
    if words is None:
        probe = state.probe
        return probe is not None and probe()
    batch_id = state.batch_id
    return bool(
        words[_words.CANCEL_BATCH] == batch_id
        or words[_words.CANCEL_TASK] == state.key
        or state.local_cancel == batch_id
    )


def raise_if_cancelled() -> None:
    """Raise :class:`~alloter_mp.Cancelled` when :func:`cancelled` is ``True``."""
    if cancelled():
        raise Cancelled("the batch of this task was cancelled")


def time_left() -> float | None:
    """Seconds until the current task must end, ``None`` without a deadline or outside a task.

    That is the sooner of the call's deadline (the alloter's timeout or the context's
    deadline) and the task's own ``task_timeout``.
    """
    if not state.in_task or state.deadline is None:
        return None
    return max(0.0, state.deadline - time.monotonic())


def sooner(deadline: float | None, timeout: float | None, start: float) -> float | None:
    """The sooner of ``deadline`` and ``start + timeout`` (either may be ``None``)."""
    if timeout is None:
        return deadline
    own = start + timeout
    return own if deadline is None or own < deadline else deadline


def chunk_words() -> tuple[memoryview, int] | None:
    """For a map chunk in a pool worker: the shared words and the running batch's id.

    A chunk writes each item's offset to ``ITEM``, so that a crash names the item,
    and stops when ``CANCEL_BATCH`` names its batch. Outside a pool worker: ``None``.
    """
    if not state.in_task or state.words is None:
        return None
    return state.words, state.batch_id


@contextlib.contextmanager
def foreign_task(deadline: float | None, probe: Callable[[], bool]) -> Iterator[None]:
    """Around :func:`execute` of another engine's task (Ray): the in-task API's answers.

    ``deadline`` is on this process's monotonic clock; ``probe()`` says whether the
    task's batch was cancelled.
    """
    state.deadline = deadline
    state.probe = probe
    try:
        yield
    finally:
        state.probe = None
        state.deadline = None


def execute(
    load: Callable[..., Any], args: tuple[Any, ...], measure: bool, meter: PeakMeter
) -> tuple[int, Any, float, float, int]:
    """Load a task with ``load(*args)``, run it, measure it.

    Returns ``(code, body, wall, cpu, peak)``: ``body`` is the pickled result (code
    :data:`OK`, by ``state.dump_result``) or an
    :class:`~alloter_mp._transport.ExceptionInfo` (code :data:`ERR`); ``cpu`` and
    ``peak`` only with ``measure`` (else 0). It never raises for what the task does.
    """
    if measure:
        meter.start()
        cpu0 = time.process_time()  # a system call: only for reports
    wall0 = time.perf_counter()
    state.in_task = True
    try:
        task = load(*args)
        result = task()
        del task
    except BaseException as exc:
        state.in_task = False
        code: int = ERR
        body: Any = _transport.capture_exception(exc, skip_frames=1)
    else:
        state.in_task = False
        code = OK
        try:
            body = state.dump_result(result)
        except BaseException as exc:
            code = ERR
            body = unpicklable_result(result, exc)
        del result
    wall = time.perf_counter() - wall0
    if measure:
        return (code, body, wall, time.process_time() - cpu0, meter.peak())
    return (code, body, wall, 0.0, 0)


def unpicklable_result(result: Any, exc: BaseException) -> _transport.ExceptionInfo:
    """The error sent for a task whose result cannot be pickled."""
    info = _transport.capture_exception(exc)
    message = f"the task's result ({type(result).__name__}) cannot be pickled: {info.message}"
    # Send the pickling error itself as the cause, with a message that says what failed.
    return info._replace(message=message, pickled=None)
