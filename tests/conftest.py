"""Shared fixtures: alloters that are closed after each test, and leak checks.

multiprocessing's fork server and resource tracker are helper processes that live
as long as the program once started; they are not workers and not leaks, so the
process counts here leave them out.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import psutil
import pytest

from alloter_mp import ProcessAlloter

HELPERS = ("forkserver", "resource_tracker")


def live_descendants() -> list[psutil.Process]:
    """Descendants of this test process that are alive and not multiprocessing helpers."""
    out = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(h in cmdline for h in HELPERS):
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


def pid_gone(pid: int, timeout: float = 5.0) -> bool:
    """True once ``pid`` is dead (a zombie counts as dead) within ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


@pytest.fixture
def alloter() -> Iterator[ProcessAlloter]:
    a = ProcessAlloter(2, cancel_grace=0.2)
    try:
        yield a
    finally:
        a.close()
    assert not wait_no_descendants(), "workers left behind after close()"
