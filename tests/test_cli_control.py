"""Per-job control on the command line (contract section 9): ``--job-timeout``,
``--retries``, ``--report FILE --resume``, jobs that start while the input is still
arriving, and ``--trace`` (section 10), for ``alloter-mp run`` and ``alloter-mp call``.

The commands run for real in subprocesses; the helpers are those of the two
command-line test files.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from _env import with_repo
from test_cli_call import call, out_values
from test_cli_call import workdir as workdir  # the fixture: a folder with calltasks.py
from test_cli_run import assert_none_left, finish, marker, read_report, tool

from alloter_mp._batch import Batch
from alloter_mp._states import TaskStatus

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")

# A job that fails until it has been run N times: it counts its runs in a file
# named after its input ("<name>:<N>"), so a test can also count the runs.
COUNTING = (
    'name=${1%%:*}; need=${1##*:}; echo run >> "$name.runs"\n'
    'n=$(wc -l < "$name.runs"); echo "$name try $n"\n'
    '[ "$n" -ge "$need" ]\n'
)


def runs(folder: Path, name: str) -> int:
    path = folder / f"{name}.runs"
    return len(path.read_text().splitlines()) if path.exists() else 0


def trace_events(path: Path) -> tuple[list[dict[str, object]], dict[object, str]]:
    """The complete ("X") events of a trace file, and its track names by tid."""
    events = json.loads(path.read_text())
    assert isinstance(events, list)
    tracks = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    return [e for e in events if e["ph"] == "X"], tracks


# -- run: --job-timeout ----------------------------------------------------------------------


def test_run_job_timeout_ends_that_job_alone_with_keep_going(tmp_path: Path) -> None:
    mark = marker()
    report = tmp_path / "r.jsonl"
    script = f'if [ "$1" = slow ]; then sleep {mark}; true; fi; sleep 0.3; echo "done $1"'
    started = time.monotonic()
    res = tool(
        "run", "-j", "3", "--keep-going", "--job-timeout", "1", "--grace", "0.2",
        "--report", str(report), "--", "sh", "-c", script, "sh", ":::", "a", "slow", "b",
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert res.returncode == 124, res.stderr  # the first failure in input order timed out
    assert res.stdout == "done a\ndone b\n"
    assert "--job-timeout" in res.stderr
    assert_none_left(mark)
    lines = read_report(report)
    assert [line["status"] for line in lines] == ["ok", "timeout", "ok"]
    assert lines[1]["exit_code"] == -15
    assert lines[1]["attempts"] == 1
    # Ended at its own deadline plus the grace (slack for a loaded machine).
    assert 1.0 <= lines[1]["wall_s"] < 1.0 + 0.2 + 1.5
    assert elapsed < 20


def test_run_job_timeout_without_keep_going_ends_the_run(tmp_path: Path) -> None:
    mark = marker()
    report = tmp_path / "r.jsonl"
    res = tool(
        "run", "-j", "2", "--job-timeout", "0.5", "--grace", "0.2", "--report", str(report),
        "--", "sh", "-c", f"sleep {mark}; true", ":::", "a", "b", "c",
    )  # fmt: skip
    assert res.returncode == 124, res.stderr
    assert_none_left(mark)
    statuses = [line["status"] for line in read_report(report)]
    # Both started at once: the first to be ended decides, the other is killed or
    # times out too; the third never starts.
    assert statuses[2] == "skipped"
    assert "timeout" in statuses[:2]
    assert set(statuses[:2]) <= {"timeout", "killed"}


# -- run: --retries ----------------------------------------------------------------------------


def test_run_retries_until_success_and_counts_attempts(tmp_path: Path) -> None:
    report = tmp_path / "r.jsonl"
    res = tool(
        "run", "-j", "2", "--retries", "2", "--report", str(report), "--",
        "sh", "-c", COUNTING, "sh", ":::", "once:1", "thrice:3", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert (runs(tmp_path, "once"), runs(tmp_path, "thrice")) == (1, 3)
    lines = read_report(report)
    assert [line["status"] for line in lines] == ["ok", "ok"]
    assert [line["attempts"] for line in lines] == [1, 3]
    # Every attempt's output, one attempt after the other, never mixed with others.
    assert res.stdout.splitlines() == ["once try 1", "thrice try 1", "thrice try 2", "thrice try 3"]


def test_run_retries_run_out(tmp_path: Path) -> None:
    report = tmp_path / "r.jsonl"
    res = tool(
        "run", "--retries", "1", "--report", str(report), "--",
        "sh", "-c", COUNTING, "sh", ":::", "never:9", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 1
    assert runs(tmp_path, "never") == 2
    (line,) = read_report(report)
    assert (line["status"], line["attempts"], line["exit_code"]) == ("failed", 2, 1)


def test_run_a_failure_that_will_be_retried_ends_nothing(tmp_path: Path) -> None:
    report = tmp_path / "r.jsonl"
    script = f'if [ "$1" = steady ]; then sleep 1; echo steady; else {COUNTING}fi'
    res = tool(
        "run", "-j", "2", "--retries", "1", "--report", str(report), "--",
        "sh", "-c", script, "sh", ":::", "steady", "flaky:2", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert [line["status"] for line in read_report(report)] == ["ok", "ok"]
    assert "steady" in res.stdout


def test_run_a_command_that_cannot_start_is_not_retried(tmp_path: Path) -> None:
    report = tmp_path / "r.jsonl"
    res = tool(
        "run", "--retries", "3", "--report", str(report), "--", "no-such-cmd-xyz", ":::", "a"
    )
    assert res.returncode == 127
    (line,) = read_report(report)
    assert (line["status"], line["attempts"], line["exit_code"]) == ("failed", 1, 127)


# -- run: --report --resume ---------------------------------------------------------------------


def test_run_resume_runs_only_what_did_not_succeed(tmp_path: Path) -> None:
    report = tmp_path / "r.jsonl"
    script = 'echo run >> "$1.runs"; [ -e "$1.ok" ] && echo "ok $1"'
    args = ["run", "--keep-going", "--report", str(report), "--resume", "--"]
    args += ["sh", "-c", script, "sh", ":::", "a", "b", "c"]
    (tmp_path / "b.ok").touch()
    first = tool(*args, cwd=tmp_path)
    assert first.returncode == 1
    assert [line["status"] for line in read_report(report)] == ["failed", "ok", "failed"]

    (tmp_path / "a.ok").touch()
    second = tool(*args, cwd=tmp_path)
    assert second.returncode == 1  # c still fails
    assert second.stdout == "ok a\n"
    assert [runs(tmp_path, n) for n in "abc"] == [2, 1, 2]
    lines = read_report(report)  # appended: the first run's three lines, then two
    assert [(line["input"], line["status"]) for line in lines[3:]] == [("a", "ok"), ("c", "failed")]
    assert "1 input(s) already done" in second.stderr

    (tmp_path / "c.ok").touch()
    assert tool(*args, cwd=tmp_path).returncode == 0
    nothing = tool(*args, cwd=tmp_path)  # every input's last line says ok
    assert (nothing.returncode, nothing.stdout) == (0, "")
    assert [runs(tmp_path, n) for n in "abc"] == [2, 1, 3]


def test_run_resume_compares_the_command_too(tmp_path: Path) -> None:
    report = tmp_path / "r.jsonl"
    assert tool("run", "--report", str(report), "--", "echo", "one", ":::", "x").returncode == 0
    res = tool("run", "--report", str(report), "--resume", "--", "echo", "two", ":::", "x")
    assert res.stdout == "two x\n"  # another command: not done yet


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--resume", "--", "echo", ":::", "a"],
        ["run", "--retries", "-1", "--", "echo", ":::", "a"],
        ["run", "--retries", "two", "--", "echo", ":::", "a"],
        ["run", "--job-timeout", "0", "--", "echo", ":::", "a"],
        ["run", "--trace", "/nonexistent-dir/x/t.json", "--", "echo", ":::", "a"],
        ["call", "--resume", "operator:neg"],
    ],
)
def test_bad_control_arguments_exit_2(args: list[str]) -> None:
    res = tool(*args)
    assert res.returncode == 2
    assert len(res.stderr.splitlines()) == 1 and "error:" in res.stderr
    assert "Traceback" not in res.stderr


def test_help_shows_the_new_options_with_examples() -> None:
    for command in ("run", "call"):
        text = tool(command, "--help").stdout
        for option in ("--job-timeout", "--retries", "--report", "--resume", "--trace"):
            assert text.count(option) >= 2, (command, option)  # the option and an example


# -- run: an input that is still arriving ---------------------------------------------------------


def test_run_starts_jobs_before_the_input_ends(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "alloter_mp", "run", "--", "echo", "got", "{}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=with_repo(),
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        for word in ("first", "second"):
            proc.stdin.write(f"{word}\n".encode())
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], 20)
            assert ready, f"no job ran for {word!r} while the input stayed open"
            assert proc.stdout.readline() == f"got {word}\n".encode()
        code, out, err = finish(proc)  # closes the input: the run ends
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (code, out, err) == (0, "", "")


def test_run_on_an_endless_input_keeps_flat_memory() -> None:
    # `yes` never ends: the run can only end through its timeout, and must not read
    # the input to its end (it has none) or hold it in memory.
    yes = subprocess.Popen(["yes", "line"], stdout=subprocess.PIPE)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "alloter_mp", "run", "-j", "2", "--timeout", "4", "--", "true"],
            stdin=yes.stdout,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=with_repo(),
        )
        assert yes.stdout is not None
        yes.stdout.close()
        peak = 0
        while proc.poll() is None:
            try:
                peak = max(peak, psutil.Process(proc.pid).memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.1)
        code, _, err = finish(proc)
    finally:
        yes.kill()
        yes.wait()
    assert code == 124, err
    assert "timed out" in err
    assert 0 < peak < 100 * 2**20


def test_the_engines_batch_keeps_only_open_slots() -> None:
    batch = Batch([], open_input=True, keep_going=True, forget_settled=True)
    for n in range(1000):
        assert batch.append(n) == n
        (slot,) = batch.take(1)
        batch.task_returned(slot, n)
    batch.append("last")
    assert len(batch._live) == 1 and batch.slots == []
    batch.close_input()
    (slot,) = batch.take(1)
    batch.task_returned(slot, None)
    assert batch.settled.is_set() and batch.outcome is None
    assert slot.status is TaskStatus.OK and not batch._live


# -- run: --trace -----------------------------------------------------------------------------------


def test_run_trace_has_an_event_per_attempt_on_job_slots(tmp_path: Path) -> None:
    trace = tmp_path / "t.json"
    script = 'sleep 0.2; [ "$1" != bad ]'
    res = tool(
        "run", "-j", "2", "--keep-going", "--trace", str(trace), "--",
        "sh", "-c", script, "sh", ":::", "a", "bad", "c", "d",
    )  # fmt: skip
    assert res.returncode == 1
    events, tracks = trace_events(trace)
    assert len(events) == 4
    assert sorted(tracks.values()) == ["job slot 1", "job slot 2"]
    by_input = {e["args"]["input"]: e for e in events}  # type: ignore[index]
    assert by_input["bad"]["cat"] == "failed" and by_input["a"]["cat"] == "ok"
    assert str(by_input["bad"]["name"]).startswith("#1 failed")
    for event in events:
        assert event["dur"] >= 0.15e6  # type: ignore[operator]
        assert event["tid"] in tracks


# -- call ---------------------------------------------------------------------------------------------

FLAKY = """
import os

def flaky(name, need):
    path = name + ".runs"
    with open(path, "a") as f:
        f.write("run\\n")
    with open(path) as f:
        n = len(f.read().splitlines())
    if n < need:
        raise RuntimeError(f"{name}: attempt {n} of {need}")
    return [name, n]
"""


@pytest.mark.parametrize("keep_going", [False, True])
def test_call_job_timeout(workdir: Path, keep_going: bool) -> None:
    flags = ["--keep-going"] if keep_going else []
    res = call(
        *flags,
        "-j",
        "2",
        "--job-timeout",
        "0.5",
        "calltasks:nap",
        lines=["0", "30", "0.1"],
        cwd=workdir,
    )
    assert res.returncode == 124, res.stderr
    assert "TaskTimeout" in res.stderr
    if keep_going:
        timeout = out_values(res)[1]
        assert isinstance(timeout, dict) and timeout["error"]["type"] == "TaskTimeout"
        assert out_values(res)[::2] == [0, 0.1]


def test_call_retries_and_report_attempts(workdir: Path) -> None:
    (workdir / "flakytasks.py").write_text(FLAKY)
    report = workdir / "r.jsonl"
    lines = [json.dumps(["a", 1]), json.dumps(["b", 3])]
    res = call(
        "--retries", "2", "--report", str(report), "flakytasks:flaky", lines=lines, cwd=workdir
    )
    assert res.returncode == 0, res.stderr
    assert out_values(res) == [["a", 1], ["b", 3]]
    by_index = {line["index"]: line for line in read_report(report)}
    assert [by_index[i]["attempts"] for i in (0, 1)] == [1, 3]
    assert [by_index[i]["status"] for i in (0, 1)] == ["ok", "ok"]
    assert by_index[1]["result"] == ["b", 3] and by_index[1]["function"] == "flakytasks:flaky"


def test_call_resume_calls_only_what_failed_and_replays_the_rest(workdir: Path) -> None:
    report = workdir / "r.jsonl"
    lines = ["1", "3", "5"]
    args = ["--keep-going", "--report", str(report), "--resume", "calltasks:boom"]
    first = call(*args, lines=lines, cwd=workdir)
    assert first.returncode == 1
    error = {"error": {"type": "ValueError", "message": "bad input 3"}}
    assert out_values(first) == [1, error, 5]
    assert len(read_report(report)) == 3

    second = call(*args, lines=lines, cwd=workdir)
    assert out_values(second) == out_values(first)  # the done inputs are replayed
    assert second.returncode == 1
    assert second.stderr.count("Traceback") == 1  # only "3" was called again
    appended = read_report(report)[3:]
    assert [(line["input"], line["status"]) for line in appended] == [(3, "failed")]


def test_call_trace_has_an_event_per_input_on_worker_tracks(workdir: Path) -> None:
    trace = workdir / "t.json"
    res = call("-j", "2", "--trace", str(trace), "calltasks:nap", lines=["0.2"] * 5, cwd=workdir)
    assert res.returncode == 0, res.stderr
    events, tracks = trace_events(trace)
    assert len(events) == 5
    assert all(e["cat"] == "ok" for e in events)
    assert 1 <= len(tracks) <= 2
    assert all(name.startswith("worker ") for name in tracks.values())
    pids = {int(name.split()[1]) for name in tracks.values()}
    assert os.getpid() not in pids
