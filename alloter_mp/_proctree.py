"""Ending a process together with every process it started.

A worker runs in a process group of its own (it calls ``setsid``), and so does every
job of ``alloter-mp run`` (started with ``start_new_session``), so the group reaches
the task's children even when psutil can no longer see them as descendants (a child
whose parent already exited); psutil reaches descendants that moved to a group of
their own. Killing escalates: SIGTERM first, SIGKILL after a grace period. The waiting
is not done here: the pool's supervisor and the command line's engine record the
escalation deadline and come back, so neither ever blocks on a stubborn process.
"""

from __future__ import annotations

import contextlib
import os
import signal

import psutil

__all__ = ["any_alive", "descendants", "group_alive", "signal_group", "signal_tree"]


def descendants(pid: int) -> list[psutil.Process]:
    """Every living descendant of ``pid`` (empty when it is gone)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def signal_tree(pid: int, sig: int, extra: list[psutil.Process] | None = None) -> None:
    """Send ``sig`` to ``pid``, its process group (when it leads one) and ``extra``.

    ``extra`` are descendants found earlier: a descendant that left the group is
    only reachable that way. psutil checks each against pid reuse before signalling.
    """
    # The worker called setsid(), so its group id is its pid. A worker killed
    # before it got that far has no group yet: fall back to the pid alone.
    signal_group(pid, sig, extra)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def signal_group(pgid: int, sig: int, extra: list[psutil.Process] | None = None) -> bool:
    """Send ``sig`` to process group ``pgid`` and to ``extra``; ``True`` if any was there.

    Safe after the group's leader was reaped: no new process gets the id ``pgid``
    while a group of that id still exists, so only what is left of the group is hit.
    """
    hit = False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
        hit = True
    for proc in extra or ():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.send_signal(sig)
            hit = True
    return hit


def group_alive(pgid: int) -> bool:
    """Whether a living (not zombie) process is left in group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # Zombies count for kill(): they wait for their (new) parent to reap them,
    # which an init process may do late. Only the living matter here.
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue
    return False


def any_alive(procs: list[psutil.Process]) -> bool:
    """Whether any of ``procs`` still runs (zombies do not count)."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                return True
    return False


SIGTERM = signal.SIGTERM
SIGKILL = getattr(signal, "SIGKILL", signal.SIGTERM)
