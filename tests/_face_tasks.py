"""Task functions for the executor and asyncio tests (importable by the workers)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import alloter_mp


def mul(x, y):
    return x * y


def capture(*args, **kwargs):
    return args, kwargs


def pid():
    return os.getpid()


def sleep_then(seconds, x=None):
    time.sleep(seconds)
    return x


def touch_then(path, x=None):
    """Leave a mark that the call ran."""
    Path(path).write_text("ran")
    return x


def sleep_then_touch(seconds, path):
    time.sleep(seconds)
    Path(path).write_text("ran")
    return "done"


def raise_value_error(message="boom"):
    raise ValueError(message)


def raise_system_exit(code=5):
    raise SystemExit(code)


class FalseyError(Exception):
    def __bool__(self):
        return False


def raise_falsey(message):
    raise FalseyError(message)


class Unrebuildable(Exception):
    """Pickles, but cannot be rebuilt (its __init__ wants two arguments)."""

    def __init__(self, a, b):
        super().__init__(f"{a}-{b}")


def raise_unrebuildable():
    raise Unrebuildable(1, 2)


def exit_now(code=3):
    os._exit(code)


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)


def spin_forever():
    while True:
        pass


def tree_then_spin(pidfile):
    """Start a grandchild (``sleep``), say both pids, then spin, deaf to cancel()."""
    child = subprocess.Popen(["sleep", "1000"])
    Path(pidfile).write_text(f"{os.getpid()} {child.pid}")
    while True:
        pass


def tree_then_sleep(pidfile, seconds):
    child = subprocess.Popen(["sleep", "1000"])
    Path(pidfile).write_text(f"{os.getpid()} {child.pid}")
    time.sleep(seconds)
    child.kill()
    return "slept"


def write_pid_then_sleep(pidfile, seconds):
    Path(pidfile).write_text(str(os.getpid()))
    time.sleep(seconds)
    return seconds


def cooperative(marker, seconds):
    """Wait for cancelled(); leave a mark when seen (and one on starting)."""
    Path(f"{marker}.started").write_text("started")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if alloter_mp.cancelled():
            Path(marker).write_text("cancelled")
            return "noticed"
        time.sleep(0.005)
    return "not noticed"


def allocate(megabytes, seconds=2.0):
    block = bytearray(megabytes * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    time.sleep(seconds)
    return len(block)


def noop(x=None):
    return x


class Tracked:
    """An object that leaves a mark (in the process that frees it) when freed."""

    def __init__(self, directory, name):
        self.directory = directory
        self.name = name

    def __del__(self):
        with contextlib.suppress(Exception):
            Path(self.directory, f"{self.name}.{os.getpid()}").write_text("freed")


def take_tracked_return_tracked(arg, directory):
    return Tracked(directory, "result")


class Payload:
    """A plain object the parent can hold a weak reference to."""

    def __init__(self, n=0):
        self.n = n

    def method(self):
        return self.n


def make_payload(n):
    return Payload(n)


_INIT = []


def init_record(value):
    _INIT.append(value)


def init_seen():
    return list(_INIT)


def init_fail():
    raise ValueError("error in initializer")


def python_exe():
    return sys.executable


def record(path, seconds, tag=None):
    """Append this call's start and end times to ``path`` (to check a limit)."""
    start = time.time()
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write(f"{start} {time.time()}\n")
    return tag


def most_at_once(path):
    """The most calls recorded in ``path`` that overlapped in time."""
    events = []
    for line in Path(path).read_text().split("\n"):
        if line.strip():
            start, end = map(float, line.split())
            events += [(start, 1), (end, -1)]
    now = most = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        now += step
        most = max(most, now)
    return most
