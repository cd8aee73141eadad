"""Process and descriptor accounting for the leak checks of the tests.

multiprocessing's fork server and resource tracker are helper processes that live
as long as the program once started; they are not workers and not leaks, so the
process counts here leave them out (and only them).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import psutil

HELPERS = ("forkserver", "resource_tracker")
# Direct children that a local Ray started (filled by the ``ray_session`` fixture):
# they and their descendants (Ray's own workers) are Ray's to manage, not ours.
RAY_ROOTS: set[int] = set()


def live_descendants(root: psutil.Process | None = None) -> list[psutil.Process]:
    """Live descendants of ``root`` (this process) other than multiprocessing helpers.

    The helpers (fork server, resource tracker) are *direct* children running
    multiprocessing's helper code. Workers forked by the fork server inherit its
    command line, so the command line alone cannot tell them apart: they are the
    fork server's children, not ours, and they count.
    """
    root = root or psutil.Process()
    out = []
    ray_pids = set()
    for pid in RAY_ROOTS:
        with contextlib.suppress(psutil.NoSuchProcess):
            ray_pids.update(p.pid for p in psutil.Process(pid).children(recursive=True))
        ray_pids.add(pid)
    for proc in root.children(recursive=True):
        if proc.pid in ray_pids:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.cmdline())
            direct = proc.ppid() == root.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if direct and any(h in cmdline for h in HELPERS):
            continue
        out.append(proc)
    return out


def wait_no_descendants(timeout: float = 5.0) -> list[psutil.Process]:
    """Wait until no (non-helper) descendant is alive; return those still alive."""
    end = time.monotonic() + timeout
    while True:
        alive = live_descendants()
        if not alive or time.monotonic() > end:
            return alive
        time.sleep(0.05)


def is_alive(pid: int, created: float | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, given ``created``, is the same process."""
    try:
        proc = psutil.Process(pid)
        if created is not None and abs(proc.create_time() - created) > 0.01:
            return False  # the pid was reused
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_dead(pids: list[tuple[int, float | None]], timeout: float) -> list[int]:
    """Wait until every ``(pid, create_time)`` is dead; return the pids still alive."""
    end = time.monotonic() + timeout
    while True:
        alive = [pid for pid, created in pids if is_alive(pid, created)]
        if not alive or time.monotonic() >= end:
            return alive
        time.sleep(0.02)


def kill_all(pids: list[tuple[int, float | None]]) -> None:
    """SIGKILL what a failed check left alive, so the next test starts clean."""
    for pid, created in pids:
        if is_alive(pid, created):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def pid_gone(pid: int, timeout: float = 5.0) -> bool:
    """True once ``pid`` is dead (a zombie counts as dead) within ``timeout``."""
    return not wait_dead([(pid, None)], timeout)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0
