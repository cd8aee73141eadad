"""The parent's handle on one worker process: start it, stop it, kill it, measure it.

Besides the process, a handle carries the supervisor's bookkeeping for that worker:
which tasks it holds (``pipeline``: ``(seq, slot)`` in the order it runs them), for
which call (``run``), its shared words (:mod:`alloter_mp._words`), its log journal
and capture files (``sight``, :mod:`alloter_mp._sight`), and why it is being killed. Only the supervisor thread changes a handle; ``stats()`` reads it
from other threads.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil

from . import _proctree, _threads, _transport, _words, _worker
from ._batch import Slot
from ._channel import channel_pair
from ._sight import HandleSight
from ._states import KillReason

if TYPE_CHECKING:
    from ._poolrun import PoolRun

__all__ = ["KILL_ESCALATION", "WorkerHandle", "WorkerStats"]

# After SIGTERM, a process still alive this long later gets SIGKILL.
KILL_ESCALATION = 0.2


@dataclass(frozen=True)
class WorkerStats:
    """One live worker process, measured with psutil."""

    pid: int
    rss: int
    cpu_percent: float
    tasks_done: int


class WorkerHandle:
    """One worker process and what the supervisor knows about it."""

    __slots__ = (
        "alone_kill_at",
        "blob_id",
        "conn",
        "conn_open",
        "cpu_seen",
        "inflight",
        "init_error",
        "kill_deadline",
        "kill_reason",
        "lent",
        "mem_peak",
        "pid",
        "pipeline",
        "proc",
        "ps",
        "room",
        "run",
        "sentinel",
        "seq",
        "shm_count",
        "sight",
        "stopping",
        "tasks_done",
        "tree",
        "tt_check",
        "waiter",
        "words",
        "words_array",
    )

    def __init__(self, proc: Any, conn: Any, words: Any, sight: HandleSight) -> None:
        self.proc = proc
        self.sight = sight
        self.pid: int = proc.pid
        self.conn = conn
        self.conn_open = True
        self.sentinel = proc.sentinel
        self.words_array = words  # keeps the shared memory alive
        self.words = _words.view(words)
        self.pipeline: deque[tuple[int, Slot]] = deque()  # (seq, slot), in running order
        self.seq = 0  # the seq of the last task sent
        self.run: PoolRun | None = None  # the call whose tasks it holds
        # The batch whose task list (blob) and shared segments it has (it lets go of
        # them when sent another batch's tasks), and how many of those segments.
        self.blob_id = 0
        self.shm_count = 0
        self.inflight = 0
        self.tasks_done = 0
        # How many more tasks it may be sent (max_tasks_per_worker; None: no end).
        self.room: int | None = None
        self.stopping = False
        # Lent to a caller, which reads its pipe meanwhile (see WorkerPool._direct_ok).
        self.lent = False
        self.waiter: Any = None  # its pipe's Channel.waiter(), for the caller it is lent to
        self.kill_reason: KillReason | None = None
        self.kill_deadline: float | None = None
        self.tt_check: float | None = None  # when to look at its task's timeout again
        self.alone_kill_at: float | None = None  # its task was ended alone: kill then
        self.tree: list[psutil.Process] = []
        self.mem_peak = 0
        self.init_error: _transport.ExceptionInfo | None = None
        self.ps: psutil.Process | None = None
        self.cpu_seen = False  # stats() has taken a first cpu_percent reading

    @classmethod
    def start(
        cls,
        ctx: Any,
        lifeline_r: Any,
        lifeline_w: Any,
        init_payload: bytes | None,
        thread_env: dict[str, str] | None = None,
    ) -> WorkerHandle:
        """Start a worker process with ``ctx`` (a multiprocessing context).

        ``thread_env``: the native thread-pool variables the worker starts with.
        """
        parent_conn, child_conn = channel_pair(ctx)
        words = _words.new_words(ctx)
        sight = HandleSight()
        try:
            proc = ctx.Process(
                target=_worker.worker_main,
                args=(
                    child_conn,
                    words,
                    lifeline_r,
                    lifeline_w,
                    init_payload,
                    thread_env,
                    sight.worker_args(),  # its files cross only while it starts
                ),
                name=_threads.carrying_env("alloter_mp-worker", thread_env),
                daemon=False,
            )
            proc.start()
        except BaseException:
            sight.close()
            parent_conn.close()
            raise
        finally:
            child_conn.close()
        return cls(proc, parent_conn, words, sight)

    def cap(self, wanted: int) -> int:
        """How many of ``wanted`` tasks it may still be sent."""
        return wanted if self.room is None else min(wanted, self.room)

    @property
    def idle(self) -> bool:
        """Holding no task, and neither stopping nor being killed."""
        return not self.pipeline and self.kill_reason is None and not self.stopping

    def stop(self) -> bool:
        """Ask an idle worker to exit; ``False`` if it could not be asked (kill it)."""
        if self.stopping:
            return True
        self.stopping = True
        try:
            self.conn.send_bytes(pickle.dumps((_worker.STOP,)))
        except OSError:
            return False
        return True

    def kill(self, reason: KillReason, now: float, *, hard: bool = False) -> None:
        """End the worker and every process its task started.

        SIGTERM first, SIGKILL at ``kill_deadline`` (see :meth:`escalate`); ``hard``
        sends SIGKILL at once. The first reason given is the one remembered.
        """
        if self.kill_reason is not None and not hard:
            return
        if self.kill_reason is None:
            self.kill_reason = reason
        self.tree = _proctree.descendants(self.pid)
        if hard:
            _proctree.signal_tree(self.pid, _proctree.SIGKILL, self.tree)
            self.kill_deadline = None
        else:
            _proctree.signal_tree(self.pid, _proctree.SIGTERM, self.tree)
            self.kill_deadline = now + KILL_ESCALATION

    def escalate(self) -> None:
        """It ignored SIGTERM (or is slow to die): no more asking."""
        self.kill_deadline = None
        self.kill_now()

    def kill_remains(self) -> None:
        """The worker is dead: SIGKILL its group and the descendants found while it
        lived. (Looking for more is no use: a dead process's children belong to
        another parent, and the search costs milliseconds.)"""
        _proctree.signal_tree(self.pid, _proctree.SIGKILL, self.tree)

    def kill_now(self) -> None:
        """SIGKILL to the worker, its group, and every descendant known or found now."""
        tree = self.tree + _proctree.descendants(self.pid)
        _proctree.signal_tree(self.pid, _proctree.SIGKILL, tree)

    def _process(self) -> psutil.Process:
        if self.ps is None:
            self.ps = psutil.Process(self.pid)
        return self.ps

    def read_rss(self) -> int | None:
        """The worker's resident memory in bytes, ``None`` if it is gone."""
        try:
            return int(self._process().memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None

    def read_stats(self) -> WorkerStats | None:
        """A :class:`WorkerStats` row, ``None`` if the worker is gone."""
        try:
            ps = self._process()
            with ps.oneshot():
                rss = ps.memory_info().rss
                cpu = ps.cpu_percent(None)
                if not self.cpu_seen:
                    # psutil's first reading has nothing to compare with (0.0):
                    # give the average since the worker started instead.
                    self.cpu_seen = True
                    used = sum(ps.cpu_times()[:2])
                    age = max(time.time() - ps.create_time(), 0.05)
                    cpu = min(100.0 * used / age, 100.0 * (os.cpu_count() or 1))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None
        return WorkerStats(self.pid, int(rss), float(cpu), self.tasks_done)

    def close(self) -> None:
        """Release the pipe, the files and the process object of a worker that has died."""
        self.conn.close()
        self.sight.close()
        with contextlib.suppress(ValueError):
            self.proc.close()
