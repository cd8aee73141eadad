"""Module-level task functions for the benchmark's workers.

They live in their own importable module (not ``__main__``) so that every library,
whatever its start method or serializer, pickles them by reference and the workers
import the same code (``scripts/`` is on the ``PYTHONPATH`` that ``bench.py`` hands
down).  Keep this module, and the package's ``__init__``, free of heavy imports:
workers started with spawn, forkserver or loky import it.  The numpy tasks live in
``np_tasks`` for that reason.
"""

from __future__ import annotations

import os
import time


def noop(i: int = 0) -> int:
    """The no-op task: returns its argument so the caller can check order."""
    return i


def spin(n: int) -> float:
    """Pure-Python CPU loop of ``n`` iterations; returns the CPU seconds it used."""
    c0 = time.process_time()
    x = 0
    for k in range(n):
        x += k * k & 7
    return time.process_time() - c0


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


FAIL_TAG = "bench-fail@"


def fail_now() -> None:
    """Raise at once; the message carries ``time.time()`` taken just before raising.

    ``time.time()`` (not ``perf_counter``) because the reading is compared with the
    parent's clock: the wall clock is the one clock every process shares by contract.
    """
    t = time.time()
    raise ValueError(f"{FAIL_TAG}{t!r}")


def spin_forever(pidfile: str) -> None:
    """Write this process's pid to ``pidfile``, then loop forever (never returns)."""
    tmp = pidfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, pidfile)
    x = 0
    while True:
        x += 1


def whoami(_: object = None) -> int:
    """The pid of the process running the task (checks that work left the parent)."""
    return os.getpid()


def log_records(n: int) -> int:
    """Emit ``n`` INFO records on the "bench" logger (relayed to the caller's handlers
    by alloter_mp); returns ``n``."""
    import logging

    log = logging.getLogger("bench")
    for i in range(n):
        log.info("record %d of %s", i, n)
    return n


def log_marking(n: int, path: str) -> int:
    """Like ``log_records``, writing how many records it has emitted to ``path`` every
    100 records (so the caller can see how far it got while its handler is stuck)."""
    import logging

    log = logging.getLogger("bench")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for i in range(n):
            if i % 100 == 0:
                os.pwrite(fd, f"{i:<12}".encode(), 0)
            log.info("record %d of %s", i, n)
    finally:
        os.close(fd)
    return n
