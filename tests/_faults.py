"""Fault-task factories shared by the reliability tests (model, soak, parent death,
start methods).

Every task records what it did in a *marker directory*, so a test can check from
outside which tasks really started, which worker ran them and which processes they
started:

* ``<i>.start``  one line ``"<worker pid> <monotonic time>"`` appended first thing by
  every run of task ``i`` (a retried task has one line per run);
* ``<i>.child``  one line ``"<pid> <create_time>"`` per process the task started;
* ``<i>.cancel`` one line ``"<monotonic time>"`` appended each time a cooperative task
  saw ``alloter_mp.cancelled()``.

Times are ``time.monotonic()``: one clock for every process of the machine (Linux's
``CLOCK_MONOTONIC``), so a test compares them with its own. Each line is written by
one ``write`` to a file opened for appending, so lines of several runs never mix.

Tasks are ``functools.partial`` objects over module-level functions, so they pickle
by reference under every start method (the tests directory is on ``sys.path``).
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from _procs import (  # noqa: F401 (the tests use them as F.*, beside the fault tasks)
    is_alive,
    kill_all,
    live_descendants,
    open_fds,
    wait_dead,
)

import alloter_mp

# -- the kinds of task ------------------------------------------------------------

VALUE = "value"  # return a value at once
SLEEP = "sleep"  # sleep briefly, then return a value
RAISE = "raise"  # raise ValueError
SEGFAULT = "segfault"  # read address 0
EXIT = "exit"  # os._exit(code)
SIGKILL_SELF = "sigkill_self"  # SIGKILL its own worker
UNPICKLABLE = "unpicklable"  # return a threading.Lock
MEMORY = "memory"  # allocate until the memory limit kills it
SLEEP_LONG = "sleep_long"  # sleep far past any timeout, ignoring cancelled()
COOPERATIVE = "cooperative"  # wait for cancelled(), then return by itself
IGNORE_TERM = "ignore_term"  # ignore SIGTERM and spin
CHILD_HANG = "child_hang"  # start a child process (several ways) and hang
# Fail the first runs, then return a value: param (how, failures), ``how`` one of
# FLAKY_MODES. It counts its runs by its own start marker.
FLAKY = "flaky"

# The task returns a value by itself.
BENIGN = frozenset({VALUE, SLEEP})
# The task fails, and the failure is known as soon as it runs.
FAILING = frozenset({RAISE, SEGFAULT, EXIT, SIGKILL_SELF, UNPICKLABLE, MEMORY})
# Failures that kill the worker process: WorkerCrashed.
CRASHING = frozenset({SEGFAULT, EXIT, SIGKILL_SELF, MEMORY})
# The task never ends by itself (within any timeout a test uses): it must be ended.
HANGING = frozenset({SLEEP_LONG, COOPERATIVE, IGNORE_TERM, CHILD_HANG})
# Hanging tasks that a kill must end (a cooperative one may return by itself).
MUST_BE_KILLED = frozenset({SLEEP_LONG, IGNORE_TERM, CHILD_HANG})

ALL_KINDS = (
    VALUE, SLEEP, RAISE, SEGFAULT, EXIT, SIGKILL_SELF, UNPICKLABLE, MEMORY,
    SLEEP_LONG, COOPERATIVE, IGNORE_TERM, CHILD_HANG,
)  # fmt: skip

# How a FLAKY task fails its first runs.
FLAKY_MODES = (
    "raise",  # raise ValueError
    "exit",  # os._exit(3): WorkerCrashed
    "hang",  # sleep past any timeout, ignoring cancelled(): ended by a task timeout
)

# How a CHILD_HANG task starts its child.
CHILD_MODES = (
    "group",  # a plain child: in the worker's process group
    "session",  # a child in a session of its own: only psutil's descendants reach it
    "orphan",  # a grandchild whose parent exited: only the process group reaches it
)

HANG_SECONDS = 30.0
MEMORY_STEP = 16 * 1024 * 1024
MEMORY_MOST = 2 * 1024 * 1024 * 1024


@dataclass(frozen=True)
class Fault:
    """One task of a generated batch: what it does, and the parameter it needs."""

    kind: str
    param: Any = None

    def expected_result(self, index: int) -> Any:
        """What the task returns when it succeeds (only for BENIGN kinds)."""
        return ("r", index, self.param)


# -- markers ----------------------------------------------------------------------


def _write(path: Path, text: str, mode: str = "w") -> None:
    with open(path, mode) as f:
        f.write(text)
        f.flush()


def _append_line(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode())  # one write: lines never interleave
    finally:
        os.close(fd)


def _mark_start(d: str, i: int) -> None:
    _append_line(Path(d) / f"{i}.start", f"{os.getpid()} {time.monotonic()!r}")


def _mark_cancel(d: str, i: int) -> None:
    _append_line(Path(d) / f"{i}.cancel", repr(time.monotonic()))


def _lines(path: Path) -> list[list[str]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [line.split() for line in text.splitlines() if line.strip()]


def _record_child(d: str, i: int, pid: int) -> None:
    try:
        created = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return
    _write(Path(d) / f"{i}.child", f"{pid} {created}\n", "a")


def runs(d: str | Path) -> dict[int, list[tuple[int, float]]]:
    """``{task index: [(worker pid, monotonic start time), ...]}``: every run of
    every task that started, in the order they started."""
    out = {}
    for p in Path(d).glob("*.start"):
        lines = [(int(pid), float(t)) for pid, t in _lines(p)]
        if lines:
            out[int(p.name.split(".")[0])] = sorted(lines, key=lambda run: run[1])
    return out


def started(d: str | Path) -> dict[int, int]:
    """``{task index: worker pid}`` of every task that started (its last run)."""
    return {i: r[-1][0] for i, r in runs(d).items()}


def children(d: str | Path) -> list[tuple[int, int, float]]:
    """``(task index, pid, create_time)`` of every process a task started."""
    out = []
    for p in Path(d).glob("*.child"):
        index = int(p.name.split(".")[0])
        for line in p.read_text().splitlines():
            if line.strip():
                pid, created = line.split()
                out.append((index, int(pid), float(created)))
    return out


def cancels(d: str | Path) -> dict[int, list[float]]:
    """``{task index: [monotonic time, ...]}``: each time a cooperative task saw
    ``cancelled()``."""
    out = {}
    for p in Path(d).glob("*.cancel"):
        times = sorted(float(t) for (t,) in _lines(p))
        if times:
            out[int(p.name.split(".")[0])] = times
    return out


def saw_cancel(d: str | Path) -> set[int]:
    return set(cancels(d))


# -- the task bodies (module level, so they pickle by reference) ----------------


def value(d: str, i: int, param: Any) -> Any:
    _mark_start(d, i)
    return ("r", i, param)


def sleep(d: str, i: int, param: float) -> Any:
    _mark_start(d, i)
    time.sleep(param)
    return ("r", i, param)


def raise_(d: str, i: int, param: float | None) -> Any:
    _mark_start(d, i)
    if param:
        time.sleep(param)  # fail a little later, once the siblings surely run
    raise ValueError(f"fault in task {i}")


def segfault(d: str, i: int, param: Any) -> Any:
    _mark_start(d, i)
    ctypes.string_at(0)


def exit_(d: str, i: int, param: int) -> Any:
    _mark_start(d, i)
    os._exit(param)


def sigkill_self(d: str, i: int, param: Any) -> Any:
    _mark_start(d, i)
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(HANG_SECONDS)


def unpicklable(d: str, i: int, param: Any) -> Any:
    _mark_start(d, i)
    return threading.Lock()


def memory(d: str, i: int, param: Any) -> Any:
    _mark_start(d, i)
    hog = []
    while len(hog) * MEMORY_STEP < MEMORY_MOST:
        hog.append(b"x" * MEMORY_STEP)  # bytes are written, so the pages are resident
        time.sleep(0.002)
    time.sleep(HANG_SECONDS)  # not killed: hang, so the test sees a timeout instead


def sleep_long(d: str, i: int, param: Any) -> Any:
    _mark_start(d, i)
    time.sleep(HANG_SECONDS)
    return ("r", i, param)


def cooperative(d: str, i: int, param: Any) -> Any:
    _mark_start(d, i)
    end = time.monotonic() + HANG_SECONDS
    while time.monotonic() < end:
        if alloter_mp.cancelled():
            _mark_cancel(d, i)
            return "noticed"
        time.sleep(0.005)
    return "not noticed"


def ignore_term(d: str, i: int, param: Any) -> Any:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _mark_start(d, i)
    end = time.monotonic() + HANG_SECONDS
    while time.monotonic() < end:
        spin = time.perf_counter() + 0.001
        while time.perf_counter() < spin:  # spin a little, sleep a little (2 cores)
            pass
        time.sleep(0.004)


def child_hang(d: str, i: int, param: str) -> Any:
    _mark_start(d, i)
    if param == "orphan":
        out = subprocess.run(
            ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"],
            capture_output=True,
            text=True,
            check=True,
        )
        _record_child(d, i, int(out.stdout.strip()))
    else:
        child = subprocess.Popen(["sleep", "60"], start_new_session=(param == "session"))
        _record_child(d, i, child.pid)
    time.sleep(HANG_SECONDS)


def flaky(d: str, i: int, param: tuple[str, int]) -> Any:
    _mark_start(d, i)
    how, failures = param
    if len(_lines(Path(d) / f"{i}.start")) <= failures:
        if how == "raise":
            raise ValueError(f"fault in task {i}")
        if how == "exit":
            os._exit(3)
        time.sleep(HANG_SECONDS)
    return ("r", i, param)


_BODIES: dict[str, Callable[..., Any]] = {
    VALUE: value,
    SLEEP: sleep,
    RAISE: raise_,
    SEGFAULT: segfault,
    EXIT: exit_,
    SIGKILL_SELF: sigkill_self,
    UNPICKLABLE: unpicklable,
    MEMORY: memory,
    SLEEP_LONG: sleep_long,
    COOPERATIVE: cooperative,
    IGNORE_TERM: ignore_term,
    CHILD_HANG: child_hang,
    FLAKY: flaky,
}


def make_task(fault: Fault, index: int, marker_dir: str | Path) -> Callable[[], Any]:
    """The task (a picklable zero-argument callable) for ``fault`` at ``index``."""
    return functools.partial(_BODIES[fault.kind], str(marker_dir), index, fault.param)


def run_item(d: str, faults: tuple[tuple[str, Any], ...], index: int) -> Any:
    """Item ``index`` of a ``map`` over the task indexes: the task ``faults[index]``
    (``(kind, param)`` pairs), run as :func:`make_task` would."""
    kind, param = faults[index]
    return _BODIES[kind](d, index, param)


def make_item_fn(faults: list[Fault], marker_dir: str | Path) -> Callable[[int], Any]:
    """The function (picklable) that ``map(fn, range(len(faults)))`` runs the faults with."""
    pairs = tuple((f.kind, f.param) for f in faults)
    return functools.partial(run_item, str(marker_dir), pairs)


def expected_exitcode(fault: Fault) -> int | None:
    """The ``WorkerCrashed.exitcode`` a crashing fault gives."""
    if fault.kind == SEGFAULT:
        return -signal.SIGSEGV
    if fault.kind == EXIT:
        return int(fault.param)
    if fault.kind == FLAKY:
        return 3
    if fault.kind in (SIGKILL_SELF, MEMORY):
        return -signal.SIGKILL
    raise ValueError(f"{fault.kind} does not crash")
