"""Task functions for the tests: real work, real failures, real crashes."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time

import alloter_mp


def value(x):
    return x


def sleep_then(seconds, x=None):
    time.sleep(seconds)
    return x


def record(path, seconds, tag):
    """Append start/end times to a file, to check the limit from outside."""
    start = time.time()
    time.sleep(seconds)
    end = time.time()
    with open(path, "a") as f:
        f.write(f"{tag} {start} {end}\n")
    return tag


def most_at_once(spans):
    """The most of the ``(start, end)`` spans that overlap at one moment."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def fail_on(bad, x):
    """``2 * x``, or ValueError for the item ``bad`` (for map)."""
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x * 2


def raise_value_error(message="boom"):
    raise ValueError(message)


def _write_pid(pidfile):
    if pidfile is not None:
        with open(pidfile, "w") as f:
            f.write(str(os.getpid()))


def segfault(delay=0.0, pidfile=None):
    _write_pid(pidfile)
    time.sleep(delay)
    ctypes.string_at(0)


def exit_now(code=3, delay=0.0, pidfile=None):
    _write_pid(pidfile)
    time.sleep(delay)
    os._exit(code)


def kill_self(sig=signal.SIGKILL, delay=0.0, pidfile=None):
    _write_pid(pidfile)
    time.sleep(delay)
    os.kill(os.getpid(), sig)
    time.sleep(10)


def spin_forever():
    while True:
        pass


def ignore_sigterm_and_spin(pidfile):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(pidfile, "w") as f:
        f.write(str(os.getpid()))
    while True:
        pass


def start_child_and_hang(pidfile):
    child = subprocess.Popen(["sleep", "1000"])
    with open(pidfile, "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    time.sleep(1000)


def write_pid_and_sleep(pidfile, seconds):
    # Written aside, then renamed: a reader never sees the file empty.
    with open(f"{pidfile}.part", "w") as f:
        f.write(str(os.getpid()))
    os.replace(f"{pidfile}.part", pidfile)
    time.sleep(seconds)
    return seconds


def wait_for_cancel(seconds):
    """Return 'noticed' once the batch is cancelled, within ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if alloter_mp.cancelled():
            return "noticed"
        time.sleep(0.01)
    return "not noticed"


def cancel_marker(path, seconds):
    """Write 'cancelled' to path if the task sees cancellation within ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if alloter_mp.cancelled():
            with open(path, "w") as f:
                f.write("cancelled")
            return "cancelled"
        time.sleep(0.01)
    return "finished"


def in_task_state():
    return alloter_mp.cancelled(), alloter_mp.time_left()


class TwoArgError(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


def raise_two_arg():
    raise TwoArgError(1, 2)


class LockHoldingError(Exception):
    def __init__(self):
        import threading

        super().__init__("holds a lock")
        self.lock = threading.Lock()


def raise_lock_holding():
    raise LockHoldingError()


def return_lock():
    import threading

    return threading.Lock()


def pid():
    return os.getpid()


def stubborn_sleep(seconds):
    """An impolite sibling: ignores cancellation, so it has to be killed."""
    time.sleep(seconds)
    return "should have been killed"


def sleep_then_raise(seconds, message="late boom"):
    time.sleep(seconds)
    raise ValueError(message)


def sleep_then_pid(seconds):
    time.sleep(seconds)
    return os.getpid()


_INITIALIZED = []


def init_worker(*args):
    _INITIALIZED.append(args)


def initialized():
    return list(_INITIALIZED)


def failing_init():
    raise RuntimeError("initializer exploded")


class SlowToPickle:
    """A task whose pickling takes 0.4 s."""

    def __call__(self):
        return "ran"

    def __reduce__(self):
        time.sleep(0.4)
        return (SlowToPickle, ())


# -- tasks for the timing of a batch's end (test_ending.py) ------------------------
# They stamp ``time.monotonic()``, which on Linux is one clock for every process, so
# a test can place a task's moments on the caller's own time line.


def stamp_then_raise(path, delay):
    """Sleep ``delay`` s, write the moment of failing to ``path``, then raise."""
    time.sleep(delay)
    with open(path, "w") as f:
        f.write(repr(time.monotonic()))
    raise ValueError("failed on time")


def ignore_sigterm_and_sleep(pidfile, seconds=100):
    """Ignore SIGTERM (only SIGKILL ends it) and sleep, ignoring ``cancelled()``."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(pidfile, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)


def exit_on_sigterm(pidfile, marker, seconds=100):
    """Sleep ignoring ``cancelled()``; on SIGTERM write its moment to ``marker`` and exit.

    Proves from outside that the worker was asked with SIGTERM before any SIGKILL.
    """

    def on_term(signum, frame):
        with open(marker, "w") as f:
            f.write(repr(time.monotonic()))
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    with open(pidfile, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
