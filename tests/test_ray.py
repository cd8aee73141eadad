"""RayAlloter on a real local Ray: the outcomes of the process alloter, on Ray.

The session's Ray (``ray_session`` in conftest) has 2 CPUs and listens on the
loopback address only. The task functions (below, and those shared with the other
tests in ``_tasks``) are module-level on purpose: they travel by reference, so the
Ray workers import their modules, as they would a user's.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import pytest
from _env import REPO, needs_ray, without_ray_settings
from _logs import Collect
from _procs import pid_gone
from _tasks import (
    exit_now,
    fail_on,
    ignore_sigterm_and_spin,
    kill_self,
    most_at_once,
    raise_two_arg,
    return_lock,
    segfault,
    value,
)

import alloter_mp
from alloter_mp import (
    Cancelled,
    Context,
    ExecTimeout,
    MemoryLimitExceeded,
    RemoteError,
    SerializationError,
    TaskError,
    WorkerCrashed,
)
from alloter_mp.ray import RayAlloter

pytestmark = pytest.mark.ray

# The contract's timing bound on Ray is 500 ms; the tests allow that plus a wide
# margin for a loaded 2-core CI machine, which still catches a missed end.
BOUND = 0.5
SLACK = 1.5
MiB = 1024 * 1024


def _ray_workers_running_our_tasks() -> list[psutil.Process]:
    # Ray titles a worker "ray::<function>" while it runs a task, "ray::IDLE" after.
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].startswith("ray::run_task"):
            out.append(proc)
    return out


@pytest.fixture(autouse=True)
def no_task_left_running() -> Iterator[None]:
    """After each test, every task it handed to Ray has ended (returned or killed)."""
    yield
    end = time.monotonic() + 10
    while _ray_workers_running_our_tasks() and time.monotonic() < end:
        time.sleep(0.05)
    left = _ray_workers_running_our_tasks()
    assert not left, f"Ray workers still running tasks: {[p.pid for p in left]}"


@pytest.fixture
def ralloter(ray_session: Any) -> Iterator[RayAlloter]:
    a = RayAlloter(2, cancel_grace=0.3)
    try:
        yield a
    finally:
        a.close()


# -- tasks (run in Ray workers) --------------------------------------------------


def square(x: int) -> int:
    return x * x


def raise_at(path: str, seconds: float, after: str | None = None) -> None:
    """Raise ``seconds`` after the file ``after`` appears (a sibling started), noting when.

    Ray starts workers as it needs them, so a sibling may start later than this task:
    waiting for it makes sure the failure finds it running.
    """
    _wait_file(after)
    time.sleep(seconds)
    Path(path).write_text(repr(time.time()))
    raise ValueError("raised on time")


def raise_after(after: str, seconds: float = 0.3) -> None:
    _wait_file(after)
    time.sleep(seconds)
    raise ValueError("late boom")


def _wait_file(path: str | None) -> None:
    end = time.monotonic() + 30
    while path is not None and not Path(path).exists() and time.monotonic() < end:
        time.sleep(0.005)


def spin(pidfile: str) -> None:
    Path(pidfile).write_text(str(os.getpid()))
    while True:
        pass


def spin_holding_the_gil(pidfile: str) -> int:
    Path(pidfile).write_text(str(os.getpid()))
    return sum(range(10**13))  # one C call that never lets another thread run


def spin_with_child(pidfile: str) -> None:
    child = subprocess.Popen(["sleep", "1000"])
    Path(pidfile).write_text(f"{os.getpid()} {child.pid}")
    while True:
        pass


def cooperative(path: str, pause: float = 0.005) -> str:
    """Wait for ``cancelled()``, write when it was seen, return."""
    Path(path + ".started").touch()
    deadline = time.monotonic() + 30
    while not alloter_mp.cancelled():
        if time.monotonic() > deadline:
            return "never told"
        if pause:
            time.sleep(pause)
    Path(path).write_text(repr(time.time()))
    return "told"


def cooperative_tight(path: str) -> str:
    """``cooperative`` asking without a pause between questions."""
    return cooperative(path, pause=0.0)


def cooperative_in_thread(path: str) -> str:
    """``cooperative`` in a thread of the task while its main thread waits in join()."""
    out: list[str] = []
    thread = threading.Thread(target=lambda: out.append(cooperative(path)))
    thread.start()
    thread.join()
    return out[0]


def cooperative_ignoring_sigint(path: str) -> str:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as some worker code does
    return cooperative(path)


def record(path: str, seconds: float) -> int:
    Path(path + ".started").touch()
    start = time.time()
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write(f"{start} {time.time()}\n")
    return os.getpid()


def burn(seconds: float) -> float:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    return seconds


def in_task_view() -> tuple[bool, float | None, int]:
    return alloter_mp.cancelled(), alloter_mp.time_left(), os.getpid()


def big_result(size: int) -> bytes:
    return b"x" * size


def hog(step: int, most: int) -> int:
    held = []
    for _ in range(most // step):
        held.append(bytearray(step))
        for i in range(0, step, 4096):
            held[-1][i] = 1
        time.sleep(0.002)
    return len(held)


def log_lines(n: int, tag: str = "line") -> int:
    log = logging.getLogger("raytest")
    log.debug("%s debug", tag)
    for i in range(n):
        log.info("%s %d", tag, i)
    return os.getpid()


def log_item(x: int) -> int:
    logging.getLogger("raytest").warning("item %d", x)
    return x


class RayTestWarning(UserWarning):
    pass


def warn_once() -> int:
    warnings.warn("from ray", RayTestWarning, stacklevel=1)
    return 1


def write_out(tag: str) -> str:
    print(f"print {tag}")
    os.write(2, f"fd2 {tag}\n".encode())
    subprocess.run(["echo", f"child {tag}"], check=True)
    return tag


def print_then_raise(text: str) -> None:
    print(text)
    raise ValueError(text)


@pytest.fixture
def ray_logs() -> Iterator[Collect]:
    logger = logging.getLogger("raytest")
    handler = Collect()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


# -- helpers ----------------------------------------------------------------------


def _read_pid(path: Path, timeout: float = 30.0) -> list[int]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.read_text().strip():
            return [int(p) for p in path.read_text().split()]
        time.sleep(0.01)
    raise AssertionError(f"no pid in {path}")


def _spans(path: Path) -> list[tuple[float, float]]:
    return [
        (float(a), float(b)) for a, b in (line.split() for line in path.read_text().splitlines())
    ]


# -- results ------------------------------------------------------------------------


def test_results_in_order_from_ray_workers(ralloter: RayAlloter) -> None:
    tasks = [partial(value, i) for i in range(20)] + [lambda: "closure", partial(os.getpid)]
    out = ralloter.exec(*tasks)
    assert out[:21] == [*range(20), "closure"]
    worker = psutil.Process(out[21])
    assert worker.pid != os.getpid()
    assert worker.name().startswith("ray::"), worker.name()
    assert ralloter.exec() == []


def test_limit_bounds_tasks_in_flight_across_calls(ray_session: Any, tmp_path: Path) -> None:
    spans = tmp_path / "spans"
    with RayAlloter(1) as a:
        assert a.limit == 1
        a.exec(*[partial(record, str(spans), 0.1) for _ in range(4)])
        assert most_at_once(_spans(spans)) == 1
    spans.unlink()
    with RayAlloter(2) as a:
        threads = [
            threading.Thread(target=a.exec, args=[partial(record, str(spans), 0.15)] * 3)
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(_spans(spans)) == 6
        assert most_at_once(_spans(spans)) <= 2


def test_limit_none_is_the_clusters_cpus(ray_session: Any) -> None:
    with RayAlloter() as a:
        assert a.limit == 2
    with RayAlloter(num_cpus=2) as a:
        assert a.limit == 1


# -- failures -------------------------------------------------------------------------


def test_first_failure_raises_with_remote_traceback_and_ends_siblings(
    ralloter: RayAlloter, tmp_path: Path
) -> None:
    pidfile, raised = tmp_path / "pid", tmp_path / "raised"
    with pytest.raises(TaskError) as info:
        ralloter.exec(
            partial(raise_at, str(raised), 0.3, str(pidfile)),
            partial(spin, str(pidfile)),
            lambda: 1,
        )
    returned_after = time.time() - float(raised.read_text())
    err = info.value
    assert err.index == 0
    assert isinstance(err.__cause__, ValueError)
    assert "raised on time" in err.remote_traceback and "raise_at" in err.remote_traceback
    assert returned_after < BOUND + SLACK, returned_after  # a fast return
    (pid,) = _read_pid(pidfile)
    # The spinning sibling ignores cancelled(): it is force-cancelled after the grace.
    assert pid_gone(pid, timeout=0.3 + BOUND + SLACK + 5), "spinning sibling still alive"


def test_a_task_ignoring_sigterm_is_still_ended(ralloter: RayAlloter, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    report = ralloter.exec_report(
        partial(raise_after, str(pidfile)), partial(ignore_sigterm_and_spin, str(pidfile))
    )
    (pid,) = _read_pid(pidfile)
    assert pid_gone(pid, timeout=0.3 + BOUND + SLACK)
    killed = report.tasks[1]
    assert killed.status == "cancelled"
    assert killed.pid == pid  # the worker it ran in, though it never returned
    assert killed.wall_s >= 0.3 + 0.3  # until the kill: the failure, then the grace


@pytest.mark.parametrize(
    "task", [cooperative, cooperative_tight, cooperative_in_thread, cooperative_ignoring_sigint]
)
def test_running_sibling_is_told_through_cancelled(
    ray_session: Any, tmp_path: Path, task: Any
) -> None:
    # Also in a thread of the task (its main thread blocked in join(), where Ray's
    # interruption cannot run), and in a task that ignores SIGINT.
    seen, raised = tmp_path / "seen", tmp_path / "raised"
    with RayAlloter(2, cancel_grace=5.0) as a:
        report = a.exec_report(
            partial(task, str(seen)), partial(raise_at, str(raised), 0.3, f"{seen}.started")
        )
    assert [t.status for t in report.tasks] == ["cancelled", "error"]
    assert report.tasks[0].result == "told"
    told_after = float(seen.read_text()) - float(raised.read_text())
    assert 0 <= told_after < BOUND + SLACK, told_after


def test_queued_tasks_never_start_and_report_says_so(ralloter: RayAlloter, tmp_path: Path) -> None:
    spans = tmp_path / "spans"
    report = ralloter.exec_report(
        partial(raise_after, f"{spans}.started", 0.2),
        partial(record, str(spans), 0.5),
        *[partial(record, str(spans), 0.01) for _ in range(3)],
    )
    statuses = [t.status for t in report.tasks]
    assert statuses == ["error", "cancelled", "skipped", "skipped", "skipped"]
    assert len(_spans(spans)) == 1  # the running sibling returned by itself, late
    assert not report.ok
    with pytest.raises(TaskError):
        report.raise_for_status()
    json.dumps(report.to_dict())


@pytest.mark.parametrize("delay", [0.0, 0.3])
@pytest.mark.parametrize("crash", [exit_now, segfault, kill_self])
def test_dead_worker_is_worker_crashed(
    ralloter: RayAlloter, tmp_path: Path, crash: Any, delay: float
) -> None:
    pidfile = tmp_path / "pid"
    with pytest.raises(WorkerCrashed) as info:
        ralloter.exec(lambda: time.sleep(0.2), partial(crash, delay=delay, pidfile=str(pidfile)))
    assert info.value.index == 1
    assert info.value.exitcode is None  # Ray does not report how a worker died
    assert "died" in str(info.value)
    # The worker's pid, as the task told the board when it started: not waited for,
    # so a task that dies at once may not have told it. When given, it is the
    # process the task ran in (pid_gone alone would pass for a pid that never was).
    pid = info.value.pid
    if delay:
        assert pid is not None
    if pid is not None:
        (ran_in,) = _read_pid(pidfile)
        assert pid == ran_in, f"WorkerCrashed names process {pid}, the task ran in {ran_in}"
        assert pid_gone(pid, timeout=5.0)
    # Nothing is retried, and the alloter goes on.
    assert ralloter.exec(lambda: 5) == [5]


def test_exceptions_and_results_that_cannot_travel(ralloter: RayAlloter) -> None:
    with pytest.raises(TaskError) as info:
        ralloter.exec(raise_two_arg)
    assert isinstance(info.value.__cause__, RemoteError)
    assert "TwoArgError" in str(info.value) and "1/2" in str(info.value)
    with pytest.raises(TaskError, match="cannot be pickled"):
        ralloter.exec(return_lock)


def test_unpicklable_task_fails_before_anything_runs(ralloter: RayAlloter, tmp_path: Path) -> None:
    spans = tmp_path / "spans"
    lock = threading.Lock()
    with pytest.raises(SerializationError) as info:
        ralloter.exec(partial(record, str(spans), 0.0), lambda: lock)
    assert info.value.index == 1
    time.sleep(0.3)
    assert not spans.exists()
    with pytest.raises(TypeError):
        ralloter.exec(lambda: 1, 42)  # type: ignore[arg-type]


def test_huge_result(ralloter: RayAlloter) -> None:
    (out,) = ralloter.exec(partial(big_result, 64 * MiB))
    assert len(out) == 64 * MiB


# -- timeouts, contexts ------------------------------------------------------------


@pytest.mark.parametrize("grace", [0.0, 0.2])
def test_timeout_stops_the_work(ray_session: Any, tmp_path: Path, grace: float) -> None:
    pidfile = tmp_path / "pid"
    with RayAlloter(2, timeout=1.0, cancel_grace=grace) as a:
        started = time.monotonic()
        with pytest.raises(ExecTimeout):
            a.exec(partial(spin_with_child, str(pidfile)), lambda: 1)
        elapsed = time.monotonic() - started
        assert 1.0 <= elapsed < 1.0 + BOUND + SLACK, elapsed
        pid, child = _read_pid(pidfile)
        assert pid_gone(pid, timeout=grace + BOUND + SLACK), "the spinning task still runs"
        assert pid_gone(child, timeout=5.0), "the task's child still runs"
        assert a.exec(lambda: 2) == [2]


def test_timeout_stops_a_task_stuck_in_c_holding_the_gil(ray_session: Any, tmp_path: Path) -> None:
    # The task's own watchdog cannot run; the driver's late forced cancel ends it.
    pidfile = tmp_path / "pid"
    with RayAlloter(1, timeout=1.0, cancel_grace=0.0) as a:
        with pytest.raises(ExecTimeout):
            a.exec(partial(spin_holding_the_gil, str(pidfile)))
        (pid,) = _read_pid(pidfile)
        assert pid_gone(pid, timeout=2.0 + BOUND + SLACK), "the stuck task still runs"


def test_time_left_and_cancelled_inside_a_task(ray_session: Any) -> None:
    with RayAlloter(1, timeout=30.0) as a:
        (seen,) = a.exec(in_task_view)
    was_cancelled, left, _ = seen
    assert was_cancelled is False
    assert left is not None and 25.0 < left <= 30.0
    with RayAlloter(1) as a:
        assert a.exec(in_task_view)[0][:2] == (False, None)


def test_context_cancel_ends_the_call(ralloter: RayAlloter, tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    ctx = Context()
    threading.Timer(0.5, ctx.cancel, args=("enough",)).start()
    started = time.monotonic()
    with pytest.raises(Cancelled, match="enough"):
        ralloter.exec_with_context(ctx, partial(cooperative, str(seen)))
    assert time.monotonic() - started < 0.5 + BOUND + SLACK
    end = time.monotonic() + 5
    while not seen.exists() and time.monotonic() < end:
        time.sleep(0.02)
    assert seen.exists(), "the running task was not told"


def test_context_deadline_is_an_exec_timeout(ralloter: RayAlloter) -> None:
    ctx = Context(timeout=0.5)
    with pytest.raises(ExecTimeout):
        ralloter.exec_with_context(ctx, partial(time.sleep, 30))


# -- map, imap, reports, memory ----------------------------------------------------


def test_map_and_imap(ralloter: RayAlloter) -> None:
    assert ralloter.map(square, range(200)) == [x * x for x in range(200)]
    assert ralloter.map(square, range(50), chunksize=7) == [x * x for x in range(50)]
    with pytest.raises(TaskError) as info:
        ralloter.map(partial(fail_on, 137), range(300), chunksize=20)
    assert info.value.index == 137
    assert list(ralloter.imap(square, iter(range(100)))) == [x * x for x in range(100)]
    unordered = ralloter.imap(square, (x for x in range(100)), ordered=False)
    assert sorted(unordered) == [x * x for x in range(100)]
    with pytest.raises(TaskError) as info:
        list(ralloter.imap(partial(fail_on, 42), iter(range(100)), chunksize=5))
    assert info.value.index == 42


def test_imap_errors_return_puts_each_failure_in_place(ralloter: RayAlloter) -> None:
    # On Ray each item of a keep-going imap is a task of its own (a one-item chunk):
    # a failed one still yields its TaskError in its place, in order or not.
    got = list(ralloter.imap(partial(fail_on, 3), iter(range(6)), errors="return"))
    assert [g for i, g in enumerate(got) if i != 3] == [0, 2, 4, 8, 10]
    assert isinstance(got[3], TaskError) and got[3].index == 3
    unordered = list(ralloter.imap(partial(fail_on, 1), range(4), ordered=False, errors="return"))
    failed = [g for g in unordered if isinstance(g, TaskError)]
    assert len(failed) == 1 and failed[0].index == 1
    assert sorted(g for g in unordered if not isinstance(g, TaskError)) == [0, 4, 6]


def test_imap_closed_early_ends_the_work(ralloter: RayAlloter) -> None:
    results = ralloter.imap(square, iter(range(10_000_000)), chunksize=10)
    assert next(results) == 0
    results.close()  # type: ignore[attr-defined]
    assert ralloter.exec(lambda: 7) == [7]


def test_report_measures_inside_the_ray_worker(ralloter: RayAlloter) -> None:
    report = ralloter.exec_report(partial(burn, 0.3), partial(value, "v"))
    assert report.ok and report.results == [0.3, "v"]
    burner, plain = report.tasks
    assert burner.status == plain.status == "ok"
    assert 0.25 <= burner.cpu_s <= 0.6, burner.cpu_s
    assert burner.wall_s >= burner.cpu_s * 0.9
    assert burner.peak_rss > 10 * MiB and plain.peak_rss > 10 * MiB
    assert burner.pid is not None and psutil.Process(burner.pid).name().startswith("ray::")
    assert "ok" in str(report)


def test_memory_limit_kills_the_task(ray_session: Any) -> None:
    limit = 400 * MiB  # a Ray worker alone holds about 90 MiB
    with RayAlloter(1, memory_limit=limit) as a:
        with pytest.raises(MemoryLimitExceeded) as info:
            a.exec(partial(hog, 10 * MiB, 2048 * MiB))
        err = info.value
        assert err.index == 0 and err.limit == limit
        assert err.peak_rss > limit
        assert err.pid is not None and pid_gone(err.pid, timeout=5.0)
        assert a.exec(partial(hog, 10 * MiB, 50 * MiB)) == [5]


def test_progress_bar(ray_session: Any, capfd: pytest.CaptureFixture[str]) -> None:
    with RayAlloter(2, progress=True) as a:
        assert a.map(square, range(10), chunksize=2) == [x * x for x in range(10)]
    err = capfd.readouterr().err
    assert "10/10" in err


# -- setup -------------------------------------------------------------------------


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    # The session fixture's Ray settings are left out: the child decides for itself.
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env=without_ray_settings(**env),
    )


def test_import_alloter_mp_never_imports_ray() -> None:
    out = _python(
        """
        import sys, alloter_mp, alloter_mp.ray
        assert "ray" not in sys.modules, "ray was imported"
        print("ok")
        """
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_missing_ray_is_a_clear_error() -> None:
    out = _python(
        """
        import sys
        sys.modules["ray"] = None  # as if not installed
        from alloter_mp.ray import RayAlloter
        try:
            RayAlloter(2)
        except ImportError as exc:
            print(exc)
        """
    )
    assert out.returncode == 0, out.stderr
    assert "pip install 'alloter-mp[ray]'" in out.stdout


def test_bad_options_fail_before_ray_starts() -> None:
    with pytest.raises(ValueError):
        RayAlloter(-1)
    with pytest.raises(TypeError):
        RayAlloter("2")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RayAlloter(2, timeout=0)
    with pytest.raises(ValueError):
        RayAlloter(2, num_cpus=0)
    with pytest.raises(ValueError):
        RayAlloter(2, memory_limit=-5)


def test_close_shuts_down_only_a_ray_it_started(ray_session: Any, tmp_path: Path) -> None:
    # Ours joins the session's Ray and leaves it running.
    with RayAlloter(1) as a:
        assert a.exec(lambda: 1) == [1]
    assert ray_session.is_initialized()
    # With no Ray in the process, an alloter starts one and shuts it down on close.
    out = _python(
        """
        import psutil, ray
        from alloter_mp.ray import RayAlloter
        with RayAlloter(1, timeout=60) as a:
            assert a.exec(lambda: 41 + 1) == [42]
            assert ray.is_initialized()
            # The Ray it started listens on the loopback address only.
            addresses = {node["NodeManagerAddress"] for node in ray.nodes()}
            assert addresses == {"127.0.0.1"}, addresses
            listening = {
                c.laddr.ip for p in psutil.Process().children(recursive=True)
                for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN
            }
            assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
        assert not ray.is_initialized()
        left = [p for p in psutil.Process().children(recursive=True) if p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
        print("left", len(left), [p.name() for p in left])
        """,
        RAY_AUTH_MODE="disabled",
    )
    assert out.returncode == 0, out.stderr
    assert "left 0 []" in out.stdout, out.stdout


@pytest.mark.parametrize("call", ["exec", "exec_report", "imap"])
def test_ctrl_c_in_the_caller_ends_the_ray_tasks(
    ray_session: Any, tmp_path: Path, call: str
) -> None:
    import _thread

    pidfile = tmp_path / "pid"
    task = partial(spin, str(pidfile))
    with RayAlloter(1, cancel_grace=0.1) as a:
        timer = threading.Timer(1.0, _thread.interrupt_main)  # as if Ctrl-C
        timer.start()
        started = time.monotonic()
        try:
            with pytest.raises(KeyboardInterrupt):
                if call == "imap":
                    list(a.imap(lambda _: task(), [0], chunksize=1))
                else:
                    getattr(a, call)(task)
        finally:
            timer.cancel()
            timer.join()
        assert time.monotonic() - started < 1.0 + BOUND + SLACK
        (pid,) = _read_pid(pidfile)
        assert pid_gone(pid, timeout=0.1 + BOUND + SLACK)
        assert a.exec(lambda: 3) == [3]


def test_close_ends_a_running_call_and_later_calls_fail(ray_session: Any, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    a = RayAlloter(1, cancel_grace=0.1)
    threading.Timer(1.0, a.close).start()
    with pytest.raises(Cancelled, match="closed"):
        a.exec(partial(spin, str(pidfile)))
    (pid,) = _read_pid(pidfile)
    assert pid_gone(pid, timeout=0.1 + BOUND + SLACK)
    a.close()  # again: nothing happens
    with pytest.raises(alloter_mp.AlloterError, match="closed"):
        a.exec(lambda: 1)


def test_a_failing_supervisor_fails_calls_instead_of_hanging(
    ray_session: Any, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from alloter_mp import _ray_runner

    def broken(self: Any, ref: Any) -> None:
        raise RuntimeError("supervisor bug")

    monkeypatch.setattr(_ray_runner.RayRunner, "_settle", broken)
    with RayAlloter(2, cancel_grace=0.1) as a:
        report = a.exec_report(lambda: 1, partial(time.sleep, 0.5))
        assert isinstance(report.outcome, alloter_mp.AlloterError)
        assert "supervisor bug" in str(report.outcome)
        assert all(t.status in ("cancelled", "skipped") for t in report.tasks)
        with pytest.raises(alloter_mp.AlloterError, match="supervisor"):
            a.exec(lambda: 1)
    assert "supervisor bug" in capfd.readouterr().err


def test_a_forced_cancel_does_not_crash_the_next_call(ray_session: Any, tmp_path: Path) -> None:
    # A task told to stop returns just as the forced cancel (no grace) kills its
    # worker; Ray may then hand the next task to that dying worker, which dies before
    # the task starts. That task never ran: it is handed again, not reported crashed.
    for round_ in range(8):
        with RayAlloter(2, cancel_grace=0.0) as a:
            seen = tmp_path / f"seen{round_}"
            report = a.exec_report(
                partial(cooperative, str(seen)), partial(raise_after, f"{seen}.started")
            )
            assert [t.status for t in report.tasks] == ["cancelled", "error"]
            assert a.exec(*[partial(value, i) for i in range(5)]) == list(range(5))


@needs_ray
def test_sigkill_of_the_program_ends_the_ray_it_started(tmp_path: Path) -> None:
    # The program's own local Ray (not the session's): its tasks and its core
    # processes go when the program dies without a chance to shut Ray down.
    pidfile = tmp_path / "pid"
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os
            from pathlib import Path
            from alloter_mp.ray import RayAlloter

            def spin():
                Path({str(pidfile)!r}).write_text(str(os.getpid()))
                while True:
                    pass

            if __name__ == "__main__":
                with RayAlloter(1) as a:
                    a.exec(spin)
            """
        )
    )
    env = without_ray_settings(RAY_AUTH_MODE="disabled")
    job = subprocess.Popen([sys.executable, str(script)], env=env)
    try:
        (task_pid,) = _read_pid(pidfile, timeout=60)
        ray_core = [
            p
            for p in psutil.Process(job.pid).children(recursive=True)
            if p.name() in ("gcs_server", "raylet")
        ]
        assert len(ray_core) == 2, ray_core
        job.kill()
        job.wait(10)
        assert pid_gone(task_pid, timeout=20), "the program's Ray task still spins"
        for proc in ray_core:
            assert pid_gone(proc.pid, timeout=20), f"{proc.name()} outlived the program"
    finally:
        job.kill()
        job.wait(10)


@needs_ray
def test_the_ray_example_runs() -> None:
    example = REPO / "examples" / "ray_fanout.py"
    out = subprocess.run(
        [sys.executable, str(example)],
        capture_output=True,
        text=True,
        timeout=180,
        env=without_ray_settings(RAY_AUTH_MODE="disabled"),
    )
    assert out.returncode == 0, out.stderr
    assert "primes below 1,200,000: 92,938" in out.stdout
    assert "as expected: task 1 raised ZeroDivisionError" in out.stdout


def test_an_alloter_dropped_without_close_ends_its_thread(ray_session: Any) -> None:
    import gc

    def threads() -> int:
        return sum(t.name == "alloter_mp-ray" for t in threading.enumerate())

    before = threads()
    a = RayAlloter(1)
    assert a.exec(lambda: 1) == [1]
    assert threads() == before + 1
    del a
    gc.collect()
    end = time.monotonic() + 10
    while threads() > before and time.monotonic() < end:
        time.sleep(0.02)
    assert threads() == before


# -- seeing inside a task (contract section 10) ----------------------------------------


def test_records_of_ray_tasks_reach_the_callers_handlers(
    ralloter: RayAlloter, ray_logs: Collect
) -> None:
    pids = ralloter.exec(*[partial(log_lines, 20, f"t{i}") for i in range(3)])
    for i in range(3):
        mine = [r for r in ray_logs.records if r.getMessage().startswith(f"t{i} ")]
        # The caller's level (INFO) applies: no debug record.
        assert [r.getMessage() for r in mine] == [f"t{i} {k}" for k in range(20)]
        assert {r.task_index for r in mine} == {i}
        assert {r.process for r in mine} == {pids[i]} != {os.getpid()}
    ray_logs.records.clear()
    assert ralloter.map(log_item, range(30), chunksize=7) == list(range(30))
    got = sorted((r.task_index, r.getMessage()) for r in ray_logs.records)
    assert got == [(i, f"item {i}") for i in range(30)]
    ray_logs.records.clear()
    ralloter.with_options(relay_logs=False).exec(partial(log_lines, 3))
    assert ray_logs.records == []


def test_warnings_of_ray_tasks_are_shown_under_the_callers_filters(ralloter: RayAlloter) -> None:
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        ralloter.exec(warn_once)
    assert [(w.category, str(w.message)) for w in shown] == [(RayTestWarning, "from ray")]


def test_output_of_ray_tasks_is_captured(ralloter: RayAlloter) -> None:
    captured = ralloter.with_options(capture_output=True)
    report = captured.exec_report(partial(write_out, "a"), partial(write_out, "b"))
    assert [(t.stdout, t.stderr) for t in report.tasks] == [
        ("print a\nchild a\n", "fd2 a\n"),
        ("print b\nchild b\n", "fd2 b\n"),
    ]
    with pytest.raises(TaskError) as info:
        captured.exec(partial(print_then_raise, "doomed"))
    assert (info.value.stdout, info.value.stderr) == ("doomed\n", "")
    assert ralloter.exec_report(partial(write_out, "c")).tasks[0].stdout is None


# -- the awaitable calls (section 8) ------------------------------------------------


async def _await_pids(path: Path, timeout: float = 30.0) -> list[int]:
    import asyncio

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.read_text().strip():
            return [int(p) for p in path.read_text().split()]
        await asyncio.sleep(0.01)
    raise AssertionError(f"no pid in {path}")


def test_async_calls_have_the_plain_outcomes(ralloter: RayAlloter) -> None:
    import asyncio

    async def numbers(n: int) -> Any:
        for i in range(n):
            yield i

    async def main() -> None:
        assert await ralloter.exec_async(partial(value, 1), partial(square, 3)) == [1, 9]
        with pytest.raises(TaskError) as info:
            await ralloter.exec_async(partial(value, 1), partial(fail_on, 2, 2))
        assert info.value.index == 1
        report = await ralloter.exec_report_async(partial(square, 4))
        assert report.tasks[0].status == "ok" and report.tasks[0].result == 16
        assert await ralloter.map_async(square, range(30)) == [x * x for x in range(30)]
        assert await ralloter.map_async(square, numbers(10)) == [x * x for x in range(10)]
        got = [x async for x in ralloter.imap_async(square, numbers(20), chunksize=3)]
        assert got == [x * x for x in range(20)]
        many = await asyncio.gather(*[ralloter.exec_async(partial(value, i)) for i in range(200)])
        assert many == [[i] for i in range(200)]

    asyncio.run(main())


def test_async_cancellation_ends_the_ray_task(ralloter: RayAlloter, tmp_path: Path) -> None:
    import asyncio

    pidfile = tmp_path / "pid"

    async def main() -> float:
        task = asyncio.ensure_future(ralloter.exec_async(partial(spin_with_child, str(pidfile))))
        pid, child = await _await_pids(pidfile)
        started = time.monotonic()
        task.cancel("stop")
        with pytest.raises(asyncio.CancelledError) as info:
            await task
        assert info.value.args == ("stop",)
        elapsed = time.monotonic() - started
        assert pid_gone(pid, timeout=0.5), "the Ray task outlived its await"
        assert pid_gone(child, timeout=5.0), "the task's child outlived its await"
        return elapsed

    elapsed = asyncio.run(main())
    assert elapsed < 0.3 + BOUND + SLACK, elapsed  # the grace, the bound, the slack


def test_async_timeout_on_ray(ray_session: Any, tmp_path: Path) -> None:
    import asyncio

    pidfile = tmp_path / "pid"

    async def main() -> None:
        with RayAlloter(2, cancel_grace=0.0) as a:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(a.exec_async(partial(spin, str(pidfile))), 2.0)
            (pid,) = await _await_pids(pidfile)
            assert pid_gone(pid, timeout=BOUND + SLACK)
            assert await a.exec_async(lambda: 5) == [5]

    asyncio.run(main())
