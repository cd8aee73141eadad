"""Section 4 of the contract: exec_report, TaskReport figures, stats() and progress.

Every figure is checked against what really happened in a real worker process, with
margins tight enough to catch a wrong measurement: the parent's CPU instead of the
worker's, a cumulative CPU counter, a process-lifetime memory peak instead of the
task's own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from _tasks import pid, stubborn_sleep

import alloter_mp
from alloter_mp import (
    Cancelled,
    ExecTimeout,
    ProcessAlloter,
    Report,
    TaskError,
    TaskReport,
    WorkerCrashed,
    WorkerStats,
)

MiB = 2**20
STATUSES = {"ok", "error", "crashed", "timeout", "cancelled", "skipped"}


# -- tasks (module level: they travel to the workers) ---------------------------


def tiny() -> int:
    return 1


def burn(seconds: float) -> float:
    """Use ``seconds`` of CPU time (of this thread: however loaded the machine is).

    Returns the CPU time it used by its own clock, a reference for the report.
    """
    start = time.thread_time()
    n = 0.0
    while time.thread_time() - start < seconds:
        for _ in range(1000):
            n += 1.0
    return time.thread_time() - start


def sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


def fail_after(seconds: float) -> None:
    time.sleep(seconds)
    raise ValueError("planned failure")


def crash(code: int = 7) -> None:
    os._exit(code)


def sleep_until_cancelled(limit: float) -> str:
    """A polite sibling: returns as soon as its batch is cancelled."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if alloter_mp.cancelled():
            return "stopped early"
        time.sleep(0.005)
    return "ran to the end"


def allocate(mib: int) -> int:
    """Allocate ``mib`` MiB in 10 MiB chunks and touch every page; return bytes held."""
    chunks = []
    for _ in range(mib // 10):
        chunk = bytearray(10 * MiB)
        chunk[::4096] = b"\x01" * len(range(0, len(chunk), 4096))
        chunks.append(chunk)
    return sum(len(c) for c in chunks)


def call(fn, *args):  # type: ignore[no-untyped-def]
    return lambda: fn(*args)


# -- statuses --------------------------------------------------------------------


def test_ok_report_is_complete_and_in_order() -> None:
    with ProcessAlloter(2) as alloter:
        report = alloter.exec_report(*[call(lambda i: i * i, i) for i in range(5)])
    assert isinstance(report, Report)
    assert report.ok
    report.raise_for_status()  # nothing to raise
    assert [t.index for t in report.tasks] == [0, 1, 2, 3, 4]
    assert all(isinstance(t, TaskReport) for t in report.tasks)
    assert [t.status for t in report.tasks] == ["ok"] * 5
    assert [t.result for t in report.tasks] == [0, 1, 4, 9, 16]
    assert all(t.error is None for t in report.tasks)
    assert all(isinstance(t.pid, int) and t.pid > 0 for t in report.tasks)
    assert all(t.wall_s >= 0 and t.cpu_s >= 0 and t.peak_rss > 0 for t in report.tasks)


def test_error_cancelled_and_skipped() -> None:
    # limit 3: 0 fails at 0.4 s while 1 (polite) and 2 (stubborn) run; 3 and 4 wait
    # for a free worker and never start. Nothing ends before the failure, so this
    # does not depend on how the pool hands out queued tasks.
    tasks = [
        call(fail_after, 0.4),
        call(sleep_until_cancelled, 20.0),
        call(stubborn_sleep, 20.0),
        tiny,
        tiny,
    ]
    with ProcessAlloter(3, cancel_grace=0.3) as alloter:
        alloter.exec(tiny, tiny, tiny)  # warm workers: 1 and 2 surely start before 0 fails
        started = time.monotonic()
        report = alloter.exec_report(*tasks)
        elapsed = time.monotonic() - started
    statuses = [t.status for t in report.tasks]
    assert statuses[0] == "error"
    assert statuses[1] == "cancelled"  # returned by itself after the failure
    assert report.tasks[1].result == "stopped early"
    assert report.tasks[1].error is None
    assert statuses[2] == "cancelled"  # killed after its grace
    assert report.tasks[2].result is None
    killed_error = report.tasks[2].error
    assert isinstance(killed_error, Cancelled) and "task 0 failed" in str(killed_error)
    assert statuses[3:] == ["skipped", "skipped"]
    assert all(t.pid is None and t.wall_s == 0 and t.cpu_s == 0 for t in report.tasks[3:])
    # The report waits for the siblings to end, but not for their 20 s sleeps.
    assert 0.4 <= elapsed < 5.0
    assert 0.4 + 0.3 - 0.05 <= report.tasks[2].wall_s < 5.0  # ran until killed after the grace
    assert report.tasks[1].wall_s < 0.4 + 0.4  # stopped soon after the failure
    error = report.tasks[0].error
    assert isinstance(error, TaskError) and error.index == 0
    assert isinstance(error.__cause__, ValueError)
    assert "planned failure" in error.remote_traceback
    assert not report.ok
    with pytest.raises(TaskError) as info:
        report.raise_for_status()
    assert info.value.index == 0
    assert info.value is report.tasks[0].error


def test_crashed() -> None:
    with ProcessAlloter(2, cancel_grace=0.2) as alloter:
        report = alloter.exec_report(call(crash, 7), call(stubborn_sleep, 20.0), tiny, tiny)
        after = alloter.exec(pid, pid)  # the dead worker was replaced
    assert report.tasks[0].status == "crashed"
    error = report.tasks[0].error
    assert isinstance(error, WorkerCrashed) and error.index == 0 and error.exitcode == 7
    assert report.tasks[1].status in ("cancelled", "skipped")  # it may not have started yet
    assert [t.status for t in report.tasks[2:]] == ["skipped", "skipped"]
    assert report.tasks[0].pid not in after
    with pytest.raises(WorkerCrashed):
        report.raise_for_status()


def test_timeout() -> None:
    with ProcessAlloter(3, timeout=0.5, cancel_grace=0.1) as alloter:
        alloter.exec(tiny, tiny, tiny)  # warm workers: the 0.5 s are the tasks' own
        started = time.monotonic()
        report = alloter.exec_report(
            tiny, call(stubborn_sleep, 20.0), call(sleep_until_cancelled, 20.0)
        )
        elapsed = time.monotonic() - started
    assert [t.status for t in report.tasks] == ["ok", "timeout", "timeout"]
    assert report.tasks[2].result == "stopped early"
    assert 0.5 <= elapsed < 3.0
    assert report.tasks[1].wall_s >= 0.45
    assert not report.ok
    with pytest.raises(ExecTimeout):
        report.raise_for_status()


def test_every_status_is_reachable() -> None:
    seen: set[str] = set()
    with ProcessAlloter(2, timeout=5.0, cancel_grace=0.1) as alloter:
        alloter.exec(tiny, tiny)
        seen |= {t.status for t in alloter.exec_report(tiny).tasks}
        failing = (call(fail_after, 0.3), call(stubborn_sleep, 20), tiny)
        seen |= {t.status for t in alloter.exec_report(*failing).tasks}
        seen |= {t.status for t in alloter.exec_report(call(crash, 3)).tasks}
    with ProcessAlloter(1, timeout=0.3, cancel_grace=0.0) as alloter:
        seen |= {t.status for t in alloter.exec_report(call(stubborn_sleep, 20)).tasks}
    assert seen == STATUSES


# What each case must raise, named (comparing exec's error with the report's alone
# would pass if both were wrong alike): the exact type, its index, and a check.
_RAISES: dict[str, tuple[type[BaseException], int | None, Any]] = {
    "error": (TaskError, 1, lambda e: isinstance(e.__cause__, ValueError)),
    "crash": (WorkerCrashed, 2, lambda e: e.exitcode == 5),
    "timeout": (ExecTimeout, None, lambda e: isinstance(e, TimeoutError)),
}


@pytest.mark.parametrize("case", ["ok", "error", "crash", "timeout"])
def test_raise_for_status_raises_what_exec_raises(case: str) -> None:
    tasks = {
        "ok": [tiny, tiny],
        "error": [tiny, call(fail_after, 0.05), call(stubborn_sleep, 20)],
        "crash": [tiny, call(sleep, 0.05), call(crash, 5)],
        "timeout": [tiny, call(stubborn_sleep, 20)],
    }[case]
    with ProcessAlloter(2, timeout=1.0, cancel_grace=0.1) as alloter:
        try:
            expected: object = alloter.exec(*tasks)
        except Exception as exc:
            expected = exc
        report = alloter.exec_report(*tasks)
    if case == "ok":
        assert expected == [1, 1]
        assert report.ok
        assert report.raise_for_status() is None
        assert report.results == expected
        return
    kind, index, check = _RAISES[case]
    assert type(expected) is kind, f"exec raised {expected!r}, not a {kind.__name__}"
    assert getattr(expected, "index", None) == index and check(expected), repr(expected)
    assert not report.ok
    with pytest.raises(kind) as info:
        report.raise_for_status()
    assert type(info.value) is kind, f"raise_for_status raised {info.value!r}"
    assert getattr(info.value, "index", None) == index and check(info.value), repr(info.value)


# -- figures ---------------------------------------------------------------------


def test_cpu_is_the_workers_own_per_task() -> None:
    # One worker runs burn, sleep, burn, sleep in turn: a cumulative counter, the
    # parent's CPU or wall time would all be caught.
    with ProcessAlloter(1) as alloter:
        alloter.exec(tiny)  # the worker imports this module (CPU time of its first task)
        report = alloter.exec_report(
            call(burn, 0.3), call(sleep, 0.3), call(burn, 0.3), call(sleep, 0.3)
        )
    assert report.ok
    assert len({t.pid for t in report.tasks}) == 1
    for t in report.tasks[0::2]:  # burners
        assert 0.29 <= t.cpu_s <= 0.6, t
        assert -0.02 < t.cpu_s - t.result < 0.08, t  # what the task measured itself
        assert t.wall_s >= t.cpu_s - 0.01, t
    for t in report.tasks[1::2]:  # sleepers
        assert t.cpu_s < 0.1, t
        assert 0.3 <= t.wall_s < 1.5, t
    assert report.wall_s >= sum(t.wall_s for t in report.tasks) * 0.95


def test_cpu_and_wall_in_parallel() -> None:
    with ProcessAlloter(2) as alloter:
        alloter.exec(call(sleep, 0.05), call(sleep, 0.05))  # both workers import this module
        report = alloter.exec_report(call(burn, 0.3), call(sleep, 0.3))
    burner, sleeper = report.tasks
    assert burner.pid != sleeper.pid
    assert 0.29 <= burner.cpu_s <= 0.6
    assert -0.02 < burner.cpu_s - burner.result < 0.08
    assert sleeper.cpu_s < 0.1
    assert burner.wall_s >= 0.29 and 0.3 <= sleeper.wall_s < 1.5
    # They ran side by side: the call took about as long as the longer one.
    assert report.wall_s < burner.wall_s + 0.3


def test_peak_rss_is_per_task() -> None:
    # limit 1: every task runs on the same worker, one after the other.
    with ProcessAlloter(1) as alloter:
        report = alloter.exec_report(call(allocate, 200), tiny, call(allocate, 100), tiny)
        later = alloter.exec_report(tiny)
    tasks = report.tasks + later.tasks
    assert report.ok and later.ok
    assert len({t.pid for t in tasks}) == 1
    big, small, mid, small2, small3 = tasks
    assert big.result == 200 * MiB
    assert 200 * MiB <= big.peak_rss < 200 * MiB + 150 * MiB
    assert 100 * MiB <= mid.peak_rss < 100 * MiB + 150 * MiB
    assert mid.peak_rss < big.peak_rss - 50 * MiB  # its own peak, not the worker's so far
    for t in (small, small2, small3):
        assert 0 < t.peak_rss < 100 * MiB, t  # a process-lifetime peak would be >= 200 MiB


def test_peak_rss_is_per_task_in_a_worker_started_by_a_big_parent() -> None:
    # A spawned worker's getrusage ru_maxrss starts at the high-water mark of the
    # image it replaced at exec, here the 300 MiB parent, and resetting the mark does
    # not clear that: a meter reading only ru_maxrss would report >= 300 MiB for
    # every task of this worker.
    ballast = bytearray(300 * MiB)  # zero-filled, so resident
    with ProcessAlloter(1, start_method="spawn") as alloter:
        report = alloter.exec_report(tiny, call(allocate, 50), tiny)
    del ballast
    assert report.ok
    first, mid, last = report.tasks
    assert 50 * MiB <= mid.peak_rss < 150 * MiB
    assert 0 < first.peak_rss < 100 * MiB and 0 < last.peak_rss < 100 * MiB


# -- report surface ----------------------------------------------------------------


def _mixed_report() -> Report:
    # 0 ok, 1 error, 2 and 3 cancelled; 4 and 5 ok or skipped (the pool may hand them
    # to the worker 0 freed, or queue them behind a busy one).
    with ProcessAlloter(4, cancel_grace=0.1) as alloter:
        alloter.exec(tiny, tiny, tiny, tiny)
        return alloter.exec_report(
            call(burn, 0.05),
            call(fail_after, 0.3),
            call(sleep_until_cancelled, 20),
            call(stubborn_sleep, 20),
            tiny,
            tiny,
        )


def test_to_dict_is_json_and_has_no_results() -> None:
    report = _mixed_report()
    data = report.to_dict()
    text = json.dumps(data)
    back = json.loads(text)
    assert back["ok"] is False
    assert len(back["tasks"]) == len(report.tasks)
    assert back["counts"]["error"] == 1 and back["counts"]["cancelled"] == 2
    assert back["counts"]["ok"] >= 1
    assert sum(back["counts"].values()) == len(report.tasks)
    assert back["error"]["type"].startswith("TaskError")
    for t, d in zip(report.tasks, back["tasks"], strict=True):
        assert d["index"] == t.index and d["status"] == t.status and d["pid"] == t.pid
        assert d["peak_rss"] == t.peak_rss
        assert abs(d["wall_s"] - t.wall_s) < 1e-5 and abs(d["cpu_s"] - t.cpu_s) < 1e-5
        assert "result" not in d
        assert (d["error"] is None) == (t.error is None)
    failed = back["tasks"][1]
    assert (
        "ValueError" in failed["error"]["type"] and "planned failure" in failed["error"]["message"]
    )
    assert json.loads(json.dumps(report.tasks[0].to_dict()))["status"] == "ok"


def test_str_is_a_table_with_a_row_per_task_and_totals() -> None:
    report = _mixed_report()
    text = str(report)
    lines = text.splitlines()
    for t in report.tasks:
        rows = [line for line in lines if re.match(rf"{t.index}\s+{t.status}\b", line)]
        assert len(rows) == 1, (t, text)
        if t.pid is not None:
            assert str(t.pid) in rows[0]
        assert f"{t.wall_s:.3f}" in rows[0]
    header = lines[0].lower()
    for word in ("status", "wall", "cpu", "peak", "pid"):
        assert word in header
    totals = [line for line in lines if line.startswith("total")]
    assert len(totals) == 1
    assert "1 error" in totals[0] and "2 cancelled" in totals[0]
    assert f"{report.wall_s:.3f}" in totals[0]
    assert "planned failure" in text


def test_empty_report() -> None:
    with ProcessAlloter(1) as alloter:
        report = alloter.exec_report()
    assert report.ok and report.tasks == []
    assert json.loads(json.dumps(report.to_dict()))["tasks"] == []
    assert "total" in str(report)


# -- progress -----------------------------------------------------------------------


def test_progress_bar_on_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    with ProcessAlloter(2, progress=True, cancel_grace=0.1) as alloter:
        alloter.exec_report(*[call(sleep, 0.05) for _ in range(5)])
        out, err = capfd.readouterr()
        assert out == ""
        assert "5/5" in err and "failed=0" in err
        # Several refreshes as tasks end, not one line at the end only.
        assert err.count("/5") >= 2

        alloter.exec_report(tiny, call(fail_after, 0.1), call(stubborn_sleep, 20), tiny, tiny)
        out, err = capfd.readouterr()
        assert out == ""
        assert "5/5" in err and "failed=1" in err


def test_no_progress_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    with ProcessAlloter(2, cancel_grace=0.1) as alloter:
        alloter.exec_report(*[call(sleep, 0.05) for _ in range(5)])
        alloter.exec_report(tiny, call(fail_after, 0.1), call(stubborn_sleep, 20), tiny)
        alloter.exec(tiny, tiny)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


# -- stats ----------------------------------------------------------------------------


def test_stats_rows_are_live_workers() -> None:
    with ProcessAlloter(2) as alloter:
        assert alloter.stats() == []  # no worker started yet
        pids = set(alloter.exec(*[pid] * 6))
        rows = alloter.stats()
        assert all(isinstance(r, WorkerStats) for r in rows)
        assert len(rows) == 2
        assert {r.pid for r in rows} >= pids
        for r in rows:
            proc = psutil.Process(r.pid)
            assert proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
            assert r.rss > 5 * MiB
            assert abs(r.rss - proc.memory_info().rss) < 20 * MiB
            assert r.cpu_percent >= 0
        assert sum(r.tasks_done for r in rows) == 6
        alloter.exec(*[tiny] * 4)
        assert sum(r.tasks_done for r in alloter.stats()) == 10

        # A dead worker leaves the stats; its replacement joins them.
        report = alloter.exec_report(call(crash, 9))
        dead = report.tasks[0].pid
        alloter.exec(tiny, tiny)
        live = {r.pid for r in alloter.stats()}
        assert dead not in live and len(live) == 2


def test_stats_cpu_percent_sees_a_busy_worker() -> None:
    with ProcessAlloter(1) as alloter:
        alloter.exec(tiny)
        busy = threading.Thread(target=alloter.exec, args=(call(burn, 1.5),))
        busy.start()
        try:
            time.sleep(0.5)
            first = alloter.stats()
            time.sleep(0.4)
            second = alloter.stats()
        finally:
            busy.join()
        third = alloter.stats()
    assert len(first) == len(second) == 1
    # Busy all the time (a whole core when the machine is idle): even the very first
    # reading, which psutil alone would give as 0.0, says so.
    # (Margins for a loaded machine, where the worker gets a share of a core.)
    assert first[0].cpu_percent > 5
    assert second[0].cpu_percent > 10
    assert third[0].tasks_done == 2


# -- the example ----------------------------------------------------------------------


def test_report_demo_example_runs() -> None:
    root = Path(__file__).resolve().parent.parent
    demo = root / "examples" / "report_demo.py"
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(demo)],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout
    tables = [line for line in out.splitlines() if line.startswith("total")]
    assert len(tables) == 2, out
    for status in ("ok", "error", "cancelled", "skipped", "crashed"):
        assert re.search(rf"^\d+\s+{status}\s", out, re.MULTILINE), (status, out)
    assert "record 17 has no 'id' field" in out
    assert "passed the memory limit" in out
    assert re.search(r"pid \d+: [\d.]+ MiB resident", out)
