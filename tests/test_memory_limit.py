"""memory_limit=: a task whose worker passes the limit is killed with MemoryLimitExceeded.

The runaway task below grows by 10 MiB chunks (every page touched, so they are
resident) and, after each chunk, writes its own resident size (read from
/proc/self/statm) and the time to a log file. That log is a measurement independent
of the supervisor's sampling: it shows how far the worker really got before it was
killed. Between two log lines the worker grows by at most one chunk, so its true peak
is at most the last logged size plus one chunk.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import _tasks
import pytest

from alloter_mp import (
    MemoryLimitExceeded,
    ProcessAlloter,
    TaskError,
    WorkerCrashed,
)

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/statm"), reason="the runaway task reads /proc/self/statm"
)

MiB = 2**20
LIMIT = 150 * MiB
CHUNK = 10 * MiB
# "Never much more than the limit": the worker's true peak stays below this.
MARGIN = 100 * MiB


def hog(log_path: str, total: int = 400 * MiB) -> str:
    """Grow to ``total`` bytes in touched chunks, logging "time rss" after each; then hold."""
    page = os.sysconf("SC_PAGE_SIZE")
    chunks = []
    with open(log_path, "w") as log:
        while len(chunks) * CHUNK < total:
            chunk = bytearray(CHUNK)
            chunk[::4096] = b"\x01" * len(range(0, CHUNK, 4096))
            chunks.append(chunk)
            with open("/proc/self/statm") as statm:
                rss = int(statm.read().split()[1]) * page
            log.write(f"{time.monotonic()} {rss}\n")
            log.flush()
        log.write("done\n")  # only reached if the limit did not stop us
        log.flush()
        time.sleep(30)  # hold it all: only the limit (or the timeout) can end this task
    return "held 400 MiB"


def use(mib: int) -> int:
    data = bytearray(mib * MiB)
    data[::4096] = b"\x01" * len(range(0, len(data), 4096))
    return len(data)


def read_log(path: Path) -> tuple[list[tuple[float, int]], bool]:
    records = []
    done = False
    for line in path.read_text().splitlines():
        if line == "done":
            done = True
        elif line:
            t, rss = line.split()
            records.append((float(t), int(rss)))
    return records, done


def check_the_kill(
    error: BaseException, log: Path, raised_at: float, pid: int | None = None
) -> None:
    """What the error says, and what the task's own log says about the worker's memory."""
    assert isinstance(error, MemoryLimitExceeded)
    assert isinstance(error, WorkerCrashed) and isinstance(error, TaskError)
    assert error.index == 0
    assert error.limit == LIMIT
    assert error.exitcode == -signal.SIGKILL
    if pid is not None:
        assert error.pid == pid
    assert "memory limit" in str(error)

    records, done = read_log(log)
    assert not done, "the task allocated all 400 MiB: the limit did not stop it"
    assert records, "the task never logged"
    logged_peak = max(rss for _, rss in records)
    true_peak_bound = logged_peak + CHUNK  # a chunk may have been under way at the kill
    # The worker never held much more than the limit.
    assert true_peak_bound < LIMIT + MARGIN, (logged_peak / MiB, error.peak_rss / MiB)
    # The peak reported is a real sample: above the limit (that is why it was killed)
    # and not above what the worker can have held.
    assert LIMIT < error.peak_rss <= true_peak_bound + 2 * MiB, (
        error.peak_rss / MiB,
        logged_peak / MiB,
    )
    # Killed soon after passing the limit: the last time the task was seen below it
    # (or its start) is at most ~100 ms before the parent already knew of the kill.
    below = [t for t, rss in records if rss <= LIMIT]
    crossed_after = below[-1] if below else records[0][0]
    assert raised_at - crossed_after < 0.25, raised_at - crossed_after


def test_exec_raises_memory_limit_exceeded_and_the_pool_heals(tmp_path: Path) -> None:
    log = tmp_path / "hog.log"
    with ProcessAlloter(2, memory_limit=LIMIT, cancel_grace=0.2) as alloter:
        before = set(alloter.exec(_tasks.pid, _tasks.pid))
        started = time.monotonic()
        with pytest.raises(MemoryLimitExceeded) as info:
            alloter.exec(lambda: hog(str(log)), lambda: _tasks.stubborn_sleep(30))
        raised_at = time.monotonic()
        assert raised_at - started < 2.0  # fast return, not after the sibling's 30 s
        check_the_kill(info.value, log, raised_at)
        dead = info.value.pid
        assert dead in before

        # The pool heals: the dead worker is replaced and the next call works.
        after = alloter.exec(_tasks.pid, _tasks.pid, lambda: use(50))
        assert after[2] == 50 * MiB
        assert dead not in after[:2]
        live = {row.pid for row in alloter.stats()}
        assert dead not in live
        assert set(after[:2]) <= live  # (the killed sibling's worker is replaced on demand)

        # And the limit still holds on the new worker.
        with pytest.raises(MemoryLimitExceeded) as again:
            alloter.exec(lambda: hog(str(log)))
        check_the_kill(again.value, log, time.monotonic())


def test_exec_report_shows_the_kill_and_the_ended_siblings(tmp_path: Path) -> None:
    log = tmp_path / "hog.log"
    # cancel_grace=0: the sibling is killed at once, so the report is back as soon as
    # the parent knows of the kill and the time it took can be checked.
    with ProcessAlloter(2, memory_limit=LIMIT, cancel_grace=0.0) as alloter:
        alloter.exec(_tasks.pid, _tasks.pid)
        report = alloter.exec_report(
            lambda: hog(str(log)), lambda: _tasks.stubborn_sleep(30), _tasks.pid, _tasks.pid
        )
        raised_at = time.monotonic()
        statuses = [t.status for t in report.tasks]
        assert statuses == ["crashed", "cancelled", "skipped", "skipped"]
        hog_report = report.tasks[0]
        error = hog_report.error
        assert error is not None
        check_the_kill(error, log, raised_at, pid=hog_report.pid)
        assert isinstance(error, MemoryLimitExceeded)
        assert hog_report.peak_rss == error.peak_rss
        assert hog_report.wall_s < 1.0
        assert not report.ok
        with pytest.raises(MemoryLimitExceeded):
            report.raise_for_status()
        assert report.to_dict()["tasks"][0]["error"]["type"] == "MemoryLimitExceeded"
        assert alloter.exec_report(_tasks.pid, _tasks.pid).ok


def test_tasks_under_the_limit_are_left_alone() -> None:
    with ProcessAlloter(1, memory_limit=LIMIT) as alloter:
        report = alloter.exec_report(lambda: use(80), lambda: use(80), _tasks.pid)
        assert alloter.exec(lambda: use(80)) == [80 * MiB]
    assert report.ok, str(report)
    assert [t.status for t in report.tasks] == ["ok", "ok", "ok"]
    for t in report.tasks[:2]:
        assert 80 * MiB <= t.peak_rss < LIMIT
    assert report.tasks[2].peak_rss < 80 * MiB
