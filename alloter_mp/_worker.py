"""The worker process: its main loop, and the in-task API (``cancelled()`` & co).

A worker:

* starts a session of its own, so killing its process group reaches every process
  a task started, and a Ctrl-C meant for the parent does not reach it;
* watches a lifeline pipe from the parent in a small thread: when the parent dies
  the pipe reaches EOF and the worker kills its own group, so nothing is orphaned;
* turns on ``faulthandler``, so a segfault leaves its stack on stderr;
* reads task messages, keeps the tasks in a local queue and runs them in order; a
  task of a batch the parent has cancelled (a flag in shared memory) is skipped;
* sends results back in small groups (an error at once), with the wall time, CPU
  time and, when asked, the peak resident memory of each task.

The worker knows nothing of batches beyond the ids it echoes back.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import pickle
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from . import _threads, _transport
from ._errors import Cancelled
from ._measure import PeakMeter

__all__ = ["cancelled", "raise_if_cancelled", "time_left", "worker_main"]

# Message kinds, parent -> worker.
# The blob, when not None, is the whole batch's task list pickled at once; items
# then carry None and the worker takes task ``index`` from it.
TASKS = 1  # (TASKS, batch_id, deadline, measure, blob, [(index, payload), ...])
STOP = 2  # (STOP,)
# Worker -> parent.
RESULTS = 3  # (RESULTS, batch_id, [(index, code, payload, wall, cpu, peak), ...])
INIT_FAILED = 4  # (INIT_FAILED, ExceptionInfo)

# Result codes.
OK = 0
ERR = 1
SKIPPED = 2

# Results are held back at most this long (or this many) so that tiny tasks do not
# pay a message each; an error is sent at once.
_FLUSH_AFTER = 0.002
_FLUSH_COUNT = 256


class _TaskState:
    """What the in-task API reads: set only inside a worker process."""

    flag: Any = None  # shared int64 array: [cancelled batch id, item offset in a chunk]
    view: memoryview | None = None  # the same two words, cheaper to touch
    batch_id: int = 0
    local_cancel: int = -1  # a batch this worker saw fail: skip the rest of it
    deadline: float | None = None
    in_task: bool = False
    # How a task run by another engine (Ray) asks whether its batch was cancelled;
    # ``view`` is then None.
    probe: Callable[[], bool] | None = None


_state = _TaskState()


def cancelled() -> bool:
    """``True`` once the batch the current task belongs to has been cancelled.

    A batch is cancelled by its first failure, its timeout, its context or the
    caller's interruption. Outside a task this is always ``False``. Long tasks should
    check it now and then and return early: they get ``cancel_grace`` seconds before
    their worker is killed.
    """
    if not _state.in_task:
        return False
    words = _state.view
    if words is None:
        probe = _state.probe
        return probe is not None and probe()
    return bool(words[0] == _state.batch_id or _state.local_cancel == _state.batch_id)


def raise_if_cancelled() -> None:
    """Raise :class:`~alloter_mp.Cancelled` when :func:`cancelled` is ``True``."""
    if cancelled():
        raise Cancelled("the batch of this task was cancelled")


def chunk_view() -> tuple[memoryview, int] | None:
    """For a chunk runner: the shared words (cancelled batch, item offset) and our batch.

    A chunk writes each item's offset to word 1, so that a crash names the item,
    and stops when word 0 names its batch. A memoryview makes both cheap enough to
    do per item; outside a worker this is ``None``.
    """
    if not _state.in_task or _state.view is None:
        return None
    return _state.view, _state.batch_id


def time_left() -> float | None:
    """Seconds until the current batch's deadline, ``None`` without one or outside a task."""
    if not _state.in_task or _state.deadline is None:
        return None
    return max(0.0, _state.deadline - time.monotonic())


@contextlib.contextmanager
def foreign_task(deadline: float | None, probe: Callable[[], bool]) -> Iterator[None]:
    """Around :func:`execute` of another engine's task (Ray): the in-task API's answers.

    ``deadline`` is on this process's monotonic clock; ``probe()`` says whether the
    task's batch was cancelled.
    """
    _state.deadline = deadline
    _state.probe = probe
    try:
        yield
    finally:
        _state.probe = None
        _state.deadline = None


# -- the process ---------------------------------------------------------------


def _watch_lifeline(lifeline: Any) -> None:
    """Kill this worker's whole group when the parent's end of the lifeline closes.

    This is the only parent-death mechanism on purpose: ``PR_SET_PDEATHSIG`` would
    have the kernel SIGKILL the worker the moment its parent dies, before this
    thread could end the processes the running task started.
    """
    with contextlib.suppress(OSError, EOFError):
        lifeline.poll(None)
    # The parent is gone (or closed the pipe): nobody will read our results.
    # Children that left our group (a session of their own) are reached through psutil.
    with contextlib.suppress(Exception):
        import psutil

        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(Exception):
                child.kill()
    with contextlib.suppress(OSError):
        os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(70)


def _become_group_leader() -> None:
    with contextlib.suppress(OSError):
        os.setsid()


def worker_main(
    conn: Any,
    flag: Any,
    lifeline: Any,
    lifeline_w: Any,
    init_payload: bytes | None,
    thread_env: dict[str, str] | None = None,
) -> None:
    """Entry point of a worker process (the target of ``multiprocessing.Process``)."""
    _threads.apply_env(thread_env)  # before the initializer or a task loads a BLAS
    _become_group_leader()
    # The parent owns Ctrl-C: it cancels the batch, and kills us if need be.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    faulthandler.enable()
    with contextlib.suppress(Exception):
        lifeline_w.close()  # under fork we inherited the parent's end: drop it
    threading.Thread(target=_watch_lifeline, args=(lifeline,), daemon=True).start()
    _state.flag = flag
    _state.view = memoryview(flag).cast("B").cast("q")

    if init_payload is not None:
        try:
            initializer, initargs = _transport.loads(init_payload)
            initializer(*initargs)
        except BaseException as exc:
            info = _transport.capture_exception(exc, skip_frames=1)
            with contextlib.suppress(OSError):
                conn.send_bytes(pickle.dumps((INIT_FAILED, info), _transport.PROTOCOL))
            os._exit(3)
    _serve(conn, flag)


def _serve(conn: Any, flag: Any) -> None:
    meter = PeakMeter()
    blobs = _Blobs()
    queue: deque[tuple[int, float | None, bool, int, bytes]] = deque()
    out: list[tuple[Any, ...]] = []
    out_batch = 0
    out_since = 0.0
    recv = conn.recv_bytes
    send = conn.send_bytes
    poll = conn.poll
    dumps = pickle.dumps
    protocol = _transport.PROTOCOL

    def flush() -> None:
        nonlocal out
        if out:
            send(dumps((RESULTS, out_batch, out), protocol))
            out = []

    while True:
        # Block only when there is nothing to do and nothing left to report.
        if not queue:
            flush()
        # Read what the parent sent only when running low: tasks sent ahead wait in
        # the pipe meanwhile, and a poll per task would cost more than a tiny task.
        while not queue or (len(queue) < 2 and poll()):
            try:
                msg = pickle.loads(recv())
            except (EOFError, OSError):
                return
            if msg[0] == STOP:
                flush()
                return
            _, batch_id, deadline, measure, blob, items = msg
            if blob is not None:
                blobs.set(batch_id, blob)
            for index, payload in items:
                queue.append((batch_id, deadline, measure, index, payload))
        batch_id, deadline, measure, index, payload = queue.popleft()
        if out and (batch_id != out_batch):
            flush()
        if not out:
            out_batch = batch_id
            out_since = time.monotonic()
        if flag[0] == batch_id or _state.local_cancel == batch_id:
            out.append((index, SKIPPED, None, 0.0, 0.0, 0))
            continue
        item = _run_one(batch_id, deadline, measure, index, payload, blobs, meter)
        out.append(item)
        if item[1] == ERR:
            # Any failure ends its batch: skip what we hold of it, tell the parent now.
            _state.local_cancel = batch_id
            flush()
        elif len(out) >= _FLUSH_COUNT or time.monotonic() - out_since >= _FLUSH_AFTER:
            flush()


class _Blobs:
    """The task list of the batch this worker serves, unpickled on first use."""

    def __init__(self) -> None:
        self.batch_id = 0
        self.blob: bytes | None = None
        self.tasks: list[Any] | None = None

    def set(self, batch_id: int, blob: bytes) -> None:
        self.batch_id, self.blob, self.tasks = batch_id, blob, None

    def task(self, batch_id: int, index: int) -> Any:
        if batch_id != self.batch_id or self.blob is None:
            raise RuntimeError(f"no task list for batch {batch_id}")  # a bug, said loudly
        if self.tasks is None:
            self.tasks = pickle.loads(self.blob)
        return self.tasks[index]


def _run_one(
    batch_id: int,
    deadline: float | None,
    measure: bool,
    index: int,
    payload: bytes | None,
    blobs: _Blobs,
    meter: PeakMeter,
) -> tuple[Any, ...]:
    _state.batch_id = batch_id
    _state.deadline = deadline
    words = _state.view  # the shared words, through the cheaper memoryview
    assert words is not None
    words[1] = 0
    words[2] = index + 1  # a crash names this task, not one whose result is held back
    if payload is None:
        outcome = execute(blobs.task, (batch_id, index), measure, meter)
    else:
        outcome = execute(pickle.loads, (payload,), measure, meter)
    words[2] = 0
    return (index, *outcome)


def execute(
    load: Callable[..., Any], args: tuple[Any, ...], measure: bool, meter: PeakMeter
) -> tuple[int, Any, float, float, int]:
    """Load a task with ``load(*args)``, run it, measure it.

    Returns ``(code, body, wall, cpu, peak)``: ``body`` is the pickled result (code
    ``OK``) or an :class:`~alloter_mp._transport.ExceptionInfo` (code ``ERR``). It
    never raises for what the task does.
    """
    if measure:
        meter.start()
    wall0 = time.perf_counter()
    cpu0 = time.process_time()
    _state.in_task = True
    try:
        task = load(*args)
        result = task()
        del task
    except BaseException as exc:
        _state.in_task = False
        code: int = ERR
        body: Any = _transport.capture_exception(exc, skip_frames=1)
    else:
        _state.in_task = False
        code = OK
        try:
            body = _transport.dumps_result(result)
        except BaseException as exc:
            code = ERR
            body = _unpicklable_result(result, exc)
        del result
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    peak = meter.peak() if measure else 0
    return (code, body, wall, cpu, peak)


def _unpicklable_result(result: Any, exc: BaseException) -> _transport.ExceptionInfo:
    info = _transport.capture_exception(exc)
    message = f"the task's result ({type(result).__name__}) cannot be pickled: {info.message}"
    # Send the pickling error itself as the cause, with a message that says what failed.
    return info._replace(message=message, pickled=None)
