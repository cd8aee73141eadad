"""What runs inside a Ray worker: one task of a batch, and the board its batches share.

A task travels to Ray as the same bytes a pool worker would get, and comes back as
the same ``(code, body, wall, cpu, peak)`` a pool worker reports (plus the Ray
worker's pid), so the driver settles it with the same code.

The in-task API answers for a Ray task too:

* ``cancelled()``: when a batch ends, the driver tells the :class:`Board` (a small
  Ray actor) on which the task's watchdog thread waits; the watchdog sets the
  task's flag (seen from every thread of the task) and kills the task's own worker
  once ``cancel_grace`` is over. Ray's own cancellation mark (``is_canceled()``) and
  its interruption of the main thread, which SIGINT handling turns into the same
  flag while a task runs, cover a cancel Ray delivers itself.
* ``time_left()`` reads the batch's deadline, sent as wall-clock time and put back
  on this machine's monotonic clock.
* With a ``memory_limit``, a thread samples the worker's resident memory; past the
  limit it records the peak on the board and kills the worker and its children, so
  the driver can tell a memory kill from a crash.

The task's log records and warnings are kept by a :class:`WorkerRelay` without a
pipe, under the driver's levels and filters, and return with the reply as frames
the driver hands to its logging; with ``capture``, its descriptors 1 and 2 go to
files of this worker meanwhile, and their text returns with the reply too. (A task
whose worker dies takes both with it: no parent holds this worker's files.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from typing import Any

import psutil

from . import _task, _transport
from ._capture import Capture, CaptureFiles
from ._logrelay import Snapshot, WorkerRelay
from ._measure import PeakMeter
from ._task import execute, foreign_task, sooner

__all__ = ["WAIT_SECONDS", "Board", "run_task"]

# A task's watchdog asks the board whether its batch ended in calls of this length.
WAIT_SECONDS = 1.0
# How often a Ray task's resident memory is sampled under a memory limit.
MEMORY_SAMPLE_SECONDS = 0.01
# How long a task waits for an answer of the board.
_BOARD_TIMEOUT = 5.0

_meter: PeakMeter | None = None
_relay: WorkerRelay | None = None
_capture: Capture | None = None


class Board:
    """What an alloter's Ray tasks share: ended batches, their workers, memory kills.

    It runs as a Ray actor, one per driver process shared by its alloters (batch
    keys are unique in a process), with no CPU of its own. The driver
    writes which batches ended; each task writes its worker's pid as it starts (so
    a task that is killed or dies is reported with its worker, as on the pool; when
    asked to, before its code runs, so that a task whose worker died before it
    started is known never to have run) and its memory guard writes a kill. Tasks
    and the driver read.
    """

    def __init__(self) -> None:
        self._ended: dict[int, asyncio.Event] = {}
        self._kills: dict[tuple[int, int], tuple[int, int]] = {}
        self._pids: dict[tuple[int, int], int] = {}
        self._timeouts: set[tuple[int, int]] = set()
        self._ended_at: dict[int, float] = {}

    def _event(self, key: int) -> asyncio.Event:
        event = self._ended.get(key)
        if event is None:
            event = self._ended[key] = asyncio.Event()
        return event

    async def ping(self) -> bool:
        """Answer, to show the board is up."""
        return True

    async def end(self, key: int) -> None:
        """Batch ``key`` has ended: its running tasks should stop."""
        self._ended_at.setdefault(key, time.time())
        self._event(key).set()

    async def wait_end(self, key: int, timeout: float) -> float | None:
        """When batch ``key`` ended (wall-clock seconds), waiting for it at most
        ``timeout`` seconds; ``None`` if it has not."""
        event = self._event(key)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
        if not event.is_set():
            return None
        return self._ended_at.get(key, time.time())

    async def started(self, key: int, index: int, pid: int) -> None:
        """Task ``index`` of batch ``key`` runs in worker process ``pid``."""
        self._pids[(key, index)] = pid

    async def started_tasks(self, key: int) -> list[int]:
        """The indexes of batch ``key``'s tasks that told the board they started."""
        return [index for k, index in self._pids if k == key]

    async def pid_of(self, key: int, index: int) -> int | None:
        """The worker process task ``index`` of batch ``key`` started in, if it did."""
        return self._pids.pop((key, index), None)

    async def over_memory(self, key: int, index: int, peak: int, pid: int) -> None:
        """Task ``index`` of batch ``key`` passed the memory limit (its worker dies next)."""
        self._kills[(key, index)] = (peak, pid)

    async def memory_kill(self, key: int, index: int) -> tuple[int, int] | None:
        """``(peak, pid)`` if task ``index`` of batch ``key`` was killed for its memory."""
        return self._kills.pop((key, index), None)

    async def timed_out(self, key: int, index: int) -> None:
        """Task ``index`` of batch ``key`` ran past its task timeout (it may be killed next)."""
        self._timeouts.add((key, index))

    async def was_timed_out(self, key: int, index: int) -> bool:
        """Whether task ``index`` of batch ``key`` ran past its task timeout."""
        found = (key, index) in self._timeouts
        self._timeouts.discard((key, index))
        return found

    async def forget(self, key: int) -> None:
        """Batch ``key`` is settled: drop what is known of it."""
        event = self._ended.pop(key, None)
        self._ended_at.pop(key, None)
        if event is not None:
            event.set()  # release any task still waiting on it
        for table in (self._kills, self._pids):
            for k in [k for k in table if k[0] == key]:
                del table[k]
        self._timeouts = {k for k in self._timeouts if k[0] != key}


def run_task(
    payload: bytes,
    key: int,
    index: int,
    deadline_wall: float | None,
    measure: bool,
    memory_limit: int | None,
    board_name: str,
    paths: tuple[str, ...],
    confirm: bool,
    grace: float,
    task_timeout: float | None = None,
    log_snapshot: Snapshot | None = None,
    capture: bool = False,
) -> tuple[int, Any, float, float, int, int, float, bool, bytes, tuple[str, str] | None]:
    """The Ray remote function: run one pickled task, measured.

    ``board_name`` names the driver's board actor (a name is cheaper to send than
    its handle, which each worker looks up once). ``paths`` is the driver's
    ``sys.path``: as in a pool worker, modules the driver
    imports by path (a test directory, a script's folder) import here too, where
    those folders exist. With ``confirm`` the task waits until the board has its
    worker's pid before it runs. ``grace`` is how long the task may run on once its
    batch has ended before it kills its own worker (see :class:`_Watchdog`), which
    also ends the task on its own ``task_timeout`` seconds after it started.
    ``log_snapshot``: the driver's logging levels and warning filters, to relay the
    task's records and warnings under (``None``: not relayed); ``capture``: keep
    what it writes to descriptors 1 and 2. Returns ``(code, body, wall, cpu, peak,
    pid, start, timed_out, frames, output)`` (``start`` in wall-clock seconds,
    ``frames`` its relayed records, ``output`` its ``(stdout, stderr)`` or
    ``None``); it never raises for what the task does, so an exception out of Ray
    means the worker or Ray itself failed.
    """
    global _meter
    if _meter is None:
        _meter = PeakMeter()
    _adopt_paths(paths)
    board = _board(board_name)
    notice = board.started.remote(key, index, os.getpid())
    if confirm:
        # Waited for: once the task's code may run, the board knows. A worker Ray
        # hands a task while it is dying (after a forced cancel of its previous
        # task) dies before this, and the driver, finding no pid, knows the task
        # never ran. Waiting costs a few ms, so only tasks handed soon after a
        # forced cancel do it.
        with contextlib.suppress(Exception):
            ray_get(notice, timeout=_BOARD_TIMEOUT)
    start_wall, start = time.time(), time.monotonic()
    deadline = None
    if deadline_wall is not None:
        deadline = start + (deadline_wall - start_wall)
    own_deadline = None if task_timeout is None else start + task_timeout
    probe = _Probe()
    guard = None
    if memory_limit is not None:
        guard = _MemoryGuard(memory_limit, board, key, index)
    watchdog = _Watchdog(board, key, index, grace, probe, own_deadline)
    relay = _start_relay(log_snapshot, index)
    captured = _start_capture() if capture else None
    probe.install()
    output: tuple[str, str] | None = None
    try:
        with foreign_task(sooner(deadline, task_timeout, start), probe):
            outcome = execute(_transport.loads, (payload,), measure or guard is not None, _meter)
    finally:
        watchdog.finish()  # from here on it never kills: the reply is on its way
        probe.uninstall()
        if guard is not None:
            guard.close()
        if captured is not None:
            output = captured.end()
        frames = b""
        if relay is not None:
            frames = relay.take()
            relay.configure(None)  # the worker's own logging back, for Ray's other work
    return (*outcome, os.getpid(), start_wall, watchdog.timed_out, frames, output)


class _ItemOffset:
    """The relay's view of which item of a chunk runs (``Chunk`` marks it in the state)."""

    def __getitem__(self, _word: int) -> int:
        return _task.state.item


def _start_relay(snap: Snapshot | None, index: int) -> WorkerRelay | None:
    global _relay
    if snap is None:
        return None
    if _relay is None:
        _relay = WorkerRelay(None, words=_ItemOffset())
    _relay.configure(snap)
    _relay.index = index
    _task.state.item = 0
    return _relay


def _start_capture() -> Capture:
    global _capture
    if _capture is None:
        _capture = Capture(CaptureFiles.create())
    _capture.begin()
    return _capture


_adopted: tuple[str, ...] = ()
_boards: dict[str, Any] = {}


def _board(name: str) -> Any:
    board = _boards.get(name)
    if board is None:
        import ray

        board = _boards[name] = ray.get_actor(name)
    return board


def ray_get(ref: Any, timeout: float) -> Any:
    import ray

    return ray.get(ref, timeout=timeout)


def _adopt_paths(paths: tuple[str, ...]) -> None:
    global _adopted
    if paths == _adopted:
        return
    for path in paths:
        if path not in sys.path and os.path.isdir(path):
            sys.path.append(path)  # after the worker's own: its packages come first
    _adopted = paths


class _Probe:
    """``cancelled()`` for a Ray task; while installed, SIGINT only sets its flag."""

    def __init__(self) -> None:
        self.cancelled = False  # also set by the watchdog, for the task's other threads
        self._previous: Any = None
        self._context: Any = None
        self._main = threading.main_thread()

    def install(self) -> None:
        import ray

        self._context = ray.get_runtime_context()
        if threading.current_thread() is self._main:
            previous = signal.signal(signal.SIGINT, self._on_interrupt)
            self._previous = getattr(previous, "previous", previous)  # unwrap an absorber

    def _on_interrupt(self, signum: int, frame: Any) -> None:
        self.cancelled = True

    def __call__(self) -> bool:
        if not self.cancelled and threading.current_thread() is self._main:
            # Ray's own mark, in case its interruption has not reached Python yet
            # (it is visible to the main thread only). Only ever set: the watchdog
            # may set the flag while this reads Ray's mark.
            with contextlib.suppress(Exception):
                if self._context.is_canceled():
                    self.cancelled = True
        return self.cancelled

    def uninstall(self) -> None:
        if self._previous is not None:
            # Ray's unforced cancel may trip SIGINT just as the task ends; the handler
            # then runs at the main thread's next bytecode, perhaps inside the next
            # task, where a KeyboardInterrupt would break it (or the worker). So the
            # next SIGINT is absorbed once, then the previous handler is back.
            signal.signal(signal.SIGINT, _Absorber(self._previous))
            self._previous = None


class _Absorber:
    """A SIGINT handler that swallows one interrupt, then puts ``previous`` back."""

    def __init__(self, previous: Any) -> None:
        self.previous = previous

    def __call__(self, signum: int, frame: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self.previous)


class _Watchdog:
    """Ends the task ``grace`` seconds after its batch ended, by killing its own worker.

    The driver tells the board when a batch ends; this thread waits on the board for
    that (one call at a time, each returning within :data:`WAIT_SECONDS`), then sets
    the task's ``cancelled()`` flag — for the task's other threads too — and, if the
    task still runs when the grace is over, SIGKILLs the worker's process group, its
    children and the worker. A forced ``ray.cancel`` from the driver would do the
    same, but Ray aborts the driver when such a cancel crosses the reply of a task
    that had just finished; a worker that dies is an ordinary event for Ray. The
    driver still cancels with force, later, a task this thread could not end (one
    stuck in C code holding the GIL).

    With ``own_deadline`` (the task's own timeout) the watchdog ends the task the
    same way when that passes, after noting it on the board (``timed_out`` says so
    in the task's reply, if it returns by itself within the grace).
    """

    def __init__(
        self,
        board: Any,
        key: int,
        index: int,
        grace: float,
        probe: _Probe,
        own_deadline: float | None = None,
    ) -> None:
        self._board = board
        self._key = key
        self._index = index
        self._grace = grace
        self._probe = probe
        self._own_deadline = own_deadline
        self.timed_out = False
        self._lock = threading.Lock()
        self._done = threading.Event()
        thread = threading.Thread(target=self._watch, name="alloter_mp-watchdog", daemon=True)
        thread.start()

    def _watch(self) -> None:
        ended: float | None = None
        while not self._done.is_set():
            wait = WAIT_SECONDS
            if self._own_deadline is not None:
                left = self._own_deadline - time.monotonic()
                if left <= 0:
                    self._time_out()
                    break
                wait = min(wait, left)
            try:
                ended = ray_get(self._board.wait_end.remote(self._key, wait), 30.0 + wait)
            except Exception:
                return  # the board is gone: the driver's forced cancel remains
            if ended is not None:
                break
        if self._done.is_set():
            return
        self._probe.cancelled = True
        # The grace counts from the batch's end, not from now: a task Ray started
        # only after its batch had ended (it was handed before) gets no more time.
        grace = self._grace
        if ended is not None:
            grace = max(0.0, ended + self._grace - time.time())
        if self._done.wait(grace):
            return
        with self._lock:
            if self._done.is_set():
                return
            _kill_this_worker()

    def _time_out(self) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self.timed_out = True
        with contextlib.suppress(Exception):  # noted before the kill can come
            ray_get(self._board.timed_out.remote(self._key, self._index), _BOARD_TIMEOUT)

    def finish(self) -> None:
        # Under the lock: a kill already decided completes before the reply is sent.
        with self._lock:
            self._done.set()


def _kill_this_worker() -> None:
    with contextlib.suppress(Exception):
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(Exception):
                child.kill()
    with contextlib.suppress(OSError):
        if os.getpgid(0) == os.getpid():  # Ray gives each worker a group of its own
            os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


class _MemoryGuard:
    """Kills this Ray worker when its resident memory passes the limit."""

    def __init__(self, limit: int, board: Any, key: int, index: int) -> None:
        self._process = psutil.Process()
        self._limit = limit
        self._board = board
        self._key = key
        self._index = index
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="alloter_mp-memory", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(MEMORY_SAMPLE_SECONDS):
            try:
                rss = int(self._process.memory_info().rss)
            except Exception:
                return
            if rss > self._limit:
                self._kill(rss)

    def _kill(self, peak: int) -> None:
        with contextlib.suppress(Exception):
            note = self._board.over_memory.remote(self._key, self._index, peak, os.getpid())
            ray_get(note, _BOARD_TIMEOUT)  # recorded before the worker dies
        _kill_this_worker()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
