"""Process hygiene: every process a cell starts is gone when the cell ends.

After each cell whatever new descendant is still alive is killed (and reported as a
leak), a watchdog (SIGALRM) bounds every cell, and at exit every descendant is killed
and reaped.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psutil

HELPER_MARKS = ("resource_tracker", "semaphore_tracker", "forkserver")

Descendants = dict[tuple[int, float], psutil.Process]


def descendants() -> Descendants:
    out: Descendants = {}
    try:
        kids = psutil.Process().children(recursive=True)
    except psutil.Error:
        return out
    for p in kids:
        with suppress(psutil.Error):
            out[(p.pid, p.create_time())] = p
    return out


def is_helper(p: psutil.Process) -> bool:
    """A long-lived helper of multiprocessing/loky started directly by us (resource
    tracker, forkserver).  Workers forked by a forkserver share its command line but
    are its children, not ours, so they are not helpers."""
    try:
        if p.ppid() != os.getpid():
            return False
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return False
    return any(m in cmd for m in HELPER_MARKS)


def live(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_procs(procs: list[psutil.Process]) -> None:
    for p in procs:
        with suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=3)


def reap_new(before: Descendants, grace: float) -> int:
    """Wait up to ``grace`` s for descendants born since ``before`` to exit, then kill
    the rest; return how many had to be killed."""
    deadline = time.monotonic() + grace
    while True:
        new = [
            p for k, p in descendants().items() if k not in before and not is_helper(p) and live(p)
        ]
        if not new or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    kill_procs(new)
    return len(new)


def kill_everything() -> None:
    """At the end: every descendant but the resource trackers / forkservers (they exit
    by themselves when we do, and killing them early makes multiprocessing and loky
    relaunch them from their exit handlers), then reap our zombies."""
    kill_procs([p for p in descendants().values() if not is_helper(p)])
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break


class CellTimeout(BaseException):
    """Raised by the watchdog in the main thread; a BaseException so that no library's
    ``except Exception`` swallows it."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise CellTimeout()


@contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def read_pid(pidfile: str, wait: float = 2.0) -> int | None:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            with open(pidfile) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            time.sleep(0.01)
    return None


def spinning_state(pid: int | None) -> tuple[bool, bool]:
    """(alive, still burning CPU) for the looping task's process."""
    if pid is None:
        return False, False
    try:
        p = psutil.Process(pid)
        if not live(p):
            return False, False
        c0 = sum(p.cpu_times()[:2])
        time.sleep(0.3)
        c1 = sum(p.cpu_times()[:2])
        # an idle worker uses ~0 CPU; a spinning one gets its share of a busy machine
        return live(p), (c1 - c0) > 0.05
    except psutil.Error:
        return False, False
