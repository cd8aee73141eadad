"""Running batches on Ray: the second runner behind the same batch rules.

One thread per :class:`RayRunner` (its supervisor) owns every Ray task the runner has
in flight. It blocks on one queue of events — "a task's object is ready", "a batch
arrived or ended" — with the nearest timer (a deadline, the end of a grace period)
as its timeout, and on each turn:

* settles finished tasks: the task's own outcome through
  :func:`~alloter_mp._outcome.report_outcome`, a dead worker as
  :class:`WorkerCrashed` (or :class:`MemoryLimitExceeded` when the task's memory
  guard recorded a kill), a task it force-cancelled as killed;
* for a batch that has ended: tells the :class:`~alloter_mp._ray_task.Board`, on
  which every running task's watchdog waits (the task sees ``cancelled()``, and its
  watchdog kills its own worker when ``cancel_grace`` is over), cancels without
  force the tasks Ray has not started (they never run), and cancels with force,
  late, a task that is still not ended (one stuck in C code holding the GIL);
* hands queued tasks to Ray while fewer than ``limit`` of the runner's tasks are in
  flight, one batch after another in turn.

The rules of a call (what ends it, what is skipped, what the outcome is) are the
batch's; this module only reports facts to it, as the local pool does.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from typing import Any

from ._batch import Batch, Slot
from ._errors import AlloterError, Cancelled, MemoryLimitExceeded, TaskError, WorkerCrashed
from ._logreceive import LogReceiver
from ._outcome import report_outcome
from ._ray_task import Board, run_task
from ._sight import position_in
from ._states import TaskStatus

__all__ = ["RayRunner", "import_ray"]

# A task ends itself (its watchdog kills its worker) when the grace is over; the
# driver cancels with force only this long after that, for a task whose watchdog
# could not act. A forced cancel that crosses the reply of a task that has just
# finished makes Ray abort the driver (Ray 2.60: "Tried to complete task that was
# not pending"), so it is kept for tasks that are truly stuck.
FORCE_LATE = 2.0
# Ray drops a forced cancel that closely follows an unforced one (measured: within
# ~10 ms), so a forced cancel is repeated this often until the task's object resolves.
FORCE_AGAIN = 0.1
# A task force-cancelled this long ago whose object never resolved is settled anyway.
KILL_GIVE_UP = 10.0
# How long the board actor may take to start (a new Ray worker process).
BOARD_START = 60.0
# How many times a task whose worker died before the task started is handed again.
HAND_AGAIN_MOST = 3
# Ray may hand a new task to a worker that is dying (killed by its task's watchdog
# or a forced cancel): the driver reuses its lease on that worker. A task handed
# while such a kill may be near (from when a task is told to stop until this long
# after its grace, or after the kill was seen) confirms its start before it runs
# (see run_task).
CONFIRM_WINDOW = 2.0
_kill_window_until = [0.0]  # monotonic; shared by the process's runners, like the lease


def _kills_may_come_until(when: float) -> None:
    _kill_window_until[0] = max(_kill_window_until[0], when + CONFIRM_WINDOW)


_boards: dict[str, Any] = {}
_boards_lock = threading.Lock()


def shared_board(ray: Any) -> tuple[Any, str]:
    """This process's :class:`Board` actor on the Ray it is connected to, and its name.

    It is up and answering. Made on first use and again when the one known no longer
    answers (Ray was shut down and started again, or the actor died).
    """
    with _boards_lock:
        known = _boards.get("board")
        if known is not None:
            try:
                ray.get(known[0].ping.remote(), timeout=BOARD_START)
                return known  # type: ignore[no-any-return]
            except Exception:
                pass
        name = f"alloter_mp-board-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        # Each running task keeps one call waiting on it (see _ray_task._Watchdog).
        actor = ray.remote(Board).options(
            num_cpus=0, max_restarts=0, name=name, max_concurrency=100_000
        )
        board = actor.remote()
        ray.get(board.ping.remote(), timeout=BOARD_START)
        _boards["board"] = (board, name)
        return board, name


def import_ray() -> Any:
    """The ``ray`` module, or an ImportError that names the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(
            "alloter_mp.ray needs Ray, which is not installed: pip install 'alloter-mp[ray]'"
        ) from exc
    return ray


class _Running:
    """One task handed to Ray."""

    __slots__ = (
        "confirm",
        "forced_at",
        "handed",
        "killed_at",
        "ref",
        "run",
        "slot",
        "told",
    )

    def __init__(self, run: _BatchRun, slot: Slot, ref: Any, handed: int, confirm: bool) -> None:
        self.confirm = confirm  # the task confirms its start before it runs
        self.run = run
        self.slot = slot
        self.ref = ref
        self.handed = handed  # how many times it was handed to Ray
        self.told = False  # cancelled without force: the batch ended
        self.killed_at: float | None = None  # first cancelled with force
        self.forced_at = 0.0  # last cancelled with force


class _BatchRun:
    """The runner's bookkeeping for one batch."""

    __slots__ = ("batch", "key", "marked", "paths", "running")

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.key = batch.id
        self.running: set[_Running] = set()
        self.marked = False  # the board knows the batch ended
        # The caller's import path, for the tasks' workers (see run_task).
        self.paths = tuple(os.path.abspath(p) for p in sys.path)


class RayRunner:
    """Runs batches' tasks as Ray tasks, at most ``limit`` in flight at once."""

    def __init__(self, ray: Any, limit: int, num_cpus: float) -> None:
        self._ray = ray
        self._limit = limit
        self._remote = ray.remote(run_task).options(
            num_cpus=num_cpus, max_retries=0, retry_exceptions=False
        )
        # Up before any task runs: a task's memory guard or start notice must never
        # wait for the board to start (and the first call must not pay for it).
        self._board, self._board_name = shared_board(ray)
        self._board_lost = False
        self._logs = LogReceiver()  # the tasks' records, handed to this process's logging
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._runs: deque[_BatchRun] = deque()  # supervisor thread only
        self._in_flight: dict[Any, _Running] = {}  # ObjectRef -> _Running
        self._thread: threading.Thread | None = None
        self._closed = False
        self._broken: AlloterError | None = None  # the supervisor failed: no more calls

    # -- from callers --------------------------------------------------------------

    def submit(self, batch: Batch) -> None:
        """Start running ``batch``; its slots are all settled by this runner."""
        with self._lock:
            if self._broken is not None:
                raise self._broken
            if self._closed:
                raise AlloterError("the alloter is closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._supervise, name="alloter_mp-ray", daemon=True
                )
                self._thread.start()
            batch.notify = self._wake
            self._events.put(("batch", _BatchRun(batch)))

    def close(self, *, wait: bool = True) -> None:
        """End every batch, force-cancel what runs, stop the supervisor (``wait``: for it)."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._events.put(("close", None))
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

    def _wake(self) -> None:
        self._events.put(("wake", None))

    # -- the supervisor --------------------------------------------------------------

    def _supervise(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug here must not hang the callers
            error = AlloterError(f"the Ray supervisor failed: {exc!r}")
            with self._lock:  # from now on submit() refuses: no batch can slip in
                self._broken = error
            # The board too: a task Ray starts after this (it was queued in Ray) is
            # ended by its own watchdog at once, where a cancel may come too late.
            for run in self._runs:
                with contextlib.suppress(Exception):
                    self._board.end.remote(run.key)
            for running in self._in_flight.values():
                with contextlib.suppress(Exception):
                    self._ray.cancel(running.ref, force=True)
            traceback.print_exc(file=sys.stderr)
            for run in [*self._runs, *self._drain_new_batches()]:
                run.batch.fail(error)
                run.batch.abandon()

    def _drain_new_batches(self) -> list[_BatchRun]:
        found: list[_BatchRun] = []
        while True:
            try:
                kind, value = self._events.get_nowait()
            except queue.Empty:
                return found
            if kind == "batch":
                found.append(value)

    def _loop(self) -> None:
        closing = False
        while True:
            timeout = self._next_timer()
            try:
                event: tuple[str, Any] | None = self._events.get(timeout=timeout)
            except queue.Empty:
                event = None
            while event is not None:
                kind, value = event
                if kind == "batch":
                    self._runs.append(value)
                elif kind == "done":
                    self._settle(value)
                elif kind == "close":
                    closing = True
                try:
                    event = self._events.get_nowait()
                except queue.Empty:
                    event = None
            now = time.monotonic()
            if closing:
                for run in self._runs:
                    run.batch.cancel(Cancelled("the alloter was closed"))
            self._handle_endings(now)
            self._dispatch()
            self._forget_settled()
            if closing and not self._runs and not self._in_flight:
                return

    def _next_timer(self) -> float | None:
        soonest: float | None = None
        for run in self._runs:
            batch = run.batch
            if batch.ending:
                unkilled = any(r.killed_at is None for r in run.running)
                grace = batch.grace_deadline
                at = grace + FORCE_LATE if unkilled and grace is not None else None
            else:
                at = batch.deadline
                ready = batch.next_ready_at()
                if ready is not None and (at is None or ready < at):
                    at = ready
            if at is not None and (soonest is None or at < soonest):
                soonest = at
        for running in self._in_flight.values():
            if running.killed_at is not None:
                at = min(running.forced_at + FORCE_AGAIN, running.killed_at + KILL_GIVE_UP)
                if soonest is None or at < soonest:
                    soonest = at
        if soonest is None:
            return None
        return max(0.0, soonest - time.monotonic())

    def _handle_endings(self, now: float) -> None:
        for run in self._runs:
            batch = run.batch
            if not batch.ending and batch.deadline is not None and now >= batch.deadline:
                batch.expire()
            if not batch.ending:
                continue
            grace = batch.grace_deadline
            over = grace is not None and now >= grace + FORCE_LATE
            started: set[int] = set()
            if run.running and not run.marked:
                run.marked = True  # the tasks' watchdogs are waiting for this
                with contextlib.suppress(Exception):
                    self._board.end.remote(run.key)
                known, answer = self._ask_board("started_tasks", run.key)
                started = set(answer) if known else set()
            for running in run.running:
                if not running.told:
                    running.told = True
                    _kills_may_come_until(now + batch.cancel_grace)  # its watchdog's kill
                    if running.slot.index not in started:
                        # Not started (as far as the board knows): Ray drops it from
                        # its queue. A running task is told by its watchdog instead:
                        # Ray's unforced cancel needs the task's GIL, and while it
                        # waits for it no forced cancel reaches that worker.
                        with contextlib.suppress(Exception):
                            self._ray.cancel(running.ref, force=False)
                if over and running.killed_at is None:
                    running.killed_at = now
                    self._force(running, now)
        for running in list(self._in_flight.values()):
            if running.killed_at is None:
                continue
            if now >= running.forced_at + FORCE_AGAIN:
                self._force(running, now)
            if now >= running.killed_at + KILL_GIVE_UP:
                # Ray never said the task ended: settle it, and stop counting it.
                self._forget_running(running)
                running.run.batch.task_killed(running.slot)

    def _force(self, running: _Running, now: float) -> None:
        running.forced_at = now
        _kills_may_come_until(now)
        with contextlib.suppress(Exception):
            self._ray.cancel(running.ref, force=True)

    def _dispatch(self) -> None:
        # One task per batch in turn, so that concurrent calls share the limit.
        while len(self._in_flight) < self._limit:
            handed = False
            for run in self._runs:
                batch = run.batch
                if len(self._in_flight) >= self._limit:
                    return
                if batch.ending or not batch.has_queued():
                    continue
                for slot in batch.take(1):
                    self._hand(run, slot)
                    handed = True
            if not handed:
                return

    def _hand(self, run: _BatchRun, slot: Slot, handed: int = 0) -> None:
        batch = run.batch
        confirm = time.monotonic() < _kill_window_until[0]
        deadline_wall = None
        if batch.deadline is not None:
            deadline_wall = time.time() + (batch.deadline - time.monotonic())
        try:
            ref = self._remote.remote(
                slot.payload,
                run.key,
                slot.index,
                deadline_wall,
                batch.measure,
                batch.memory_limit,
                self._board_name,
                run.paths,
                confirm,
                batch.cancel_grace,
                batch.task_timeout,
                batch.log_snapshot,
                batch.capture_output,
            )
        except Exception as exc:
            batch.task_failed(
                slot, WorkerCrashed(slot.base, None, message=f"Ray refused it: {exc}")
            )
            return
        running = _Running(run, slot, ref, handed + 1, confirm)
        self._in_flight[ref] = running
        run.running.add(running)
        put = self._events.put
        ref.future().add_done_callback(lambda _f, ref=ref: put(("done", ref)))

    def _forget_running(self, running: _Running) -> None:
        self._in_flight.pop(running.ref, None)
        running.run.running.discard(running)

    def _settle(self, ref: Any) -> None:
        running = self._in_flight.get(ref)
        if running is None:
            return  # settled already (given up on after a kill)
        self._forget_running(running)
        if running.told:
            _kills_may_come_until(time.monotonic())  # the window counts from a kill's end too
        batch, slot = running.run.batch, running.slot
        try:
            reply = self._ray.get(ref)
        except Exception as exc:
            self._settle_failure(running, exc)
            return
        code, body, wall, cpu, peak, pid, start, timed_out, frames, output = reply
        if frames:  # before the outcome: the records arrive before the call returns
            self._logs.deliver(frames, position_in(batch))
        slot.output = output
        slot.wall_s, slot.cpu_s, slot.peak_rss, slot.pid = wall, cpu, peak, pid
        batch.started(slot, time.monotonic() - (time.time() - start))
        if timed_out:
            batch.end_task(slot, TaskStatus.TIMEOUT)
        report_outcome(batch, slot, code == 0, body)

    def _settle_failure(self, running: _Running, exc: BaseException) -> None:
        run, slot = running.run, running.slot
        batch = run.batch
        slot.wall_s = time.monotonic() - slot.started  # from the hand-over: Ray's queue too
        if running.told or running.killed_at is not None:
            if batch.measure:  # a report shows the worker even of a killed task
                slot.pid = self._pid_of(run.key, slot.index)[1]
            batch.task_killed(slot)
            return
        if (
            batch.task_timeout is not None
            and self._ask_board("was_timed_out", run.key, slot.index)[1]
        ):
            # Its watchdog ended it at its task timeout and killed its worker.
            slot.pid = self._pid_of(run.key, slot.index)[1]
            batch.end_task(slot, TaskStatus.TIMEOUT)
            batch.task_killed(slot)
            return
        known, slot.pid = self._pid_of(run.key, slot.index)
        ray_exc = self._ray.exceptions
        if (
            running.confirm
            and known
            and slot.pid is None
            and isinstance(exc, ray_exc.WorkerCrashedError)
            and running.handed < HAND_AGAIN_MOST
            and not batch.ending
        ):
            # Its worker died before the task's code could run: Ray handed it to a
            # worker that was dying after a forced cancel. Running it now is no retry.
            self._hand(run, slot, running.handed)
            return
        if batch.memory_limit is not None:
            _, kill = self._ask_board("memory_kill", run.key, slot.index)
            if kill is not None:
                peak, pid = int(kill[0]), int(kill[1])
                slot.peak_rss, slot.pid = peak, pid
                error: TaskError = MemoryLimitExceeded(
                    slot.base, batch.memory_limit, peak, pid, exitcode=-9
                )
                batch.task_failed(slot, error, crashed=True)
                return
        if isinstance(exc, ray_exc.RayTaskError):
            # run_task itself failed (it catches all the task does): say what Ray said.
            error = TaskError(slot.base, str(exc), getattr(exc, "traceback_str", ""))
            error.__cause__ = exc
            batch.task_failed(slot, error)
            return
        message = f"its Ray worker died: {type(exc).__name__}: {_first_line(exc)}"
        if slot.pid is not None:
            message = f"its Ray worker (process {slot.pid}) died: {type(exc).__name__}"
            message += f": {_first_line(exc)}"
        error = WorkerCrashed(slot.base, None, slot.pid, message=message)
        batch.task_failed(slot, error, crashed=True)

    def _ask_board(self, method: str, *args: int) -> tuple[bool, Any]:
        """``(the board answered, its answer)``; a board that failed once is not asked again."""
        if self._board_lost:
            return False, None
        try:
            answer = self._ray.get(getattr(self._board, method).remote(*args), timeout=10.0)
        except Exception:
            self._board_lost = True  # it would cost every later question the timeout
            return False, None
        return True, answer

    def _pid_of(self, key: int, index: int) -> tuple[bool, int | None]:
        """``(the board answered, the pid of the worker the task started in or None)``."""
        known, pid = self._ask_board("pid_of", key, index)
        return known, None if pid is None else int(pid)

    def _forget_settled(self) -> None:
        while self._runs and self._runs[0].batch.settled.is_set():
            self._forget(self._runs.popleft())
        if any(r.batch.settled.is_set() for r in self._runs):
            kept = deque(r for r in self._runs if not r.batch.settled.is_set())
            for r in self._runs:
                if r.batch.settled.is_set():
                    self._forget(r)
            self._runs = kept

    def _forget(self, run: _BatchRun) -> None:
        with contextlib.suppress(Exception):
            self._board.forget.remote(run.key)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
