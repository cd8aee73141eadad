"""Contract section 10 through the pool: relayed logs and warnings, captured output.

The relay's and capture's own halves are tested in test_logrelay.py and
test_capture.py with a bare worker; these tests go through ProcessAlloter and
Alloter: what the test process's own handlers, levels, filters and warning filters
see of tasks run by a pool, and what reports and errors carry of their output.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import _tasks
import pytest
from _logs import Collect

from alloter_mp import (
    Alloter,
    ExecTimeout,
    ProcessAlloter,
    TaskError,
    TaskTimeout,
    WorkerCrashed,
)

# The test process's logging: the ``logs`` fixture (conftest.py) and ``Collect``.


# -- tasks (module level: the workers import them) -------------------------------------


def log_lines(n: int, tag: str = "line", name: str = "app") -> int:
    log = logging.getLogger(name)
    for i in range(n):
        log.info("%s %d", tag, i)
    return os.getpid()


def log_item(x: int) -> int:
    logging.getLogger("app").warning("item %d", x)
    return x


def log_item_or_fail(x: int) -> int:
    print(f"out of {x}")
    logging.getLogger("app").warning("item %d", x)
    if x % 4 == 3:
        raise ValueError(f"bad {x}")
    return x


def log_levels() -> None:
    for name in ("app", "app.db", "noisy"):
        log = logging.getLogger(name)
        log.debug("%s debug", name)
        log.info("%s info", name)
        log.error("%s error", name)


def log_then_die(how: str) -> None:
    log = logging.getLogger("app")
    for i in range(3):
        log.warning("before the end %d", i)
    print("printed before the end", flush=True)
    if how == "exit":
        os._exit(7)
    elif how == "kill":
        _tasks.kill_self()
    else:
        _tasks.segfault()


def log_then_sleep(seconds: float) -> None:
    logging.getLogger("app").warning("started")
    print("started", flush=True)
    time.sleep(seconds)


def log_until_killed(period: float) -> None:
    log = logging.getLogger("app")
    i = 0
    while True:
        log.info("tick %d", i)
        i += 1
        time.sleep(period)


def log_then_raise(after: float) -> None:
    time.sleep(after)
    logging.getLogger("app").error("failing now")
    raise ValueError("planned")


def warn(category: type[Warning] = UserWarning, text: str = "careful") -> int:
    warnings.warn(text, category, stacklevel=1)
    return 1


def write_everywhere(tag: str) -> str:
    print(f"print {tag}")
    print(f"stderr {tag}", file=sys.stderr)
    os.write(1, f"fd1 {tag}\n".encode())
    os.write(2, f"fd2 {tag}\n".encode())
    subprocess.run(["echo", f"child {tag}"], check=True)
    subprocess.run(["sh", "-c", f"echo child-err {tag} >&2"], check=True)
    return tag


def print_then_raise(text: str) -> None:
    print(text)
    print(f"err {text}", file=sys.stderr)
    raise ValueError(text)


def print_a_lot(mib: int) -> None:
    line = "x" * 1023 + "\n"
    for _ in range(mib * 1024):
        sys.stdout.write(line)
    print("the end")


class AppWarning(UserWarning):
    pass


def _call(fn, *args):
    return functools.partial(fn, *args)


# -- records -------------------------------------------------------------------------


def test_records_reach_the_parents_handler_in_order_with_task_index_and_pid(logs, alloter):
    pids = alloter.exec(*[_call(log_lines, 50, f"t{i}") for i in range(4)])
    assert len(logs.records) == 200
    for i in range(4):
        mine = [r for r in logs.records if r.getMessage().startswith(f"t{i} ")]
        assert [r.getMessage() for r in mine] == [f"t{i} {k}" for k in range(50)]
        assert {r.task_index for r in mine} == {i}
        assert {r.process for r in mine} == {pids[i]}
    assert os.getpid() not in {r.process for r in logs.records}
    first = logs.records[0]
    assert first.name == "app" and first.levelno == logging.INFO
    assert first.funcName == "log_lines" and first.pathname == __file__


def test_relay_is_on_by_default_for_alloter_too(logs):
    with Alloter() as a:
        pid = a.exec(_call(log_lines, 2))[0]
    assert logs.messages() == ["line 0", "line 1"]
    assert {r.process for r in logs.records} == {pid}


@pytest.mark.parametrize("chunksize", [1, 3, None])
def test_a_maps_records_name_the_item(logs, alloter, chunksize):
    assert alloter.map(log_item, range(20), chunksize=chunksize) == list(range(20))
    got = sorted((r.task_index, r.getMessage()) for r in logs.records)
    assert got == [(i, f"item {i}") for i in range(20)]


def test_imap_and_items_judged_one_by_one_name_the_item(logs, alloter):
    assert list(alloter.imap(log_item, range(12), chunksize=5)) == list(range(12))
    out = alloter.map(log_item_or_fail, range(12), chunksize=5, errors="return")
    assert [isinstance(v, TaskError) for v in out] == [i % 4 == 3 for i in range(12)]
    got = sorted((r.task_index, r.getMessage()) for r in logs.records)
    assert got == sorted([(i, f"item {i}") for i in range(12)] * 2)


def test_the_parents_levels_filters_and_disabled_loggers_decide(logs, alloter):
    logging.getLogger("app.db").setLevel(logging.DEBUG)
    logging.getLogger("app").addFilter(lambda r: "info" not in r.getMessage())
    logging.getLogger("noisy").disabled = True
    alloter.exec(log_levels)
    assert logs.messages() == [
        "app error",  # "app info" filtered out by the filter of app's logger
        "app.db debug",
        "app.db info",
        "app.db error",
    ]
    # A level changed between calls applies to the next call.
    logging.getLogger("app.db").setLevel(logging.ERROR)
    logging.getLogger("noisy").disabled = False
    logs.records.clear()
    alloter.exec(log_levels)
    assert logs.messages() == ["app error", "app.db error", "noisy info", "noisy error"]


def test_handlers_of_named_loggers_and_their_propagation_apply(logs, alloter):
    own = Collect()
    app = logging.getLogger("app")
    app.addHandler(own)
    app.propagate = False
    try:
        alloter.exec(_call(log_lines, 3))
    finally:
        app.removeHandler(own)
        app.propagate = True
    assert own.messages() == ["line 0", "line 1", "line 2"]
    assert logs.records == []


def test_relay_logs_false_relays_nothing(logs, alloter):
    quiet = alloter.with_options(relay_logs=False)
    quiet.exec(_call(log_lines, 3), _call(warn, AppWarning), log_levels)
    assert logs.records == []
    # The worker's own logging had them (its last resort printed the errors).
    report = quiet.with_options(capture_output=True).exec_report(log_levels)
    assert report.tasks[0].stderr == "app error\napp.db error\nnoisy error\n"
    assert logs.records == []
    alloter.exec(_call(log_lines, 1))  # the original alloter still relays
    assert logs.messages() == ["line 0"]
    with ProcessAlloter(1, relay_logs=False) as a:
        a.exec(_call(log_lines, 2))
    assert logs.messages() == ["line 0"]


@pytest.mark.parametrize("how", ["exit", "kill", "segfault"])
def test_records_of_a_task_that_then_crashes_arrive_before_the_call_returns(logs, how):
    with ProcessAlloter(1) as a, pytest.raises(WorkerCrashed) as info:
        a.exec(_call(log_then_die, how))
    assert logs.messages() == [f"before the end {i}" for i in range(3)]
    assert {r.process for r in logs.records} == {info.value.pid}
    assert {r.task_index for r in logs.records} == {0}


def test_records_of_a_task_killed_at_its_task_timeout_arrive(logs):
    with ProcessAlloter(1, task_timeout=0.3, cancel_grace=0.1) as a:
        report = a.exec_report(_call(log_then_sleep, 30))
    assert report.tasks[0].status == "timeout"
    assert logs.messages() == ["started"]


@pytest.mark.parametrize("ending", ["timeout", "sibling failed"])
def test_records_written_before_the_call_ended_arrive_before_it_returns(logs, ending):
    """Records a task wrote up to the call's end, even in its last few ms, are handed
    over before the call returns; those of its grace period come later."""
    with ProcessAlloter(2, cancel_grace=0.3) as a:
        a.exec(_tasks.pid, _tasks.pid)  # both workers up
        tasks = [_call(log_until_killed, 0.0002)]
        expected: type[Exception] = TaskError
        call = a
        if ending == "timeout":
            call = a.with_options(timeout=0.6)
            expected = ExecTimeout
        else:
            tasks.append(_call(log_then_raise, 0.6))
        started = time.time()
        with pytest.raises(expected):
            call.exec(*tasks)
        returned = len(logs.records)
        time.sleep(0.8)  # the grace passes: the worker is killed
    if ending == "timeout":
        end = started + 0.6  # the deadline is a little later still
    else:
        (failure,) = [r for r in logs.records if r.getMessage() == "failing now"]
        end = failure.created  # the failure came just after
    ticks = [r for r in logs.records if r.getMessage().startswith("tick")]
    assert len(ticks) > 100
    assert [r.getMessage() for r in ticks] == [f"tick {i}" for i in range(len(ticks))]
    late = [r for r in logs.records[returned:] if r.created <= end]
    assert late == [], f"{len(late)} records written before the end came after the call"
    assert any(r.created > end for r in logs.records[returned:]), "the grace's records"


def test_records_show_up_while_a_long_task_runs(logs, alloter):
    done = threading.Event()
    thread = threading.Thread(
        target=lambda: (alloter.exec(_call(log_then_sleep, 2.0)), done.set()), daemon=True
    )
    thread.start()
    end = time.monotonic() + 1.5
    while not logs.records and time.monotonic() < end:
        time.sleep(0.01)
    assert logs.messages() == ["started"] and not done.is_set()
    thread.join(10)
    assert done.is_set()


def test_a_stuck_parent_handler_does_not_stop_a_task_that_logs_less_than_a_pipe_holds(
    tmp_path, alloter
):
    """Records travel in batches on the worker's pipe: a task writing less than the
    pipe and the worker's journal hold never waits for the parent's handlers."""
    marker = tmp_path / "done"
    release = threading.Event()

    class Stuck(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            release.wait(10)

    def watch() -> None:
        end = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < end:
            time.sleep(0.01)
        release.set()

    handler = Stuck()
    logging.getLogger("app").addHandler(handler)
    try:
        threading.Thread(target=watch, daemon=True).start()
        started = time.monotonic()
        alloter.exec(_call(log_and_mark, 200, str(marker)))
        took = time.monotonic() - started
    finally:
        logging.getLogger("app").removeHandler(handler)
        release.set()
    assert marker.exists()
    assert took < 8, "the task waited for the stuck handler"


def log_and_mark(n: int, path: str) -> None:
    log = logging.getLogger("app")
    for i in range(n):
        log.warning("record %d", i)  # ~100 bytes a frame: 200 of them fit easily
    Path(path).write_text("done")


# -- warnings -----------------------------------------------------------------------


def test_a_tasks_warning_is_shown_in_the_parent_under_its_filters(alloter):
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        alloter.exec(_call(warn, AppWarning, "look out"))
    assert [(w.category, str(w.message)) for w in shown] == [(AppWarning, "look out")]
    assert shown[0].filename == __file__
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=AppWarning)
        alloter.exec(_call(warn, AppWarning), _call(warn, UserWarning, "other"))
    assert [str(w.message) for w in shown] == ["other"]


def test_an_error_filter_of_the_parent_makes_the_task_raise_as_it_would_here(alloter):
    with warnings.catch_warnings():
        warnings.simplefilter("error", AppWarning)
        with pytest.raises(TaskError) as info:
            alloter.exec(_call(warn, AppWarning, "now an error"))
    assert isinstance(info.value.__cause__, AppWarning)
    assert "now an error" in str(info.value)


def test_warnings_are_not_relayed_with_the_relay_off(alloter):
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        alloter.with_options(relay_logs=False).exec(_call(warn, AppWarning))
    assert shown == []


# -- captured output ------------------------------------------------------------------


def test_output_is_not_captured_by_default(alloter):
    report = alloter.exec_report(_call(write_everywhere, "a"))
    assert report.tasks[0].stdout is None and report.tasks[0].stderr is None


def test_print_os_write_and_child_processes_are_captured_apart(alloter):
    captured = alloter.with_options(capture_output=True)
    report = captured.exec_report(*[_call(write_everywhere, t) for t in "abc"])
    for task, tag in zip(report.tasks, "abc", strict=True):
        assert task.status == "ok"
        assert task.stdout == f"print {tag}\nfd1 {tag}\nchild {tag}\n"
        assert task.stderr == f"stderr {tag}\nfd2 {tag}\nchild-err {tag}\n"
    assert report.to_dict()["tasks"][0]["stdout"] == "print a\nfd1 a\nchild a\n"


def test_a_failed_tasks_error_carries_its_output_and_pickles_with_it(alloter):
    captured = alloter.with_options(capture_output=True)
    with pytest.raises(TaskError) as info:
        captured.exec(_call(print_then_raise, "doomed"))
    error = info.value
    assert (error.stdout, error.stderr) == ("doomed\n", "err doomed\n")
    back = pickle.loads(pickle.dumps(error))
    assert (back.stdout, back.stderr, back.index) == ("doomed\n", "err doomed\n", 0)
    with pytest.raises(TaskError) as info:
        alloter.exec(_call(print_then_raise, "uncaptured"))
    assert info.value.stdout is None and info.value.stderr is None


def test_the_output_of_a_task_that_crashed_or_timed_out_is_kept(logs):
    with ProcessAlloter(1, capture_output=True, task_timeout=0.5, cancel_grace=0.1) as a:
        (crashed,) = a.exec_report(_call(log_then_die, "segfault")).tasks
        (timed_out,) = a.exec_report(_call(log_then_sleep, 30)).tasks
        (fine,) = a.exec_report(_call(print, "next")).tasks  # on a new worker
    assert crashed.status == "crashed"
    assert crashed.stdout == "printed before the end\n"
    assert "Fatal Python error: Segmentation fault" in (crashed.stderr or "")
    assert crashed.error.stdout == crashed.stdout  # type: ignore[union-attr]
    assert timed_out.status == "timeout" and timed_out.stdout == "started\n"
    assert isinstance(timed_out.error, TaskTimeout) and timed_out.error.stdout == "started\n"
    assert fine.status == "ok" and fine.stdout == "next\n"


def test_an_items_error_carries_that_items_output(alloter):
    captured = alloter.with_options(capture_output=True)
    out = captured.map(log_item_or_fail, range(8), chunksize=4, errors="return")
    errors = [v for v in out if isinstance(v, TaskError)]
    assert [e.index for e in errors] == [3, 7]
    assert [e.stdout for e in errors] == ["out of 3\n", "out of 7\n"]
    with pytest.raises(TaskError) as info:
        captured.map(log_item_or_fail, range(8), chunksize=8)
    # A chunk run at once: its output up to the failing item.
    assert info.value.index == 3
    assert info.value.stdout == "out of 0\nout of 1\nout of 2\nout of 3\n"


def test_only_the_last_mib_of_a_stream_is_kept(alloter):
    report = alloter.with_options(capture_output=True).exec_report(_call(print_a_lot, 3))
    out = report.tasks[0].stdout
    assert out is not None and len(out) <= 1 << 20
    assert out.endswith("x\nthe end\n") and len(out) > (1 << 20) - 2048


# -- the plumbing ----------------------------------------------------------------------


def test_the_message_kinds_are_all_distinct():
    from alloter_mp import _sight, _worker

    kinds = [
        _worker.TASKS,
        _worker.STOP,
        _worker.RESULTS,
        _worker.INIT_FAILED,
        _worker.ITEM,
        _sight.LOGS,
        _sight.CONFIG,
        _sight.OUTPUT,
    ]
    assert len(set(kinds)) == len(kinds)


def test_options_are_call_options(alloter):
    assert alloter._caller.options.relay_logs is True
    assert alloter._caller.options.capture_output is False
    other = alloter.with_options(relay_logs=False, capture_output=True)
    assert other._caller.options.relay_logs is False
    assert other._caller.options.capture_output is True
    assert alloter._caller.options.relay_logs is True  # the original is untouched
