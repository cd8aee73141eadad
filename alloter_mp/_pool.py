"""WorkerPool: worker processes and the one supervisor thread that runs them.

Data flow::

    caller thread                 supervisor thread (one per pool)         worker process
    -------------                 --------------------------------         --------------
    exec(*tasks)
      pickle tasks
      Batch(slots, deadline) ---> inbox + wake-up pipe
      wait on batch.decided       wait() on worker pipes, worker sentinels,
      (expires it at deadline)    the wake-up pipe and the nearest timer
                                    dispatch: (batch, slots) ---------------> run in order,
                                                                             skip cancelled batch
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
  records exactly which worker holds which slots (``WorkerHandle.pipeline``), so every
  death settles every task the worker could hold.
* A worker runs the tasks it is sent in order and reports each one. Several small
  tasks of one batch may be sent ahead to a worker so that tiny tasks do not pay a
  round trip each; a worker holds tasks of one batch at a time, so one shared flag
  per worker ("this batch is cancelled") is enough to make it skip what it holds.

The batch rules (who failed first, which tasks are skipped, cancelled or timed out)
live in :mod:`alloter_mp._batch`; this module only reports facts to batches.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import multiprocessing
import multiprocessing.util
import os
import pickle
import selectors
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from . import _threads, _transport, _worker
from ._batch import Batch, Slot, report_outcome
from ._cpus import available_cpus
from ._errors import (
    AlloterError,
    Cancelled,
    MemoryLimitExceeded,
    TaskError,
    WorkerCrashed,
)
from ._handle import WorkerHandle, WorkerStats

__all__ = ["DEFAULT_START_METHOD", "WorkerPool"]


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


class _Owner:
    """An alloter's share of a pool: at most ``limit`` workers busy with its tasks."""

    __slots__ = ("active", "limit", "memory_limit")

    def __init__(self, limit: int | None, memory_limit: int | None = None) -> None:
        self.limit = limit
        self.active = 0
        self.memory_limit = memory_limit

    def full(self) -> bool:
        return self.limit is not None and self.active >= self.limit


class _Run:
    """The pool's bookkeeping for one batch it runs."""

    __slots__ = ("avg_wall", "end_handled", "memory_limit", "owner")

    def __init__(self, owner: _Owner, memory_limit: int | None) -> None:
        self.owner = owner
        self.memory_limit = memory_limit
        self.end_handled = False
        self.avg_wall: float | None = None


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

    ``size`` workers at most (``None`` or ``0``: :func:`available_cpus`), started on first
    use and kept warm. ``initializer(*initargs)`` runs once in each worker;
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
        _elastic: bool = False,
    ) -> None:
        self._size = _check_count("size", size, default=available_cpus())
        self._threads = _threads.thread_count(
            self._size, _threads.check_threads_per_worker(threads_per_worker)
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
        if max_tasks_per_worker is not None:
            if isinstance(max_tasks_per_worker, bool) or not isinstance(max_tasks_per_worker, int):
                raise TypeError("max_tasks_per_worker must be a positive int or None")
            if max_tasks_per_worker <= 0:
                raise ValueError("max_tasks_per_worker must be > 0")
        self.start_method = method
        self._ctx: Any = multiprocessing.get_context(method)
        if method == "forkserver":
            _preload_worker_in_forkserver(self._ctx)
        self._init_payload = (
            _transport.dumps((initializer, initargs)) if initializer is not None else None
        )
        self._max_tasks = max_tasks_per_worker
        self._elastic = _elastic
        self._pid = os.getpid()

        self._lock = threading.Lock()
        self._inbox: deque[tuple[Batch, _Owner, int | None]] = deque()
        self._closing = False
        self._broken: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        self._lifeline_r, self._lifeline_w = self._ctx.Pipe(duplex=False)

        # Owned by the supervisor thread.
        self._workers: list[WorkerHandle] = []
        self._batches: list[Batch] = []
        # Every worker's pipe and sentinel plus the wake-up pipe, registered once:
        # rebuilding the set on each turn of the loop costs more than the turn.
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
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
            thread.join(timeout)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closing else "open"
        return f"<WorkerPool size={self._size} start_method={self.start_method!r} {state}>"

    # -- for the alloters --------------------------------------------------------

    def _submit(self, batch: Batch, owner: _Owner, memory_limit: int | None = None) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError("a WorkerPool cannot be used from a forked child process")
        batch.notify = self._wake
        with self._lock:
            if self._closing:
                raise AlloterError("the pool is closed")
            if self._broken is not None:
                raise AlloterError("the pool's supervisor failed") from self._broken
            self._inbox.append((batch, owner, memory_limit))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._supervise, name=f"alloter_mp-supervisor-{id(self):x}", daemon=True
                )
                self._thread.start()
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    # -- the supervisor ----------------------------------------------------------

    def _supervise(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # never leave a caller waiting on a dead loop
            self._broken = exc
            traceback.print_exc(file=sys.stderr)
            error = AlloterError(f"the pool's supervisor failed: {exc!r}")
            for batch in list(self._batches) + [b for b, _, _ in self._inbox]:
                batch.fail(error)
                batch.abandon()  # nobody will report on its tasks any more
            for w in list(self._workers):
                w.kill_now()
        finally:
            self._release()

    def _loop(self) -> None:
        stop_deadline: float | None = None
        while True:
            now = time.monotonic()
            self._take_inbox()
            if self._closing:
                if stop_deadline is None:
                    stop_deadline = now + STOP_WAIT
                    for batch in self._batches:
                        batch.cancel(Cancelled("the pool was closed"))
                for w in self._workers:
                    if w.idle:
                        self._stop(w)  # also those that became idle since
                if not self._workers:
                    return
                if now >= stop_deadline:
                    for w in self._workers:
                        if w.kill_reason is None:
                            w.kill("close", now, hard=True)
            self._check_timers(now)
            self._handle_endings(now)
            if not self._closing:
                self._dispatch()
            self._forget_settled()

            timer = self._next_timer()
            if stop_deadline is not None:
                timer = stop_deadline if timer is None else min(timer, stop_deadline)
            timeout = None if timer is None else max(0.0, timer - time.monotonic())
            deaths = []
            for key, _ in self._selector.select(timeout):
                if key.data is None:
                    # Wake-ups only mean "look again": one read empties the pipe.
                    with contextlib.suppress(BlockingIOError, OSError):
                        os.read(self._wake_r, 65536)
                    continue
                w, what = key.data
                if what == "dead":
                    deaths.append(w)
                elif w.conn_open:
                    self._read(w)
            for w in deaths:
                self._on_death(w)

    def _take_inbox(self) -> None:
        while self._inbox:
            batch, owner, memory_limit = self._inbox.popleft()
            batch.runner_state = _Run(owner, memory_limit)
            self._batches.append(batch)

    # -- timers ----------------------------------------------------------------

    def _next_timer(self) -> float | None:
        times: list[float] = []
        for batch in self._batches:
            if not batch.ending:
                if batch.deadline is not None:
                    times.append(batch.deadline)
            elif not batch.settled.is_set():
                grace = batch.grace_deadline
                if grace is not None and any(w.batch is batch for w in self._workers):
                    times.append(grace)
        for w in self._workers:
            if w.kill_deadline is not None:
                times.append(w.kill_deadline)
            elif w.pipeline and w.kill_reason is None and _memory_limit(w) is not None:
                times.append(time.monotonic() + MEMORY_SAMPLE)
        return min(times) if times else None

    def _check_timers(self, now: float) -> None:
        for batch in self._batches:
            if not batch.ending and batch.deadline is not None and now >= batch.deadline:
                batch.expire()
        for w in self._workers:
            if w.kill_deadline is not None and now >= w.kill_deadline:
                w.escalate()
            elif w.pipeline and w.kill_reason is None:
                limit = _memory_limit(w)
                if limit is not None:
                    self._sample_memory(w, limit, now)

    def _sample_memory(self, w: WorkerHandle, limit: int, now: float) -> None:
        rss = w.read_rss()
        if rss is None:
            return
        w.mem_peak = max(w.mem_peak, rss)
        if rss > limit:
            w.kill("memory", now, hard=True)

    def _handle_endings(self, now: float) -> None:
        for batch in self._batches:
            if not batch.ending:
                continue
            run: _Run = batch.runner_state
            holders = [w for w in self._workers if w.batch is batch]
            if not run.end_handled:
                run.end_handled = True
                for w in holders:
                    w.flag[0] = batch.id
            grace = batch.grace_deadline
            if holders and grace is not None and now >= grace:
                for w in holders:
                    if w.kill_reason is None:
                        w.kill("end", now)

    def _forget_settled(self) -> None:
        if any(b.settled.is_set() for b in self._batches):
            self._batches = [
                b
                for b in self._batches
                if not b.settled.is_set() or any(w.batch is b for w in self._workers)
            ]

    # -- dispatch ----------------------------------------------------------------

    def _dispatch(self) -> None:
        for batch in self._batches:
            if batch.ending or not batch.has_queued():
                continue
            run: _Run = batch.runner_state
            owner = run.owner
            depth = _ahead_depth(batch, run)
            # Idle (or new) workers first; only then send ahead to busy ones, so a
            # task never waits behind another while a worker could run it.
            for w in self._workers:
                if not batch.has_queued() or owner.full():
                    break
                if w.idle and w.batch is None:
                    self._send(w, batch, batch.take(min(depth, self._share(batch))))
            while batch.has_queued() and not owner.full() and self._can_spawn():
                try:
                    w = self._spawn()
                except Exception as exc:  # out of processes or descriptors, say
                    if not any(x.batch is batch for x in self._workers):
                        batch.fail(AlloterError(f"could not start a worker process: {exc!r}"))
                    break
                self._send(w, batch, batch.take(min(depth, self._share(batch))))
            if depth > 1 and batch.has_queued():
                for w in self._workers:
                    if w.batch is batch and w.kill_reason is None and not w.stopping:
                        room = depth - len(w.pipeline)
                        if room > 0 and w.inflight < AHEAD_BYTES:
                            self._send(w, batch, batch.take(min(room, self._share(batch))))
        if self._elastic:
            self._trim_idle()

    def _share(self, batch: Batch) -> int:
        workers = max(1, min(self._size, len(self._workers) or 1))
        return max(1, math.ceil(batch.queued_count() / workers))

    def _can_spawn(self) -> bool:
        live = sum(1 for w in self._workers if w.kill_reason is None and not w.stopping)
        return self._elastic or live < self._size

    def _trim_idle(self) -> None:
        idle = [w for w in self._workers if w.idle and w.batch is None]
        for w in idle[self._size :]:
            self._stop(w)

    def _send(self, w: WorkerHandle, batch: Batch, slots: list[Slot]) -> None:
        if not slots:
            return
        run: _Run = batch.runner_state
        if w.batch is None:
            w.batch = batch
            w.owner = run.owner
            run.owner.active += 1
            w.mem_peak = 0
        blob = None
        if batch.blob is not None and w.blob_id != batch.id:
            blob = batch.blob
            w.blob_id = batch.id
        message = pickle.dumps(
            (
                _worker.TASKS,
                batch.id,
                batch.deadline,
                batch.measure,
                blob,
                [(s.index, s.payload) for s in slots],
            ),
            _transport.PROTOCOL,
        )
        for s in slots:
            s.pid = w.pid
            s.payload = None  # sent: the batch need not keep it
        w.pipeline.extend(slots)
        w.inflight += len(message)
        try:
            w.conn.send_bytes(message)
        except OSError:
            # The worker is dying; its sentinel will settle these slots.
            self._unwatch_conn(w)

    def _spawn(self) -> WorkerHandle:
        w = WorkerHandle.start(
            self._ctx,
            self._lifeline_r,
            self._lifeline_w,
            self._init_payload,
            _threads.worker_env(self._threads),
        )
        self._workers.append(w)
        self._selector.register(w.conn.fileno(), selectors.EVENT_READ, (w, "conn"))
        self._selector.register(w.sentinel, selectors.EVENT_READ, (w, "dead"))
        return w

    def _stop(self, w: WorkerHandle) -> None:
        if not w.stop():
            w.kill("close", time.monotonic(), hard=True)

    # -- events from workers -----------------------------------------------------

    def _read(self, w: WorkerHandle, *, drain: bool = False) -> None:
        # One message per readiness event: the selector is level-triggered and will
        # report the pipe again if more is waiting, and polling first would cost
        # more system calls than the message. A dead worker is drained to the end.
        try:
            while w.conn_open:
                self._on_message(w, pickle.loads(w.conn.recv_bytes()))
                if not drain or not w.conn.poll():
                    break
        except (EOFError, OSError):
            self._unwatch_conn(w)  # the sentinel tells the rest

    def _unwatch_conn(self, w: WorkerHandle) -> None:
        if w.conn_open:
            w.conn_open = False
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(w.conn.fileno())

    def _on_message(self, w: WorkerHandle, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == _worker.INIT_FAILED:
            w.init_error = msg[1]
            return
        _, batch_id, items = msg
        batch = w.batch
        assert batch is not None and batch.id == batch_id, "result for a batch the worker lacks"
        run: _Run = batch.runner_state
        for index, code, body, wall, cpu, peak in items:
            slot = w.pipeline.popleft()
            assert slot.index == index, "worker answered out of order"
            slot.wall_s, slot.cpu_s, slot.peak_rss = wall, cpu, peak
            if code == _worker.SKIPPED:
                batch.task_skipped(slot)
                continue
            w.tasks_done += 1
            run.avg_wall = wall if run.avg_wall is None else 0.8 * run.avg_wall + 0.2 * wall
            report_outcome(batch, slot, code == _worker.OK, body)
        if not w.pipeline:
            self._release_worker(w)
            if self._max_tasks is not None and w.tasks_done >= self._max_tasks:
                self._stop(w)

    def _release_worker(self, w: WorkerHandle) -> None:
        if w.owner is not None:
            w.owner.active -= 1
        w.batch = None
        w.owner = None
        w.inflight = 0

    def _on_death(self, w: WorkerHandle) -> None:
        # Whatever the task started dies with it, whoever's group it sits in. First:
        # a forked grandchild holding the worker's end of the pipe would otherwise
        # keep a half-sent message from ever reaching EOF.
        w.kill_now()
        if w.conn_open and w.conn.poll():
            self._read(w, drain=True)  # results it sent before dying still count
        w.proc.join(0.5)
        exitcode = w.proc.exitcode
        batch = w.batch
        # Keep the pool warm: replace a worker that died holding work, was killed or
        # retired. One that died on its own before doing anything (a failing
        # initializer) is replaced only on demand, so a broken setup cannot spin.
        replace = w.init_error is None and bool(w.pipeline or w.kill_reason or w.tasks_done)
        if w.pipeline and batch is not None:
            # Tasks before the one that ran returned, but the worker still held their
            # results back: they died with it. The one that ran is the one to blame.
            running, lost = int(w.flag[2]) - 1, []
            if any(s.index == running for s in w.pipeline):
                while w.pipeline[0].index != running:
                    lost.append(w.pipeline.popleft())
            head = w.pipeline.popleft()
            # A chunk runner keeps the offset of the item it runs in flag[1].
            index = head.base + int(w.flag[1])
            if w.kill_reason == "memory":
                limit = _memory_limit(w) or 0
                batch.task_failed(
                    head,
                    MemoryLimitExceeded(index, limit, w.mem_peak, w.pid, exitcode),
                    crashed=True,
                )
                head.peak_rss = max(head.peak_rss, w.mem_peak)
            elif w.kill_reason in ("end", "close"):
                batch.task_killed(head)
            elif w.init_error is not None:
                info = w.init_error
                cause = _transport.rebuild_exception(info)
                error = TaskError(
                    index,
                    f"the worker's initializer failed: {info.type_name}: {info.message}",
                    info.traceback,
                )
                error.__cause__ = cause
                batch.task_failed(head, error, crashed=True)
            else:
                batch.task_failed(head, WorkerCrashed(index, exitcode, w.pid), crashed=True)
            head.wall_s = head.wall_s or (time.monotonic() - head.started)
            for slot in lost:
                batch.task_killed(slot)
            while w.pipeline:
                batch.task_skipped(w.pipeline.popleft())
        if w.batch is not None:
            self._release_worker(w)
        self._workers.remove(w)
        self._unwatch_conn(w)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(w.sentinel)
        w.close()
        if replace and not self._closing and not self._elastic and self._can_spawn():
            with contextlib.suppress(Exception):  # dispatch will try again on demand
                self._spawn()

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


def _memory_limit(w: WorkerHandle) -> int | None:
    if w.batch is None:
        return None
    limit: int | None = w.batch.runner_state.memory_limit
    return limit


def _ahead_depth(batch: Batch, run: _Run) -> int:
    if run.avg_wall is None:
        # Nothing measured yet: a map's even chunks may go two to a worker, so it
        # never waits for a round trip between them; other tasks go one at a time.
        return 2 if batch.even else 1
    return max(1, min(AHEAD_MOST, int(AHEAD_SECONDS / max(run.avg_wall, 1e-6))))


def _check_count(name: str, value: int | None, *, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, not {value}")
    return value or default


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
