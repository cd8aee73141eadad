"""Per-task control (contract section 9): task timeouts, retries, keep-going maps,
and alloters derived with with_options().

Tasks record what they did in files (start times, runs), so the tests check from
outside how often and when each task really ran.
"""

from __future__ import annotations

import itertools
import os
import pickle
import signal
import time
from pathlib import Path

import psutil
import pytest
from _procs import pid_gone

import alloter_mp
from alloter_mp import (
    Alloter,
    ExecTimeout,
    ProcessAlloter,
    TaskError,
    TaskTimeout,
    WorkerCrashed,
)

GRACE = 0.2
ESCALATION = 0.2  # SIGTERM -> SIGKILL (the pool's KILL_ESCALATION)
# A loaded 2-core CI machine: process start, scheduling, supervisor wake-ups.
SLACK = 0.35


# -- tasks -------------------------------------------------------------------------


def note_run(d: str, name: str) -> None:
    with open(os.path.join(d, f"{name}.runs"), "a") as f:
        f.write(f"{time.time()} {os.getpid()}\n")


def runs(d: Path, name: str) -> list[tuple[float, int]]:
    path = d / f"{name}.runs"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        t, pid = line.split()
        out.append((float(t), int(pid)))
    return out


def spin_and_note(d: str, name: str) -> None:
    note_run(d, name)
    with open(os.path.join(d, f"{name}.pid"), "w") as f:
        f.write(str(os.getpid()))
    while True:
        pass


def sleep_and_note(d: str, name: str, seconds: float) -> str:
    note_run(d, name)
    time.sleep(seconds)
    return name


def cooperate(d: str, name: str) -> str:
    note_run(d, name)
    while not alloter_mp.cancelled():
        time.sleep(0.005)
    return "noticed"


def time_left_now() -> float | None:
    return alloter_mp.time_left()


def crash_first_times(d: str, name: str, crashes: int) -> str:
    note_run(d, name)
    if len(runs(Path(d), name)) <= crashes:
        os._exit(7)
    return name


def raise_first_times(d: str, name: str, failures: int, exc: type[BaseException]) -> str:
    note_run(d, name)
    if len(runs(Path(d), name)) <= failures:
        raise exc(f"attempt {len(runs(Path(d), name))}")
    return name


def raise_after(d: str, name: str, seconds: float) -> None:
    note_run(d, name)
    time.sleep(seconds)
    raise ValueError(name)


def hang_item(x: int) -> int:
    if x == 1:
        time.sleep(30)
    return x


def item_task(d: str, x: int) -> int:
    note_run(d, f"item{x}")
    if x == 5:
        raise ValueError("five")
    if x == 7:
        os._exit(3)
    if x == 9:
        time.sleep(30)
    return x * 10


def crash_item_once(d: str, x: int) -> int:
    note_run(d, f"item{x}")
    if x == 3 and len(runs(Path(d), "item3")) == 1:
        os._exit(5)
    return x


def still_cancelled_free(d: str, name: str, seconds: float) -> bool:
    """Run ``seconds``; True if cancelled() never turned True meanwhile."""
    note_run(d, name)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if alloter_mp.cancelled():
            return False
        time.sleep(0.01)
    return True


def _task(fn, *args):
    import functools

    return functools.partial(fn, *args)


# -- task_timeout ------------------------------------------------------------------


def test_task_timeout_ends_a_spinning_task_and_its_process(tmp_path: Path) -> None:
    d = str(tmp_path)
    tt = 0.5
    with ProcessAlloter(2, task_timeout=tt, cancel_grace=GRACE) as a:
        a.exec(lambda: 1)  # warm: the bound below is about the task, not start-up
        t0 = time.monotonic()
        with pytest.raises(TaskTimeout) as info:
            a.exec(_task(sleep_and_note, d, "ok", 0.05), _task(spin_and_note, d, "spin"))
        elapsed = time.monotonic() - t0
    err = info.value
    assert err.index == 1 and err.timeout == tt
    assert isinstance(err, TaskError) and isinstance(err, TimeoutError)
    # Told at its deadline, killed after the grace (SIGTERM ends a spinning task);
    # the warm worker starts it within milliseconds of the call.
    assert elapsed >= tt + GRACE - 0.02, elapsed
    assert elapsed <= tt + GRACE + SLACK, elapsed
    pid = int((tmp_path / "spin.pid").read_text())
    assert pid_gone(pid, timeout=ESCALATION + SLACK)


def test_task_timeout_counts_from_the_task_own_start(tmp_path: Path) -> None:
    d = str(tmp_path)
    # One worker: the second task starts 0.35 s into the call, past nothing of its own.
    with ProcessAlloter(1, task_timeout=0.6) as a:
        tasks = [_task(sleep_and_note, d, f"t{i}", 0.35) for i in range(3)]
        assert a.exec(*tasks) == ["t0", "t1", "t2"]  # the call takes 1.05 s > 0.6 s


def test_time_left_inside_a_task_counts_the_task_timeout() -> None:
    with ProcessAlloter(1, timeout=30.0, task_timeout=2.0) as a:
        (left,) = a.exec(time_left_now)
    assert left is not None and 1.5 < left <= 2.0


def test_a_task_told_of_its_timeout_that_returns_in_its_grace_still_timed_out(
    tmp_path: Path,
) -> None:
    d = str(tmp_path)
    with ProcessAlloter(1, task_timeout=0.3, cancel_grace=1.0) as a:
        report = a.exec_report(_task(cooperate, d, "c"))
        pid_before = report.tasks[0].pid
        (t,) = report.tasks
        assert t.status == "timeout" and isinstance(t.error, TaskTimeout)
        assert t.attempts == 1
        # It returned by itself: its worker was not killed, and runs the next task.
        assert a.exec(os.getpid) == [pid_before]


def test_a_task_timeout_ends_the_siblings_without_errors_return(tmp_path: Path) -> None:
    d = str(tmp_path)
    with ProcessAlloter(2, task_timeout=2.0, cancel_grace=0.5) as a:
        a.exec(lambda: 1, lambda: 1)  # warm
        # The spinner times out at 2.0 s and is killed at 2.5 s, which ends the call;
        # the sibling starts at 1.0 s, so its own timeout (3.0 s) is far off, and it
        # has the grace to notice that it was cancelled.
        report = a.exec_report(
            _task(spin_and_note, d, "spin"),
            _task(sleep_and_note, d, "short", 1.0),
            _task(cooperate, d, "sib"),
            _task(sleep_and_note, d, "queued", 0.0),
        )
    statuses = [t.status for t in report.tasks]
    assert statuses == ["timeout", "ok", "cancelled", "skipped"], statuses
    assert isinstance(report.outcome, TaskTimeout) and report.outcome.index == 0
    assert report.tasks[2].result == "noticed"
    assert report.tasks[3].attempts == 0 and report.tasks[3].start_s is None


def test_task_timeout_pickles_with_its_fields() -> None:
    err = pickle.loads(pickle.dumps(TaskTimeout(3, 1.5)))
    assert (type(err), err.index, err.timeout) == (TaskTimeout, 3, 1.5)
    assert "1.5" in str(err) and isinstance(err, TimeoutError)


# -- retries -----------------------------------------------------------------------


def test_a_crashing_task_is_retried_until_it_succeeds(tmp_path: Path) -> None:
    d = str(tmp_path)
    with ProcessAlloter(2, retries=2) as a:
        report = a.exec_report(_task(crash_first_times, d, "flaky", 2), lambda: "other")
    assert report.ok and report.results == ["flaky", "other"]
    assert [t.attempts for t in report.tasks] == [3, 1]
    assert len(runs(tmp_path, "flaky")) == 3


def test_retries_run_out_and_the_last_failure_counts(tmp_path: Path) -> None:
    d = str(tmp_path)
    with ProcessAlloter(2, retries=1) as a, pytest.raises(WorkerCrashed) as info:
        a.exec(_task(crash_first_times, d, "flaky", 5))
    assert info.value.index == 0
    assert len(runs(tmp_path, "flaky")) == 2  # retries + 1 runs, no more


def test_retry_on_selects_the_task_own_exceptions(tmp_path: Path) -> None:
    d = str(tmp_path)
    with ProcessAlloter(1, retries=3, retry_on=(KeyError,)) as a:
        assert a.exec(_task(raise_first_times, d, "k", 2, KeyError)) == ["k"]
        with pytest.raises(TaskError) as info:
            a.exec(_task(raise_first_times, d, "v", 2, ValueError))
    assert isinstance(info.value.__cause__, ValueError)
    assert len(runs(tmp_path, "k")) == 3
    assert len(runs(tmp_path, "v")) == 1  # ValueError is not in retry_on: never retried


def test_by_default_a_raising_task_is_not_retried(tmp_path: Path) -> None:
    d = str(tmp_path)
    with ProcessAlloter(1, retries=3) as a, pytest.raises(TaskError):
        a.exec(_task(raise_first_times, d, "v", 1, ValueError))
    assert len(runs(tmp_path, "v")) == 1


def test_retry_delay_doubles_after_each_failure(tmp_path: Path) -> None:
    d = str(tmp_path)
    delay = 0.2
    with ProcessAlloter(1, retries=3, retry_delay=delay) as a:
        assert a.exec(_task(crash_first_times, d, "f", 3)) == ["f"]
    times = [t for t, _ in runs(tmp_path, "f")]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 3
    for k, gap in enumerate(gaps, start=1):
        assert gap >= delay * 2 ** (k - 1) - 0.02, gaps
    assert gaps[2] < delay * 4 + 1.0, gaps  # not wildly late either


def test_no_retry_past_the_call_deadline(tmp_path: Path) -> None:
    d = str(tmp_path)
    with ProcessAlloter(1, retries=5, retry_delay=0.8) as warm:
        warm.exec(lambda: 1)
        a = warm.with_options(timeout=2.0)
        t0 = time.monotonic()
        with pytest.raises(WorkerCrashed):
            a.exec(_task(crash_first_times, d, "f", 10))
        # Runs at 0 s and 0.8 s; the next would be 1.6 s later, at 2.4 s, past the
        # 2 s deadline: the crash is the outcome at once, the deadline not awaited.
        assert time.monotonic() - t0 < 2.0
    assert len(runs(tmp_path, "f")) == 2


def test_a_failure_that_will_be_retried_does_not_end_the_siblings(tmp_path: Path) -> None:
    d = str(tmp_path)
    with ProcessAlloter(2, retries=2) as a:
        got = a.exec(
            _task(crash_first_times, d, "flaky", 2), _task(still_cancelled_free, d, "sib", 1.0)
        )
    assert got == ["flaky", True]  # the sibling was never told to stop
    assert len(runs(tmp_path, "sib")) == 1


def test_a_retry_still_waiting_when_the_call_ends_reports_its_failure(tmp_path: Path) -> None:
    # "skipped" is a task that never started (0 attempts). One that ran, crashed and
    # was waiting for its retry when a sibling's failure ended the call keeps what
    # its run gave: its crash, with its one attempt.
    d = str(tmp_path)
    with ProcessAlloter(2, retries=2, retry_delay=5.0) as a:
        t0 = time.monotonic()
        report = a.exec_report(
            _task(crash_first_times, d, "flaky", 5), _task(raise_after, d, "sib", 0.3)
        )
        took = time.monotonic() - t0
    assert took < 3.0  # the retry's delay is not awaited
    assert len(runs(tmp_path, "flaky")) == 1
    flaky, sib = report.tasks
    assert (sib.status, sib.attempts) == ("error", 1)
    assert isinstance(report.outcome, TaskError) and report.outcome.index == 1
    assert (flaky.status, flaky.attempts) == ("crashed", 1), (flaky.status, flaky.attempts)
    assert isinstance(flaky.error, WorkerCrashed) and flaky.error.exitcode == 7


def test_a_retry_handed_over_but_not_started_when_the_call_ends_reports_its_failure(
    tmp_path: Path,
) -> None:
    # The same when the retry was already handed to a worker that had not started
    # it (here a new worker, still in its 0.6 s initializer) when the call ended.
    d = str(tmp_path)
    with ProcessAlloter(2, retries=1, initializer=time.sleep, initargs=(0.6,)) as a:
        report = a.exec_report(
            _task(crash_first_times, d, "flaky", 5), _task(raise_after, d, "sib", 0.3)
        )
    assert len(runs(tmp_path, "flaky")) == 1
    flaky, sib = report.tasks
    assert (sib.status, sib.attempts) == ("error", 1)
    assert (flaky.status, flaky.attempts) == ("crashed", 1), (flaky.status, flaky.attempts)
    assert isinstance(flaky.error, WorkerCrashed) and flaky.error.exitcode == 7


def test_an_idle_kill_is_not_a_retry_and_attempts_count_runs(tmp_path: Path) -> None:
    d = str(tmp_path)
    with ProcessAlloter(2, retries=0) as a:
        a.exec(os.getpid, os.getpid)
        for w in a.stats():
            os.kill(w.pid, signal.SIGKILL)
        report = a.exec_report(_task(sleep_and_note, d, "x", 0.0), _task(sleep_and_note, d, "y", 0))
    assert report.ok and [t.attempts for t in report.tasks] == [1, 1]


# -- keep going: errors="return" ------------------------------------------------------


# Chunks of 3: the crash (item 7) comes mid-chunk, with item 8 still to run after
# it; the timeout (item 9) starts a chunk, with two items after it.
@pytest.mark.parametrize("chunksize", [1, 3, None])
def test_map_errors_return_puts_each_failure_in_place(tmp_path: Path, chunksize: int) -> None:
    d = str(tmp_path)
    import functools

    with ProcessAlloter(2, task_timeout=1.0, cancel_grace=GRACE) as a:
        out = a.map(
            functools.partial(item_task, d), range(12), chunksize=chunksize, errors="return"
        )
    kinds = [type(x).__name__ if isinstance(x, BaseException) else x for x in out]
    assert kinds == [
        0,
        10,
        20,
        30,
        40,
        "TaskError",
        60,
        "WorkerCrashed",
        80,
        "TaskTimeout",
        100,
        110,
    ]
    assert [x.index for x in out if isinstance(x, TaskError)] == [5, 7, 9]
    assert isinstance(out[5].__cause__, ValueError)
    # Every item ran exactly once: a crash mid-chunk fails only the item that ran.
    for x in range(12):
        assert len(runs(tmp_path, f"item{x}")) == 1, x


def test_imap_errors_return_in_order_and_unordered(tmp_path: Path) -> None:
    d = str(tmp_path)
    import functools

    fn = functools.partial(item_task, d)
    items = [x for x in range(12) if x != 9]
    with ProcessAlloter(2) as a:
        ordered = list(a.imap(fn, iter(items), chunksize=3, errors="return"))
        unordered = list(a.imap(fn, iter(items), chunksize=3, ordered=False, errors="return"))
    expect = [x * 10 for x in items]
    expect[items.index(5)] = "TaskError"
    expect[items.index(7)] = "WorkerCrashed"
    assert [type(x).__name__ if isinstance(x, BaseException) else x for x in ordered] == expect
    got = sorted(
        str(type(x).__name__) if isinstance(x, BaseException) else str(x) for x in unordered
    )
    assert got == sorted(str(x) for x in expect)


def test_a_failed_item_is_retried_within_its_chunk(tmp_path: Path) -> None:
    d = str(tmp_path)
    import functools

    with ProcessAlloter(2, retries=1) as a:
        assert a.map(functools.partial(crash_item_once, d), range(8), chunksize=4) == list(range(8))
    assert len(runs(tmp_path, "item3")) == 2
    assert all(len(runs(tmp_path, f"item{x}")) == 1 for x in range(8) if x != 3)


def test_without_errors_return_the_item_that_fails_last_is_still_raised() -> None:
    # Items judged one by one (here for retries): when the failing item is the last
    # to settle, its failure is still the call's outcome, not a value in its place.
    with (
        ProcessAlloter(
            2, task_timeout=0.3, cancel_grace=0.05, retries=1, retry_on=(KeyError,)
        ) as a,
        pytest.raises(TaskTimeout) as info,
    ):
        a.map(hang_item, [0, 1], chunksize=1)
    assert info.value.index == 1


def test_errors_return_still_ends_everything_at_the_call_timeout(tmp_path: Path) -> None:
    d = str(tmp_path)
    import functools

    with ProcessAlloter(2, timeout=0.8, cancel_grace=GRACE) as a, pytest.raises(ExecTimeout):
        a.map(functools.partial(sleep_and_note, d, "s"), [5.0] * 4, errors="return")


def test_errors_must_be_raise_or_return() -> None:
    with ProcessAlloter(1) as a, pytest.raises(ValueError, match="errors"):
        a.map(abs, [1], errors="ignore")


# -- with_options --------------------------------------------------------------------


def test_with_options_shares_the_workers_and_the_limit(tmp_path: Path) -> None:
    d = str(tmp_path)
    import threading

    with ProcessAlloter(2) as a:
        b = a.with_options(timeout=30.0, retries=1)
        assert b.limit == a.limit == 2 and b.timeout == 30.0 and a.timeout is None
        threads = [
            threading.Thread(
                target=alloter.exec,
                args=[_task(sleep_and_note, d, f"{n}{i}", 0.3) for i in range(2)],
            )
            for n, alloter in (("a", a), ("b", b))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        pids = {w.pid for w in a.stats()}
        b.close()  # never closes the original's workers
        assert a.exec(os.getpid)[0] in pids
    spans = []
    for name in ("a0", "a1", "b0", "b1"):
        ((start, _),) = runs(tmp_path, name)
        spans.append((start, start + 0.3))
    # The two alloters together never ran more than 2 tasks at once.
    for s, _ in spans:
        assert sum(1 for a0, a1 in spans if a0 <= s + 0.01 < a1) <= 2


def test_with_options_refuses_options_that_shape_the_workers() -> None:
    with ProcessAlloter(1) as a:
        for name, value in (("limit", 3), ("start_method", "spawn"), ("max_tasks_per_worker", 1)):
            with pytest.raises(TypeError, match=name):
                a.with_options(**{name: value})
        with pytest.raises(TypeError, match="unknown"):
            a.with_options(timout=1.0)
        with pytest.raises(ValueError):
            a.with_options(task_timeout=-1)
        with pytest.raises(TypeError):
            a.with_options(retry_on=ValueError("not a class"))


def test_bad_per_task_options() -> None:
    with pytest.raises(ValueError):
        ProcessAlloter(1, task_timeout=0)
    with pytest.raises(ValueError):
        ProcessAlloter(1, retries=-1)
    with pytest.raises(TypeError):
        ProcessAlloter(1, retries=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ProcessAlloter(1, retry_delay=-0.1)


def test_an_alloter_without_a_limit_says_so() -> None:
    with Alloter() as a:
        assert a.limit is None
        assert a.exec(lambda: 1) == [1]
    with ProcessAlloter() as p:
        assert p.limit == alloter_mp.available_cpus()


def test_no_process_is_left_after_per_task_endings(tmp_path: Path) -> None:
    from _procs import wait_no_descendants

    d = str(tmp_path)
    with ProcessAlloter(2, task_timeout=0.3, cancel_grace=0.0) as a:
        with pytest.raises(TaskTimeout):
            a.exec(_task(spin_and_note, d, "s1"), _task(spin_and_note, d, "s2"))
        pids = [
            int((tmp_path / f"{n}.pid").read_text())
            for n in ("s1", "s2")
            if (tmp_path / f"{n}.pid").exists()
        ]
    assert not wait_no_descendants()
    for pid in pids:
        assert not psutil.pid_exists(pid) or pid_gone(pid)
