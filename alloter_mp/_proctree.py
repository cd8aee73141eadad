"""Ending a process together with every process it started.

A worker runs in a process group of its own (it calls ``setsid``), so the group
reaches the task's children even when psutil can no longer see them as descendants
(a child whose parent already exited); psutil reaches descendants that moved to a
group of their own. Killing escalates: SIGTERM first, SIGKILL after a short wait.
The waiting is not done here: the supervisor records the escalation deadline and
comes back, so it never blocks on a stubborn process.
"""

from __future__ import annotations

import contextlib
import os
import signal

import psutil

__all__ = ["descendants", "signal_tree"]


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
    with contextlib.suppress(ProcessLookupError, PermissionError):
        # The worker called setsid(), so its group id is its pid. A worker killed
        # before it got that far has no group yet: fall back to the pid alone.
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)
    for proc in extra or ():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.send_signal(sig)


SIGTERM = signal.SIGTERM
SIGKILL = getattr(signal, "SIGKILL", signal.SIGTERM)
