"""WorkerPool: worker processes and the one supervisor thread that runs them.

Data flow::

    caller thread                 supervisor thread (one per pool)         worker process
    -------------                 --------------------------------         --------------
    exec(*tasks)
      pickle tasks
      Batch(slots, deadline) ---> inbox + wake-up pipe
      wait on batch.decided       wait() on worker pipes, worker sentinels,
      (expires it at deadline)    the wake-up pipe and the nearest timer
                                    dispatch: (batch, [(seq, task)]) -------> run in order,
                                                                             say in shared words
                                                                             which seq runs;
                                                                             skip an ended batch
                                    results  <------------------------------ (ok | err | skipped)
                                    batch.task_returned / task_failed
                                    batch ended -> set cancel flags, at the
                                      grace deadline kill what still runs
                                    sentinel fired -> settle its tasks,
                                      kill its group, start a new worker
      <- results or first error

What happens, by actor:

* The caller pickles its tasks, hands a :class:`~alloter_mp._batch.Batch` to the
  pool and waits on ``batch.decided``. At the batch's deadline the caller itself
  expires the batch, so the timeout does not depend on the supervisor being quick.
* The supervisor owns every worker. It blocks in one selector (epoll on Linux)
  on each worker's pipe and process sentinel plus a wake-up pipe of its own, with
  the nearest timer (deadline, grace, kill escalation, memory sample) as timeout.
  Results, deaths, new batches and endings are all events of that one loop. It
  records exactly which worker holds which tasks (``WorkerHandle.pipeline``), so every
  death settles every task the worker could hold: the one running is blamed, those
  it never started (as its shared words tell) go back to the queue.
* A worker runs the tasks it is sent in order and reports each one. Several small
  tasks of one batch may be sent ahead to a worker so that tiny tasks do not pay a
  round trip each; a worker holds tasks of one batch at a time, so one shared word
  per worker ("this batch is cancelled") is enough to make it skip what it holds.

The batch rules (who failed first, which tasks are skipped, cancelled or timed out)
live in :mod:`alloter_mp._batch`; this module only reports facts to batches.
"""

from __future__ import annotations

import atexit
import contextlib
import heapq
import importlib
import math
import multiprocessing
import multiprocessing.util
import os
import pickle
import select
import selectors
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from . import _shm, _sight, _task, _threads, _transport, _words, _worker
from ._batch import Batch, Latch, Slot
from ._errors import (
    AlloterError,
    Cancelled,
    InitializerFailed,
    MemoryLimitExceeded,
    TaskError,
    WorkerCrashed,
)
from ._handle import WorkerHandle, WorkerStats
from ._messages import MessageReader
from ._options import check_limit, check_positive, default_limit
from ._outcome import attach_output, report_item, report_outcome
from ._poolrun import PoolRun, Quota
from ._states import KillReason, TaskStatus

__all__ = ["DEFAULT_START_METHOD", "WorkerPool", "elastic_pool", "submit"]


def _default_start_method() -> str:
    # The parent always has a thread (the supervisor), and forking a process that has
    # threads can deadlock the child; "forkserver" forks from a clean single-threaded
    # server instead, and is nearly as quick to start a worker as "fork" once the
    # server runs (measured in the README). "spawn" is the portable fallback.
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


DEFAULT_START_METHOD = _default_start_method()


def _default_for_this_main() -> str:
    # forkserver and spawn workers re-import the main module from its file. A program
    # with no such file (piped in: ``python - < job.py``) would kill every worker at
    # start, so the default falls back to fork there; tasks travel by value anyway.
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    path = getattr(main, "__file__", None)
    if (
        DEFAULT_START_METHOD != "fork"
        and spec is None
        and isinstance(path, str)
        and not os.path.isfile(path)
        and "fork" in multiprocessing.get_all_start_methods()
    ):
        return "fork"
    return DEFAULT_START_METHOD


# How often a worker's memory is sampled while a task with a memory limit runs.
MEMORY_SAMPLE = 0.01
# Tasks are sent ahead to a busy worker only while this many bytes are in flight, so
# the parent never blocks writing to a worker that is itself writing a big result.
AHEAD_BYTES = 32 * 1024
# Send ahead about this much work per worker (judged by the batch's task times).
AHEAD_SECONDS = 0.005
AHEAD_MOST = 256
# How long close() waits for workers to stop by themselves before killing them.
STOP_WAIT = 2.0
# How long a caller reads a worker lent to it before giving it back to the
# supervisor (Ctrl-C waits that long at most meanwhile).
LEND_MOST = 0.02
# How long the supervisor waits for the descriptors a result message announces
# (its worker sends them right after it; a worker that never does is killed).
FDS_WAIT = 5.0


_live_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


@atexit.register
def _close_all_at_exit() -> None:
    # Registered after multiprocessing's own exit hook (imported above), so it runs
    # first: multiprocessing would otherwise wait for our non-daemon workers forever.
    for pool in list(_live_pools):
        with contextlib.suppress(Exception):
            pool.close(wait=True, timeout=STOP_WAIT)


class WorkerPool:
    """A pool of worker processes that one or several alloters may share.

    ``size`` workers at most (``None`` or ``0``: :func:`available_cpus`), started on
    first use and kept warm. ``initializer(*initargs)`` runs once in each worker;
    ``max_tasks_per_worker`` replaces a worker after that many tasks. Each worker's
    native thread pools (OpenMP, BLAS, numexpr) start with ``threads_per_worker``
    threads (default: the usable CPUs shared out among ``size`` workers, at least
    1) unless the environment sets their variables. An alloter
    given this pool through ``with_pool`` never closes it: ``close()`` (or the
    ``with`` block) does.
    """

    def __init__(
        self,
        size: int | None = None,
        *,
        start_method: str | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: Iterable[Any] = (),
        max_tasks_per_worker: int | None = None,
        threads_per_worker: int | None = None,
    ) -> None:
        self._size = check_limit("size", size) or default_limit()
        self._threads = _threads.thread_count(
            self._size, check_positive("threads_per_worker", threads_per_worker)
        )
        method = start_method if start_method is not None else _default_for_this_main()
        if method not in multiprocessing.get_all_start_methods():
            raise ValueError(
                f"start_method must be one of {multiprocessing.get_all_start_methods()}, "
                f"not {method!r}"
            )
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be callable")
        initargs = tuple(initargs)
        check_positive("max_tasks_per_worker", max_tasks_per_worker)
        self.start_method = method
        self._ctx: Any = multiprocessing.get_context(method)
        if method == "forkserver":
            _preload_worker_in_forkserver(self._ctx)
        self._init_payload = (
            _transport.dumps((initializer, initargs)) if initializer is not None else None
        )
        self._max_tasks = max_tasks_per_worker
        # An elastic pool (an Alloter's) starts a worker per task; see elastic_pool().
        self._elastic = False
        self._pid = os.getpid()

        # Guards the supervisor's state below: the supervisor holds it but while it
        # waits, a caller while it hands out tasks itself (see _direct_ok). Reentrant:
        # a callback run by the supervisor (a future's) may submit.
        self._lock = threading.RLock()
        self._lends = 0  # workers lent to callers so far (see _direct_ok)
        self._inbox: deque[PoolRun] = deque()
        # Runs whose batch has news (its notify was called), from any thread.
        self._poked: deque[PoolRun] = deque()
        self._closing = False
        self._broken: BaseException | None = None
        self._thread: threading.Thread | None = None
        # A wake-up byte is in the pipe and the supervisor has not looked yet: more
        # wake-ups until it does would only cost system calls.
        self._wake_pending = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        self._lifeline_r, self._lifeline_w = self._ctx.Pipe(duplex=False)

        # Owned by the supervisor thread. Every run it has not let go of (``_runs``)
        # and, so that no turn of the loop walks them all (thousands of calls may
        # be waiting at once), the few it must look at: those with tasks to hand
        # over, in order (``_waiting``), those ending, those with a retry waiting
        # for its delay, their deadlines (a heap), and those that had news since
        # the last turn (``_touched``).
        self._workers: list[WorkerHandle] = []
        self._runs: dict[PoolRun, None] = {}
        self._waiting: deque[PoolRun] = deque()
        self._ending: dict[PoolRun, None] = {}
        self._delayed_runs: dict[PoolRun, None] = {}
        self._deadlines: list[tuple[float, int, PoolRun]] = []
        self._touched: set[PoolRun] = set()
        self._readers: dict[WorkerHandle, MessageReader] = {}
        # Settled runs whose workers were told to let go of their shared segments.
        self._freeing: dict[int, PoolRun] = {}
        # Every worker's pipe and sentinel plus the wake-up pipe, registered once:
        # rebuilding the set on each turn of the loop costs more than the turn.
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        # Its epoll object, where it has one: lending a worker only changes the
        # kernel's interest in its pipe (see _watch).
        epoll = getattr(self._selector, "_selector", None)
        self._epoll: Any = (
            epoll if _epoll_type is not None and isinstance(epoll, _epoll_type) else None
        )
        _live_pools.add(self)

    # -- public ----------------------------------------------------------------

    @property
    def size(self) -> int:
        """The most workers this pool runs at once."""
        return self._size

    @property
    def closed(self) -> bool:
        """``True`` once ``close()`` was called."""
        return self._closing

    def stats(self) -> list[WorkerStats]:
        """One :class:`WorkerStats` per live worker (pid, rss, cpu percent, tasks done)."""
        rows = []
        for w in list(self._workers):
            if w.kill_reason is None:
                row = w.read_stats()
                if row is not None:
                    rows.append(row)
        return rows

    def close(self, *, wait: bool = True, timeout: float | None = None) -> None:
        """Stop every worker: running calls end with :class:`Cancelled`. Idempotent."""
        with self._lock:
            first = not self._closing
            self._closing = True
            thread = self._thread
        if first:
            self._wake()
            if thread is None:
                self._release()
        if wait and thread is not None and thread is not threading.current_thread():
            # A first call may have made the thread and not started it yet (it starts
            # it right after handing out its tasks): join() refuses a thread not started.
            end = None if timeout is None else time.monotonic() + timeout
            while thread.ident is None and (end is None or time.monotonic() < end):
                time.sleep(0.001)
            with contextlib.suppress(RuntimeError):
                thread.join(None if end is None else max(0.0, end - time.monotonic()))

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closing else "open"
        return f"<WorkerPool size={self._size} start_method={self.start_method!r} {state}>"

    # -- for the alloters --------------------------------------------------------

    def _submit(self, batch: Batch, quota: Quota) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError("a WorkerPool cannot be used from a forked child process")
        run = PoolRun(batch, quota)
        poked, wake = self._poked, self._wake

        def notify() -> None:
            poked.append(run)
            wake()

        batch.notify = notify
        if batch.log_snapshot is not None:
            batch.logs_drained = Latch()
        lent = None
        starting = None
        with _sigint_deferred():
            with self._lock:
                if self._closing:
                    raise AlloterError("the pool is closed")
                if self._broken is not None:
                    raise AlloterError("the pool's supervisor failed") from self._broken
                if self._thread is None:
                    # Started once the first tasks are out: Thread.start() waits for the
                    # thread to run, and the first workers need not wait for that.
                    starting = self._thread = threading.Thread(
                        target=self._supervise,
                        name=f"alloter_mp-supervisor-{id(self):x}",
                        daemon=True,
                    )
                if self._direct_ok(run):
                    lent = self._hand_out(run, lend=_lendable(batch))
                    if lent is None:
                        self._adopt(run)
                    # The supervisor must look at tasks still queued (it may start
                    # workers), at the timers of running ones (memory samples, task
                    # timeouts) and at the deadline; a lent run comes back to it later.
                    look = lent is None and (
                        batch.has_queued()
                        or batch.memory_limit is not None
                        or batch.task_timeout is not None
                        or batch.deadline is not None
                    )
                else:
                    self._inbox.append(run)
                    look = True
            if starting is not None:
                starting.start()
            elif look:
                self._wake()
            if lent is not None:
                self._wait_lent(lent, run)

    # -- the caller's own dispatch ------------------------------------------------

    def _direct_ok(self, run: PoolRun) -> bool:
        """Whether the caller may hand ``run``'s first tasks out itself.

        That spares the round trip through the supervisor's wake-up pipe (and the
        wait for its thread to start, on a cold pool). A batch of one task goes
        further: its worker is lent to the caller, which reads the reply itself for
        up to ``LEND_MOST`` seconds, then gives it back (see :meth:`_lend`). Nothing
        else changes: the run is the supervisor's like any other (its timers,
        endings and deaths), the worker's ``pipeline`` says which tasks it holds.
        Not when work is already waiting (it goes first), nor from the supervisor's
        own thread (a callback submitting).
        """
        if (
            self._inbox
            or self._waiting
            or threading.current_thread() is self._thread
            or run.batch.decided.is_set()
        ):
            return False
        return self._can_spawn() or any(
            w.idle and w.run is None and w.room != 0 and w.conn_open for w in self._workers
        )

    def _adopt(self, run: PoolRun) -> None:
        """Make a run handed out by its caller the supervisor's, as _take_inbox does."""
        if run.forgotten:
            return
        self._runs[run] = None
        deadline = run.batch.deadline
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, run.batch.id, run))
        self._touched.add(run)

    def _hand_out(self, run: PoolRun, *, lend: bool = False) -> WorkerHandle | None:
        """Send a new run's tasks: to idle workers, then to new ones while the pool may
        grow. With ``lend``, the first worker sent to is lent to the calling thread
        first (returned; see :meth:`_lend`)."""
        batch = run.batch
        quota = run.quota
        depth = _ahead_depth(run)
        lent: WorkerHandle | None = None

        def give(w: WorkerHandle) -> None:
            nonlocal lent
            if lend and lent is None:
                self._lend(w)  # before the task goes: its reply must not wake the supervisor
                lent = w
            self._send(w, run, batch.take(w.cap(min(depth, self._share(batch)))))

        for w in self._workers:
            if not batch.has_queued() or quota.full():
                break
            if w.idle and w.run is None and w.room != 0 and w.conn_open:
                give(w)
        if batch.has_queued() and not quota.full():
            for w in self._start_workers(run, depth):
                if not batch.has_queued() or quota.full():
                    break
                give(w)
        if lent is not None and lent.run is not run:
            self._give_back(lent, run)  # nothing was sent to it after all
            lent = None
        return lent

    def _start_workers(self, run: PoolRun, depth: int) -> list[WorkerHandle]:
        """New workers for ``run``'s queued tasks, as many as the pool may grow by.

        All are started before any is sent a task: under fork, what the parent
        writes between two forks stays private to the earlier child.
        """
        batch = run.batch
        quota = run.quota
        wanted = _ceil_div(batch.queued_count(), max(1, min(depth, self._share(batch))))
        if quota.limit is not None:
            wanted = min(wanted, quota.limit - quota.active)
        started: list[WorkerHandle] = []
        while len(started) < wanted and self._can_spawn():
            try:
                started.append(self._spawn())
            except Exception as exc:  # out of processes or descriptors, say
                if not started and not run.holders:
                    batch.fail(AlloterError(f"could not start a worker process: {exc!r}"))
                break
        return started

    def _lend(self, w: WorkerHandle) -> None:
        """The caller reads ``w``'s pipe for a while (the supervisor still watches its
        sentinel: a death is its to settle, under the lock, as ever)."""
        self._lends += 1
        w.lent = True
        self._watch(w, False)

    def _watch(self, w: WorkerHandle, on: bool) -> None:
        """Have the supervisor's selector watch ``w``'s pipe, or stop watching it."""
        fd = w.conn.fileno()
        epoll = self._epoll
        try:  # (not contextlib.suppress: this runs twice per call of one task)
            if epoll is not None:
                # The pipe stays registered: only the kernel's interest changes, which
                # costs a system call instead of the selector's bookkeeping each way.
                epoll.modify(fd, _EPOLLIN if on else 0)
            elif on:
                self._selector.register(fd, selectors.EVENT_READ, (w, "conn"))
            else:
                self._selector.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass

    def _wait_lent(self, w: WorkerHandle, run: PoolRun) -> None:
        """Read what the lent worker sends until the batch is decided, the worker
        dies, or ``LEND_MOST`` passes; then give it back to the supervisor."""
        batch = run.batch
        end = time.monotonic() + LEND_MOST
        if batch.deadline is not None:
            end = min(end, batch.deadline)
        if w.waiter is None:
            w.waiter = w.conn.waiter()  # the caller lending it is its only user
        poll = w.waiter
        try:
            while not batch.decided.is_set():
                left = end - time.monotonic()
                if left <= 0 or not poll(left):
                    break  # taking long: the supervisor reads it from here on
                with self._lock:
                    if not w.conn_open:
                        break  # it died meanwhile and the supervisor settled it
                    self._read(w)
        finally:
            with self._lock:
                self._give_back(w, run)

    def _give_back(self, w: WorkerHandle, run: PoolRun) -> None:
        w.lent = False
        if w.conn_open:
            self._watch(w, True)  # level-triggered: what waits wakes the supervisor now
        if run.batch.settled.is_set() and not run.holders:
            self._forget(run)
        elif not run.forgotten and run not in self._runs:
            self._adopt(run)  # its timers, endings and queue are the supervisor's now
            self._wake()

    def _wake(self) -> None:
        if self._wake_pending:
            return
        self._wake_pending = True
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    # -- the supervisor ----------------------------------------------------------

    def _supervise(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # never leave a caller waiting on a dead loop
            with self._lock:
                self._broken = exc
                traceback.print_exc(file=sys.stderr)
                error = AlloterError(f"the pool's supervisor failed: {exc!r}")
                for run in [*self._runs, *self._inbox]:
                    run.batch.fail(error)
                    run.batch.abandon()  # nobody will report on its tasks any more
                for w in list(self._workers):
                    w.kill_now()
        finally:
            with self._lock:
                for run in [*self._runs, *self._inbox, *self._freeing.values()]:
                    _segments_freed(run)
                self._release()

    def _loop(self) -> None:
        # Everything but the wait runs under the pool's lock: a caller may hand tasks
        # to idle workers itself (see _direct_ok).
        stop_deadline: float | None = None
        due: float | None = 0.0  # the nearest timer: timers are looked at once it is due
        while True:
            with self._lock:
                now = time.monotonic()
                self._take_inbox()
                if self._closing:
                    if stop_deadline is None:
                        stop_deadline = now + STOP_WAIT
                        for run in list(self._runs):
                            run.batch.cancel(Cancelled("the pool was closed"))
                    for w in self._workers:
                        if w.idle:
                            self._stop(w)  # also those that became idle since
                    if not self._workers:
                        return
                    if now >= stop_deadline:
                        for w in self._workers:
                            if w.kill_reason is None:
                                w.kill(KillReason.CLOSE, now, hard=True)
                if due is not None and now >= due:
                    self._check_timers(now)
                self._review_touched()
                self._handle_endings(now)
                if not self._closing:
                    self._dispatch()
                self._review_touched()

                timer = due = self._next_timer()
                if stop_deadline is not None:
                    timer = stop_deadline if timer is None else min(timer, stop_deadline)
                timeout = None if timer is None else max(0.0, timer - time.monotonic())
                lends = self._lends
            events = self._selector.select(timeout)
            with self._lock:
                self._handle_events(events, lends != self._lends)

    def _handle_events(self, events: list[tuple[Any, int]], lent_since: bool) -> None:
        deaths = []
        for key, _ in events:
            if key.data is None:
                # Wake-ups only mean "look again": one read empties the pipe.
                # Cleared after it: a wake-up whose byte this read took has
                # its news looked at by the turn that follows, and one that
                # comes later writes again.
                with contextlib.suppress(BlockingIOError, OSError):
                    os.read(self._wake_r, 65536)
                self._wake_pending = False
                continue
            w, what = key.data
            if what == "dead":
                deaths.append(w)
            elif w.conn_open and not w.lent and (not lent_since or w.conn.poll()):
                # A worker lent and given back since the wait may have been read dry.
                self._read(w)
        for w in deaths:
            if w in self._workers:
                self._on_death(w)

    def _take_inbox(self) -> None:
        while self._inbox:
            run = self._inbox.popleft()
            self._runs[run] = None
            deadline = run.batch.deadline
            if deadline is not None:
                heapq.heappush(self._deadlines, (deadline, run.batch.id, run))
            self._touched.add(run)

    # -- which runs to look at -------------------------------------------------------

    def _review_touched(self) -> None:
        """Put each run that had news where the loop will look for it."""
        poked = self._poked
        touched = self._touched
        while poked:
            touched.add(poked.popleft())
        if not touched:
            return
        self._touched = set()
        for run in touched:
            self._review(run)

    def _review(self, run: PoolRun) -> None:
        if run.forgotten:
            return
        batch = run.batch
        if batch.settled.is_set() and not run.holders:
            self._forget(run)
            return
        if batch.ending:
            self._ending[run] = None
            return
        if batch.next_ready_at() is not None:
            self._delayed_runs[run] = None
        if not run.waiting and batch.has_queued():
            run.waiting = True
            self._waiting.append(run)

    def _forget(self, run: PoolRun) -> None:
        drained = run.batch.logs_drained
        if drained is not None:
            drained.set()  # settled, and no worker holds a task of it: nothing is owed
        run.forgotten = True
        # The batch's notify closure holds the run, which holds the batch: without
        # this cycle the results go as soon as the caller drops them (big results
        # map shared memory), not at the next garbage collection.
        run.batch.detach()
        # Nor does the pool keep it until its next turn (a lent worker's reply may
        # have marked it while the supervisor slept).
        self._touched.discard(run)
        with contextlib.suppress(ValueError, RuntimeError):  # a caller may append meanwhile
            while run in self._poked:
                self._poked.remove(run)
        self._runs.pop(run, None)
        self._ending.pop(run, None)
        self._delayed_runs.pop(run, None)
        # Its entries in _waiting and _deadlines are passed over when reached.
        self._free_segments(run)

    # -- shared segments ------------------------------------------------------------

    def _segments_for(self, w: WorkerHandle, run: PoolRun) -> list[int]:
        """The segments of ``run``'s batch that ``w`` lacks (copies: close them)."""
        outbox = run.batch.outbox
        if outbox is None or outbox.segment_count <= w.shm_count:
            return []
        fds: list[int] = outbox.fds_copy(w.shm_count)
        if fds:
            w.shm_count += len(fds)
            if run.sharers is None:
                run.sharers = set()
                run.batch.segments_freed = Latch()
            run.sharers.add(w)
        return fds

    def _switch_batch(self, w: WorkerHandle, run: PoolRun) -> None:
        """``w`` is sent tasks of ``run`` after another batch's: it lets go of that
        batch's task list and segments when it reads them."""
        for other in [*self._runs, *self._freeing.values()]:
            if other.sharers is not None and w in other.sharers:
                self._worker_freed(other, w)
        w.blob_id = run.batch.id
        w.shm_count = 0

    def _free_segments(self, run: PoolRun) -> None:
        """``run`` settled: the workers holding its segments are told to let go."""
        outbox = run.batch.outbox
        if outbox is not None:
            outbox.release()  # the caller did, unless it went away
        if run.sharers is None:
            return
        for w in list(run.sharers):
            if w.conn_open and w.kill_reason is None and not w.stopping:
                w.blob_id = 0
                with contextlib.suppress(OSError):
                    w.conn.send_bytes(pickle.dumps((_worker.RELEASE, run.batch.id)))
            # Otherwise it is on its way out: its segments go when it is gone.
        if run.sharers:
            self._freeing[run.batch.id] = run
        else:
            _segments_freed(run)

    def _worker_freed(self, run: PoolRun, w: WorkerHandle) -> None:
        assert run.sharers is not None
        run.sharers.discard(w)
        if not run.sharers and self._freeing.pop(run.batch.id, None) is not None:
            _segments_freed(run)

    # -- timers ----------------------------------------------------------------

    def _next_timer(self) -> float | None:
        times: list[float] = []
        deadlines = self._deadlines
        while deadlines and (deadlines[0][2].forgotten or deadlines[0][2].batch.ending):
            heapq.heappop(deadlines)
        if deadlines:
            times.append(deadlines[0][0])
        for run in list(self._delayed_runs):
            ready = run.batch.next_ready_at()
            if ready is None:
                del self._delayed_runs[run]
            else:
                times.append(ready)
        for run in self._ending:
            if not run.batch.settled.is_set() and run.holders:
                grace = run.batch.grace_deadline
                if grace is not None:
                    times.append(grace)
        for w in self._workers:
            if w.kill_deadline is not None:
                times.append(w.kill_deadline)
            elif w.pipeline and w.kill_reason is None:
                if _memory_limit(w) is not None:
                    times.append(time.monotonic() + MEMORY_SAMPLE)
                if w.tt_check is not None:
                    times.append(w.tt_check)
                if w.alone_kill_at is not None:
                    times.append(w.alone_kill_at)
        return min(times) if times else None

    def _check_timers(self, now: float) -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            run = heapq.heappop(deadlines)[2]
            if not run.forgotten:
                run.batch.expire()  # it notifies: reviewed as ending
        for run in self._delayed_runs:
            ready = run.batch.next_ready_at()
            if ready is not None and ready <= now:
                self._touched.add(run)  # its retry may be handed over
        for w in self._workers:
            if w.kill_deadline is not None and now >= w.kill_deadline:
                w.escalate()
            elif w.pipeline and w.kill_reason is None:
                limit = _memory_limit(w)
                if limit is not None:
                    self._sample_memory(w, limit, now)
                self._check_task_timeout(w, now)

    def _check_task_timeout(self, w: WorkerHandle, now: float) -> None:
        """End the task a worker runs once it has run longer than its task timeout.

        The worker says in its words which task (and chunk item) runs since when; the
        next look is due at that task's deadline, or, while none runs, a whole task
        timeout from now (no task starting after now can time out sooner).
        """
        w.tt_check = None
        batch = None if w.run is None else w.run.batch
        if batch is None or batch.task_timeout is None or batch.ending:
            return
        words = w.words
        seq, item = int(words[_words.RUNNING]), int(words[_words.ITEM])
        start = words[_words.START_NS] / 1e9
        if seq != int(words[_words.RUNNING]) or item != int(words[_words.ITEM]):
            w.tt_check = now + 0.001  # it moved on while we read: look again at once
            return
        if seq == 0:
            w.tt_check = now + batch.task_timeout
            return
        deadline = start + batch.task_timeout
        if now < deadline:
            w.tt_check = deadline
            return
        for sent, slot in w.pipeline:
            if sent == seq:
                batch.end_task(slot, TaskStatus.TIMEOUT, item if slot.item_state is not None else 0)
                break

    def _sample_memory(self, w: WorkerHandle, limit: int, now: float) -> None:
        rss = w.read_rss()
        if rss is None:
            return
        w.mem_peak = max(w.mem_peak, rss)
        if rss > limit:
            w.kill(KillReason.MEMORY, now, hard=True)

    def _handle_endings(self, now: float) -> None:
        for run in list(self._ending) if self._ending else ():
            batch = run.batch
            drained = batch.logs_drained
            if not run.holders:
                if drained is not None:
                    drained.set()  # no worker holds a task of it: no record is owed
                if batch.settled.is_set():
                    self._forget(run)
                continue
            holders = [w for w in self._workers if w.run is run]
            if not run.end_handled:
                run.end_handled = True
                for w in holders:
                    w.words[_words.CANCEL_BATCH] = batch.id
                    if drained is not None:
                        w.sight.owes()  # records written before the end, not sent yet
            if drained is not None and not any(w.sight.owed is not None for w in holders):
                drained.set()  # the caller may return: they were handed over
            grace = batch.grace_deadline
            if grace is not None and now >= grace:
                for w in holders:
                    if w.kill_reason is None:
                        w.kill(KillReason.END, now, hard=batch.kill_at_once)
        for w in self._workers:
            w.alone_kill_at = None
            if w.run is not None and w.run.batch.alone and w.kill_reason is None:
                self._end_alone(w, w.run.batch, now)

    def _end_alone(self, w: WorkerHandle, batch: Batch, now: float) -> None:
        """Tell (then kill after the grace) a task of ``w`` that was ended on its own.

        One not started yet is skipped instead, with the tasks sent after it (which go
        back to the queue): the worker checks the skip range before each task.
        """
        for seq, slot in w.pipeline:
            if slot.ended_alone is None:
                continue
            words = w.words
            if seq > int(words[_words.STARTED]):
                if not words[_words.SKIP_FROM] <= seq <= words[_words.SKIP_TO]:
                    # The lower bound first: the range is never wider than meant.
                    words[_words.SKIP_FROM] = seq
                    words[_words.SKIP_TO] = w.seq
                return
            if slot.unstarted_only:
                batch.spare(slot)  # it had started: it runs on
                continue
            item = slot.ended_item if slot.item_state is not None else 0
            words[_words.CANCEL_TASK] = _words.task_key(seq, item)
            w.alone_kill_at = slot.ended_at + batch.cancel_grace
            if now >= w.alone_kill_at:
                w.kill(KillReason.TASK, now)
            return

    # -- dispatch ----------------------------------------------------------------

    def _dispatch(self) -> None:
        """Hand queued tasks over: idle (or new) workers first, to the runs in the
        order they came; only then more tasks ahead to busy workers, each of its own
        run, so that a task never waits behind another while a worker could run it.
        """
        waiting = self._waiting
        if waiting:
            self._fill_free_workers(waiting)
            self._send_ahead()
        if self._elastic:
            self._trim_idle()

    def _fill_free_workers(self, waiting: deque[PoolRun]) -> None:
        idle = [w for w in self._workers if w.idle and w.run is None and w.room != 0]
        idle.reverse()  # taken from the end, in the workers' order
        can_spawn = self._can_spawn()
        kept: list[PoolRun] = []
        while waiting and (idle or can_spawn):
            run = waiting.popleft()
            batch = run.batch
            if run.forgotten or batch.ending or not batch.has_queued():
                run.waiting = False
                if not run.forgotten:
                    self._touched.add(run)  # a retry waiting, or the end: see _review
                continue
            kept.append(run)
            quota = run.quota
            depth = _ahead_depth(run)
            while idle and batch.has_queued() and not quota.full():
                w = idle.pop()
                self._send(w, run, batch.take(w.cap(min(depth, self._share(batch)))))
            if batch.has_queued() and not quota.full() and can_spawn:
                for w in self._start_workers(run, depth):
                    if not batch.has_queued() or quota.full():
                        break
                    self._send(w, run, batch.take(w.cap(min(depth, self._share(batch)))))
                can_spawn = self._can_spawn()
        # Runs still holding tasks keep their place, ahead of those not looked at.
        waiting.extendleft(reversed(kept))

    def _send_ahead(self) -> None:
        for w in self._workers:
            run = w.run
            if run is None or not run.waiting or w.kill_reason is not None or w.stopping:
                continue
            if w.lent:
                continue  # its caller reads it: more comes once it is given back
            batch = run.batch
            depth = _ahead_depth(run)
            if depth <= 1 or batch.ending or not batch.has_queued():
                continue
            room = depth - len(w.pipeline)
            if room > 0 and w.inflight < AHEAD_BYTES and w.room != 0:
                self._send(w, run, batch.take(w.cap(min(room, self._share(batch)))))

    def _share(self, batch: Batch) -> int:
        workers = max(1, min(self._size, len(self._workers) or 1))
        return max(1, math.ceil(batch.queued_count() / workers))

    def _can_spawn(self) -> bool:
        # A worker that has been sent its last task (room 0) is on its way out: its
        # replacement may start while it finishes, as one that is stopping does.
        live = sum(
            1 for w in self._workers if w.kill_reason is None and not w.stopping and w.room != 0
        )
        return self._elastic or live < self._size

    def _trim_idle(self) -> None:
        idle = [w for w in self._workers if w.idle and w.run is None]
        for w in idle[self._size :]:
            self._stop(w)

    def _send(self, w: WorkerHandle, run: PoolRun, slots: list[Slot]) -> None:
        if not slots:
            return
        batch = run.batch
        if w.run is None:
            w.run = run
            run.holders += 1
            run.quota.active += 1
            w.mem_peak = 0
            config = w.sight.config(batch)
            if config is not None:
                with contextlib.suppress(OSError):  # the TASKS message below finds out
                    w.conn.send_bytes(config)
        if batch.task_timeout is not None and w.tt_check is None:
            # Look at its task's time soon: no event may come before its timeout.
            w.tt_check = time.monotonic()
        blob = None
        if w.blob_id != batch.id:
            self._switch_batch(w, run)
            blob = batch.blob
        if w.room is not None:
            w.room -= len(slots)
        items = []
        for s in slots:
            w.seq += 1
            items.append((w.seq, s.index, s.payload, batch.prepare_items(s)))
            w.pipeline.append((w.seq, s))
            s.pid = w.pid
        msg: tuple[Any, ...] = (_worker.TASKS, run.params, blob, items)
        fds = self._segments_for(w, run)
        if fds:
            msg = (_worker.SHARED, len(fds), msg)
        message = pickle.dumps(msg, _transport.PROTOCOL)
        w.inflight += len(message)
        try:
            w.conn.send_bytes(message)
            _shm.send_fds(w.conn.fd_conn, fds)
        except OSError:
            # The worker is dying; its sentinel will settle these slots.
            self._unwatch_conn(w)
        finally:
            for fd in fds:
                os.close(fd)

    def _spawn(self) -> WorkerHandle:
        w = WorkerHandle.start(
            self._ctx,
            self._lifeline_r,
            self._lifeline_w,
            self._init_payload,
            _threads.worker_env(self._threads),
        )
        w.room = self._max_tasks
        self._workers.append(w)
        self._readers[w] = MessageReader(w.conn.fileno())
        self._selector.register(w.conn.fileno(), selectors.EVENT_READ, (w, "conn"))
        self._selector.register(w.sentinel, selectors.EVENT_READ, (w, "dead"))
        return w

    def _stop(self, w: WorkerHandle) -> None:
        if not w.stop():
            w.kill(KillReason.CLOSE, time.monotonic(), hard=True)

    # -- events from workers -----------------------------------------------------

    def _read(self, w: WorkerHandle, *, drain: bool = False) -> None:
        # What the pipe holds, in one read per readiness event (see _messages): the
        # selector is level-triggered and reports the pipe again if more is waiting.
        # A dead worker is drained to the end.
        reader = self._readers.get(w)
        if reader is None:
            return
        try:
            while w.conn_open:
                for message in reader.read():
                    msg = pickle.loads(message)
                    kind = msg[0]
                    if kind == _worker.SHARED:
                        fds = _shm.recv_fds(w.conn.fd_conn, msg[1], timeout=FDS_WAIT)
                        msg = _received(msg, fds)
                    elif kind == _worker.RELEASED:
                        run = self._freeing.get(msg[1])
                        if run is not None:
                            self._worker_freed(run, w)
                        continue
                    self._on_message(w, msg)
                if not drain or not w.conn.poll():
                    break
        except EOFError:
            self._unwatch_conn(w)  # the sentinel tells the rest
        except OSError:
            self._unwatch_conn(w)
            if not drain:
                w.kill_now()  # a pipe that broke under a live worker: make it a death

    def _unwatch_conn(self, w: WorkerHandle) -> None:
        if w.conn_open:
            w.conn_open = False
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(w.conn.fileno())

    def _on_message(self, w: WorkerHandle, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == _sight.LOGS:  # may come between tasks too (from a task's thread)
            w.sight.on_logs(msg, None if w.run is None else w.run.batch)
            return
        if kind == _worker.INIT_FAILED:
            w.init_error = msg[1]
            return
        run = w.run
        assert run is not None and run.batch.id == msg[1], "result for a batch the worker lacks"
        self._touched.add(run)
        batch = run.batch
        if kind == _worker.ITEM:
            _, _, seq, offset, code, body, start = msg
            slot = _find(w, seq)
            batch.started(slot, start)
            output = w.sight.take_item_output(seq, offset)
            report_item(batch, slot, offset, code == _task.OK, body, output)
            return
        if kind == _sight.OUTPUT:
            _, _, seq, offset, out, err = msg
            if offset < 0:
                _find(w, seq).output = (out, err)
            else:
                w.sight.on_item_output(seq, offset, (out, err))
            return
        for seq, code, body, wall, cpu, peak, start in msg[2]:
            sent, slot = w.pipeline.popleft()
            assert sent == seq, "worker answered out of order"
            if code == _worker.SKIPPED:
                if w.room is not None:
                    w.room += 1  # it did not run there
                if not batch.task_unstarted(slot):
                    batch.task_killed(slot)
                continue
            slot.wall_s, slot.cpu_s, slot.peak_rss = wall, cpu, peak
            batch.started(slot, start)
            w.tasks_done += 1
            run.avg_wall = wall if run.avg_wall is None else 0.8 * run.avg_wall + 0.2 * wall
            report_outcome(batch, slot, code == _task.OK, body)
        if not w.pipeline:
            self._release_worker(w)
            if w.room == 0:
                self._stop(w)  # it ran its max_tasks_per_worker: a fresh one replaces it

    def _release_worker(self, w: WorkerHandle) -> None:
        run = w.run
        if run is not None:
            run.quota.active -= 1
            run.holders -= 1
            self._touched.add(run)  # it may be let go, or have tasks for other workers
        w.run = None
        w.inflight = 0

    def _on_death(self, w: WorkerHandle) -> None:
        # Whatever the task started dies with it, whoever's group it sits in. First:
        # a forked grandchild holding the worker's end of the pipe would otherwise
        # keep a half-sent message from ever reaching EOF.
        w.kill_remains()
        if w.conn_open and w.conn.poll():
            self._read(w, drain=True)  # results it sent before dying still count
        # Then the records it journaled but never sent, before its task is settled.
        w.sight.recover(None if w.run is None else w.run.batch)
        w.proc.join(0.5)
        # Keep the pool warm: replace a worker that died holding work, was killed or
        # retired. One that died on its own before doing anything (a failing
        # initializer) is replaced only on demand, so a broken setup cannot spin.
        replace = w.init_error is None and bool(w.pipeline or w.kill_reason or w.tasks_done)
        if w.pipeline and w.run is not None:
            self._touched.add(w.run)
            self._settle_dead(w, w.run.batch, w.proc.exitcode)
        if w.run is not None:
            self._release_worker(w)
        self._workers.remove(w)
        for run in [*self._runs, *self._freeing.values()]:
            if run.sharers is not None and w in run.sharers:
                self._worker_freed(run, w)
        self._readers.pop(w, None)
        self._unwatch_conn(w)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(w.sentinel)
        w.close()
        if replace and not self._closing and not self._elastic and self._can_spawn():
            with contextlib.suppress(Exception):  # dispatch will try again on demand
                self._spawn()

    def _settle_dead(self, w: WorkerHandle, batch: Batch, exitcode: int | None) -> None:
        """Settle every task a dead worker held, as its shared words tell.

        The task it ran (or ran last) is the one the death belongs to; tasks before
        it returned, but their results were still held back and died with it; tasks
        it never started go back to the queue: they never ran, so sending them to
        another worker is no retry (a worker killed while idle blames nobody).
        """
        running = int(w.words[_words.RUNNING])
        started = int(w.words[_words.STARTED])
        blamed_seq = running or started
        lost: list[Slot] = []
        head: Slot | None = None
        never: list[Slot] = []
        for seq, slot in w.pipeline:
            if seq > started:
                never.append(slot)
            elif seq == blamed_seq:
                head = slot
            else:
                lost.append(slot)
        w.pipeline.clear()
        if head is None and never and w.init_error is not None:
            head = never.pop(0)  # its initializer failed: the first task tells the caller
        if head is not None:
            if blamed_seq and batch.capture_output and head.output is None:
                # What it wrote until it died: the files still hold it (a task, or
                # the chunk item that ran).
                head.output = w.sight.read_output()
            if running:
                batch.started(head, w.words[_words.START_NS] / 1e9)
            # A chunk runner keeps the offset of the item it runs in ITEM.
            offset = int(w.words[_words.ITEM]) if running else 0
            self._blame(w, batch, head, head.base + offset, exitcode)
        for slot in lost:
            if slot.item_state is not None:
                batch.run_interrupted(slot)  # its items were each reported already
            else:
                batch.task_killed(slot)
        for slot in never:
            if not batch.task_unstarted(slot):
                self._blame(w, batch, slot, slot.base, exitcode)

    def _blame(
        self, w: WorkerHandle, batch: Batch, slot: Slot, index: int, exitcode: int | None
    ) -> None:
        """Settle the task a worker's death belongs to, by why the worker died."""
        slot.wall_s = slot.wall_s or (time.monotonic() - slot.started)
        if w.kill_reason in (KillReason.END, KillReason.CLOSE, KillReason.TASK):
            batch.task_killed(slot)
            return
        if w.kill_reason is KillReason.MEMORY:
            limit = _memory_limit(w) or 0
            error: TaskError = MemoryLimitExceeded(index, limit, w.mem_peak, w.pid, exitcode)
            slot.peak_rss = max(slot.peak_rss, w.mem_peak)
        elif w.init_error is None:
            error = WorkerCrashed(index, exitcode, w.pid)
        else:
            info = w.init_error
            error = InitializerFailed(
                index,
                f"the worker's initializer failed: {info.type_name}: {info.message}",
                info.traceback,
            )
            error.__cause__ = _transport.rebuild_exception(info)
        if slot.item_state is not None and slot.status is TaskStatus.RUNNING:
            # Only the item that was running fails; the rest of the chunk runs on.
            attach_output(error, slot.output)
            batch.item_failed(slot, index - slot.base, error, crashed=True)
            batch.run_interrupted(slot)
            return
        batch.task_failed(slot, error, crashed=True)

    def _release(self) -> None:
        self._selector.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1
        for conn in (self._lifeline_r, self._lifeline_w):
            with contextlib.suppress(OSError):
                conn.close()
        _live_pools.discard(self)


def _received(msg: tuple[Any, ...], fds: list[int]) -> tuple[Any, ...]:
    """The message inside a SHARED one, each shared body made a :class:`_shm.Received`
    on its own segments (taken from ``fds`` in order)."""
    inner: tuple[Any, ...] = msg[2]
    taken = 0

    def attach(body: tuple[bytes, _shm.Refs, int]) -> _shm.Received:
        nonlocal taken
        data, refs, count = body
        received = _shm.Received(data, refs, fds[taken : taken + count])
        taken += count
        return received

    if inner[0] == _worker.RESULTS:
        rows = inner[2]
        for i, row in enumerate(rows):
            if type(row[2]) is tuple:
                rows[i] = (*row[:2], attach(row[2]), *row[3:])
    elif inner[0] == _worker.ITEM and type(inner[5]) is tuple:
        inner = (*inner[:5], attach(inner[5]), *inner[6:])
    return inner


_epoll_type: Any = getattr(select, "epoll", None)
_EPOLLIN = getattr(select, "EPOLLIN", 1)
# The signal module's own functions convert to and from enums, which costs more
# than the rest of a round trip; the C module's do not.
_signal: Any = importlib.import_module("_signal")


def _lendable(batch: Batch) -> bool:
    """Whether the caller may read the reply to ``batch`` itself: a lone task, with
    nothing the supervisor must time (task timeout, memory samples)."""
    return (
        len(batch.slots) == 1
        and not batch.per_item
        and batch.task_timeout is None
        and batch.memory_limit is None
    )


class _sigint_deferred:
    """Hold SIGINT back in the main thread while the caller changes the pool's state.

    A ``KeyboardInterrupt`` between taking a task and sending it (or in the middle
    of reading a message) would lose the task. The handler is swapped for one that
    remembers the signal, and the original one is called once the state is whole
    again (raising ``KeyboardInterrupt`` then, as it would have).
    """

    __slots__ = ("handler", "pending")

    def __init__(self) -> None:
        self.handler: Any = None
        self.pending: tuple[int, Any] | None = None

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        handler = _signal.getsignal(_signal.SIGINT)
        if callable(handler):
            self.handler = handler
            _signal.signal(_signal.SIGINT, self._hold)

    def _hold(self, signum: int, frame: Any) -> None:
        self.pending = (signum, frame)

    def __exit__(self, *exc_info: object) -> None:
        handler = self.handler
        if handler is None:
            return
        _signal.signal(_signal.SIGINT, handler)
        if self.pending is not None:
            handler(*self.pending)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _segments_freed(run: PoolRun) -> None:
    freed = run.batch.segments_freed
    if freed is not None:
        freed.set()


def _find(w: WorkerHandle, seq: int) -> Slot:
    for sent, slot in w.pipeline:
        if sent == seq:
            return slot
    raise AssertionError(f"worker {w.pid} reported task {seq}, which it does not hold")


def _memory_limit(w: WorkerHandle) -> int | None:
    return None if w.run is None else w.run.batch.memory_limit


def _ahead_depth(run: PoolRun) -> int:
    if run.avg_wall is None:
        # Nothing measured yet: a map's even chunks may go two to a worker, so it
        # never waits for a round trip between them; other tasks go one at a time.
        return 2 if run.batch.even else 1
    return max(1, min(AHEAD_MOST, int(AHEAD_SECONDS / max(run.avg_wall, 1e-6))))


def submit(pool: WorkerPool, batch: Batch, quota: Quota) -> None:
    """Run ``batch`` on ``pool`` within ``quota``; the pool settles every task."""
    pool._submit(batch, quota)


def elastic_pool(**options: Any) -> WorkerPool:
    """A pool for an :class:`~alloter_mp.Alloter`: a worker per task, idle ones trimmed.

    Up to ``size`` idle workers are kept warm; beyond that a call may start as many
    workers as it has tasks, which stop after it.
    """
    pool = WorkerPool(**options)
    pool._elastic = True
    return pool


_preloaded: set[int] = set()


def _preload_worker_in_forkserver(ctx: Any) -> None:
    # Have the fork server import the worker module once, so each new worker starts
    # with it loaded. Only possible before the server starts.
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    if server is None or id(server) in _preloaded:
        return
    _preloaded.add(id(server))
    if getattr(server, "_forkserver_pid", None) is not None:
        return
    # Not __main__: a script's top-level ``import numpy`` would load BLAS in the
    # server, before a worker can cap its threads (see _threads); each worker imports
    # __main__ itself, after its thread variables are set. (Python 3.10-3.13 never
    # preload __main__ anyway: the server looks for a key the parent does not send.)
    ours = ("__main__", "alloter_mp._worker")
    current = [m for m in getattr(server, "_preload_modules", None) or [] if m not in ours]
    ctx.set_forkserver_preload([*current, "alloter_mp._worker"])
