"""What runs inside a Ray worker: one task of a batch, and the board of memory kills.

A task travels to Ray as the same bytes a pool worker would get, and comes back as
the same ``(code, body, wall, cpu, peak)`` a pool worker reports (plus the Ray
worker's pid), so the driver settles it with the same code.

The in-task API answers for a Ray task too:

* ``cancelled()``: when a batch ends, the driver cancels its Ray tasks without
  force. Ray then marks the task cancelled (``is_canceled()`` of its runtime
  context) and interrupts the worker's main thread as if by SIGINT; while a task
  runs, SIGINT only sets the task's flag, so the task is told, not broken, and
  gets ``cancel_grace`` seconds to return before the driver cancels with force.
* ``time_left()`` reads the batch's deadline, sent as wall-clock time and put back
  on this machine's monotonic clock.
* With a ``memory_limit``, a thread samples the worker's resident memory; past the
  limit it records the peak on the alloter's :class:`Board` (a small Ray actor) and
  kills the worker and its children, so the driver can tell a memory kill from a
  crash.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Any

from . import _transport
from ._measure import PeakMeter
from ._worker import execute, foreign_task

__all__ = ["Board", "run_task"]

# How often a Ray task's resident memory is sampled under a memory limit.
MEMORY_SAMPLE_SECONDS = 0.01
# How long a task waits for the board before it kills itself anyway.
_BOARD_TIMEOUT = 5.0

_meter: PeakMeter | None = None


class Board:
    """Memory kills of an alloter's Ray tasks, so the driver can tell them from crashes.

    It runs as a Ray actor (no CPU of its own), made only for alloters with a
    memory limit: a task's guard writes before it kills its worker, the driver reads
    when the worker's death reaches it.
    """

    def __init__(self) -> None:
        self._kills: dict[tuple[int, int], tuple[int, int]] = {}

    def over_memory(self, key: int, index: int, peak: int, pid: int) -> None:
        """Task ``index`` of batch ``key`` passed the memory limit (its worker dies next)."""
        self._kills[(key, index)] = (peak, pid)

    def memory_kill(self, key: int, index: int) -> tuple[int, int] | None:
        """``(peak, pid)`` if task ``index`` of batch ``key`` was killed for its memory."""
        return self._kills.pop((key, index), None)

    def forget(self, key: int) -> None:
        """Batch ``key`` is settled: drop what is known of it."""
        for k in [k for k in self._kills if k[0] == key]:
            del self._kills[k]


def run_task(
    payload: bytes,
    key: int,
    index: int,
    deadline_wall: float | None,
    measure: bool,
    memory_limit: int | None,
    board: Any,
    paths: tuple[str, ...],
) -> tuple[int, Any, float, float, int, int]:
    """The Ray remote function: run one pickled task, measured.

    ``paths`` is the driver's ``sys.path``: as in a pool worker, modules the driver
    imports by path (a test directory, a script's folder) import here too, where
    those folders exist. Returns ``(code, body, wall, cpu, peak, pid)``; it never
    raises for what the task does, so an exception out of Ray means the worker or
    Ray itself failed.
    """
    global _meter
    if _meter is None:
        _meter = PeakMeter()
    _adopt_paths(paths)
    deadline = None
    if deadline_wall is not None:
        deadline = time.monotonic() + (deadline_wall - time.time())
    probe = _Probe()
    guard = None
    if memory_limit is not None:
        guard = _MemoryGuard(memory_limit, board, key, index)
    probe.install()
    try:
        with foreign_task(deadline, probe):
            outcome = execute(_transport.loads, (payload,), measure or guard is not None, _meter)
    finally:
        probe.uninstall()
        if guard is not None:
            guard.close()
    return (*outcome, os.getpid())


_adopted: tuple[str, ...] = ()


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
        self._cancelled = False
        self._previous: Any = None
        self._context: Any = None

    def install(self) -> None:
        import ray

        self._context = ray.get_runtime_context()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_interrupt)

    def _on_interrupt(self, signum: int, frame: Any) -> None:
        self._cancelled = True

    def __call__(self) -> bool:
        if not self._cancelled and self._context is not None:
            # Ray's own mark, in case its interruption has not reached Python yet.
            with contextlib.suppress(Exception):
                self._cancelled = bool(self._context.is_canceled())
        return self._cancelled

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class _MemoryGuard:
    """Kills this Ray worker when its resident memory passes the limit."""

    def __init__(self, limit: int, board: Any, key: int, index: int) -> None:
        import psutil

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
        import ray

        with contextlib.suppress(Exception):
            ray.get(
                self._board.over_memory.remote(self._key, self._index, peak, os.getpid()),
                timeout=_BOARD_TIMEOUT,
            )
        with contextlib.suppress(Exception):
            for child in self._process.children(recursive=True):
                with contextlib.suppress(Exception):
                    child.kill()
        os.kill(os.getpid(), signal.SIGKILL)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
